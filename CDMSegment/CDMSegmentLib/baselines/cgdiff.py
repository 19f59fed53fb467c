"""CG-Diff (Wolleb et al., "Diffusion Models for Medical Anomaly Detection", MICCAI 2022): the paper's strongest baseline.

1. Encode the slice with deterministic DDIM *inversion* (DDIM run backwards) up to level L.
2. Decode it with deterministic DDIM, guided by the noise-aware classifier towards the
   normal class: the lesion is "healed" and the rest reconstructed.
3. The anomaly map is |x_0 - x_rec| summed over channels.

Wolleb et al. use L = 500 of T = 1000 (linear betas) and every timestep in both directions,
with classifier scale s = 100 (their repository's flags). The level is chosen by alpha_bar,
as the CDM's, so any T works; ``steps`` spaces the timesteps evenly between 0 and L, so fewer
steps than L trade fidelity of the inversion for time (2 x steps network evaluations plus
``steps`` classifier gradients per slice: the paper's setting costs 1000 + 500).
Here the diffusion model is the class-conditional one, conditioned on the normal class
throughout, which is what the guided decoding steers towards anyway.
"""

from dataclasses import dataclass
from typing import Callable, List

import torch

from ..core.cdm import classifier_log_prob_grad
from ..core.errors import CDMSegmentError
from ..core.schedule import NoiseSchedule

# alpha_bar at t = 499 of the linear T = 1000 schedule: Wolleb et al.'s L = 500.
PAPER_LEVEL = 0.0786


@dataclass(frozen=True)
class CGDiffParams:
    """noise_level: alpha_bar at L; steps: DDIM steps each way; guidance_scale: s."""

    noise_level: float = PAPER_LEVEL
    steps: int = 500
    guidance_scale: float = 100.0


def cgdiff_timesteps(t_end: int, steps: int) -> List[int]:
    """[-1, t_1, ..., t_steps = t_end]: -1 is the clean image, the others evenly spaced timesteps."""
    if steps < 1:
        raise CDMSegmentError(f"CG-Diff needs at least 1 DDIM step, got {steps}")
    if steps > t_end + 1:
        raise CDMSegmentError(f"CG-Diff cannot take {steps} steps to level L = {t_end}: at most L + 1; "
                              "lower the steps or raise the level")
    return [-1] + [round(k * (t_end + 1) / steps) - 1 for k in range(1, steps + 1)]


def cgdiff_heatmap(network, schedule: NoiseSchedule, classifier, x_0: torch.Tensor, *, t_end: int, steps: int = 500,
                   guidance_scale: float = 100.0, normal_class: int = 0) -> torch.Tensor:
    """Anomaly map |x_0 - x_rec| summed over channels: (B, C, H, W) -> (B, H, W), >= 0.

    network: eps_theta(x_t, t, class_emb) with ``class_embedding``; classifier(x_t, t) -> logits.
    t_end: L. The network is evaluated at t = 0 for the first inversion step from the clean image.
    """
    if not 0 < t_end < schedule.num_timesteps:
        raise CDMSegmentError(f"the CG-Diff level L must lie in 1..{schedule.num_timesteps - 1}, got {t_end}")
    times = cgdiff_timesteps(t_end, steps)
    b = x_0.shape[0]
    device = x_0.device

    def at(t: int) -> torch.Tensor:
        return torch.full((b,), t, device=device, dtype=torch.long)

    emb = network.class_embedding(at(normal_class))
    x = x_0
    # 1. DDIM inversion: x_{t_k} -> x_{t_{k+1}} with eps_theta(x_{t_k}, t_k) (Song et al. eq. 12, run backwards)
    for t, t_next in zip(times[:-1], times[1:]):
        eps = network(x, at(max(t, 0)), emb).to(x.dtype)
        x = schedule.ddim_step(eps, x, at(t), at(t_next))
    # 2. guided DDIM decoding towards the normal class (Dhariwal & Nichol eq. 14)
    towards_normal = torch.zeros(b, device=device)
    for t, t_prev in zip(times[:0:-1], times[-2::-1]):
        eps = network(x, at(t), emb).to(x.dtype)
        if guidance_scale != 0:
            grad = classifier_log_prob_grad(classifier, x, at(t), towards_normal, normal_class, normal_class)
            eps = eps - (1 - schedule.alpha_bar(t)).sqrt().item() * guidance_scale * grad
        x = schedule.ddim_step(eps, x, at(t), at(t_prev))
    # 3. the anomaly map
    return (x_0 - x).abs().sum(dim=1)


def build_cgdiff_method(model, classifier, params: CGDiffParams,
                        normal_class: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The registry's interface: fn(x_0 (B, C, H, W), slice_ids (B,)) -> (B, H, W); model/classifier: LoadedModel."""
    schedule = model.schedule()
    t_end = schedule.timestep_for_alpha_bar(params.noise_level)
    cgdiff_timesteps(t_end, params.steps)  # reject impossible settings before the first batch

    def heatmap(x_0: torch.Tensor, slice_ids: torch.Tensor) -> torch.Tensor:
        return cgdiff_heatmap(model.network, schedule, classifier.network, x_0, t_end=t_end, steps=params.steps,
                              guidance_scale=params.guidance_scale, normal_class=normal_class)

    return heatmap

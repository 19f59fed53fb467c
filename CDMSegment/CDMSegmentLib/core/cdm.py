"""The CDM heatmap (Hu et al. 2023, Algorithm 1) and its classifier-guided variant CG-CDM.

The heatmap is a finite difference of the denoised image with respect to the class
condition: two copies of one noisy slice are denoised with deterministic DDIM,
one conditioned on f(y1), the other on tau f(y1) + (1 - tau) f(y0); their signed
difference, divided by (1 - tau), is accumulated after every step.
"""

from typing import Optional

import torch

from .errors import CDMSegmentError
from .schedule import NoiseSchedule


def check_cdm_parameters(t_start: int, steps: int, tau: float, schedule: NoiseSchedule) -> None:
    """Reject settings the algorithm cannot run, with the valid range in the message."""
    if not 0 <= tau < 1:
        raise CDMSegmentError(f"tau must be in [0, 1) (1 would divide by zero), got {tau}")
    if steps < 1:
        raise CDMSegmentError(f"the number of DDIM steps R must be at least 1, got {steps}")
    if not 0 < t_start < schedule.num_timesteps:
        raise CDMSegmentError(f"the noise level Q must lie in 1..{schedule.num_timesteps - 1}, got {t_start}")
    if steps > t_start + 1:
        raise CDMSegmentError(f"R = {steps} steps cannot start at Q = {t_start}: R must be at most Q + 1")


def classifier_log_prob_grad(classifier, x_t: torch.Tensor, t: torch.Tensor, weights: torch.Tensor,
                             target_class: int, normal_class: int) -> torch.Tensor:
    """grad_x [w log p(y1 | x_t) + (1 - w) log p(y0 | x_t)] for each sample; weights w: (B,)."""
    with torch.enable_grad():
        x = x_t.detach().float().requires_grad_(True)
        log_p = torch.log_softmax(classifier(x, t).float(), dim=1)
        objective = weights * log_p[:, target_class] + (1 - weights) * log_p[:, normal_class]
        (grad,) = torch.autograd.grad(objective.sum(), x)
    return grad.to(x_t.dtype)


def cdm_heatmap(network, schedule: NoiseSchedule, x_0: torch.Tensor, *, t_start: int, steps: int = 10,
                tau: float = 0.95, target_class: int = 1, normal_class: int = 0,
                noise: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None,
                classifier=None, guidance_scale: float = 0.0) -> torch.Tensor:
    """Signed CDM map for a batch of slices.

    network: eps_theta with ``network(x_t, t, class_emb)`` and ``network.class_embedding(y)``.
    x_0: (B, C, H, W) in [-1, 1]. t_start: Q. steps: R (2R network evaluations per slice,
    both branches in one batch). noise: (B, C, H, W) eps for q_sample, else drawn from
    ``generator``. classifier: optional noise-aware ``classifier(x_t, t) -> logits``; with it
    both branches are guided (CG-CDM) with scale ``guidance_scale``, branch A towards y1,
    branch B towards the same tau-mix of y1 and y0 as its embedding.
    Returns (B, H, W): the accumulated difference summed over channels (positive where
    the target class makes the image brighter).
    """
    check_cdm_parameters(t_start, steps, tau, schedule)
    b = x_0.shape[0]
    device = x_0.device
    if noise is None:
        noise = torch.randn(x_0.shape, generator=generator, device=device, dtype=x_0.dtype)
    t0 = torch.full((b,), t_start, device=device, dtype=torch.long)
    # 1. noise the slice to level Q in closed form
    x_t = schedule.q_sample(x_0, t0, noise)
    y1 = torch.full((b,), target_class, device=device, dtype=torch.long)
    y0 = torch.full((b,), normal_class, device=device, dtype=torch.long)
    f1 = network.class_embedding(y1)
    f0 = network.class_embedding(y0)
    # 2. branch A on f(y1), branch B on tau f(y1) + (1 - tau) f(y0), stacked as one batch
    emb = torch.cat([f1, tau * f1 + (1 - tau) * f0])
    weights = torch.cat([torch.ones(b, device=device), torch.full((b,), tau, device=device)])
    x = torch.cat([x_t, x_t])
    accumulated = torch.zeros_like(x_0)
    for t in range(t_start, t_start - steps, -1):
        tt = torch.full((2 * b,), t, device=device, dtype=torch.long)
        eps = network(x, tt, emb).to(x.dtype)
        if classifier is not None and guidance_scale != 0:
            # classifier guidance (Dhariwal & Nichol eq. 14): eps_hat = eps - sqrt(1 - alpha_bar) s grad log p
            grad = classifier_log_prob_grad(classifier, x, tt, weights, target_class, normal_class)
            eps = eps - (1 - schedule.alpha_bar(t)).sqrt().item() * guidance_scale * grad
        x = schedule.ddim_step(eps, x, tt, tt - 1)
        # 3. signed one-sided finite difference w.r.t. the condition
        x_a, x_b = x.chunk(2)
        accumulated = accumulated + (x_a - x_b) / (1 - tau)
    # 4. sum over channels
    return accumulated.sum(dim=1)

"""The noise schedule: alpha_bar(t), the closed-form forward process and the DDIM step.

Pure arithmetic on tensors; it never holds a network (the sampler receives one).
Notation as in Ho et al. 2020 and Song et al. 2021 (DDIM): ``alphas_cumprod`` is
alpha_bar, ``x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps``.
"""

import math

import torch

from .errors import CDMSegmentError
from .model_metadata import SCHEDULES


class NoiseSchedule:
    """alpha_bar for t = 0 .. T-1 (float64), linear betas (Ho et al.) or cosine (Nichol & Dhariwal).

    The linear betas are scaled by 1000 / T, as in improved-diffusion, so that the
    paper's T = 4000 and the usual T = 1000 describe the same continuous process.
    """

    def __init__(self, kind: str = "linear", num_timesteps: int = 1000):
        if kind not in SCHEDULES:
            raise CDMSegmentError(f"unknown noise schedule {kind!r}; expected one of {', '.join(SCHEDULES)}")
        if num_timesteps < 2:
            raise CDMSegmentError(f"the schedule needs at least 2 timesteps, got {num_timesteps}")
        self.kind = kind
        self.num_timesteps = int(num_timesteps)
        if kind == "linear":
            scale = 1000.0 / num_timesteps
            # clamped so that very short schedules (T < 50) still have alpha > 0
            betas = torch.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=torch.float64).clamp(max=0.999)
        else:
            s = 0.008
            steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
            f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
            betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
        self.betas = betas
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)

    def alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        """alpha_bar_t for integer t (any shape); t = -1 means the clean image (alpha_bar = 1)."""
        t = torch.as_tensor(t, dtype=torch.long).cpu()
        padded = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod])
        return padded[t + 1]

    def timestep_for_alpha_bar(self, alpha_bar: float) -> int:
        """The t whose alpha_bar is closest to ``alpha_bar``: the noise level is chosen by alpha_bar, not by t."""
        if not 0.0 < alpha_bar < 1.0:
            raise CDMSegmentError(f"noise level alpha_bar must lie strictly between 0 and 1, got {alpha_bar}")
        return int(torch.argmin((self.alphas_cumprod - alpha_bar).abs()))

    def q_sample(self, x_0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps (Ho et al. eq. 4). x_0: (B, C, H, W), t: (B,)."""
        a = _per_sample(self.alpha_bar(t), x_0)
        return a.sqrt() * x_0 + (1 - a).sqrt() * eps

    def predict_x0(self, eps: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """pred_x0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)."""
        a = _per_sample(self.alpha_bar(t), x_t)
        return (x_t - (1 - a).sqrt() * eps) / a.sqrt()

    def ddim_step(self, eps: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, t_prev: torch.Tensor) -> torch.Tensor:
        """Deterministic DDIM (eta = 0, Song et al. eq. 12) from t to t_prev; t_prev = -1 lands on x_0.

        Also runs backwards (t_prev > t): that is DDIM inversion, used by CG-Diff.
        """
        pred_x0 = self.predict_x0(eps, x_t, t)
        a_prev = _per_sample(self.alpha_bar(t_prev), x_t)
        return a_prev.sqrt() * pred_x0 + (1 - a_prev).sqrt() * eps


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Broadcast per-sample scalars (B,) or () over (B, C, H, W) in ``like``'s dtype and device."""
    v = values.to(device=like.device, dtype=like.dtype)
    return v.reshape(-1, *([1] * (like.dim() - 1))) if v.dim() else v

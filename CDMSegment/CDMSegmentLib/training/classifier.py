"""The noise-aware slice classifier p(y | x_t, t): guidance for CG-CDM and CG-Diff, and at t = 0 the CAM baselines' classifier.

It is the encoder half of the conditional UNet (same residual blocks, same timestep
embedding, no class embedding) followed by GroupNorm-SiLU, global average pooling and a
linear layer, as the classifier of Dhariwal & Nichol's guided-diffusion (with mean instead
of attention pooling). It is trained on the same image-level labels as the diffusion model,
over the full range of t, so its gradient is meaningful at every noise level.

``features`` ends at the last convolution of the encoder: that is the CAM target layer.
The split into ``features`` and ``classify_features`` keeps that layer reachable in a
TorchScript model file, where forward hooks on inner modules do not run.
"""

from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .train import TrainConfig, load_checkpoint, train_network
from ..core.unet import UNetConfig, encoder_levels, timestep_embedding


class NoiseAwareClassifier(nn.Module):
    """logits(x_t, t): x_t (B, C, H, W) in [-1, 1], t (B,) integer -> (B, num_classes).

    Uses of ``UNetConfig``: in_channels, num_classes, base_channels, channel_mults,
    blocks_per_level, attention_levels/heads, dropout, groups (the decoder is absent).
    """

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        ch = [cfg.base_channels * m for m in cfg.channel_mults]
        emb_dim = 4 * cfg.base_channels
        self.time_dim = cfg.base_channels
        self.time_mlp = nn.Sequential(nn.Linear(cfg.base_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.stem = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down, self.downsample, _ = encoder_levels(cfg, emb_dim)
        c_prev = ch[-1]
        self.norm = nn.GroupNorm(cfg.groups, c_prev)
        self.linear = nn.Linear(c_prev, cfg.num_classes)

    @torch.jit.export
    def features(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The last encoder feature map (B, C_last, H / 2**(levels-1), W / 2**(levels-1)): the CAM target layer."""
        emb = self.time_mlp(timestep_embedding(t, self.time_dim).to(x.dtype))
        h = self.stem(x)
        for level, down in zip(self.down, self.downsample):
            h = down(level(h, emb))
        return h

    @torch.jit.export
    def classify_features(self, h: torch.Tensor) -> torch.Tensor:
        """Feature map (B, C_last, h, w) -> logits (B, num_classes)."""
        return self.linear(F.silu(self.norm(h)).mean(dim=(2, 3)))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.classify_features(self.features(x, t))


def classifier_loss(model, net, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the image-level label on the noisy slice (eps is not a target here)."""
    return F.cross_entropy(model(x_t, t).float(), y)


def train_classifier(images: torch.Tensor, labels: torch.Tensor, cfg: TrainConfig, run_dir: Path,
                     progress: bool = True, log: Callable[[str], None] = print,
                     stop_after: Optional[int] = None) -> Path:
    """Train the noise-aware classifier with the diffusion model's loop (same batches, t and eps per step).

    images: (N, C, S, S) uint8 or float in [-1, 1]; labels: (N,) image-level class per slice.
    cfg.unet describes the encoder. Writes and resumes ``run_dir/checkpoint.pt``; returns its path.
    """
    return train_network(lambda: NoiseAwareClassifier(cfg.unet), classifier_loss, images, labels, cfg, run_dir,
                         kind="classifier", progress=progress, log=log, stop_after=stop_after)


def load_classifier_checkpoint(path: Path, weights: str = "ema"):
    """-> (NoiseAwareClassifier on the CPU, TrainConfig, checkpoint dict)."""
    return load_checkpoint(path, weights, kind="classifier", build=NoiseAwareClassifier)

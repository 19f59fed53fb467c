"""The class-conditional epsilon-predicting UNet.

The class embedding f(y) is added to the timestep embedding, and their sum reaches
every residual block through a scale-and-shift of its normalised features (as in
Dhariwal & Nichol's guided-diffusion, the paper's backbone). The network takes the
class *embedding* rather than the label, because the CDM evaluates it at
interpolated embeddings ``tau f(y1) + (1 - tau) f(y0)``.
"""

import math
from dataclasses import asdict, dataclass
from typing import List, Tuple

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class UNetConfig:
    in_channels: int = 1
    num_classes: int = 2
    base_channels: int = 32
    channel_mults: Tuple[int, ...] = (1, 2, 2, 4)
    blocks_per_level: int = 1
    attention_levels: Tuple[int, ...] = (3,)  # level indices (0 = full resolution) with self-attention
    attention_heads: int = 4
    dropout: float = 0.0
    groups: int = 8

    def to_dict(self) -> dict:
        return asdict(self)

    def __post_init__(self):
        # tuples whatever the caller passed (a JSON list, a parsed argument), so configs compare equal
        self.channel_mults = tuple(self.channel_mults)
        self.attention_levels = tuple(self.attention_levels)

    @classmethod
    def from_dict(cls, d: dict) -> "UNetConfig":
        return cls(**d)


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps t: (B,) -> (B, dim) (Vaswani et al.)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice; the conditioning embedding scales and shifts the second norm."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int, groups: int, dropout: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * c_out)
        self.norm2 = nn.GroupNorm(groups, c_out)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class Attention(nn.Module):
    """Multi-head self-attention over the pixels of a feature map."""

    def __init__(self, channels: int, heads: int, groups: int):
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w).unbind(1)
        # written out rather than F.scaled_dot_product_attention: TorchScript records every argument
        # of a call, and SDPA gained arguments in later torch releases, which older ones cannot load
        weights = torch.softmax(torch.einsum("bhdi,bhdj->bhij", q, k) * (q.shape[2] ** -0.5), dim=-1)
        a = torch.einsum("bhij,bhdj->bhdi", weights, v)
        return x + self.out(a.reshape(b, c, h, w))


class Level(nn.Module):
    """Residual blocks (with optional attention after each) at one resolution."""

    def __init__(self, c_in: int, c_out: int, n: int, emb_dim: int, cfg: UNetConfig, attention: bool):
        super().__init__()
        self.blocks = nn.ModuleList(
            [ResBlock(c_in if i == 0 else c_out, c_out, emb_dim, cfg.groups, cfg.dropout) for i in range(n)])
        self.attns = nn.ModuleList(
            [Attention(c_out, cfg.attention_heads, cfg.groups) if attention else nn.Identity() for _ in range(n)])

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for block, attn in zip(self.blocks, self.attns):
            x = attn(block(x, emb))
        return x


def encoder_levels(cfg: UNetConfig, emb_dim: int) -> Tuple[nn.ModuleList, nn.ModuleList, List[int]]:
    """The contracting path shared by the UNet and the noise-aware classifier: a Level per resolution
    and a stride-2 conv after each but the last. Returns (levels, downsamples, channels per level)."""
    ch = [cfg.base_channels * m for m in cfg.channel_mults]
    down, downsample = nn.ModuleList(), nn.ModuleList()
    c_prev = ch[0]
    for i, c in enumerate(ch):
        down.append(Level(c_prev, c, cfg.blocks_per_level, emb_dim, cfg, i in cfg.attention_levels))
        downsample.append(nn.Conv2d(c, c, 3, stride=2, padding=1) if i < len(ch) - 1 else nn.Identity())
        c_prev = c
    return down, downsample, ch


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 conv (no checkerboard artefacts of transposed convs)."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # repeat_interleave, not F.interpolate: a scripted interpolate call carries arguments newer
        # torch releases added, so a model file made with them would not load in older ones
        return self.conv(x.repeat_interleave(2, dim=-2).repeat_interleave(2, dim=-1))


class ConditionalUNet(nn.Module):
    """eps_theta(x_t, t, f(y)): x_t (B, C, H, W), t (B,) integer, class_emb (B, E) -> eps (B, C, H, W).

    Any H, W: the input is padded to a multiple of 2**(levels-1) and the output cropped back.
    """

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.time_dim = cfg.base_channels
        ch = [cfg.base_channels * m for m in cfg.channel_mults]
        emb_dim = 4 * cfg.base_channels
        self.emb_dim = emb_dim
        self.multiple = 2 ** (len(ch) - 1)
        self.time_mlp = nn.Sequential(nn.Linear(cfg.base_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.class_emb = nn.Embedding(cfg.num_classes, emb_dim)
        self.stem = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down, self.downsample, _ = encoder_levels(cfg, emb_dim)
        c_prev = ch[-1]
        self.mid = Level(c_prev, c_prev, 2, emb_dim, cfg, True)
        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for i in reversed(range(len(ch))):
            self.up.append(Level(c_prev + ch[i], ch[i], cfg.blocks_per_level, emb_dim, cfg, i in cfg.attention_levels))
            self.upsample.append(Upsample(ch[i], ch[i - 1]) if i > 0 else nn.Identity())
            c_prev = ch[i - 1] if i > 0 else ch[i]
        self.head = nn.Sequential(nn.GroupNorm(cfg.groups, ch[0]), nn.SiLU(), nn.Conv2d(ch[0], cfg.in_channels, 3, padding=1))
        nn.init.zeros_(self.head[-1].weight)
        nn.init.zeros_(self.head[-1].bias)

    @torch.jit.export
    def class_embedding(self, y: torch.Tensor) -> torch.Tensor:
        """f(y): (B,) integer labels -> (B, E)."""
        return self.class_emb(y)

    def forward(self, x: torch.Tensor, t: torch.Tensor, class_emb: torch.Tensor) -> torch.Tensor:
        h_in, w_in = x.shape[-2], x.shape[-1]
        pad_h = (self.multiple - h_in % self.multiple) % self.multiple
        pad_w = (self.multiple - w_in % self.multiple) % self.multiple
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h), mode="reflect" if min(h_in, w_in) > max(pad_h, pad_w) else "replicate")
        emb = self.time_mlp(timestep_embedding(t, self.time_dim).to(x.dtype)) + class_emb.to(x.dtype)
        h = self.stem(x)
        skips: List[torch.Tensor] = []
        for level, down in zip(self.down, self.downsample):
            h = level(h, emb)
            skips.append(h)
            h = down(h)
        h = self.mid(h, emb)
        for level, up in zip(self.up, self.upsample):
            h = level(torch.cat([h, skips.pop()], dim=1), emb)
            h = up(h)
        return self.head(h)[..., :h_in, :w_in]

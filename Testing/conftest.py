"""Shared fixtures: tiny networks and model files, made in seconds on the CPU."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "CDMSegment"))

from CDMSegmentLib.export import diffusion_metadata  # noqa: E402
from CDMSegmentLib.modelfile import save_model  # noqa: E402
from CDMSegmentLib.train import TrainConfig  # noqa: E402
from CDMSegmentLib.unet import ConditionalUNet, UNetConfig  # noqa: E402

TINY_UNET = UNetConfig(base_channels=8, channel_mults=(1, 2), attention_levels=(1,), groups=4)


def make_tiny_model_file(path: Path, *, image_size: int = 32, modalities=("flair",), defaults=None, seed: int = 0):
    """An untrained but valid diffusion model file (weights random, output head non-zero)."""
    torch.manual_seed(seed)
    cfg = TrainConfig(unet=UNetConfig(**{**TINY_UNET.to_dict(), "in_channels": len(modalities)}))
    net = ConditionalUNet(cfg.unet)
    torch.nn.init.normal_(net.head[-1].weight, std=0.05)
    meta = diffusion_metadata(cfg, name="tiny-test", version="0", image_size=image_size, modalities=modalities,
                              class_names=["normal", "tumour"], training={"data": "none (test fixture)"},
                              defaults=defaults or {"noise_level": 0.9, "steps": 2, "tau": 0.0, "noise_draws": 1})
    return save_model(net, meta, path)


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("models") / "tiny.pt"
    make_tiny_model_file(path)
    return path

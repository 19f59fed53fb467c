"""Choosing where the networks run: CUDA when there is one, else the CPU, always saying which."""

from typing import Callable

import torch

from .errors import CDMSegmentError


def choose_device(device: str = "auto", log: Callable[[str], None] = print) -> torch.device:
    """'auto': CUDA when available, else the CPU, saying which; 'cuda' without CUDA is an error."""
    if device not in ("auto", "cpu", "cuda") and not device.startswith("cuda:"):
        raise CDMSegmentError(f"unknown device {device!r}; use auto, cpu or cuda")
    if device == "auto":
        chosen = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        log(f"device: {torch.cuda.get_device_name(chosen) if chosen.type == 'cuda' else 'CPU'} "
            f"({'CUDA found' if chosen.type == 'cuda' else 'no CUDA GPU found'})")
        return chosen
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CDMSegmentError("CUDA was requested but no CUDA GPU is usable by this PyTorch; use --device cpu")
    return torch.device(device)

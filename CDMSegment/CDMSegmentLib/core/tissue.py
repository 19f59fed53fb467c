"""What counts as content: tissue, not "non-zero".

A skull-stripped MRI marks its background with exact zeros, and then tissue is every non-zero voxel.
A raw MRI's background is noise and a CT's is air at -1000 HU: every voxel is non-zero, so "non-zero"
would make every slice run and spread the heatmap over the air. There, tissue is what lies above FSL
BET's robust background threshold: the 2nd percentile plus 10% of the 2nd-98th percentile range
(Smith 2002, "Fast robust automated brain extraction").
"""

import math
from typing import Union

import numpy as np
import torch

from .device import voxel_tensor
from .percentile import percentiles

# A volume with at least this fraction of exact zeros uses zero as its background (skull-stripped data).
ZERO_BACKGROUND_FRACTION = 0.05
# BET's background threshold: low percentile + this fraction of the robust range.
BET_PERCENTILES = (2.0, 98.0)
BET_FRACTION = 0.1
# A slice has content when at least this fraction of its voxels (and at least one) is tissue.
SLICE_CONTENT_FRACTION = 0.001


def has_zero_background(array: Union[np.ndarray, torch.Tensor]) -> bool:
    """True when exact zeros mark the background (array: any shape, numpy or torch on any device)."""
    a = voxel_tensor(array)
    return int(torch.count_nonzero(a == 0)) >= ZERO_BACKGROUND_FRACTION * a.numel()


def _float32_below(value: float) -> float:
    """The largest float32 <= value: for float32 voxels, ``x > value`` is ``x > _float32_below(value)``, so a
    comparison in float32 on the device picks the voxels numpy's float64 comparison picked."""
    rounded = np.float32(value)
    return float(rounded) if float(rounded) <= value else float(np.nextafter(rounded, np.float32(-np.inf)))


def tissue_mask(arrays, device: Union[str, torch.device, None] = None) -> torch.Tensor:
    """The modalities of one volume ((M, K, J, I), a sequence of (K, J, I), or one (K, J, I); numpy or torch,
    any dtype) -> (K, J, I) bool on ``device`` (None: where the arrays are), computed there: tissue in any
    modality."""
    if getattr(arrays, "ndim", None) == 3:
        arrays = [arrays]
    mask = None
    for a in arrays:
        a = voxel_tensor(a, device)
        if has_zero_background(a):
            tissue = a != 0
        else:
            a = a.float()
            low, high = percentiles(a, BET_PERCENTILES)
            tissue = a > _float32_below(low + BET_FRACTION * (high - low))
        mask = tissue if mask is None else mask | tissue
    return mask


def slices_with_content(tissue: Union[np.ndarray, torch.Tensor]) -> np.ndarray:
    """(S, ...) bool tissue mask stacked along the slice axis (numpy or torch on any device) -> indices of the
    slices with content, on the host."""
    per_slice = voxel_tensor(tissue).reshape(tissue.shape[0], -1)
    needed = max(1, math.ceil(SLICE_CONTENT_FRACTION * per_slice.shape[1]))
    counts = per_slice.view(torch.uint8).sum(dim=1, dtype=torch.int32)  # on the CPU twice count_nonzero's speed
    return np.flatnonzero(counts.cpu().numpy() >= needed)

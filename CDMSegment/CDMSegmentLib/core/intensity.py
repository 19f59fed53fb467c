"""Per-volume intensity normalisation, shared by training and inference so both see the same numbers."""

import math
from typing import Union

import numpy as np
import torch

from .errors import CDMSegmentError
from .device import voxel_tensor
from .percentile import percentiles

DEFAULT_NORMALISATION = {"method": "percentile", "low": 0.5, "high": 99.5}


def normalise_volume(array: Union[np.ndarray, torch.Tensor], spec: dict = None,
                     device: Union[str, torch.device, None] = None) -> torch.Tensor:
    """Map one modality of one volume to [-1, 1]: robust percentiles of the non-zero voxels.

    array: (K, J, I) any dtype, numpy or torch -> (K, J, I) float32 on ``device`` (None: where the array
    is), computed there: the volume crosses to a GPU once, in its own dtype. Background (exact zeros, as
    in skull-stripped BraTS) stays at -1. The percentiles are taken over the whole volume, not per slice,
    so a healthy slice keeps its brightness relative to a slice with a lesion. Raises CDMSegmentError for
    an unknown ``spec``, a NaN or infinite voxel, an all-zero or a constant image.
    """
    spec = spec or DEFAULT_NORMALISATION
    if spec.get("method") != "percentile":
        raise CDMSegmentError(f"unknown intensity normalisation {spec.get('method')!r}; expected 'percentile'")
    a = voxel_tensor(array, device).float()
    # One pass for both: the minimum and maximum carry a NaN, and an infinity reaches one of them.
    if a.numel() and not all(math.isfinite(v) for v in torch.stack(torch.aminmax(a)).tolist()):
        raise CDMSegmentError("the image contains NaN or infinite voxels; fix or mask them first")
    background = a == 0
    foreground = a[~background]
    if foreground.numel() == 0:
        raise CDMSegmentError("the image is all zeros; nothing to segment")
    lo, hi = percentiles(foreground, [spec["low"], spec["high"]])
    if hi <= lo:
        raise CDMSegmentError("the image has a constant intensity; nothing to segment")
    out = (a - lo).div_(hi - lo).clamp_(0.0, 1.0).mul_(2.0).sub_(1.0)
    return out.masked_fill_(background, -1.0)

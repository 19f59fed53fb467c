"""Per-volume intensity normalisation, shared by training and inference so both see the same numbers."""

import math
from typing import Union

import numpy as np
import torch

from .errors import CDMSegmentError
from .device import voxel_tensor
from .percentile import percentiles

DEFAULT_NORMALISATION = {"method": "percentile", "low": 0.5, "high": 99.5}


FLOAT32_MAX = float(np.finfo(np.float32).max)
FLOAT32_TINY = float(np.finfo(np.float32).tiny)  # the smallest normal float32


def check_values(a: torch.Tensor) -> None:
    """Voxel values the float32 computation can hold, judged in their own type: NaN or infinite voxels, and
    finite ones too large or too small for float32 (a float64 image up to 1e300 would become infinite, one of
    1e-300 all zeros) are refused, each said as what it is."""
    if not a.numel() or not a.is_floating_point():  # integers are finite and fit
        return
    # One pass for both: the minimum and maximum carry a NaN, and an infinity reaches one of them.
    low, high = (float(v) for v in torch.stack(torch.aminmax(a)).tolist())
    if not (math.isfinite(low) and math.isfinite(high)):
        raise CDMSegmentError("the image contains NaN or infinite voxels; fix or mask them first")
    magnitude = max(-low, high)
    # the normalisation divides by the range high - low, which must stay finite in float32 too
    if magnitude > FLOAT32_MAX / 2 or 0 < magnitude < FLOAT32_TINY:
        limit = f"at most {FLOAT32_MAX / 2:.3g}" if magnitude > 1 else f"below {FLOAT32_TINY:.3g} they become 0"
        raise CDMSegmentError(f"the image holds values from {low:.3g} to {high:.3g}, too "
                              f"{'large' if magnitude > 1 else 'small'} for the 32-bit floating point the model "
                              f"computes in ({limit}); rescale the image to its usual intensity range first")


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
    a = voxel_tensor(array, device)
    check_values(a)
    a = a.float()
    background = a == 0
    foreground = a[~background]
    if foreground.numel() == 0:
        raise CDMSegmentError("the image is all zeros; nothing to segment")
    lo, hi = percentiles(foreground, [spec["low"], spec["high"]])
    if hi <= lo:
        raise CDMSegmentError(f"the image has a constant intensity (nearly all its non-zero voxels are {lo:g}, as in "
                              "a mask or a label map); nothing to segment: give the grey-level image")
    out = (a - lo).div_(hi - lo).clamp_(0.0, 1.0).mul_(2.0).sub_(1.0)
    return out.masked_fill_(background, -1.0)

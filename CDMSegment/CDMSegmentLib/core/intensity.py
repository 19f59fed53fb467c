"""Per-volume intensity normalisation, shared by training and inference so both see the same numbers."""

import numpy as np

from .errors import CDMSegmentError

DEFAULT_NORMALISATION = {"method": "percentile", "low": 0.5, "high": 99.5}


def normalise_volume(array: np.ndarray, spec: dict = None) -> np.ndarray:
    """Map one modality of one volume to [-1, 1]: robust percentiles of the non-zero voxels.

    array: (K, J, I) any dtype. Background (exact zeros, as in skull-stripped BraTS) stays at -1.
    The percentiles are taken over the whole volume, not per slice, so a healthy slice keeps
    its brightness relative to a slice with a lesion.
    """
    spec = spec or DEFAULT_NORMALISATION
    if spec.get("method") != "percentile":
        raise CDMSegmentError(f"unknown intensity normalisation {spec.get('method')!r}; expected 'percentile'")
    a = np.asarray(array, dtype=np.float32)
    if not np.isfinite(a).all():
        raise CDMSegmentError("the image contains NaN or infinite voxels; fix or mask them first")
    foreground = a[a != 0]
    if foreground.size == 0:
        raise CDMSegmentError("the image is all zeros; nothing to segment")
    lo, hi = np.percentile(foreground, [spec["low"], spec["high"]])
    if hi <= lo:
        raise CDMSegmentError("the image has a constant intensity; nothing to segment")
    out = np.clip((a - lo) / (hi - lo), 0.0, 1.0) * 2.0 - 1.0
    out[a == 0] = -1.0
    return out

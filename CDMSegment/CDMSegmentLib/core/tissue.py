"""What counts as content: tissue, not "non-zero".

A skull-stripped MRI marks its background with exact zeros, and then tissue is every non-zero voxel.
A raw MRI's background is noise and a CT's is air at -1000 HU: every voxel is non-zero, so "non-zero"
would make every slice run and spread the heatmap over the air. There, tissue is what lies above FSL
BET's robust background threshold: the 2nd percentile plus 10% of the 2nd-98th percentile range
(Smith 2002, "Fast robust automated brain extraction").
"""

import math

import numpy as np

# A volume with at least this fraction of exact zeros uses zero as its background (skull-stripped data).
ZERO_BACKGROUND_FRACTION = 0.05
# BET's background threshold: low percentile + this fraction of the robust range.
BET_PERCENTILES = (2.0, 98.0)
BET_FRACTION = 0.1
# A slice has content when at least this fraction of its voxels (and at least one) is tissue.
SLICE_CONTENT_FRACTION = 0.001


def has_zero_background(array: np.ndarray) -> bool:
    """True when exact zeros mark the background (array: any shape)."""
    return np.count_nonzero(array == 0) >= ZERO_BACKGROUND_FRACTION * array.size


def tissue_mask(arrays: np.ndarray) -> np.ndarray:
    """(M, K, J, I) modalities of one volume (or one (K, J, I) volume) -> (K, J, I) bool: tissue in any modality."""
    arrays = np.asarray(arrays)
    if arrays.ndim == 3:
        arrays = arrays[None]
    mask = np.zeros(arrays.shape[1:], dtype=bool)
    for a in arrays:
        if has_zero_background(a):
            mask |= a != 0
        else:
            low, high = np.percentile(a, BET_PERCENTILES)
            mask |= a > low + BET_FRACTION * (high - low)
    return mask


def slices_with_content(tissue: np.ndarray) -> np.ndarray:
    """(S, ...) tissue mask stacked along the slice axis -> indices of the slices with content."""
    per_slice = tissue.reshape(tissue.shape[0], -1)
    needed = max(1, math.ceil(SLICE_CONTENT_FRACTION * per_slice.shape[1]))
    return np.flatnonzero(np.count_nonzero(per_slice, axis=1) >= needed)

"""Baselines on intensity alone, to show what a method's figures mean on hyperintense lesions.

- Otsu on intensity: voxels brighter than Otsu's threshold of the brain's intensities
  (no training data; on a healthy volume it still finds half the brain).
- A calibrated intensity threshold: one threshold on the intensity relative to the brain's
  median, chosen on cases with masks from the training families to maximise pooled Dice, so
  false positives on lesion-free cases count. On bright FLAIR lesions this is the strongest
  simple baseline. (Not the model's percentile normalisation: that saturates at the 99.5th
  percentile, where bright lesions and the brightest normal voxels become one value.)
"""

from typing import Sequence, Tuple

import numpy as np

from ..core.errors import CDMSegmentError
from ..core.threshold import otsu_threshold

THRESHOLD_GRID = np.round(np.arange(1.0, 3.0, 0.01), 2)  # intensity / median of the brain
THRESHOLD_BASELINE = "intensity threshold (calibrated)"  # its name in the tables


def intensity_otsu_mask(array: np.ndarray) -> np.ndarray:
    """The Otsu baseline: voxels brighter than Otsu's threshold of the non-zero (brain) intensities."""
    brain = array != 0
    return (array > otsu_threshold(array[brain])) & brain


def relative_intensity(array: np.ndarray) -> np.ndarray:
    """array / median of its non-zero (brain) voxels, float32; the background stays 0."""
    brain = array != 0
    if not brain.any():
        raise CDMSegmentError("the image is all zeros; nothing to segment")
    return (array / np.float32(np.median(array[brain]))).astype(np.float32) * brain


def intensity_threshold_mask(array: np.ndarray, threshold: float) -> np.ndarray:
    """Brain voxels brighter than ``threshold`` times the brain's median intensity. array: (K, J, I)."""
    return (relative_intensity(array) > threshold) & (array != 0)


def fit_intensity_threshold(pairs: Sequence[Tuple[np.ndarray, np.ndarray]]) -> Tuple[float, float]:
    """(threshold, pooled Dice) maximising pooled Dice over (image, truth mask) pairs, on ``THRESHOLD_GRID``.

    Pooled Dice = 2 sum |P n T| / (sum |P| + sum |T|) over all cases, lesion-free ones included.
    """
    if not pairs or not any(truth.any() for _, truth in pairs):
        raise CDMSegmentError("fitting the intensity threshold needs cases with lesion masks")
    overlap = np.zeros(len(THRESHOLD_GRID))
    predicted = np.zeros(len(THRESHOLD_GRID))
    lesion = 0
    for image, truth in pairs:
        values = relative_intensity(image)[image != 0]
        inside = truth[image != 0]
        lesion += int(truth.sum())
        # voxels above each threshold, all and inside the lesion, from one sort per case
        all_sorted, lesion_sorted = np.sort(values), np.sort(values[inside])
        predicted += values.size - np.searchsorted(all_sorted, THRESHOLD_GRID, side="right")
        overlap += lesion_sorted.size - np.searchsorted(lesion_sorted, THRESHOLD_GRID, side="right")
    pooled = 2 * overlap / np.maximum(predicted + lesion, 1)
    best = int(np.argmax(pooled))
    return float(THRESHOLD_GRID[best]), float(pooled[best])

"""From a volume heatmap to a mask: one threshold for the whole volume, then clean-up.

A per-slice Otsu (the paper's protocol) always finds "something" on a healthy slice;
a volume-level rule does not paint healthy slices with noise.
"""

from typing import Optional, Sequence, Union

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from .errors import CDMSegmentError
from .settings import check_threshold


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of a set of heatmap values (SimpleITK's implementation)."""
    values = np.asarray(values, dtype=np.float32).ravel()
    if values.size == 0 or values.max() <= values.min():
        return float("inf")
    image = sitk.GetImageFromArray(values.reshape(1, 1, -1))
    f = sitk.OtsuThresholdImageFilter()
    f.SetNumberOfHistogramBins(bins)
    f.Execute(image)
    return float(f.GetThreshold())


def resolve_threshold(heatmap: np.ndarray, rule: Union[str, float], content: Optional[np.ndarray] = None,
                      calibrated: Optional[float] = None) -> float:
    """rule: 'otsu' (over the volume's content voxels), 'model' (the value calibrated on held-out
    data and stored in the model), or a number in heatmap units (checked: core/ranges.py)."""
    rule = check_threshold(rule)
    if rule == "otsu":
        values = heatmap[content] if content is not None else heatmap
        return otsu_threshold(values)
    if rule == "model":
        if calibrated is None:
            raise CDMSegmentError("no calibrated threshold is stored for this method and model; "
                                  "use --threshold otsu or a number")
        return float(calibrated)
    return float(rule)


def voxels_for_ml(ml: float, spacing_mm: Sequence[float]) -> int:
    """A minimum component size in ml as voxels of this spacing: the rule means the same at any resolution."""
    return int(round(ml * 1000 / float(np.prod(spacing_mm))))


def make_mask(heatmap: np.ndarray, threshold: float, content: Optional[np.ndarray] = None,
              min_component_voxels: int = 0) -> np.ndarray:
    """uint8 mask: heatmap > threshold inside the content, without 3D components smaller than
    ``min_component_voxels`` (isolated specks a radiologist would have to erase by hand). Components are
    labelled inside the mask's bounding box only: a lesion's box is a small part of the volume (a 155 x 240
    x 240 volume: 200 ms labelled whole on two CPU cores), and every component lies inside it."""
    mask = heatmap > threshold
    if content is not None:
        mask &= content
    return without_small_components(mask, min_component_voxels).astype(np.uint8)


def without_small_components(mask: np.ndarray, min_voxels: int) -> np.ndarray:
    """bool (K, J, I): ``mask`` without its 3D components (face-connected) of fewer than ``min_voxels`` voxels;
    ``min_voxels`` 1 or less keeps every one."""
    mask = mask.astype(bool)
    if min_voxels > 1 and mask.any():
        box = _bounding_box(mask)
        labels, _ = ndimage.label(mask[box])
        sizes = np.bincount(labels.ravel())
        keep = sizes >= min_voxels
        keep[0] = False
        mask[box] = keep[labels]  # mask is astype's copy: the caller's array is not changed
    return mask


def _bounding_box(mask: np.ndarray) -> tuple:
    """The smallest box (one slice per axis) holding every True voxel of a mask with at least one."""
    box = []
    for axis in range(mask.ndim):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box.append(slice(int(hit[0]), int(hit[-1]) + 1))
    return tuple(box)

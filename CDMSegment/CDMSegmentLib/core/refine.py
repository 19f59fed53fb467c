"""Growing the CDM's mask through the lesion's own intensity: the CDM says *which* bright regions are
lesions, the image says *where their edges are*.

A calibrated intensity threshold on FLAIR delineates a bright lesion well but also takes every bright
normal structure (a periventricular rim, bright cortex, flow artefacts) and so marks millilitres of
"lesion" on a healthy brain; the CDM, which has learnt what normal looks like, rarely fires there,
but its heatmap is made at the model's slice size (96-128 px) and its edges are soft. Together: keep
the connected components of the bright voxels that the CDM's mask touches, plus the CDM's mask
itself (a faint lesion under the intensity threshold still counts); ``supported_components`` is the
variant without the CDM's own voxels (the threshold's result minus what the CDM does not support). Both thresholds are calibrated
on validation data only (``cdmsegment set-defaults``: ``grow_above`` in the model's defaults).

A fixed threshold cannot suit a faint lesion (1.2 x the brain's median) and a bright one (2.5 x) at once:
``lesion_intensity_components`` takes its level from the lesion the CDM found, a fraction of the median
intensity under the CDM's mask (never below a floor), and keeps the components the CDM covers enough of.
Its three numbers are the model's ``lesion_intensity``, ``lesion_intensity_floor`` and ``lesion_support``
defaults, calibrated on validation volumes of the training families.
"""

from typing import Optional

import numpy as np
from scipy import ndimage

from .errors import CDMSegmentError


def supported_components(mask: np.ndarray, image: np.ndarray, content: np.ndarray,
                         relative_threshold: float) -> np.ndarray:
    """bool (K, J, I): the 3D components (face-connected) of the content voxels brighter than
    ``relative_threshold`` times the content's median intensity that ``mask`` touches: the intensity
    threshold's result without the bright regions the CDM does not support.

    mask, content: (K, J, I) bool or 0/1; image: (K, J, I) intensities on the same grid (the first modality).
    Raises CDMSegmentError for a threshold that is not a finite number above 0.
    """
    if not np.isfinite(relative_threshold) or relative_threshold <= 0:
        raise CDMSegmentError(f"the intensity growth threshold must be a number above 0 (a multiple of the brain's "
                              f"median intensity, e.g. 1.5), got {relative_threshold}")
    mask, content = mask.astype(bool), content.astype(bool)
    if not mask.any() or not content.any():
        return np.zeros(mask.shape, bool)
    return _covered_components((image > relative_threshold * float(np.median(image[content]))) & content, mask)


def _covered_components(bright: np.ndarray, mask: np.ndarray, min_support: float = 0.0) -> np.ndarray:
    """bool: the 3D components (face-connected) of ``bright`` that ``mask`` touches, and of which it covers at
    least ``min_support`` (0-1) of the voxels."""
    labels, count = ndimage.label(bright)
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    covered = np.bincount(labels[mask].ravel(), minlength=count + 1)
    keep = (covered > 0) & (covered >= min_support * sizes)
    keep[0] = False
    return keep[labels]


def grow_through_intensity(mask: np.ndarray, image: np.ndarray, content: np.ndarray,
                           relative_threshold: float) -> np.ndarray:
    """uint8 (K, J, I): ``mask`` joined with its ``supported_components`` (same arguments and errors)."""
    return (supported_components(mask, image, content, relative_threshold) | mask.astype(bool)).astype(np.uint8)


def lesion_intensity_components(mask: np.ndarray, image: np.ndarray, content: Optional[np.ndarray], fraction: float,
                                floor: float = 0.0, min_support: float = 0.0, *,
                                brain_median: Optional[float] = None) -> np.ndarray:
    """uint8 (K, J, I): the lesion the CDM found, delineated by its own intensity.

    level = max(``floor``, ``fraction`` x the median intensity under ``mask``), both in multiples of the
    content's median intensity; the result is the 3D components (face-connected) of the content voxels
    brighter than that level of which ``mask`` covers at least ``min_support`` (0-1) of the voxels (and at
    least one). An empty ``mask`` gives an empty result.

    mask, content: (K, J, I) bool or 0/1; image: (K, J, I) intensities on the same grid (the first modality).
    brain_median: the content's median intensity (default: computed from ``content``). A mask re-made later
    from the heatmap alone (a new threshold in Slicer) gives the run's ``brain_median`` and no content: with a
    floor of 1 or more every voxel above the level lies in the content anyway (it is brighter than the brain's
    median, and the content is every voxel above a level below that median), so the result is the same.
    Raises CDMSegmentError for a fraction outside (0, 1], a floor below 0, a support outside [0, 1], or neither
    content nor brain_median.
    """
    if not (np.isfinite(fraction) and 0 < fraction <= 1):
        raise CDMSegmentError(f"the lesion intensity fraction must be in (0, 1] (a share of the median intensity "
                              f"under the CDM's mask, e.g. 0.7), got {fraction}")
    if not (np.isfinite(floor) and floor >= 0) or not (np.isfinite(min_support) and 0 <= min_support <= 1):
        raise CDMSegmentError(f"the lesion intensity floor must be 0 or more and the support in [0, 1], got "
                              f"{floor} and {min_support}")
    if content is None and brain_median is None:
        raise CDMSegmentError("the lesion intensity needs the brain's median intensity or its tissue mask")
    mask = mask.astype(bool) if content is None else mask.astype(bool) & content.astype(bool)
    if not mask.any():
        return np.zeros(mask.shape, np.uint8)
    brain = float(np.median(image[content.astype(bool)])) if brain_median is None else float(brain_median)
    level = max(floor * brain, fraction * float(np.median(image[mask])))
    bright = image > level if content is None else (image > level) & content.astype(bool)
    return _covered_components(bright, mask, min_support).astype(np.uint8)


def apply_refinement(mask: np.ndarray, image: np.ndarray, content: Optional[np.ndarray], refinement: dict) -> np.ndarray:
    """uint8: ``mask`` delineated as a run's ``refinement`` says (core/runner.refine_mask: lesion_intensity,
    lesion_intensity_floor, lesion_support, brain_median); content None for a mask re-made from the heatmap
    alone (a new threshold in Slicer; lesion_intensity_components says why that gives the same)."""
    return lesion_intensity_components(mask, image, content, refinement["lesion_intensity"],
                                       refinement["lesion_intensity_floor"], refinement["lesion_support"],
                                       brain_median=refinement["brain_median"])

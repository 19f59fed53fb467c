"""Segmentation metrics: Dice, IoU, HD95 in millimetres, pixel AUROC, false positives on healthy slices, and
lesion-wise detection (how many lesions a mask finds, how many of its regions touch none).

Undefined values are NaN, never a silent 0 or 1, and the evaluation reports how many there were:
- Dice and IoU with an empty ground truth *and* an empty prediction are NaN (nothing to overlap;
  healthy slices are scored by their false positives instead);
- HD95 is NaN when either the prediction or the ground truth is empty (no surface to measure
  from), reported as "n/a" with the number of such slices;
- AUROC is NaN when the pixels hold only one class.
"""

import math
from dataclasses import dataclass
from typing import Sequence, Tuple

import numpy as np
from scipy import ndimage

from ..core.errors import CDMSegmentError


def _pair(prediction: np.ndarray, truth: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    p, t = np.asarray(prediction, dtype=bool), np.asarray(truth, dtype=bool)
    if p.shape != t.shape:
        raise CDMSegmentError(f"prediction {p.shape} and ground truth {t.shape} differ in shape")
    return p, t


def dice(prediction: np.ndarray, truth: np.ndarray) -> float:
    """2 |P n T| / (|P| + |T|) for masks of any shape; NaN when both are empty."""
    p, t = _pair(prediction, truth)
    total = int(p.sum()) + int(t.sum())
    return 2.0 * int((p & t).sum()) / total if total else math.nan


def iou(prediction: np.ndarray, truth: np.ndarray) -> float:
    """|P n T| / |P u T|; NaN when both are empty."""
    p, t = _pair(prediction, truth)
    union = int((p | t).sum())
    return int((p & t).sum()) / union if union else math.nan


def _surface(mask: np.ndarray) -> np.ndarray:
    """Boundary voxels: in the mask with a face neighbour outside it (the image border counts as outside)."""
    return mask & ~ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(mask.ndim, 1),
                                          border_value=0)


def hd95(prediction: np.ndarray, truth: np.ndarray, spacing_mm: Sequence[float]) -> float:
    """95th-percentile symmetric Hausdorff distance between the mask surfaces, in mm.

    The larger of the two directed 95th percentiles (surface of P to surface of T and back),
    the convention of MONAI's ``compute_hausdorff_distance(percentile=95)``. Distances are
    Euclidean on the voxel grid scaled by ``spacing_mm`` (one value per array axis), computed
    with scipy's exact distance transform. NaN when either mask is empty.
    """
    p, t = _pair(prediction, truth)
    if len(spacing_mm) != p.ndim:
        raise CDMSegmentError(f"spacing has {len(spacing_mm)} values for a {p.ndim}D mask")
    if not p.any() or not t.any():
        return math.nan
    sp, st = _surface(p), _surface(t)
    to_t = ndimage.distance_transform_edt(~st, sampling=spacing_mm)[sp]
    to_p = ndimage.distance_transform_edt(~sp, sampling=spacing_mm)[st]
    return float(max(np.percentile(to_t, 95), np.percentile(to_p, 95)))


def pixel_auroc(scores: np.ndarray, truth: np.ndarray) -> float:
    """Area under the ROC curve of the heatmap as a pixel classifier (scikit-learn); NaN with one class only."""
    from sklearn.metrics import roc_auc_score

    y = np.asarray(truth, dtype=bool).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.size != s.size:
        raise CDMSegmentError(f"{s.size} scores for {y.size} ground-truth pixels")
    if y.all() or not y.any():
        return math.nan
    return float(roc_auc_score(y, s))


def false_positive_pixels(prediction: np.ndarray, truth: np.ndarray) -> int:
    """Predicted voxels outside the ground truth (on a healthy slice or volume: all predicted voxels)."""
    p, t = _pair(prediction, truth)
    return int((p & ~t).sum())


@dataclass(frozen=True)
class LesionCounts:
    """Lesion-wise detection of one mask: lesions are the ground truth's 3D components, regions the
    prediction's (face-connected, as core/refine.py counts components)."""

    lesions: int  # components of the ground truth
    found: int  # lesions the prediction touches (any overlap: the lesion-wise true positives)
    false_regions: int  # components of the prediction that touch no lesion (lesion-wise false positives)


def lesion_counts(prediction: np.ndarray, truth: np.ndarray) -> LesionCounts:
    """Lesions found and false regions of a (K, J, I) prediction against its ground truth, both bool or 0/1.

    The lesion-wise true-positive rate, found / lesions, and the count of false regions are the detection
    figures of the MSSEG challenge (Commowick et al., Sci Rep 2018), here with any overlap as a detection and no
    minimum lesion size. Unlike 3D Dice, which the largest lesion dominates, every lesion counts once: a mask
    that finds the one large lesion of a volume with eight small ones scores a high Dice and 1 of 9.
    Raises CDMSegmentError for masks of different shapes.
    """
    return lesion_findings(prediction, truth)[0]


@dataclass(frozen=True)
class DiceParts:
    """Where a prediction's 3D Dice goes, in voxels and as a Dice (``dice_parts``)."""

    missed_voxels: int  # lesion voxels in lesions the prediction does not touch (detection)
    false_region_voxels: int  # predicted voxels in regions that touch no lesion (false detections)
    found_dice: float  # Dice of the regions that touch a lesion against the lesions touched (delineation)


def dice_parts(prediction: np.ndarray, truth: np.ndarray) -> DiceParts:
    """The three parts of a (K, J, I) prediction's 3D Dice against its ground truth (bool or 0/1, the components
    of ``lesion_counts``): lesions missed, regions that are false detections, and the delineation of the rest.
    Together they say whether a low Dice is a detection problem (what the network misses or invents) or a
    delineation one (edges): without the false regions and the missed lesions, the Dice would be ``found_dice``.
    found_dice is NaN where no lesion is found (or there is none).
    Raises CDMSegmentError for masks of different shapes.
    """
    return lesion_findings(prediction, truth)[1]


def lesion_findings(prediction: np.ndarray, truth: np.ndarray) -> Tuple[LesionCounts, DiceParts]:
    """(``lesion_counts``, ``dice_parts``) of one prediction from one labelling of each mask (same arguments and
    errors): what an evaluation that reports both calls."""
    p, t = _pair(prediction, truth)
    lesion_labels, lesions = ndimage.label(t)
    region_labels, regions = ndimage.label(p)
    found_ids = np.unique(lesion_labels[p & t])
    touching_ids = np.unique(region_labels[p & t])
    found = np.isin(lesion_labels, found_ids) & t
    touching = np.isin(region_labels, touching_ids) & p
    counts = LesionCounts(int(lesions), int(found_ids.size), int(regions - touching_ids.size))
    parts = DiceParts(int((t & ~found).sum()), int((p & ~touching).sum()),
                      dice(touching, found) if found.any() else math.nan)
    return counts, parts


def nan_mean(values: Sequence[float]) -> Tuple[float, int]:
    """(mean of the defined values, number of NaN values left out); the mean is NaN when none is defined."""
    a = np.asarray(list(values), dtype=np.float64)
    defined = a[~np.isnan(a)]
    return (float(defined.mean()) if defined.size else math.nan), int(a.size - defined.size)

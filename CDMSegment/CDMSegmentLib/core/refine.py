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
``lesion_intensity_components`` takes each lesion's level from the lesion the CDM found there, a fraction of the
median intensity under that part of the CDM's mask (never below a floor), and keeps the components the CDM covers
enough of.
Its three numbers are the model's ``lesion_intensity``, ``lesion_intensity_floor`` and ``lesion_support``
defaults, calibrated on validation volumes of the training families.

A lesion whose heatmap stays under the threshold (a faint lesion, 1.1-1.3 x grey matter; a small one the
network sees only in part) leaves no mask for that growth to start from. ``heatmap_supported_components`` adds
the bright components in which the heatmap is high *on average*: normal bright tissue (cortex, a periventricular
rim) forms large components where the heatmap is mostly zero, a lesion a component where it is high throughout.
Its numbers are the model's ``heatmap_floor`` and ``heatmap_support`` defaults, chosen after the three above on
the same validation volumes (evaluation/refine_calibration.py).

A lesion on the cortex forms, above its level, one component with the bright cortex, which the CDM's mask covers
too little of for the support: the whole finding would drop out. ``strong_findings`` names the findings the CDM is
sure of (large enough, a high heatmap peak), which keep their own bright voxels whatever the support; their numbers
are the model's ``strong_finding_ml`` and ``strong_finding_peak``, chosen after those on the same volumes.

A small lesion (an MS plaque of a few voxels) is often brighter than anything around it while the heatmap, made at
the model's slice size, reaches only a share of the threshold there: its mask is empty or a speck, and its mean
heatmap is too low for the support. ``small_lesion_components`` adds the small bright components the heatmap
reaches at all: bright enough (``small_lesion_floor`` x the brain's median), small (at most ``small_lesion_ml``)
and with a heatmap peak of ``small_lesion_peak`` x the threshold; normal bright tissue forms large components or
lies where the heatmap is zero. Chosen after those, on validation volumes that include small lesions of the
training families.

Growing a finding through voxels near the floor leaves, around normal tissue the heatmap touches, fragments of a few
voxels each (on the held-out MS-like volumes of the recipe some fifty per volume, most of their false-positive
volume): ``min_finding_voxels`` removes the final segment's components smaller than that, as the Segment Editor's
*Islands* effect would. Its volume is the model's ``min_finding_ml``, chosen last on the same validation volumes.
"""

from typing import Optional, Tuple

import numpy as np
from scipy import ndimage

from .errors import CDMSegmentError
from .threshold import make_mask, without_small_components


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


def _covered_components(bright: np.ndarray, mask: np.ndarray, min_support: float = 0.0,
                        reference: Optional[np.ndarray] = None) -> np.ndarray:
    """bool: the 3D components (face-connected) of ``bright`` that ``mask`` touches, and of which ``reference``
    (default ``mask``) covers at least ``min_support`` (0-1) of the voxels."""
    labels, count = ndimage.label(bright)
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    touched = np.bincount(labels[mask].ravel(), minlength=count + 1)
    covered = touched if reference is None else np.bincount(labels[reference].ravel(), minlength=count + 1)
    keep = (touched > 0) & (covered >= min_support * sizes)
    keep[0] = False
    return keep[labels]


def grow_through_intensity(mask: np.ndarray, image: np.ndarray, content: np.ndarray,
                           relative_threshold: float) -> np.ndarray:
    """uint8 (K, J, I): ``mask`` joined with its ``supported_components`` (same arguments and errors)."""
    return (supported_components(mask, image, content, relative_threshold) | mask.astype(bool)).astype(np.uint8)


def lesion_intensity_components(mask: np.ndarray, image: np.ndarray, content: Optional[np.ndarray], fraction: float,
                                floor: float = 0.0, min_support: float = 0.0, *,
                                brain_median: Optional[float] = None,
                                reference: Optional[np.ndarray] = None,
                                strong: Optional[np.ndarray] = None) -> np.ndarray:
    """uint8 (K, J, I): the lesion the CDM found, delineated by its own intensity.

    Each lesion found (a 3D component, face-connected, of ``reference``, which is ``mask`` unless given, that holds
    voxels of ``mask``) has its own level = max(``floor``, ``fraction`` x the median intensity under it), both in
    multiples of the content's median intensity; the result is, lesion by lesion, the 3D components of the content
    voxels brighter than its level that its ``mask`` voxels touch and of which ``reference`` covers at least
    ``min_support`` (0-1) of the voxels. One level for the whole mask (its
    median) would set a faint lesion's edge by a bright one's intensity and cut it away; on validation volumes of
    the training families and on six held-out sets the level per lesion was never worse by more than 0.001 mean
    Dice, with the same false positives (README, *Refining the mask*). An empty ``mask`` gives an empty result.

    mask, content: (K, J, I) bool or 0/1; image: (K, J, I) intensities on the same grid (the first modality).
    brain_median: the content's median intensity (default: computed from ``content``). A mask re-made later
    from the heatmap alone (a new threshold in Slicer) gives the run's ``brain_median`` and no content: with a
    floor of 1 or more every voxel above the level lies in the content anyway (it is brighter than the brain's
    median, and the content is every voxel above a level below that median), so the result is the same.
    reference: (K, J, I) bool, a mask holding ``mask`` (the heatmap's mask at the threshold the three numbers were
    calibrated at, where a higher one made ``mask``): the lesions, their levels and the support are measured on it,
    and ``mask`` only says which components are kept. Without it, a higher threshold shrinks the mask to a lesion's
    core and its share of the lesion's component falls under ``min_support``: the whole lesion would drop out at once
    (the bundled sample's 13 ml lesion at 1.2 x the model's threshold), where a radiologist raising the
    threshold expects the weakest findings to go first.
    strong: (K, J, I) bool, the strong findings (``strong_findings``): a lesion found there keeps its own voxels
    brighter than its level even where the bright component they belong to is mostly outside the mask (a lesion
    on the cortex joins the bright cortex, which the CDM covers too little of for ``min_support``).
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
    inside = (lambda m: m.astype(bool)) if content is None else (lambda m: m.astype(bool) & content.astype(bool))
    mask = inside(mask)
    reference = mask if reference is None else inside(reference) | mask
    if not mask.any():
        return np.zeros(mask.shape, np.uint8)
    brain = float(np.median(image[content.astype(bool)])) if brain_median is None else float(brain_median)
    # one level per lesion found (a component of the reference holding mask voxels): a faint lesion beside a bright
    # one keeps its own; lesions whose levels agree (often the floor) share one labelling
    labels, _ = ndimage.label(reference)
    found = np.unique(labels[mask])
    medians = ndimage.median(image, labels, found)
    seeds_at = {}
    for j, median in zip(found, np.atleast_1d(medians)):
        seeds_at.setdefault(max(floor * brain, fraction * float(median)), []).append(j)
    strong_ids = set(np.unique(labels[strong.astype(bool)]).tolist()) - {0} if strong is not None else set()
    result = np.zeros(mask.shape, bool)
    for level, lesions in seeds_at.items():
        bright = image > level if content is None else (image > level) & content.astype(bool)
        result |= _covered_components(bright, mask & np.isin(labels, lesions), min_support, reference)
        own = [j for j in lesions if j in strong_ids]
        if own:
            result |= bright & np.isin(labels, own)
    return result.astype(np.uint8)


def strong_findings(mask: np.ndarray, heatmap: np.ndarray, peak: float, min_voxels: int) -> np.ndarray:
    """bool (K, J, I): the 3D components (face-connected) of ``mask`` that hold at least ``min_voxels`` voxels and
    whose heatmap reaches ``peak`` (heatmap units) somewhere: findings the CDM is sure of, whose own bright voxels
    lesion_intensity_components keeps whatever share of their bright component the mask covers.

    mask: (K, J, I) bool or 0/1; heatmap: (K, J, I) float on the same grid. ``min_voxels`` 0 or less, or a peak
    that is not a finite number, gives an empty result (the rule is off).
    """
    mask = mask.astype(bool)
    if min_voxels <= 0 or not np.isfinite(peak) or not mask.any():
        return np.zeros(mask.shape, bool)
    labels, count = ndimage.label(mask)
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    # over the mask's voxels only: scipy sorts every voxel it is given
    peaks = np.concatenate([[-np.inf], np.atleast_1d(ndimage.maximum(heatmap[mask], labels[mask],
                                                                     np.arange(1, count + 1)))])
    keep = (sizes >= int(min_voxels)) & (peaks >= peak)
    keep[0] = False
    return keep[labels]


def heatmap_supported_components(heatmap: np.ndarray, threshold: float, image: np.ndarray,
                                 content: Optional[np.ndarray], floor: float, support: float,
                                 min_voxels: int = 1, *, brain_median: Optional[float] = None) -> np.ndarray:
    """bool (K, J, I): the 3D components (face-connected) of the content voxels brighter than ``floor`` times the
    content's median intensity whose mean heatmap is at least ``support`` times ``threshold`` and that hold at
    least ``min_voxels`` voxels. ``support`` 0 gives an empty result (the step is off).

    heatmap: (K, J, I) float, the run's heatmap (>= 0, zero outside the content); threshold: the mask's threshold
    in heatmap units; image, content, brain_median: as in lesion_intensity_components (content None with the
    run's brain_median gives the same result for a floor of 1 or more, for the same reason).
    Raises CDMSegmentError for a floor or support that is not a finite number of 0 or more, or neither content
    nor brain_median.
    """
    if not (np.isfinite(floor) and floor >= 0) or not (np.isfinite(support) and support >= 0):
        raise CDMSegmentError(f"the heatmap support's floor and share of the threshold must be numbers of 0 or more "
                              f"(e.g. 1.2 and 0.5), got {floor} and {support}")
    if content is None and brain_median is None:
        raise CDMSegmentError("the heatmap support needs the brain's median intensity or its tissue mask")
    if support == 0:
        return np.zeros(image.shape, bool)
    brain = float(np.median(image[content.astype(bool)])) if brain_median is None else float(brain_median)
    bright = image > floor * brain if content is None else (image > floor * brain) & content.astype(bool)
    labels, count = ndimage.label(bright)
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    heat = np.bincount(labels.ravel(), weights=heatmap.ravel().astype(np.float64), minlength=count + 1)
    keep = (sizes >= max(int(min_voxels), 1)) & (heat >= support * float(threshold) * sizes)
    keep[0] = False
    return keep[labels]


def small_lesion_components(heatmap: np.ndarray, threshold: float, image: np.ndarray,
                            content: Optional[np.ndarray], floor: float, peak: float, max_voxels: int, *,
                            brain_median: Optional[float] = None) -> np.ndarray:
    """bool (K, J, I): the 3D components (face-connected) of the content voxels brighter than ``floor`` times the
    content's median intensity that hold at most ``max_voxels`` voxels and in which the heatmap reaches ``peak``
    times ``threshold`` somewhere: small bright lesions the heatmap reaches without its mask covering them.
    ``max_voxels`` 0 or less gives an empty result (the step is off).

    heatmap: (K, J, I) float, the run's heatmap (>= 0, zero outside the content); threshold: the mask's threshold
    in heatmap units; image, content, brain_median: as in lesion_intensity_components (content None with the
    run's brain_median gives the same result for a floor of 1 or more).
    Raises CDMSegmentError for a floor below 1 or a peak that is not a finite number above 0 (0 would keep every
    small bright component: the intensity threshold, not the CDM), or neither content nor brain_median.
    """
    if not (np.isfinite(floor) and floor >= 1) or not (np.isfinite(peak) and peak > 0):
        raise CDMSegmentError(f"the small lesions' floor must be 1 or more (a multiple of the brain's median "
                              f"intensity, e.g. 2) and their heatmap peak above 0 (a share of the threshold, e.g. "
                              f"0.2), got {floor} and {peak}")
    if content is None and brain_median is None:
        raise CDMSegmentError("the small lesions need the brain's median intensity or its tissue mask")
    if max_voxels <= 0:
        return np.zeros(image.shape, bool)
    brain = float(np.median(image[content.astype(bool)])) if brain_median is None else float(brain_median)
    bright = image > floor * brain if content is None else (image > floor * brain) & content.astype(bool)
    labels, count = ndimage.label(bright)
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    small = (sizes <= int(max_voxels)) & (np.arange(count + 1) > 0)
    ids = np.flatnonzero(small)
    if not ids.size:
        return np.zeros(image.shape, bool)
    inside = small[labels]  # the peak over the small components' voxels only: scipy sorts every voxel it is given
    peaks = np.zeros(count + 1)
    peaks[ids] = np.atleast_1d(ndimage.maximum(heatmap[inside], labels[inside], ids))
    keep = small & (peaks >= peak * float(threshold))
    return keep[labels]


def refinement_parts(mask: np.ndarray, image: np.ndarray, content: Optional[np.ndarray], refinement: dict,
                     heatmap: Optional[np.ndarray] = None,
                     threshold: Optional[float] = None) -> Tuple[np.ndarray, np.ndarray]:
    """(bool, bool) (K, J, I): ``mask`` delineated by the lesion's intensity as a run's ``refinement`` says
    (core/runner.refine_mask: lesion_intensity, lesion_intensity_floor, lesion_support, brain_median), and the
    voxels the heatmap's support adds to it (heatmap_supported_components, where heatmap_support is above 0, with
    heatmap_floor, min_component_voxels and the ``heatmap`` and ``threshold`` the mask was made with; and
    small_lesion_components, where small_lesion_voxels is above 0, with small_lesion_floor and small_lesion_peak,
    the peak a share of ``threshold``, so a higher one drops them; else none).
    content None for a mask re-made from the heatmap alone (a new threshold in Slicer; lesion_intensity_components
    says why that gives the same).
    A refinement with a ``calibrated_threshold`` (the threshold its numbers were chosen at) made into a mask at a
    higher ``threshold`` measures the lesion's level and support on the heatmap's mask at the calibrated one
    (lesion_intensity_components' ``reference``), so raising the threshold drops whole findings, weakest first.
    A refinement with ``strong_finding_voxels`` above 0 keeps the own bright voxels of the findings of at least
    that many voxels whose heatmap peaks at ``strong_finding_peak`` times the threshold or more (strong_findings;
    the findings and the threshold are those the lesions are measured at: the calibrated one where it is used).
    A refinement with ``min_finding_voxels`` above 1 then drops the components (face-connected) of both parts
    together that hold fewer voxels (module docstring).
    Raises CDMSegmentError for a refinement with heatmap support, strong findings or small lesions given no heatmap
    or threshold, strong findings without a strong_finding_peak above 0, or small lesions with a floor or peak
    small_lesion_components refuses."""
    needs_heatmap = bool(refinement.get("heatmap_support") or refinement.get("strong_finding_voxels")
                         or refinement.get("small_lesion_voxels"))
    if needs_heatmap and (heatmap is None or threshold is None):
        raise CDMSegmentError("this refinement adds the components the heatmap supports (or the small lesions it "
                              "reaches) or keeps its strong findings, and needs the heatmap and its threshold")
    calibrated = refinement.get("calibrated_threshold")
    reference, measured_at = None, threshold
    if calibrated is not None and heatmap is not None and threshold is not None and threshold > calibrated:
        reference = make_mask(heatmap, calibrated, content, refinement.get("min_component_voxels", 0)) > 0
        measured_at = calibrated
    strong = None
    if refinement.get("strong_finding_voxels"):
        if not refinement.get("strong_finding_peak", 0.0) > 0:  # a peak of 0 would make every large finding strong
            raise CDMSegmentError("the model's strong_finding_ml needs a strong_finding_peak above 0 (the heatmap's "
                                  "peak in multiples of the threshold); set both with 'cdmsegment set-defaults'")
        found = mask.astype(bool) if reference is None else reference | mask.astype(bool)
        strong = strong_findings(found if content is None else found & content.astype(bool), heatmap,
                                 refinement["strong_finding_peak"] * float(measured_at),
                                 refinement["strong_finding_voxels"])
    refined = lesion_intensity_components(mask, image, content, refinement["lesion_intensity"],
                                          refinement["lesion_intensity_floor"], refinement["lesion_support"],
                                          brain_median=refinement["brain_median"], reference=reference,
                                          strong=strong) > 0
    added = np.zeros(refined.shape, bool)
    if refinement.get("heatmap_support"):
        added |= heatmap_supported_components(heatmap, threshold, image, content, refinement["heatmap_floor"],
                                              refinement["heatmap_support"],
                                              refinement.get("min_component_voxels", 1),
                                              brain_median=refinement["brain_median"])
    if refinement.get("small_lesion_voxels"):
        added |= small_lesion_components(heatmap, threshold, image, content, refinement["small_lesion_floor"],
                                         refinement["small_lesion_peak"], refinement["small_lesion_voxels"],
                                         brain_median=refinement["brain_median"])
    if refinement.get("min_finding_voxels", 0) > 1:
        kept = without_small_components(refined | added, int(refinement["min_finding_voxels"]))
        refined, added = refined & kept, added & kept
    return refined, added & ~refined


def apply_refinement(mask: np.ndarray, image: np.ndarray, content: Optional[np.ndarray], refinement: dict,
                     heatmap: Optional[np.ndarray] = None, threshold: Optional[float] = None) -> np.ndarray:
    """uint8 (K, J, I): both of ``refinement_parts`` joined (same arguments and errors): the refined mask."""
    refined, added = refinement_parts(mask, image, content, refinement, heatmap, threshold)
    return (refined | added).astype(np.uint8)

"""Choosing a model's lesion-intensity refinement (core/refine.lesion_intensity_components) and the speck removal
before it (``min_component_ml``, core/threshold.make_mask) on validation volumes.

The CDM runs once per volume with the model's defaults and no refinement; every combination of the grid is
then applied to the same heatmaps: the mask re-made with the combination's speck removal, then refined. The
choice is the best mean 3D Dice on the volumes with a lesion among the
combinations whose mean false-positive volume on the lesion-free ones stays within ``max_fp_ml`` (the least
false positives when none does); among the combinations within ``dice_tolerance`` of that best Dice, the one with
the fewest false positives (on 18 volumes a mean 0.001 higher is one volume's Dice 0.018 higher: no reason to
take more false positives, and on held-out volumes such a lead did not hold; README, *Refining the mask*).
A second stage then adds the components the heatmap supports
(core/refine.heatmap_supported_components) to the chosen refinement, each combination of SUPPORT_GRID in turn,
by the same rule; support 0 (the first stage's result) is among them, so it is added only where it helps. A third
stage, by the same rule again, chooses which findings are strong enough to keep their own bright voxels
(core/refine.strong_findings, STRONG_GRID; ``strong_finding_ml`` 0, the rule off, is among them), and a fourth
which small bright components the heatmap reaches are added (core/refine.small_lesion_components, SMALL_GRID;
``small_lesion_ml`` 0 among them); a fifth, the smallest component the refined segment keeps
(core/refine.refinement_parts' ``min_finding_voxels``, FINDING_GRID; ``min_finding_ml`` 0, all kept, among them).
Where a step is off (its switch 0: SWITCHES) its other values change nothing:
that combination is scored once. Only validation volumes of the training families belong here, with small lesions
of those families among them where the small lesions are chosen (the recipe's ``val_small``): the held-out sets
measure the result.
"""

import itertools
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Sequence, Tuple

import numpy as np

from ..core.reading import read_volume
from ..core.runner import refine_mask, segment_volume
from ..core.threshold import make_mask, voxels_for_ml
from ..core.tissue import tissue_mask
from ..data.cases import Case
from .metrics import dice

GRID = {"min_component_ml": (0.05, 0.1, 0.25), "lesion_intensity": (0.6, 0.7, 0.8),
        "lesion_intensity_floor": (1.2, 1.3, 1.4, 1.5), "lesion_support": (0.0, 0.1, 0.2)}
SUPPORT_GRID = {"heatmap_floor": (1.1, 1.15, 1.2, 1.25, 1.3), "heatmap_support": (0.0, 0.4, 0.5, 0.75, 1.0, 1.25)}
STRONG_GRID = {"strong_finding_ml": (0.0, 0.1, 0.25, 0.5, 1.0), "strong_finding_peak": (2.0, 3.0, 4.0)}
SMALL_GRID = {"small_lesion_ml": (0.0, 0.25, 0.5, 1.0), "small_lesion_floor": (1.6, 1.8, 2.0, 2.2),
              "small_lesion_peak": (0.2, 0.4, 0.6)}
FINDING_GRID = {"min_finding_ml": (0.0, 0.01, 0.02, 0.05, 0.1)}
SWITCHES = ("heatmap_support", "strong_finding_ml", "small_lesion_ml")  # 0: that step is off
DICE_TOLERANCE = 0.001  # mean 3D Dice; within it of the best, the fewest false positives win


@dataclass
class RefinementRun:
    """One validation volume, run once: (K, J, I) CDM heatmap, image, content and truth; the heatmap's threshold
    (the run's, in heatmap units); the voxel spacing in mm (K, J, I order does not matter: only its product)."""
    heatmap: np.ndarray
    threshold: float
    image: np.ndarray
    content: np.ndarray
    truth: np.ndarray
    spacing_mm: Tuple[float, float, float]
    _masks: Dict[float, np.ndarray] = field(default_factory=dict, init=False, repr=False, compare=False)

    @classmethod
    def of(cls, heatmap: np.ndarray, threshold: float, volume, truth: np.ndarray) -> "RefinementRun":
        """The run of one core.image.Volume (the first modality) from its heatmap and threshold."""
        return cls(heatmap, float(threshold), volume.array, tissue_mask(volume.array).cpu().numpy(), truth,
                   tuple(float(s) for s in volume.spacing_mm))

    @property
    def voxel_ml(self) -> float:
        return float(np.prod(self.spacing_mm)) / 1000

    def mask(self, min_component_ml: float) -> np.ndarray:
        """bool (K, J, I): the CDM's mask with this speck removal (ml), as core/runner.segment_volume makes it."""
        if min_component_ml not in self._masks:  # each combination of the other settings reuses it
            self._masks[min_component_ml] = make_mask(self.heatmap, self.threshold, self.content,
                                                      voxels_for_ml(min_component_ml, self.spacing_mm)) > 0
        return self._masks[min_component_ml]


@dataclass
class RefinementScore:
    settings: Dict[str, float]
    mean_dice: float  # over the volumes with a lesion
    false_positive_ml: float  # mean over the lesion-free volumes


def refinement_runs(cases: Sequence[Case], model, device: str = "cpu",
                    log: Callable[[str], None] = print) -> List[RefinementRun]:
    """The CDM's heatmap of every case (the model's defaults, no refinement, forced past the plausibility checks)."""
    runs = []
    for n, case in enumerate(cases, start=1):
        volume = read_volume(case.images[model.modalities[0]])
        volumes = [volume] + [read_volume(case.images[m]) for m in model.modalities[1:]]
        result = segment_volume(model, volumes, device=device, lesion_intensity=0.0, grow_above=0.0, force=True,
                                log=lambda m: None)
        runs.append(RefinementRun.of(result.heatmap, result.threshold, volume, read_volume(case.seg).array > 0))
        log(f"{n}/{len(cases)} {case.case_id}: CDM run in {result.seconds:.1f} s")
    return runs


def score_refinement(runs: Sequence[RefinementRun], settings: Dict[str, float]) -> RefinementScore:
    """Mean 3D Dice (volumes with a lesion) and mean false positives in ml (lesion-free ones) of ``settings``
    (every key of GRID; with a heatmap_support above 0 also heatmap_floor, the components of SUPPORT_GRID; with a
    strong_finding_ml above 0 also strong_finding_peak, STRONG_GRID; with a small_lesion_ml above 0 also
    small_lesion_floor and small_lesion_peak, SMALL_GRID)."""
    dices, false_ml = [], []
    for run in runs:
        # the runner's own refinement, with these settings as the model's defaults
        refined = refine_mask(run.mask(settings["min_component_ml"]), run.image, run.content, settings, "cdm",
                              heatmap=run.heatmap, threshold=run.threshold,
                              min_component_voxels=voxels_for_ml(settings["min_component_ml"], run.spacing_mm),
                              spacing_mm=run.spacing_mm)[0] > 0
        if run.truth.any():
            dices.append(dice(refined, run.truth))
        else:
            false_ml.append(float(refined.sum() * run.voxel_ml))
    return RefinementScore(dict(settings), float(np.mean(dices)), float(np.mean(false_ml)) if false_ml else 0.0)


def check_validation_set(with_lesion: Sequence[bool]) -> None:
    """Raises ValueError unless some volumes have a lesion (Dice is measured there) and some have none (the
    false-positive limit is measured there); with_lesion: one bool per validation volume."""
    if not any(with_lesion):
        raise ValueError("the refinement is chosen on validation volumes with lesion masks; none has a lesion")
    if all(with_lesion):
        raise ValueError(f"the false-positive limit is measured on lesion-free volumes, and all {len(with_lesion)} "
                         "have a lesion; add lesion-free cases (cdmsegment phantom --families ...,healthy)")


def within_limit(scores: Sequence[RefinementScore], max_fp_ml: float) -> List[RefinementScore]:
    """The scores whose mean false positives stay within ``max_fp_ml``, best mean Dice first (ties in grid order)."""
    return sorted((s for s in scores if s.false_positive_ml <= max_fp_ml), key=lambda s: -s.mean_dice)


def choose_best(scores: Sequence[RefinementScore], max_fp_ml: float, dice_tolerance: float = DICE_TOLERANCE
                ) -> RefinementScore:
    """The best mean 3D Dice within the false-positive limit, or among those within ``dice_tolerance`` of it the
    fewest false positives (of equals, the better Dice, then the first in ``scores``); the fewest false positives
    when none stays within the limit."""
    allowed = within_limit(scores, max_fp_ml)
    if not allowed:
        return min(scores, key=lambda s: (s.false_positive_ml, -s.mean_dice))
    near = [s for s in allowed if s.mean_dice >= allowed[0].mean_dice - dice_tolerance]
    return min(near, key=lambda s: s.false_positive_ml)  # the first of equals: best Dice, then grid order


def stage_combinations(stage: Dict[str, Sequence[float]]) -> List[Dict[str, float]]:
    """Every combination of a stage's values, in grid order, each once: where a switch (SWITCHES) is 0 the stage's
    other values change nothing, so only the first such combination is kept."""
    combinations, seen = [], set()
    for values in itertools.product(*stage.values()):
        settings = dict(zip(stage, values))
        off = [k for k in SWITCHES if k in settings and not settings[k]]
        key = tuple((k, v) for k, v in settings.items() if not off or k in off)
        if key not in seen:
            seen.add(key)
            combinations.append(settings)
    return combinations


def choose_refinement(runs: Sequence[RefinementRun], max_fp_ml: float = 0.5, grid: Dict[str, Sequence[float]] = GRID,
                      support_grid: Dict[str, Sequence[float]] = SUPPORT_GRID,
                      strong_grid: Dict[str, Sequence[float]] = STRONG_GRID,
                      small_grid: Dict[str, Sequence[float]] = SMALL_GRID,
                      finding_grid: Dict[str, Sequence[float]] = FINDING_GRID,
                      dice_tolerance: float = DICE_TOLERANCE) -> Tuple[RefinementScore, List[RefinementScore]]:
    """(the chosen settings' score, every combination's score, all five stages). Raises ValueError without a
    volume with a lesion or without a lesion-free one (the false-positive limit is measured there)."""
    check_validation_set([run.truth.any() for run in runs])
    scores, chosen = [], {}
    for stage in (grid, support_grid, strong_grid, small_grid, finding_grid):
        stage_scores = [score_refinement(runs, {**chosen, **settings}) for settings in stage_combinations(stage)]
        scores += stage_scores
        best = choose_best(stage_scores, max_fp_ml, dice_tolerance)
        chosen = best.settings
    return best, scores

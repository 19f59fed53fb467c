"""Measured quality on whole volumes: what a user of the tool gets, on the input's own grid.

For each held-out case the full runner makes the mask (volume-level threshold), and we
report 3D Dice per volume, the paper's per-slice Dice on axial lesion slices, and the
false-positive volume on lesion-free cases. A plain baseline - Otsu's threshold on the
intensities of the brain - shows what the figures mean: bright-lesion FLAIR is where
intensity alone does best.
"""

import csv
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import numpy as np

from ..data.cases import Case
from ..core.reading import read_volume
from .metrics import dice, nan_mean
from ..core.modelfile import LoadedModel
from ..core.slicing import Orientation
from ..core.threshold import otsu_threshold
from ..core.runner import segment_volume


@dataclass
class VolumeScore:
    case: str
    method: str
    lesion_ml: float
    predicted_ml: float
    dice_3d: float  # NaN on lesion-free cases
    slice_dice: float  # mean over axial slices with lesion (the paper's protocol); NaN on lesion-free cases
    false_positive_ml: float  # predicted volume outside the lesion
    seconds: float


def intensity_otsu_mask(array: np.ndarray) -> np.ndarray:
    """The baseline: voxels brighter than Otsu's threshold of the non-zero (brain) intensities."""
    brain = array != 0
    return (array > otsu_threshold(array[brain])) & brain


def score_volume(case: str, method: str, pred: np.ndarray, truth: np.ndarray, orientation: Orientation,
                 voxel_ml: float, seconds: float) -> VolumeScore:
    pred_c, truth_c = orientation.to_canonical(pred), orientation.to_canonical(truth)
    lesion_slices = [k for k in range(truth_c.shape[0]) if truth_c[k].any()]
    return VolumeScore(
        case, method, float(truth.sum() * voxel_ml), float(pred.sum() * voxel_ml),
        dice(pred, truth) if truth.any() else float("nan"),
        nan_mean([dice(pred_c[k], truth_c[k]) for k in lesion_slices])[0] if lesion_slices else float("nan"),
        float((pred & ~truth).sum() * voxel_ml), seconds)


def evaluate_volumes(cases: Sequence[Case], model: LoadedModel, modalities: Optional[Sequence[str]] = None,
                     log: Callable[[str], None] = print, **run_options) -> List[VolumeScore]:
    """CDM (the model's defaults unless overridden) and the intensity-Otsu baseline on every case."""
    modalities = list(modalities or model.modalities)
    scores = []
    for n, case in enumerate(cases, start=1):
        volumes = [read_volume(case.images[m]) for m in modalities]
        truth = read_volume(case.seg).array > 0
        ref = volumes[0]
        orientation = Orientation.from_direction(ref.direction, ref.spacing_mm)
        voxel_ml = float(np.prod(ref.spacing_mm)) / 1000
        result = segment_volume(model, volumes, log=lambda m: None, **run_options)
        scores.append(score_volume(case.case_id, "CDM", result.mask > 0, truth, orientation, voxel_ml,
                                   result.seconds))
        start = time.perf_counter()
        baseline = intensity_otsu_mask(ref.array)
        scores.append(score_volume(case.case_id, "Otsu on intensity", baseline, truth, orientation, voxel_ml,
                                   time.perf_counter() - start))
        log(f"{n}/{len(cases)} {case.case_id}: CDM 3D Dice {scores[-2].dice_3d:.3f}, "
            f"false positives {scores[-2].false_positive_ml:.2f} ml, {result.seconds:.1f} s")
    return scores


def summary_table(scores: Sequence[VolumeScore]) -> str:
    """Markdown: per method, mean 3D Dice and slice Dice on lesion cases, false positives on lesion-free ones."""
    lines = ["| method | cases with lesion | 3D Dice (mean +- sd) | slice Dice, lesion slices | "
             "lesion-free cases | false positives on lesion-free cases (ml, mean / max) | s per volume |",
             "|---|---|---|---|---|---|---|"]
    for method in dict.fromkeys(s.method for s in scores):
        rows = [s for s in scores if s.method == method]
        lesion = [s for s in rows if s.lesion_ml > 0]
        healthy = [s for s in rows if s.lesion_ml == 0]
        d3 = np.array([s.dice_3d for s in lesion])
        fp = np.array([s.false_positive_ml for s in healthy]) if healthy else np.array([np.nan])
        lines.append(f"| {method} | {len(lesion)} | {np.nanmean(d3):.3f} +- {np.nanstd(d3):.3f} | "
                     f"{nan_mean([s.slice_dice for s in lesion])[0]:.3f} | {len(healthy)} | "
                     f"{np.nanmean(fp):.2f} / {np.nanmax(fp):.2f} | {np.mean([s.seconds for s in rows]):.1f} |")
    return "\n".join(lines) + "\n"


def write_scores(scores: Sequence[VolumeScore], output_dir: Path, command: str) -> List[Path]:
    output_dir.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = output_dir / "volumes.csv", output_dir / "volumes.md"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(scores[0])))
        writer.writeheader()
        writer.writerows(asdict(s) for s in scores)
    md_path.write_text(f"Command: `{command}`\n\n" + summary_table(scores))
    return [md_path, csv_path]

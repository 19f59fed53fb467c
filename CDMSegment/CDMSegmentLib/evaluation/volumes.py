"""Measured quality on whole volumes: what a user of the tool gets, on the input's own grid.

For each held-out case the full runner makes the mask (volume-level threshold), and we
report 3D Dice per volume, the paper's per-slice Dice on axial lesion slices, detection
(any overlap with the lesion), lesion-wise detection (each lesion found or not, and regions of the
mask that touch none: metrics.lesion_counts), and the false-positive volume on lesion-free cases, overall,
by lesion family (randomised phantoms' ``cases.csv``) and by lesion volume. Two baselines
on intensity alone (``intensity_baselines``) show what the figures mean, and ``paired`` sets every method
against the calibrated one on the same volumes.
"""

import csv
import io
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from ..data.cases import Case
from ..core.reading import read_volume
from .intensity_baselines import THRESHOLD_BASELINE, intensity_otsu_mask, intensity_threshold_mask
from .metrics import dice, lesion_findings, nan_mean
from .paired import paired_table
from ..core.modelfile import LoadedModel
from ..core.slicing import Orientation
from ..core.device import choose_device
from ..core.ood import ood_score
from ..core.plausibility import ood_finding
from ..core.refine import grow_through_intensity, supported_components
from ..core.runner import refine_mask, segment_volume
from ..core.tissue import tissue_mask

SIZE_BINS_ML = (0.0, 1.0, 5.0, 20.0, 100.0, np.inf)


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
    family: str = ""  # lesion family of a randomised phantom, else ""
    detected: float = float("nan")  # 1 when the prediction touches the lesion, 0 when not; NaN on lesion-free cases
    ood_score: float = float("nan")  # the model's OOD score of the volume (core/ood.py), NaN without a reference
    ood_flag: str = ""  # "warned" or "refused" where the tool would have said so, else ""
    lesions: int = 0  # 3D components of the ground truth (metrics.lesion_counts)
    lesions_found: int = 0  # of them, those the prediction touches
    false_regions: int = 0  # 3D components of the prediction that touch no lesion
    missed_lesion_ml: float = 0.0  # lesion volume in the lesions the prediction does not touch (metrics.dice_parts)
    false_region_ml: float = 0.0  # predicted volume in the regions that touch no lesion
    found_dice: float = float("nan")  # 3D Dice of the regions touching a lesion against the lesions they touch


def refined_method_name(defaults: dict) -> str:
    """'CDM + lesion intensity (0.7, floor 1.4)', with ' + heatmap support (0.5, floor 1.2)' and
    ' + strong findings (0.1 ml, peak 3)' and ' + small lesions (up to 0.5 ml, floor 2, peak 0.2)' and ', findings
    under 0.05 ml removed' where the model has them."""
    name = (f"CDM + lesion intensity ({defaults.get('lesion_intensity', 0):g}, "
            f"floor {defaults.get('lesion_intensity_floor', 0):g})")
    if defaults.get("heatmap_support"):
        name += f" + heatmap support ({defaults['heatmap_support']:g}, floor {defaults.get('heatmap_floor', 0):g})"
    if defaults.get("strong_finding_ml"):
        name += (f" + strong findings ({defaults['strong_finding_ml']:g} ml, "
                 f"peak {defaults.get('strong_finding_peak', 0):g})")
    if defaults.get("small_lesion_ml"):
        name += (f" + small lesions (up to {defaults['small_lesion_ml']:g} ml, floor "
                 f"{defaults.get('small_lesion_floor', 0):g}, peak {defaults.get('small_lesion_peak', 0):g})")
    if defaults.get("min_finding_ml"):
        name += f", findings under {defaults['min_finding_ml']:g} ml removed"
    return name


def score_volume(case: str, method: str, pred: np.ndarray, truth: np.ndarray, orientation: Orientation,
                 voxel_ml: float, seconds: float, family: str = "") -> VolumeScore:
    pred_c, truth_c = orientation.to_canonical(pred), orientation.to_canonical(truth)
    lesion_slices = [k for k in range(truth_c.shape[0]) if truth_c[k].any()]
    counts, parts = lesion_findings(pred, truth)
    return VolumeScore(
        case, method, float(truth.sum() * voxel_ml), float(pred.sum() * voxel_ml),
        dice(pred, truth) if truth.any() else float("nan"),
        nan_mean([dice(pred_c[k], truth_c[k]) for k in lesion_slices])[0] if lesion_slices else float("nan"),
        float((pred & ~truth).sum() * voxel_ml), seconds, family,
        float(counts.found > 0) if truth.any() else float("nan"), lesions=counts.lesions,
        lesions_found=counts.found, false_regions=counts.false_regions,
        missed_lesion_ml=parts.missed_voxels * voxel_ml, false_region_ml=parts.false_region_voxels * voxel_ml,
        found_dice=parts.found_dice)


def evaluate_volumes(cases: Sequence[Case], model: LoadedModel, modalities: Optional[Sequence[str]] = None,
                     families: Optional[Dict[str, str]] = None, intensity_threshold: Optional[float] = None,
                     grow_above: Optional[float] = None, log: Callable[[str], None] = print,
                     **run_options) -> List[VolumeScore]:
    """CDM (the model's defaults unless overridden, without refinement), the same mask delineated by the
    lesion's intensity when the model stores ``lesion_intensity`` (what ``segment`` gives by default), with
    ``grow_above`` also the CDM's mask grown through the intensity (core/refine.py; the model's
    ``grow_above`` when None, none when 0), and the intensity baselines on every case.

    families: case id -> lesion family, for the per-family tables. intensity_threshold: the
    calibrated threshold on relative intensity (``fit_intensity_threshold`` on training
    families, in multiples of the brain's median); without it only the Otsu baseline runs. run_options: those
    of core/runner.segment_volume; its ``device`` ('auto' by default) is resolved once, and ``log`` says which
    device 'auto' chose.
    """
    modalities = list(modalities or model.modalities)
    families = families or {}
    # resolved once, saying which device 'auto' chose, for both the OOD score and the runs
    run_options["device"] = str(choose_device(run_options.get("device", "auto"), log))
    grow_above = model.defaults.get("grow_above", 0.0) if grow_above is None else grow_above
    scores = []
    for n, case in enumerate(cases, start=1):
        volumes = [read_volume(case.images[m]) for m in modalities]
        truth = read_volume(case.seg).array > 0
        ref = volumes[0]
        orientation = Orientation.from_direction(ref.direction, ref.spacing_mm)
        voxel_ml = float(np.prod(ref.spacing_mm)) / 1000
        family = families.get(case.case_id, "")
        # every volume is scored (force), and its OOD score reported beside: a warning should mean a worse result
        ood = ood_score(model, volumes, device=run_options["device"])
        result = segment_volume(model, volumes, log=lambda m: None, grow_above=0.0, lesion_intensity=0.0, force=True,
                                **run_options)
        cdm = score_volume(case.case_id, "CDM", result.mask > 0, truth, orientation, voxel_ml, result.seconds, family)
        if ood is not None:
            finding = ood_finding(ood)
            cdm.ood_score, cdm.ood_flag = ood.score, "" if finding is None else ("refused" if finding.clear else "warned")
        first = len(scores)
        scores.append(cdm)
        content = tissue_mask(ref.array).cpu().numpy()
        fraction = model.defaults.get("lesion_intensity", 0.0)
        if fraction:  # the model's default refinement, from the same heatmap and mask
            start = time.perf_counter()
            refined = refine_mask(result.mask, ref.array, content, model.defaults, "cdm", heatmap=result.heatmap,
                                  threshold=result.threshold, min_component_voxels=result.min_component_voxels,
                                  spacing_mm=ref.spacing_mm)[0]
            scores.append(score_volume(
                case.case_id, refined_method_name(model.defaults),
                refined > 0, truth, orientation, voxel_ml, result.seconds + time.perf_counter() - start, family))
        if grow_above:  # from the same heatmap and mask: the refinement alone makes the difference
            for name, refine in ((f"CDM + intensity growth ({grow_above:g})", grow_through_intensity),
                                 (f"intensity components the CDM touches ({grow_above:g})", supported_components)):
                start = time.perf_counter()
                refined = refine(result.mask, ref.array, content, grow_above)
                scores.append(score_volume(case.case_id, name, refined > 0, truth, orientation, voxel_ml,
                                           result.seconds + time.perf_counter() - start, family))
        baselines = {"Otsu on intensity": intensity_otsu_mask}
        if intensity_threshold is not None:
            baselines[THRESHOLD_BASELINE] = lambda a: intensity_threshold_mask(a, intensity_threshold)
        for name, make_mask in baselines.items():
            start = time.perf_counter()
            mask = make_mask(ref.array)
            scores.append(score_volume(case.case_id, name, mask, truth, orientation, voxel_ml,
                                       time.perf_counter() - start, family))
        log(case_line(n, len(cases), scores[first:]))
    return scores


def case_line(n: int, total: int, case_scores: Sequence[VolumeScore]) -> str:
    """One case's progress line: the CDM's 3D Dice (a lesion-free case: none) and false positives, then those of
    the refined mask (what ``segment`` gives), named as in the tables, where the model refines, and the OOD score
    with its verdict."""
    cdm = case_scores[0]
    refined = next((s for s in case_scores if s.method.startswith("CDM + lesion intensity")), None)
    quality = "lesion-free" if np.isnan(cdm.dice_3d) else f"3D Dice CDM {cdm.dice_3d:.3f}" + (
        f", {refined.method} {refined.dice_3d:.3f}" if refined else "")
    fp = f"false positives CDM {cdm.false_positive_ml:.2f} ml" + (
        f", {refined.method} {refined.false_positive_ml:.2f} ml" if refined else "")
    ood = "" if np.isnan(cdm.ood_score) else f", OOD score {cdm.ood_score:.2f}" + (
        f" ({cdm.ood_flag})" if cdm.ood_flag else "")
    family = f" {cdm.family}" if cdm.family else ""
    return f"{n}/{total} {cdm.case}{family}: {quality}, {fp}{ood}, {cdm.seconds:.1f} s"


def summary_table(scores: Sequence[VolumeScore]) -> str:
    """Markdown: per method, mean 3D Dice and slice Dice on lesion cases, false positives on lesion-free ones."""
    lines = ["| method | volumes with lesion | 3D Dice (mean +- sd) | slice Dice, lesion slices | "
             "lesion-free volumes | false positives on lesion-free volumes (ml, mean / max) | s per volume |",
             "|---|---|---|---|---|---|---|"]
    for method in dict.fromkeys(s.method for s in scores):
        rows = [s for s in scores if s.method == method]
        lesion = [s for s in rows if s.lesion_ml > 0]
        healthy = [s for s in rows if s.lesion_ml == 0]
        d3 = np.array([s.dice_3d for s in lesion])
        fp = np.array([s.false_positive_ml for s in healthy])
        # "-" where there is nothing to average; the sd only where there are two cases or more
        dice_3d = "-" if not lesion else f"{d3.mean():.3f}" + (f" +- {d3.std():.3f}" if len(lesion) > 1 else "")
        slice_dice = "-" if not lesion else f"{nan_mean([s.slice_dice for s in lesion])[0]:.3f}"
        false_ml = "-" if not healthy else f"{fp.mean():.2f} / {fp.max():.2f}"
        lines.append(f"| {method} | {len(lesion)} | {dice_3d} | {slice_dice} | {len(healthy)} | {false_ml} | "
                     f"{np.mean([s.seconds for s in rows]):.1f} |")
    return "\n".join(lines) + "\n"


def lesions_found(rows: Sequence[VolumeScore]) -> str:
    """"found of lesions (percent)" pooled over ``rows`` (each lesion counts once, whatever its volume), "-"
    where they hold no lesion."""
    lesions = sum(s.lesions for s in rows)
    found = sum(s.lesions_found for s in rows)
    return f"{found} of {lesions} ({100 * found / lesions:.0f} %)" if lesions else "-"


def _group_row(rows: Sequence[VolumeScore]) -> str:
    lesion = [s for s in rows if s.lesion_ml > 0]
    healthy = [s for s in rows if s.lesion_ml == 0]
    d3 = [s.dice_3d for s in lesion]
    found = [s.detected for s in lesion]
    fp = [s.false_positive_ml for s in healthy]
    false_regions = f"{np.mean([s.false_regions for s in rows]):.1f}" if rows else "-"
    return (f"{len(lesion)} | {np.nanmean(d3):.3f} | {100 * np.nanmean(found):.0f} % | {lesions_found(lesion)} | "
            if lesion else "0 | - | - | - | ") + \
           (f"{len(healthy)} | {np.mean(fp):.2f} |" if healthy else "0 | - |") + f" {false_regions} |"


def family_table(scores: Sequence[VolumeScore]) -> str:
    """Markdown, per lesion family and method: mean 3D Dice, detection (volumes, then lesions), false positives on
    lesion-free cases, and regions of the mask that touch no lesion (mean per volume, all volumes)."""
    lines = ["| family | method | volumes with lesion | 3D Dice (mean) | detected | lesions found | lesion-free volumes | "
             "false positives on lesion-free volumes (ml, mean) | false regions per volume (all volumes) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for family in sorted(dict.fromkeys(s.family for s in scores)):
        for method in dict.fromkeys(s.method for s in scores):
            rows = [s for s in scores if s.family == family and s.method == method]
            lines.append(f"| {family or '-'} | {method} | {_group_row(rows)}")
    return "\n".join(lines) + "\n"


def dice_parts_table(scores: Sequence[VolumeScore]) -> str:
    """Markdown, per lesion family and method, on the volumes with a lesion: where the 3D Dice goes
    (metrics.dice_parts): the share of the lesion volume in lesions the mask does not touch (pooled over the
    volumes), the volume of the mask's regions that touch no lesion (mean per volume; a found lesion's overflow is
    not in it, but in the last figure), and the Dice of the regions that touch a lesion against the lesions they
    touch (mean over the volumes where a lesion is found, their number beside it)."""
    lines = ["| family | method | volumes with lesion | 3D Dice (mean) | lesion volume in lesions missed (pooled) | "
             "regions touching no lesion (ml, mean) | 3D Dice of the lesions found and the regions touching them "
             "(mean, volumes) |", "|---|---|---|---|---|---|---|"]
    for family in sorted(dict.fromkeys(s.family for s in scores if s.lesion_ml > 0)):
        for method in dict.fromkeys(s.method for s in scores):
            rows = [s for s in scores if s.family == family and s.method == method and s.lesion_ml > 0]
            if not rows:
                continue
            found, nothing_found = nan_mean([s.found_dice for s in rows])
            missed = 100 * sum(s.missed_lesion_ml for s in rows) / sum(s.lesion_ml for s in rows)
            lines.append(f"| {family or '-'} | {method} | {len(rows)} | {np.nanmean([s.dice_3d for s in rows]):.3f} | "
                         f"{missed:.0f} % | {np.mean([s.false_region_ml for s in rows]):.2f} | "
                         + ("-" if np.isnan(found) else f"{found:.3f} ({len(rows) - nothing_found})") + " |")
    return "\n".join(lines) + "\n"


def size_table(scores: Sequence[VolumeScore]) -> str:
    """Markdown, per lesion-volume bin (ml; a case's total) and method: mean 3D Dice, detection (any overlap)
    and the lesions found (each lesion of those volumes once)."""
    lines = ["| lesion volume (ml) | method | volumes | 3D Dice (mean) | detected | lesions found |",
             "|---|---|---|---|---|---|"]
    for lo, hi in zip(SIZE_BINS_ML[:-1], SIZE_BINS_ML[1:]):
        for method in dict.fromkeys(s.method for s in scores):
            rows = [s for s in scores if s.method == method and lo < s.lesion_ml <= hi]
            if rows:
                lines.append(f"| {lo:g}-{hi:g} | {method} | {len(rows)} | {np.nanmean([s.dice_3d for s in rows]):.3f} | "
                             f"{100 * np.mean([s.detected for s in rows]):.0f} % | {lesions_found(rows)} |")
    return "\n".join(lines) + "\n"


# What the tables' words mean, written above them in volumes.md (metrics.lesion_counts and dice_parts)
TERMS = ("Terms: *3D Dice* is computed per volume with a lesion, then averaged. "
         "*Detected*: the share of volumes with a lesion whose mask touches it (any overlap). *Lesions found*: of "
         "the lesions (3D components of the truth, each counted once, as in the MSSEG challenge), those the mask "
         "touches. *False regions*: 3D components of the mask that touch no lesion. *False positives* on "
         "lesion-free volumes: all of their mask, in ml. The figure in brackets in the last column of the third "
         "table is the number of volumes where a lesion was found.")
TABLE_TITLES = ("All volumes", "By lesion family", "Where the 3D Dice goes, by lesion family", "By lesion volume")


def tables(scores: Sequence[VolumeScore]) -> str:
    """Markdown: summary_table, family_table, dice_parts_table and size_table, each under its TABLE_TITLES heading,
    then paired.paired_table (which says what it is) where the calibrated threshold ran; blank lines between."""
    paired = paired_table(scores)
    parts = [summary_table(scores), family_table(scores), dice_parts_table(scores), size_table(scores)]
    return "\n".join([f"### {title}\n\n{table}" for title, table in zip(TABLE_TITLES, parts)] + ([paired] if paired else []))


def score_files(scores: Sequence[VolumeScore], command: str, notes: Sequence[str] = ()) -> Dict[str, str]:
    """{"volumes.csv": one row per case and method, "volumes.md": the command, ``notes`` (a paragraph each: how a
    baseline was fitted, for one) and the tables}."""
    rows = io.StringIO()
    writer = csv.DictWriter(rows, fieldnames=list(asdict(scores[0])))
    writer.writeheader()
    writer.writerows(asdict(s) for s in scores)
    preamble = "".join(f"{paragraph}\n\n" for paragraph in [f"Command: `{command}`", *notes, TERMS])
    return {"volumes.csv": rows.getvalue(), "volumes.md": preamble + tables(scores)}

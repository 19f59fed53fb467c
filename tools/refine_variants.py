"""A candidate refinement measured beside the default one and the calibrated intensity threshold, on the same
CDM heatmaps: per CDM component, a level between the lesion's intensity and its surroundings' (a local
contrast), instead of one level per volume (core/refine.lesion_intensity_components).

Per component of heatmap > the model's threshold (no speck removal): L = median intensity inside, B = median
of the brain in a shell of ``shell_mm`` around it; a component with L < min_contrast x B is dropped, else its
seed grows through the voxels above B + fraction x (L - B) within ``reach_mm`` of it. The settings are chosen
on the validation folder only (best mean 3D Dice with at most 0.5 ml of false positives on its lesion-free
volumes, as calibrate-refinement chooses), then measured on the held-out folders.

    python tools/refine_variants.py work/retrain/val work/retrain/test_families work/retrain/test_contrast \
        --cache work/refine-variants [--model brain-flair-cpu] [--per-family 6]

With --min-component-ml, also the default refinement after another speck removal (the model's min_component_ml).
The CDM runs once per volume (cached as .npz under --cache); an experiment, not a method of the tool.
"""

import argparse
import itertools
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "CDMSegment"))

from CDMSegmentLib.core.modelfile import load_model  # noqa: E402
from CDMSegmentLib.core.reading import read_volume  # noqa: E402
from CDMSegmentLib.core.runner import refine_mask, segment_volume  # noqa: E402
from CDMSegmentLib.core.threshold import make_mask, voxels_for_ml  # noqa: E402
from CDMSegmentLib.core.tissue import tissue_mask  # noqa: E402
from CDMSegmentLib.data.cases import find_brats_cases  # noqa: E402
from CDMSegmentLib.data.randomised import read_case_table  # noqa: E402
from CDMSegmentLib.evaluation.intensity_baselines import fit_intensity_threshold, intensity_threshold_mask  # noqa: E402
from CDMSegmentLib.evaluation.metrics import dice  # noqa: E402

GRID = {"fraction": (0.3, 0.4, 0.5), "min_contrast": (1.2, 1.3, 1.4), "shell_mm": (3, 4),
        "reach_mm": (4, 6, 8)}


def cdm_runs(folder: Path, cache: Path, model, per_family=None):
    """One dict per case with a mask: heatmap, threshold, CDM mask, image, content, truth, spacing, family."""
    families = {case: row["family"] for case, row in read_case_table(folder).items()}
    seen, runs = {}, []
    for case in (c for c in find_brats_cases(folder) if c.seg is not None):
        family = families.get(case.case_id, "")
        seen[family] = seen.get(family, 0) + 1
        if per_family is not None and seen[family] > per_family:
            continue
        path = cache / folder.name / f"{case.case_id}.npz"
        volume = read_volume(case.images[model.modalities[0]])
        if not path.exists():
            result = segment_volume(model, [volume], lesion_intensity=0.0, grow_above=0.0, force=True, device="cpu",
                                    log=lambda m: None)
            path.parent.mkdir(parents=True, exist_ok=True)
            np.savez_compressed(path, heatmap=result.heatmap, mask=result.mask, threshold=result.threshold)
            print(f"{folder.name} {case.case_id}: CDM in {result.seconds:.1f} s", file=sys.stderr, flush=True)
        stored = np.load(path)
        runs.append({"heatmap": stored["heatmap"], "mask": stored["mask"] > 0, "threshold": float(stored["threshold"]),
                     "image": volume.array, "content": tissue_mask(volume.array).cpu().numpy(),
                     "truth": read_volume(case.seg).array > 0, "spacing_mm": volume.spacing_mm,
                     "spacing_kji": np.array(volume.spacing_mm)[::-1],
                     "voxel_ml": float(np.prod(volume.spacing_mm)) / 1000, "family": family})
    return runs


def local_contrast(run, fraction, min_contrast, shell_mm, reach_mm) -> np.ndarray:
    """bool (K, J, I): the candidate refinement (module docstring) of one run."""
    image, content, spacing = run["image"], run["content"], run["spacing_kji"]
    labels, count = ndimage.label((run["heatmap"] > run["threshold"]) & content)
    out = np.zeros(image.shape, bool)
    pad = np.ceil((shell_mm + reach_mm) / spacing).astype(int) + 1
    for n, box in enumerate(ndimage.find_objects(labels), start=1):
        box = tuple(slice(max(0, s.start - p), min(d, s.stop + p)) for s, p, d in zip(box, pad, image.shape))
        seed, im, tissue = labels[box] == n, image[box], content[box]
        distance = ndimage.distance_transform_edt(~seed, sampling=spacing)
        shell = (distance > 0) & (distance <= shell_mm) & tissue
        inside = float(np.median(im[seed]))
        around = float(np.median(im[shell])) if shell.any() else float(np.median(image[content]))
        if inside < min_contrast * around:
            continue
        bright = (im > around + fraction * (inside - around)) & tissue & (distance <= reach_mm)
        grown, _ = ndimage.label(bright)
        kept = np.unique(grown[seed & bright])
        out[box] |= np.isin(grown, kept[kept > 0])
    return out


def default_refinement(run, model, min_component_ml) -> np.ndarray:
    """bool: the model's default refinement of the CDM's mask made with another speck removal (in ml)."""
    mask = make_mask(run["heatmap"], run["threshold"], run["content"],
                     voxels_for_ml(min_component_ml, run["spacing_mm"]))
    return refine_mask(mask, run["image"], run["content"], model.defaults, "cdm")[0] > 0


def score(runs, method):
    """(mean 3D Dice on volumes with a lesion, mean false positives in ml on lesion-free ones, share of the
    1-5 ml lesions touched, their count, {family: mean Dice})."""
    dices, false_ml, found, by_family = [], [], [], {}
    for run in runs:
        predicted, truth = method(run), run["truth"]
        if truth.any():
            dices.append(dice(predicted, truth))
            by_family.setdefault(run["family"], []).append(dices[-1])
            if 1 <= truth.sum() * run["voxel_ml"] <= 5:
                found.append(float((predicted & truth).any()))
        else:
            false_ml.append(float(predicted.sum() * run["voxel_ml"]))
    return (float(np.mean(dices)), float(np.mean(false_ml)) if false_ml else float("nan"),
            float(np.mean(found)) if found else float("nan"), len(found),
            {family: round(float(np.mean(v)), 3) for family, v in by_family.items()})


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("validation", type=Path)
    p.add_argument("held_out", type=Path, nargs="+")
    p.add_argument("--cache", type=Path, required=True)
    p.add_argument("--model", default=None)
    p.add_argument("--per-family", type=int, default=None)
    p.add_argument("--min-component-ml", type=float, nargs="*", default=[0.1],
                   help="also the default refinement after this speck removal instead of the model's")
    args = p.parse_args()
    model = load_model(args.model)
    validation = cdm_runs(args.validation, args.cache, model, args.per_family)
    level, _ = fit_intensity_threshold([(r["image"], r["truth"]) for r in validation])
    names = list(GRID)
    chosen, best = None, -1.0
    for values in itertools.product(*GRID.values()):
        settings = dict(zip(names, values))
        mean_dice, fp_ml, *_ = score(validation, lambda r: local_contrast(r, **settings))
        if fp_ml <= 0.5 and mean_dice > best:
            chosen, best = settings, mean_dice
    if chosen is None:
        sys.exit("no setting of the grid keeps the validation volumes' false positives within 0.5 ml")
    methods = {"CDM alone": lambda r: r["mask"],
               "CDM + lesion intensity (the model's default)":
                   lambda r: refine_mask(r["mask"], r["image"], r["content"], model.defaults, "cdm")[0] > 0,
               **{f"CDM + lesion intensity, speck removal {ml:g} ml": (lambda ml: lambda r: default_refinement(
                   r, model, ml))(ml) for ml in args.min_component_ml},
               f"local contrast {chosen}": lambda r: local_contrast(r, **chosen),
               f"calibrated intensity threshold ({level:g})": lambda r: intensity_threshold_mask(r["image"], level)}
    print("| set | method | 3D Dice | false positives (ml) | 1-5 ml found | Dice by family |\n|---|---|---|---|---|---|")
    for folder in [args.validation] + args.held_out:
        runs = validation if folder == args.validation else cdm_runs(folder, args.cache, model, args.per_family)
        for name, method in methods.items():
            mean_dice, fp_ml, found, small, families = score(runs, method)
            print(f"| {folder.name} | {name} | {mean_dice:.3f} | {fp_ml:.2f} | {100 * found:.0f} % of {small} | "
                  f"{families} |", flush=True)


if __name__ == "__main__":
    main()

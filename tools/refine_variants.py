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
The CDM runs once per volume (cached as .npz under --cache/<model>/<folder>); an experiment, not a method of the tool.
"""

import argparse
import itertools
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "CDMSegment"))

from CDMSegmentLib.core import ranges  # noqa: E402
from CDMSegmentLib.core.errors import CDMSegmentError  # noqa: E402
from CDMSegmentLib.core.modelfile import load_model  # noqa: E402
from CDMSegmentLib.core.reading import read_volume  # noqa: E402
from CDMSegmentLib.cli.evaluation_commands import _cases_with_masks  # noqa: E402
from CDMSegmentLib.core.runner import refine_mask, segment_volume  # noqa: E402
from CDMSegmentLib.core.threshold import voxels_for_ml  # noqa: E402
from CDMSegmentLib.core.slicing import Orientation  # noqa: E402
from CDMSegmentLib.evaluation.intensity_baselines import fit_intensity_threshold, intensity_threshold_mask  # noqa: E402
from CDMSegmentLib.evaluation.refine_calibration import RefinementRun, check_validation_set  # noqa: E402
from CDMSegmentLib.evaluation.volumes import family_table, score_volume, size_table  # noqa: E402

GRID = {"fraction": (0.3, 0.4, 0.5), "min_contrast": (1.2, 1.3, 1.4), "shell_mm": (3, 4),
        "reach_mm": (4, 6, 8)}


def cdm_runs(folder: Path, cache: Path, model, per_family=None):
    """One dict per case with a mask: its case id, family, orientation and the CDM's run (no refinement:
    evaluation/refine_calibration.RefinementRun, as calibrate-refinement keeps it)."""
    cases, families = _cases_with_masks(folder, per_family=per_family)
    runs = []
    for case in cases:
        path = cache / str(model.metadata.get("name", "model")) / folder.name / f"{case.case_id}.npz"
        volume = read_volume(case.images[model.modalities[0]])
        if not path.exists():
            result = segment_volume(model, [volume], lesion_intensity=0.0, grow_above=0.0, force=True, device="cpu",
                                    log=lambda m: None)
            path.parent.mkdir(parents=True, exist_ok=True)
            np.savez_compressed(path, heatmap=result.heatmap, threshold=result.threshold)
            print(f"{folder.name} {case.case_id}: CDM in {result.seconds:.1f} s", file=sys.stderr, flush=True)
        stored = np.load(path)
        runs.append({"case": case.case_id, "family": families.get(case.case_id, ""),
                     "orientation": Orientation.from_direction(volume.direction, volume.spacing_mm),
                     "cdm": RefinementRun.of(stored["heatmap"], stored["threshold"], volume,
                                             read_volume(case.seg).array > 0)})
    return runs


def local_contrast(run, fraction, min_contrast, shell_mm, reach_mm) -> np.ndarray:
    """bool (K, J, I): the candidate refinement (module docstring) of one run."""
    cdm = run["cdm"]
    image, content, spacing = cdm.image, cdm.content, np.array(cdm.spacing_mm)[::-1]
    labels, count = ndimage.label((cdm.heatmap > cdm.threshold) & content)
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
    """uint8: the model's default refinement of the CDM's mask made with this speck removal (in ml)."""
    cdm = run["cdm"]
    return refine_mask(cdm.mask(min_component_ml), cdm.image, cdm.content, model.defaults, "cdm", heatmap=cdm.heatmap,
                       threshold=cdm.threshold, min_component_voxels=voxels_for_ml(min_component_ml, cdm.spacing_mm),
                       spacing_mm=cdm.spacing_mm)[0]


def scores(runs, name, method) -> list:
    """evaluation/volumes.VolumeScore of ``method`` (run -> mask) on every run."""
    return [score_volume(run["case"], name, method(run) > 0, run["cdm"].truth, run["orientation"],
                         run["cdm"].voxel_ml, 0.0, run["family"]) for run in runs]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("validation", type=Path, help="validation volumes with masks, of the training families, lesion-free "
                                                 "ones included: the local contrast's settings are chosen here")
    p.add_argument("held_out", type=Path, nargs="+", help="held-out folders with masks, measured with those settings")
    p.add_argument("--cache", type=Path, required=True, help="where each volume's CDM heatmap is kept, per model")
    p.add_argument("--model", default=None, help="registered name or .pt file (default: the default model)")
    p.add_argument("--per-family", type=ranges.option("count"), default=None, help="the first N volumes per family")
    p.add_argument("--min-component-ml", type=ranges.option("min_component_ml"), nargs="*", default=[0.1],
                   help="the default refinement also after these speck removals (ml; default 0.1)")
    args = p.parse_args()
    model = load_model(args.model)
    model_ml = model.defaults.get("min_component_ml", 0.0)
    validation, *held_out = [cdm_runs(folder, args.cache, model, args.per_family)
                             for folder in [args.validation] + args.held_out]
    check_validation_set([bool(r["cdm"].truth.any()) for r in validation])
    level, _ = fit_intensity_threshold([(r["cdm"].image, r["cdm"].truth) for r in validation])
    chosen, best = None, -1.0
    for values in itertools.product(*GRID.values()):
        settings = dict(zip(GRID, values))
        rows = scores(validation, "", lambda r: local_contrast(r, **settings))
        mean_dice = np.mean([s.dice_3d for s in rows if s.lesion_ml > 0])
        if np.mean([s.false_positive_ml for s in rows if s.lesion_ml == 0]) <= 0.5 and mean_dice > best:
            chosen, best = settings, mean_dice
    if chosen is None:
        sys.exit("no setting of the grid keeps the validation volumes' false positives within 0.5 ml")
    methods = {"CDM alone": lambda r: r["cdm"].mask(model_ml),
               "CDM + lesion intensity (the model's default)": lambda r: default_refinement(r, model, model_ml),
               **{f"CDM + lesion intensity, speck removal {ml:g} ml": (lambda ml: lambda r: default_refinement(
                   r, model, ml))(ml) for ml in args.min_component_ml},
               f"local contrast {chosen}": lambda r: local_contrast(r, **chosen),
               f"calibrated intensity threshold ({level:g})": lambda r: intensity_threshold_mask(r["cdm"].image, level)}
    for folder, runs in zip([args.validation] + args.held_out, [validation] + held_out):
        rows = [row for name, method in methods.items() for row in scores(runs, name, method)]
        print(f"## {folder.name}\n\n{family_table(rows)}\n{size_table(rows)}", flush=True)


if __name__ == "__main__":
    try:
        main()
    except (CDMSegmentError, ValueError) as e:
        sys.exit(f"error: {e}")

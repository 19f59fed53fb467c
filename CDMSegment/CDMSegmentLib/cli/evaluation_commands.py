"""Command-line front ends for evaluation: ``evaluate`` (slices, every method) and ``evaluate-volumes`` (3D)."""

import json
import sys
from collections import Counter
from pathlib import Path

from ..core.ranges import option
from .training_commands import comma_list


def add_evaluate_parser(sub) -> None:
    p = sub.add_parser("evaluate", help="every method on the same slices of a data set with masks: table, CSV, figures")
    p.add_argument("data", type=Path, metavar="DATA", help="folder of cases in the BraTS layout (phantoms included), "
                   "or a .npz slice set with masks")
    p.add_argument("-o", "--output", required=True, type=Path, metavar="OUTDIR",
                   help="folder for results.csv, results.md, heatmaps.png and dice_vs_time.png")
    p.add_argument("--model", default=None, help="diffusion model (name or file; default: the registry's default model)")
    p.add_argument("--classifier", default=None, help="noise-aware classifier for cg-cdm, cg-diff and the CAMs")
    p.add_argument("--methods", type=comma_list(str), default=["cdm"],
                   help="comma-separated: cdm, cg-cdm, gradcam, gradcam++, scorecam, layercam, cg-diff")
    p.add_argument("--threshold-rule", type=comma_list(str), default=["otsu-slice", "volume-otsu"],
                   help="comma-separated: otsu-slice (the paper's), volume-otsu (the tool's), "
                        "model (calibrated: CDM's, and CG-CDM's when the classifier stores one)")
    p.add_argument("--cases", type=option("count"), default=None, help="evaluate only the first N cases")
    p.add_argument("--preset", default="model", choices=("model", "paper"), help="base CDM settings")
    p.add_argument("--noise-level", type=comma_list(option("noise_level")), default=[None], help="CDM alpha_bar at the start; a list sweeps")
    p.add_argument("--steps", type=comma_list(option("steps")), default=[None], help="CDM DDIM steps R; a list sweeps")
    p.add_argument("--tau", type=comma_list(option("tau")), default=[None], help="CDM tau; a list sweeps")
    p.add_argument("--guidance-scale", type=comma_list(option("guidance_scale")), default=[None], help="CG-CDM scale s; a list sweeps")
    p.add_argument("--cgdiff-level", type=option("noise_level"), default=None, help="CG-Diff alpha_bar at L (Wolleb: 0.0786, L=500/1000)")
    p.add_argument("--cgdiff-steps", type=option("steps"), default=None,
                   help="CG-Diff DDIM steps each way (Wolleb: 500, 1500 network passes per slice; fewer are strided)")
    p.add_argument("--cgdiff-scale", type=option("guidance_scale"), default=None, help="CG-Diff classifier scale s (Wolleb: 100)")
    p.add_argument("--batch-size", type=option("batch_size"), default=16, help="slices per network batch (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--seed", type=option("seed"), default=0,
                   help="seed of the noise drawn for each slice (default: %(default)s)")
    p.set_defaults(func=run_evaluate)


def run_evaluate(args) -> None:
    from dataclasses import replace

    from ..baselines.cgdiff import CGDiffParams
    from ..evaluation.slices import evaluate_files

    cgdiff = replace(CGDiffParams(), **{k: v for k, v in dict(
        noise_level=args.cgdiff_level, steps=args.cgdiff_steps, guidance_scale=args.cgdiff_scale).items() if v is not None})
    paths = evaluate_files(
        args.data, args.output, model=args.model, classifier=args.classifier, methods=args.methods,
        rules=args.threshold_rule, max_cases=args.cases, preset=args.preset, noise_levels=args.noise_level,
        steps=args.steps, taus=args.tau, guidance_scales=args.guidance_scale, cgdiff=cgdiff,
        batch_size=args.batch_size, seed=args.seed, device=args.device,
        command=" ".join(["cdmsegment"] + sys.argv[1:]), log=lambda m: print(m, file=sys.stderr))
    print(" ".join(str(p) for p in paths.values()))


def add_evaluate_volumes_parser(sub) -> None:
    p = sub.add_parser("evaluate-volumes", help="3D quality of the tool on held-out cases with masks, by lesion family "
                       "and size, against intensity baselines")
    p.add_argument("data", type=Path, metavar="DATA", help="folder of cases in the BraTS layout (phantoms included)")
    p.add_argument("-o", "--output", required=True, type=Path, metavar="OUTDIR",
                   help="folder for volumes.csv (per case) and volumes.md (the tables)")
    p.add_argument("--model", default=None, help="diffusion model (name or file; default: the registry's default model)")
    p.add_argument("--cases", type=option("count"), default=None, help="only the first N cases")
    p.add_argument("--per-family", type=option("count"), default=None,
                   help="only the first N cases of each lesion family (randomised phantoms' cases.csv)")
    p.add_argument("--fit-threshold-on", type=Path, default=None, metavar="TRAINDIR",
                   help="cases with masks from the training families: fit the calibrated intensity-threshold "
                        "baseline there (default: only the Otsu baseline)")
    p.add_argument("--fit-cases", type=option("count"), default=12, help="cases of TRAINDIR used for the fit")
    p.add_argument("--grow-above", type=option("grow_above"), default=None,
                   help="also score the CDM's mask grown through the bright regions it touches, above this many times "
                        "the brain's median (default: the model's grow_above, else the fitted intensity threshold "
                        "when --fit-threshold-on is given; 0: not scored)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda")
    p.add_argument("--batch-size", type=option("batch_size"), default=None,
                   help="slices per network batch (default: as segment, the model's measured value for the device, "
                        "else 4 on a CPU and 64 on a GPU)")
    p.add_argument("--overwrite", action="store_true", help="replace the volumes.csv and volumes.md of an earlier run")
    p.set_defaults(func=run_evaluate_volumes)


def add_calibrate_refinement_parser(sub) -> None:
    p = sub.add_parser("calibrate-refinement", help="choose the model's speck removal (min_component_ml), "
                                                    "lesion-intensity refinement (lesion_intensity, its floor and "
                                                    "support), heatmap support (heatmap_floor, heatmap_support) "
                                                    "strong findings (strong_finding_ml, strong_finding_peak) "
                                                    "small lesions (small_lesion_ml, small_lesion_floor, "
                                                    "small_lesion_peak) and the smallest finding kept "
                                                    "(min_finding_ml) on validation volumes; write the model's "
                                                    "defaults with them, for set-defaults",
                       description="The CDM runs once per validation volume at the model's defaults; every "
                                   "combination of the grid (GRID in CDMSegmentLib/evaluation/"
                                   "refine_calibration.py: the speck removal min_component_ml, and "
                                   "lesion_intensity with its floor and support) is applied to the same heatmaps. "
                                   "The choice: the best mean 3D Dice on the volumes with a lesion among the "
                                   "combinations whose mean false positives on the "
                                   "lesion-free volumes stay within --max-fp-ml (the fewest false positives when "
                                   "none does), and among those within --dice-tolerance of the best, the "
                                   "fewest false positives; then, by the same rule, the heatmap support added to it "
                                   "(SUPPORT_GRID; 0: none), then which findings keep their own bright voxels "
                                   "(STRONG_GRID; strong_finding_ml 0: none), then which small bright components "
                                   "the heatmap reaches are added (SMALL_GRID; small_lesion_ml 0: none), then the "
                                   "smallest finding the refined segment keeps (FINDING_GRID: min_finding_ml 0, "
                                   "0.01, 0.02, 0.05 or 0.1 ml; unlike min_component_ml, which applies to the "
                                   "CDM's mask before the refinement, this applies to the final segment). Give "
                                   "validation volumes of the training families only, with small lesions among "
                                   "them (the recipe gives val and val_small); several folders are pooled.")
    p.add_argument("model", help="model file or registered name, with its calibrated defaults (set-defaults)")
    p.add_argument("data", type=Path, nargs="+", metavar="DATA",
                   help="folders of validation cases with masks (BraTS layout), of the training families")
    p.add_argument("-o", "--output", type=Path, required=True, help="defaults JSON for 'cdmsegment set-defaults'")
    p.add_argument("--per-family", type=option("count"), default=6,
                   help="cases per lesion family in each folder (from its cases.csv; default 6)")
    p.add_argument("--max-fp-ml", type=option("volume_ml"), default=0.5,
                   help="most mean false positives (ml) allowed on the lesion-free volumes (default 0.5)")
    p.add_argument("--dice-tolerance", type=option("fraction"),
                   help="mean 3D Dice within which of the best the combination with the fewest false positives "
                        "is chosen (default: DICE_TOLERANCE in evaluation/refine_calibration.py, 0.001; 0: the best "
                        "Dice)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda")
    p.set_defaults(func=run_calibrate_refinement)


def run_calibrate_refinement(args) -> None:
    from ..core.errors import CDMSegmentError
    from ..core.modelfile import load_model
    from ..core.reading import read_volume
    from ..data.cases import find_brats_cases_in
    from ..evaluation.refine_calibration import (DICE_TOLERANCE, check_validation_set, choose_refinement,
                                                 refinement_runs, within_limit)
    from .writers import write_text_outputs

    if args.output.is_dir():
        raise CDMSegmentError(f"{args.output} is a folder; -o names the defaults JSON to write, e.g. "
                              f"{args.output / 'refined.json'}")
    model = load_model(args.model)
    find_brats_cases_in(args.data)  # a folder given twice, or a case in two folders, is refused before any run
    cases = []
    for folder in args.data:
        listed = (folder / "cases.csv").exists()
        cases += _cases_with_masks(folder, None, args.per_family if listed else None)[0]
        if not listed:
            print(f"{folder} has no cases.csv (written by 'cdmsegment phantom'): all its cases with a mask are used, "
                  "whatever --per-family says", file=sys.stderr)
    where = " + ".join(str(folder) for folder in args.data)
    try:  # before the runs: a set that cannot measure the choice is refused before hours of work
        check_validation_set([bool(read_volume(case.seg).array.any()) for case in cases])
        runs = refinement_runs(cases, model, args.device, log=lambda m: print(m, file=sys.stderr))
        tolerance = DICE_TOLERANCE if args.dice_tolerance is None else args.dice_tolerance
        best, scores = choose_refinement(runs, args.max_fp_ml, dice_tolerance=tolerance)
    except ValueError as e:
        raise CDMSegmentError(f"{where}: {e}") from None
    with_lesion = sum(bool(run.truth.any()) for run in runs)
    allowed = within_limit(scores, args.max_fp_ml)
    print(f"the best {min(5, len(allowed))} of {len(allowed)} combinations within {args.max_fp_ml:g} ml of false "
          f"positives (of {len(scores)}):", file=sys.stderr)
    for s in allowed[:5]:
        print(f"  {s.settings}: mean 3D Dice {s.mean_dice:.3f}, false positives {s.false_positive_ml:.2f} ml",
              file=sys.stderr)
    write_text_outputs({args.output: json.dumps({**model.defaults, **best.settings, "refinement_calibration": {
        "mean_dice": round(best.mean_dice, 4), "false_positive_ml": round(best.false_positive_ml, 3),
        "volumes": len(runs)}}, indent=1)})
    lesion_free = len(runs) - with_lesion
    print(f"chosen {best.settings}: mean 3D Dice {best.mean_dice:.3f} on the {with_lesion} "
          f"volume{'s' if with_lesion != 1 else ''} with a lesion, false positives {best.false_positive_ml:.2f} ml on "
          f"the {lesion_free} lesion-free one{'s' if lesion_free != 1 else ''} "
          f"-> {args.output}")


def _cases_with_masks(folder: Path, limit=None, per_family=None):
    """(cases with masks, case id -> family) from a BraTS-layout folder and its cases.csv when there is one."""
    from ..core.errors import CDMSegmentError
    from ..data.cases import find_brats_cases
    from ..data.randomised import read_case_table

    families = {case: row["family"] for case, row in read_case_table(folder).items()}
    cases = [c for c in find_brats_cases(folder) if c.seg is not None]
    if per_family is not None:
        if not families:
            raise CDMSegmentError(f"--per-family needs {folder}/cases.csv (written by 'cdmsegment phantom --families')")
        seen = Counter()
        kept = []
        for case in cases:
            seen[families.get(case.case_id, "")] += 1
            if seen[families.get(case.case_id, "")] <= per_family:
                kept.append(case)
        cases = kept
    if not cases:
        raise CDMSegmentError(f"no cases with a segmentation (*_seg.nii.gz) under {folder}")
    return cases[:limit], families


def run_evaluate_volumes(args) -> None:
    from ..core.reading import read_volume
    from ..core.modelfile import load_model
    from ..evaluation.intensity_baselines import fit_intensity_threshold
    from ..evaluation.volumes import evaluate_volumes, score_files
    from .writers import check_not_existing, write_text_outputs

    outputs = [args.output / name for name in ("volumes.csv", "volumes.md")]
    check_not_existing(outputs, args.overwrite)
    model = load_model(args.model)
    cases, families = _cases_with_masks(args.data, args.cases, args.per_family)
    threshold = None
    notes = [f"Model: {model.metadata['name']} {model.metadata['version']} (SHA256 {model.sha256}, {model.path})."]
    if args.fit_threshold_on is not None:
        fit_cases, _ = _cases_with_masks(args.fit_threshold_on, args.fit_cases)
        modality = model.modalities[0]
        threshold, pooled = fit_intensity_threshold(
            [(read_volume(c.images[modality]).array, read_volume(c.seg).array > 0) for c in fit_cases])
        notes.append(f"Calibrated intensity threshold: {threshold:.2f} x the brain's median (pooled Dice {pooled:.3f} on "
                     f"{len(fit_cases)} cases of {args.fit_threshold_on}).")
        print(notes[-1], file=sys.stderr)
    grow_above = args.grow_above if args.grow_above is not None else model.defaults.get("grow_above", threshold)
    scores = evaluate_volumes(cases, model, families=families, intensity_threshold=threshold, grow_above=grow_above,
                              device=args.device,
                              batch_size=args.batch_size, log=lambda m: print(m, file=sys.stderr))
    files = score_files(scores, " ".join(["cdmsegment"] + sys.argv[1:]), notes)
    write_text_outputs({args.output / name: text for name, text in files.items()})
    print(files["volumes.md"])  # the tables as written, not computed a second time (the paired one bootstraps)

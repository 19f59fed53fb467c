"""Command-line front ends for data and training: ``phantom``, ``slices``, ``train``, ``export``, ``calibrate``,
``set-defaults`` and ``train-classifier``."""

import argparse
import json
import sys
import time
from pathlib import Path

from ..core.errors import CDMSegmentError
from ..core.ranges import option


def comma_list(kind):
    """An argparse type: a comma-separated list of ``kind`` values ('flair,t1' or '0.9,0.8') -> list."""
    def parse(value: str) -> list:
        try:
            return [kind(v.strip()) for v in value.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {value!r}") from None
    parse.range = getattr(kind, "range", None)  # numbers are checked per item (core/ranges.py)
    return parse


# What a stopped training run leaves (instead of "no partial output was kept"): its checkpoints are written
# atomically, so the last one stays whole, and the same command resumes from it.
RUN_KEPT = "the run folder keeps the last checkpoint written, if any: the same command resumes from it"
# The --precision help of the trainers (training/train.py: auto is bf16 autocast).
TRAINING_PRECISION = ("auto or bf16: bf16 autocast (on a CPU fast only with AVX-512 BF16 or AMX); fp32: full precision "
                      "(default: %(default)s)")


def add_phantom_parser(sub) -> None:
    p = sub.add_parser("phantom", help="write phantom brain-tumour cases (BraTS layout) from the MNI152 anatomy")
    p.add_argument("output", type=Path, metavar="OUTDIR",
                   help="folder for the cases, one sub-folder each in the BraTS layout (images and *_seg.nii.gz)")
    p.add_argument("--cases", type=option("count"), default=10, help="number of cases to write (default: %(default)s)")
    p.add_argument("--seed", type=option("seed"), default=0,
                   help="seed of the set: case i depends only on the seed and i (default: %(default)s)")
    p.add_argument("--modalities", type=comma_list(str), default=("flair",), help="comma-separated: flair,t1,t1ce,t2")
    p.add_argument("--lesion-free-fraction", type=option("fraction"), default=0.25,
                   help="share of cases without a lesion (default: %(default)s; randomised phantoms use the "
                        "'healthy' family instead)")
    p.add_argument("--in-plane-mm", type=option("positive"), default=None,
                   help="fixed in-plane spacing (default: random, 1-2 mm; 0.9-1.6 mm with --families)")
    p.add_argument("--slice-mm", type=option("positive"), default=None,
                   help="fixed slice thickness (default: random, up to 5 mm; 1-6 mm with --families)")
    r = p.add_argument_group("domain-randomised FLAIR phantoms (chosen by --families; see data/randomised.py)")
    r.add_argument("--families", type=comma_list(str), default=None,
                   help="lesion families taken in turn: core-oedema,infiltrative,multifocal,ms,cortical,metastases,healthy "
                        "(or 'all'); contrast, artefacts and acquisition are drawn per case")
    r.add_argument("--grey-white", type=comma_list(option("positive")), default=None, metavar="LO,HI",
                   help="grey/white matter ratio range (default 1.0,1.4)")
    r.add_argument("--csf", type=comma_list(option("positive")), default=None, metavar="LO,HI",
                   help="CSF / grey matter range (default 0.05,0.35)")
    r.add_argument("--lesion-contrast", type=comma_list(option("positive")), default=None, metavar="LO,HI",
                   help="lesion / grey matter range (default 1.1,2.5)")
    r.add_argument("--lesion-ml", type=comma_list(option("volume_ml")), default=None, metavar="LO,HI",
                   help="total lesion volume per case (default: the family's range)")
    r.add_argument("--acquisitions", type=comma_list(str), default=("axial", "coronal", "sagittal"),
                   help="slice directions drawn from (the thick axis)")
    p.set_defaults(func=run_phantom)


RANDOMISED_ONLY = ("grey_white", "csf", "lesion_contrast", "lesion_ml")


def run_phantom(args) -> None:
    from tqdm import tqdm

    from .writers import check_output_location

    check_output_location(args.output / "cases.csv")  # an OUTDIR that is a plain file, before any work
    bar = None

    def progress(done: int, total: int) -> None:  # the bar appears with the first case, so an error comes alone
        nonlocal bar
        bar = bar or tqdm(total=total, unit="case", desc="phantoms")
        bar.update(1)

    try:
        if args.families is None:
            given = [f"--{k.replace('_', '-')}" for k in RANDOMISED_ONLY if getattr(args, k) is not None]
            if given:
                raise CDMSegmentError(f"{', '.join(given)} {'apply' if len(given) > 1 else 'applies'} to randomised "
                                      "phantoms; add --families (e.g. all)")
            from ..data.phantom import generate_phantoms

            records = generate_phantoms(args.output, args.cases, args.seed, modalities=args.modalities,
                                        lesion_free_fraction=args.lesion_free_fraction, in_plane_mm=args.in_plane_mm,
                                        slice_mm=args.slice_mm, progress=progress)
        else:
            from ..data.randomised import FAMILIES, contrast_from, generate_randomised

            if list(args.modalities) != ["flair"]:
                raise CDMSegmentError("randomised phantoms are FLAIR-like only; drop --modalities")
            if args.lesion_ml is not None and len(args.lesion_ml) != 2:
                raise CDMSegmentError(f"--lesion-ml needs LO,HI, got {','.join(f'{v:g}' for v in args.lesion_ml)}")
            records = generate_randomised(
                args.output, args.cases, args.seed, families=list(FAMILIES) if args.families == ["all"] else args.families,
                contrast=contrast_from(args.grey_white, args.csf, args.lesion_contrast),
                size_ml=tuple(args.lesion_ml) if args.lesion_ml else None, in_plane_mm=args.in_plane_mm,
                slice_mm=args.slice_mm, acquisitions=args.acquisitions, progress=progress)
    finally:
        if bar is not None:
            bar.close()
    with_lesion = sum(1 for r in records if any(row["label"] for row in r["slice_rows"]))
    print(f"{len(records)} cases ({with_lesion} with lesions) in {args.output}")


def _add_data_arguments(p, several: bool = False) -> None:
    folders = "one or more BraTS-layout folders (phantoms too; their cases are pooled)" if several else \
        "a BraTS-layout folder (phantoms too)"
    p.add_argument("data", type=Path, nargs="+" if several else None,
                   help=f"{folders}, a folder of volumes with --labels, or a .npz slice set")
    p.add_argument("--labels", type=Path, default=None,
                   help="CSV of per-slice labels (case or file, slice, label) for a folder of single-modality volumes")
    p.add_argument("--modalities", type=comma_list(str), default=("flair",),
                   help="comma-separated modalities read per case, in the model's input order (default: flair)")
    p.add_argument("--image-size", type=option("image_size"), default=128,
                   help="edge of the square model slices in pixels (default: %(default)s; a .npz keeps its own)")
    p.add_argument("--split", type=Path, default=None,
                   help="split JSON (train/val/test case ids); made and written beside the output when absent")
    p.add_argument("--subset", default="train", choices=("train", "val", "test", "all"),
                   help="the split's cases to use (default: %(default)s); all: every case, without a split")


def load_training_slices(args, split_path: Path, with_masks: bool = False):
    """Slices for training: from a .npz as is, or from the ``subset`` of a patient-level split of the cases in one
    or more case folders (``args.data``: a Path, or a list of them for ``slices``)."""
    from ..data.slicesets import load_slices

    data = args.data if isinstance(args.data, list) else [args.data]
    if len(data) > 1 and (args.labels is not None or any(d.suffix == ".npz" for d in data)):
        raise CDMSegmentError("several data arguments must all be BraTS-layout case folders (a .npz slice set, or a "
                              "folder with --labels, is given alone): give one, or only case folders")
    if data[0].suffix == ".npz":
        return load_slices(data[0])
    from ..data.cases import (build_slice_dataset, find_brats_cases_in, find_labelled_volumes, read_split,
                              select_cases, split_cases, write_split)

    if args.labels is not None:
        cases = find_labelled_volumes(data[0], args.labels, modality=args.modalities[0])
    else:
        cases = find_brats_cases_in(data)
    if args.subset != "all":
        if args.split is not None:
            split = read_split(args.split)
        else:
            split = split_cases(cases, seed=0)
            write_split(split, split_path)
        cases = select_cases(cases, split[args.subset])
    return build_slice_dataset(cases, args.modalities, args.image_size, with_masks=with_masks)


def add_slices_parser(sub) -> None:
    p = sub.add_parser("slices", help="turn case folders into one compact .npz slice set (to train from, or to "
                       "ship to a GPU machine)")
    _add_data_arguments(p, several=True)
    p.add_argument("-o", "--output", type=Path, required=True, metavar="FILE.npz",
                   help="the slice set to write; a split it makes is written beside it as FILE.split.json")
    p.add_argument("--with-masks", action="store_true", help="keep ground-truth masks (calibration, evaluation)")
    p.set_defaults(func=run_slices)


def run_slices(args) -> None:
    from ..data.slicesets import save_slices

    dataset = load_training_slices(args, args.output.with_suffix(".split.json"), with_masks=args.with_masks)
    save_slices(args.output, dataset)
    print(f"{len(dataset)} slices ({int((dataset.labels > 0).sum())} labelled > 0) -> {args.output}")


def add_train_parser(sub) -> None:
    p = sub.add_parser("train", help="train the class-conditional diffusion model on image-level slice labels")
    _add_data_arguments(p)
    p.add_argument("-o", "--run-dir", type=Path, required=True,
                   help="checkpoints go here; an existing run resumes (with a larger --steps, a finished one is extended)")
    p.add_argument("--steps", type=option("count"), default=20000, help="optimiser steps (default: %(default)s)")
    p.add_argument("--batch-size", type=option("batch_size"), default=32, help="per process (torchrun multiplies by processes)")
    p.add_argument("--lr", type=option("learning_rate"), default=2e-4,
                   help="peak AdamW learning rate, after warm-up and before cosine decay (default: %(default)s)")
    p.add_argument("--seed", type=option("seed"), default=0, help="seed of the weights, batches and noise (default: %(default)s)")
    p.add_argument("--schedule", default="linear", choices=("linear", "cosine"),
                   help="noise schedule (default: %(default)s, the paper's)")
    p.add_argument("--timesteps", type=option("timesteps"), default=1000,
                   help="diffusion timesteps T (default: %(default)s; the paper: 4000)")
    p.add_argument("--base-channels", type=option("count"), default=32,
                   help="UNet channels at full resolution (default: %(default)s)")
    p.add_argument("--channel-mults", type=comma_list(option("count")), default=(1, 2, 2, 4),
                   help="comma-separated channel multiplier of each UNet level (default: 1,2,2,4)")
    p.add_argument("--attention-levels", type=comma_list(option("level")), default=(3,),
                   help="comma-separated UNet levels with self-attention, 0 = full resolution (default: 3)")
    p.add_argument("--blocks-per-level", type=option("count"), default=1,
                   help="residual blocks per UNet level (default: %(default)s)")
    p.add_argument("--class-names", type=comma_list(str), default=("normal", "tumour"),
                   help="comma-separated class names, the normal class first (default: normal,tumour)")
    p.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"), help=TRAINING_PRECISION)
    p.add_argument("--checkpoint-every", type=option("count"), default=1000,
                   help="steps between checkpoints in the run folder (default: %(default)s)")
    p.add_argument("--t-range", type=comma_list(int), default=None, metavar="LO,HI",
                   help="train on timesteps LO..HI only (inclusive; default: all of 0..T-1); recorded in the model, "
                        "whose noise levels must then lie inside it. Reach levels where a lesion is no longer visible "
                        "in x_t (on T = 1000 linear: HI of 500 or more), or the network learns to ignore the label")
    p.add_argument("--val", type=Path, default=None, metavar="SLICES.npz",
                   help="held-out slices with masks (cdmsegment slices --with-masks): at every checkpoint the log "
                        "gives the CDM's voxel AUROC and the class difference inside and outside lesions on them")
    p.set_defaults(func=run_train, on_stop=RUN_KEPT)


def run_train(args) -> None:
    from ..training.train import TrainConfig, train_diffusion, write_run_info
    from ..core.unet import UNetConfig

    args.run_dir.mkdir(parents=True, exist_ok=True)
    dataset = load_training_slices(args, args.run_dir / "split.json")
    meta = dataset.meta
    unet = UNetConfig(in_channels=dataset.data.shape[1], num_classes=len(args.class_names),
                      base_channels=args.base_channels, channel_mults=args.channel_mults,
                      attention_levels=args.attention_levels, blocks_per_level=args.blocks_per_level)
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                      schedule=args.schedule, num_timesteps=args.timesteps, precision=args.precision,
                      checkpoint_every=args.checkpoint_every, image_size=int(meta.get("image_size", args.image_size)),
                      modalities=meta.get("modalities", args.modalities), class_names=args.class_names,
                      t_range=args.t_range, unet=unet)
    monitor = held_out_monitor(args.val, cfg) if args.val is not None else None
    start = time.perf_counter()
    ckpt = train_diffusion(dataset.data, dataset.labels, cfg, args.run_dir, on_checkpoint=monitor)
    write_run_info(args.run_dir, {"data": str(args.data), "slices": len(dataset), "cases": len(set(dataset.case_ids)),
                                  "seconds_this_run": round(time.perf_counter() - start, 1)})
    print(f"checkpoint: {ckpt}")


def held_out_monitor(path: Path, cfg):
    """The checkpoint monitor on a held-out slice set: two noise levels inside the training band, at a quarter
    and at three quarters of its alpha_bar range."""
    from ..core.schedule import NoiseSchedule
    from ..data.slicesets import load_slices
    from ..training.monitor import HeldOutMonitor, monitor_slices

    data = load_slices(path, image_size=cfg.image_size, needed_by="the training slices' network")
    schedule = NoiseSchedule(cfg.schedule, cfg.num_timesteps)
    lo, hi = (float(schedule.alpha_bar(t)) for t in cfg.t_band)
    levels = [round(hi + f * (lo - hi), 2) for f in (0.75, 0.25)]
    return HeldOutMonitor(monitor_slices(data), schedule, levels)


def add_export_parser(sub) -> None:
    p = sub.add_parser("export", help="write a checkpoint's EMA network as a TorchScript model file with metadata")
    p.add_argument("checkpoint", type=Path, help="checkpoint.pt of a 'cdmsegment train' run folder")
    p.add_argument("-o", "--output", type=Path, required=True, help="the model file to write")
    p.add_argument("--name", required=True, help="the model's name, stored in its metadata")
    p.add_argument("--version", default="1", help="the model's version, stored in its metadata (default: %(default)s)")
    p.add_argument("--defaults", type=Path, default=None,
                   help="JSON of measured defaults (noise_level, steps, tau, noise_draws, threshold, ...)")
    p.add_argument("--training-data", default="", help="what the model was trained on, for its metadata")
    p.add_argument("--overwrite", action="store_true", help="replace an existing file at --output")
    p.set_defaults(func=run_export)


def run_export(args) -> None:
    from ..training.export import export_checkpoint
    from .writers import check_model_output

    check_model_output(args.output, args.overwrite)
    defaults = json.loads(args.defaults.read_text()) if args.defaults else None
    run_info = args.checkpoint.parent / "run.json"
    training = json.loads(run_info.read_text()) if run_info.exists() else {}
    training["data"] = args.training_data or training.get("data", "")
    sha = export_checkpoint(args.checkpoint, args.output, name=args.name, version=args.version,
                            defaults=defaults, training=training)
    print(f"{args.output}: sha256 {sha}, {args.output.stat().st_size / 1e6:.1f} MB")


def add_ensemble_parser(sub) -> None:
    p = sub.add_parser("ensemble", help="write diffusion models of one recipe, trained from different seeds, as one "
                                        "ensemble model file (its noise draws take turns on the members)")
    p.add_argument("models", nargs="+", metavar="MODEL", help="two or more model files or registered names")
    p.add_argument("-o", "--output", type=Path, required=True, help="the ensemble model file to write")
    p.add_argument("--name", required=True, help="the ensemble's name, stored in its metadata")
    p.add_argument("--version", default="1", help="the ensemble's version, stored in its metadata (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing file at --output")
    p.set_defaults(func=run_ensemble)


def run_ensemble(args) -> None:
    from ..core.modelfile import load_model
    from ..training.ensemble import noise_draws_for, write_ensemble
    from .writers import check_model_output

    check_model_output(args.output, args.overwrite)
    models = [load_model(m) for m in args.models]
    sha = write_ensemble(models, args.output, args.name, args.version)
    draws = noise_draws_for(int(models[0].defaults.get("noise_draws", 1)), len(models))
    print(f"{args.output}: sha256 {sha}, {args.output.stat().st_size / 1e6:.1f} MB, {len(models)} networks, "
          f"{draws} noise draws. Its threshold, OOD reference and refinement must be measured again: cdmsegment "
          f"calibrate {args.output} VAL.npz --noise-draws {draws} ..., calibrate-ood, calibrate-refinement, then "
          "set-defaults (README, Train your own model)")


CALIBRATION_GRID = {"noise_level": [0.98, 0.95, 0.9, 0.8, 0.65, 0.5], "tau": [0.0, 0.5, 0.95], "steps": [2],
                    "noise_draws": [1]}


def add_calibrate_parser(sub) -> None:
    p = sub.add_parser("calibrate", help="measure CDM (or, with --classifier, CG-CDM) settings on held-out slices "
                                         "with masks; write the best as defaults")
    p.add_argument("model", help="model file or registered name")
    p.add_argument("data", type=Path, help=".npz slice set with masks (cdmsegment slices --with-masks)")
    p.add_argument("-o", "--output", type=Path, required=True,
                   help="defaults JSON for 'cdmsegment export' or 'cdmsegment set-defaults'")
    grid = ("a list sweeps (default: " + "; ".join(f"{k} {','.join(map(str, v))}" for k, v in CALIBRATION_GRID.items())
            + "; with --classifier: the model's own)")
    p.add_argument("--noise-level", type=comma_list(option("noise_level")), default=None, help=grid)
    p.add_argument("--tau", type=comma_list(option("tau")), default=None,
                   help="tau values to sweep (default: see --noise-level)")
    p.add_argument("--steps", type=comma_list(option("steps")), default=None,
                   help="DDIM steps R to sweep (default: see --noise-level)")
    p.add_argument("--noise-draws", type=comma_list(option("noise_draws")), default=None,
                   help="noise draws to sweep (default: see --noise-level)")
    p.add_argument("--classifier", default=None,
                   help="noise-aware classifier: calibrate CG-CDM's guidance scale and threshold for it")
    p.add_argument("--guidance-scale", type=comma_list(option("guidance_scale")), default=[1.0, 3.0, 10.0, 30.0, 100.0],
                   help="CG-CDM scales s to sweep (with --classifier)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda")
    p.add_argument("--precision", default="fp16", choices=("fp32", "bf16", "fp16"),
                   help="autocast precision of the network during the sweep (default: %(default)s)")
    p.set_defaults(func=run_calibrate)


def run_calibrate(args) -> None:
    from ..training.calibrate import defaults_from, sweep
    from ..core.modelfile import load_model
    from ..data.slicesets import load_slices
    from ..core.device import choose_device
    from .writers import write_text_outputs

    model = load_model(args.model)
    classifier = load_model(args.classifier, kind="classifier") if args.classifier else None
    data = load_slices(args.data, image_size=model.image_size, modalities=model.modalities, with_masks=True,
                       needed_by=f"the model {model.metadata.get('name', args.model)}")
    given = {k: getattr(args, k) for k in CALIBRATION_GRID}
    if classifier is None:
        grid = {k: v if v is not None else CALIBRATION_GRID[k] for k, v in given.items()}
        if given["noise_level"] is None:  # the default grid keeps to the model's noise band; a level asked is checked
            grid["noise_level"] = [a for a in grid["noise_level"] if in_noise_band(model, a, max(grid["steps"]))]
    else:
        grid = {k: v if v is not None else [model.defaults.get(k, CALIBRATION_GRID[k][0])] for k, v in given.items()}
        grid["guidance_scale"] = list(args.guidance_scale)
    for alpha_bar in grid["noise_level"]:
        model.check_noise_level(alpha_bar, max(grid["steps"]))
    rows = sweep(model, data.as_float(), data.masks, data.case_ids, grid, choose_device(args.device),
                 classifier=classifier, precision=args.precision)
    write_text_outputs({args.output: json.dumps(defaults_from(rows[0]), indent=1),
                        args.output.with_suffix(".sweep.json"): json.dumps(rows, indent=1)})
    print(f"best: {json.dumps(rows[0])}\n-> {args.output}")


def in_noise_band(model, alpha_bar: float, steps: int) -> bool:
    try:
        model.check_noise_level(alpha_bar, steps)
    except CDMSegmentError:
        return False
    return True


def add_set_defaults_parser(sub) -> None:
    p = sub.add_parser("set-defaults", help="write a model file with measured defaults (from calibrate), its "
                                            "out-of-distribution reference or what it expects added, without retraining")
    p.add_argument("model", help="model file or registered name")
    p.add_argument("defaults", type=Path, nargs="?", default=None, help="defaults JSON written by 'cdmsegment calibrate' or "
                                                                         "'cdmsegment calibrate-refinement': its keys "
                                                                         "replace the model's, the others are kept")
    p.add_argument("-o", "--output", type=Path, required=True, help="the new model file")
    p.add_argument("--kind", default="diffusion", choices=("diffusion", "classifier"),
                   help="what the model is: a diffusion model (default) or a noise-aware classifier")
    p.add_argument("--ood", type=Path, default=None, help="OOD reference JSON written by 'cdmsegment calibrate-ood'")
    p.add_argument("--expects", type=Path, default=None,
                   help='JSON of what the model takes, e.g. {"modality": "FLAIR", "skull_stripped": true, '
                        '"description": "skull-stripped brain MRI (FLAIR)"}')
    p.add_argument("--version", default=None,
                   help="the new file's version (default: the model's own); a registered model whose defaults change "
                        "is a new version")
    p.add_argument("--overwrite", action="store_true", help="replace an existing file at --output")
    p.set_defaults(func=run_set_defaults)


def _json_object(path: Path, what: str) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CDMSegmentError(f"cannot read {what} from {path}: {e}") from None
    if not isinstance(value, dict):
        raise CDMSegmentError(f"{path} must hold a JSON object of {what}")
    return value


def run_set_defaults(args) -> None:
    from ..core.modelfile import load_model, read_registry, with_defaults
    from .writers import check_model_output

    check_model_output(args.output, args.overwrite)
    if args.defaults is None and args.ood is None and args.expects is None and args.version is None:
        raise CDMSegmentError("nothing to write: give a defaults JSON, --ood, --expects or --version")
    defaults = _json_object(args.defaults, "defaults") if args.defaults else {}
    extra = {k: _json_object(path, k) for k, path in (("ood", args.ood), ("expects", args.expects)) if path}
    if args.version is not None:
        extra["version"] = args.version
    model = load_model(args.model, kind=args.kind)
    sha = with_defaults(model, defaults, args.output, **extra)
    print(f"{args.output}: sha256 {sha}, {args.output.stat().st_size / 1e6:.1f} MB")
    changed = sorted(k for k, v in defaults.items() if model.defaults.get(k) != v and k not in ("calibration",
                                                                                                "refinement_calibration"))
    registered = model.sha256 in {entry["sha256"] for entry in read_registry()}
    if changed and registered and args.version is None:
        print(f"note: the defaults {', '.join(changed)} changed and the file keeps version "
              f"{model.metadata['version']}; give --version to tell it from the model it was made from",
              file=sys.stderr)


def add_train_classifier_parser(sub) -> None:
    p = sub.add_parser("train-classifier", help="train the noise-aware slice classifier and export it as a model file")
    p.add_argument("slices", type=Path, metavar="SLICES.npz", help="slice set written by CDMSegment's data tools")
    p.add_argument("--run-dir", required=True, type=Path, help="checkpoint folder (an interrupted run resumes)")
    p.add_argument("-o", "--output", required=True, type=Path, metavar="MODEL.pt",
                   help="the classifier model file to write")
    p.add_argument("--steps", type=option("count"), default=5000, help="optimiser steps (default: %(default)s)")
    p.add_argument("--batch-size", type=option("batch_size"), default=32, help="slices per step (default: %(default)s)")
    p.add_argument("--lr", type=option("learning_rate"), default=3e-4, help="peak AdamW learning rate (default: %(default)s)")
    p.add_argument("--base-channels", type=option("count"), default=32,
                   help="network channels at full resolution (default: %(default)s)")
    p.add_argument("--channel-mults", type=comma_list(option("count")), default=[1, 2, 2, 4],
                   help="comma-separated channel multiplier of each level (default: 1,2,2,4)")
    p.add_argument("--class-names", type=comma_list(str), default=("normal", "tumour"),
                   help="comma-separated class names, the normal class first (default: normal,tumour, as train's)")
    p.add_argument("--name", default="cdmsegment-classifier",
                   help="the classifier's name, stored in its metadata (default: %(default)s)")
    p.add_argument("--version", default="0.1.0",
                   help="the classifier's version, stored in its metadata (default: %(default)s)")
    p.add_argument("--seed", type=option("seed"), default=0, help="seed of the weights, batches and noise (default: %(default)s)")
    p.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"), help=TRAINING_PRECISION)
    p.set_defaults(func=run_train_classifier, on_stop=RUN_KEPT)


def run_train_classifier(args) -> None:
    from ..training.classifier import train_classifier
    from ..data.slicesets import load_slices
    from ..training.export import export_checkpoint
    from ..training.train import TrainConfig
    from ..core.unet import UNetConfig

    data = load_slices(args.slices)
    unet = UNetConfig(in_channels=data.data.shape[1], num_classes=len(args.class_names),
                      base_channels=args.base_channels, channel_mults=args.channel_mults, attention_levels=())
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                      precision=args.precision, unet=unet, image_size=data.data.shape[-1],
                      class_names=tuple(args.class_names))
    checkpoint = train_classifier(data.data, data.labels, cfg, args.run_dir)
    sha = export_checkpoint(checkpoint, args.output, kind="classifier", name=args.name, version=args.version,
                            image_size=data.data.shape[-1], modalities=data.meta.get("modalities", ["image"]),
                            class_names=args.class_names, training={"slices": str(args.slices), "n": len(data)})
    print(f"{args.output} (SHA256 {sha})")

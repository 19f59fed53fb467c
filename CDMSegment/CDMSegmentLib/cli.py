"""The ``cdmsegment`` command line: a thin parser over the same functions the Python API exposes."""

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional

from .errors import CDMSegmentError


def _threshold(value: str):
    if value in ("otsu", "model"):
        return value
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected otsu, model or a number, got {value!r}") from None


def _axis(value: str):
    return int(value) if value.isdigit() else value


def add_segment_parser(sub) -> None:
    p = sub.add_parser("segment", help="heatmap and segmentation of one case (one input per model modality)")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image file or DICOM folder, one per modality")
    p.add_argument("-o", "--output", required=True, type=Path, metavar="OUTDIR")
    p.add_argument("--model", default=None, help="registered model name or model file (default: the bundled model)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda")
    p.add_argument("--threshold", type=_threshold, default=None,
                   help="'model' (calibrated, default when stored), 'otsu' over the volume, or a number")
    p.add_argument("--axis", type=_axis, default="auto",
                   help="slice axis: auto (axial), axial, coronal, sagittal, or voxel axis 0 (I), 1 (J), 2 (K)")
    p.add_argument("--method", default="cdm", help="cdm, cg-cdm (needs --classifier), or a baseline: gradcam, "
                   "gradcam++, scorecam, layercam, cg-diff (all need --classifier)")
    p.add_argument("--classifier", default=None, help="noise-aware classifier for cg-cdm and the baselines (name or file)")
    p.add_argument("--target-class", type=int, default=None,
                   help="class index to segment (default: every class except 0 = normal)")
    p.add_argument("--preset", default="model", choices=("model", "paper"),
                   help="defaults measured for this model, or the paper's (Q~alpha_bar 0.90, R=10, tau=0.95)")
    p.add_argument("--noise-level", type=float, default=None, help="alpha_bar at the start (paper: 0.896)")
    p.add_argument("--steps", type=int, default=None, help="DDIM steps R (2R network evaluations per slice)")
    p.add_argument("--tau", type=float, default=None, help="condition interpolation tau in [0, 1)")
    p.add_argument("--noise-draws", type=int, default=None, help="average the heatmap over this many noise draws")
    p.add_argument("--guidance-scale", type=float, default=None, help="classifier guidance scale s (cg-cdm)")
    p.add_argument("--batch-size", type=int, default=16, help="slices per network batch")
    p.add_argument("--precision", default="auto", help="auto (fp32 on CPU, fp16 on CUDA), fp32, bf16 or fp16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.set_defaults(func=run_segment)


def run_segment(args) -> None:
    from tqdm import tqdm

    from .segment import segment_files

    bar = tqdm(total=0, unit="slice", desc="segmenting", file=sys.stderr, leave=False)

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    try:
        summary = segment_files(
            args.inputs, args.output, model=args.model, device=args.device, threshold=args.threshold,
            axis=args.axis, method=args.method, classifier=args.classifier, target_class=args.target_class,
            preset=args.preset, noise_level=args.noise_level, steps=args.steps, tau=args.tau,
            noise_draws=args.noise_draws, guidance_scale=args.guidance_scale, batch_size=args.batch_size,
            precision=args.precision, seed=args.seed, overwrite=args.overwrite, progress=progress,
            log=lambda m: tqdm.write(m, file=sys.stderr))
    finally:
        bar.close()
    print(summary.line())


def add_info_parser(sub) -> None:
    p = sub.add_parser("info", help="print a model's metadata")
    p.add_argument("model", nargs="?", default=None, help="registered model name or model file")
    p.add_argument("--kind", default="diffusion", choices=("diffusion", "classifier"))
    p.set_defaults(func=run_info)


def run_info(args) -> None:
    from .modelfile import load_model

    model = load_model(args.model, kind=args.kind)
    print(f"# {model.path} (SHA256 {model.sha256})")
    print(json.dumps(model.metadata, indent=2, sort_keys=True))


def _list(kind):
    """A comma-separated list of ``kind`` values: 'cdm,cg-cdm' or '0.9,0.8'."""
    def parse(value: str):
        try:
            return [kind(v) for v in value.split(",") if v]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {value!r}") from None
    return parse


def add_evaluate_parser(sub) -> None:
    p = sub.add_parser("evaluate", help="every method on the same slices of a data set with masks: table, CSV, figures")
    p.add_argument("data", type=Path, metavar="DATA", help="folder of cases in the BraTS layout (phantoms included)")
    p.add_argument("-o", "--output", required=True, type=Path, metavar="OUTDIR")
    p.add_argument("--model", default=None, help="diffusion model (name or file; default: the bundled model)")
    p.add_argument("--classifier", default=None, help="noise-aware classifier for cg-cdm, cg-diff and the CAMs")
    p.add_argument("--methods", type=_list(str), default=["cdm"],
                   help="comma-separated: cdm, cg-cdm, gradcam, gradcam++, scorecam, layercam, cg-diff")
    p.add_argument("--threshold-rule", type=_list(str), default=["otsu-slice", "volume-otsu"],
                   help="comma-separated: otsu-slice (the paper's), volume-otsu (the tool's), model (calibrated, CDM only)")
    p.add_argument("--cases", type=int, default=None, help="evaluate only the first N cases")
    p.add_argument("--preset", default="model", choices=("model", "paper"), help="base CDM settings")
    p.add_argument("--noise-level", type=_list(float), default=[None], help="CDM alpha_bar at the start; a list sweeps")
    p.add_argument("--steps", type=_list(int), default=[None], help="CDM DDIM steps R; a list sweeps")
    p.add_argument("--tau", type=_list(float), default=[None], help="CDM tau; a list sweeps")
    p.add_argument("--guidance-scale", type=_list(float), default=[None], help="CG-CDM scale s; a list sweeps")
    p.add_argument("--cgdiff-level", type=float, default=None, help="CG-Diff alpha_bar at L (Wolleb: 0.0786, L=500/1000)")
    p.add_argument("--cgdiff-steps", type=int, default=None,
                   help="CG-Diff DDIM steps each way (Wolleb: 500, 1500 network passes per slice; fewer are strided)")
    p.add_argument("--cgdiff-scale", type=float, default=None, help="CG-Diff classifier scale s (Wolleb: 100)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run_evaluate)


def run_evaluate(args) -> None:
    from dataclasses import replace

    from .cgdiff import CGDiffParams
    from .evaluate import evaluate_files

    cgdiff = replace(CGDiffParams(), **{k: v for k, v in dict(
        noise_level=args.cgdiff_level, steps=args.cgdiff_steps, guidance_scale=args.cgdiff_scale).items() if v is not None})
    paths = evaluate_files(
        args.data, args.output, model=args.model, classifier=args.classifier, methods=args.methods,
        rules=args.threshold_rule, max_cases=args.cases, preset=args.preset, noise_levels=args.noise_level,
        steps=args.steps, taus=args.tau, guidance_scales=args.guidance_scale, cgdiff=cgdiff,
        batch_size=args.batch_size, seed=args.seed, device=args.device,
        command=" ".join(["cdmsegment"] + sys.argv[1:]), log=lambda m: print(m, file=sys.stderr))
    print(" ".join(str(p) for p in paths.values()))


def add_train_classifier_parser(sub) -> None:
    p = sub.add_parser("train-classifier", help="train the noise-aware slice classifier and export it as a model file")
    p.add_argument("slices", type=Path, metavar="SLICES.npz", help="slice set written by CDMSegment's data tools")
    p.add_argument("--run-dir", required=True, type=Path, help="checkpoint folder (an interrupted run resumes)")
    p.add_argument("-o", "--output", required=True, type=Path, metavar="MODEL.pt")
    p.add_argument("--steps", type=int, default=5000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--base-channels", type=int, default=32)
    p.add_argument("--channel-mults", type=_list(int), default=[1, 2, 2, 4])
    p.add_argument("--class-names", type=_list(str), default=["normal", "lesion"])
    p.add_argument("--name", default="cdmsegment-classifier")
    p.add_argument("--version", default="0.1.0")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"))
    p.set_defaults(func=run_train_classifier)


def run_train_classifier(args) -> None:
    from .classifier import train_classifier
    from .data import load_slices
    from .export import export_checkpoint
    from .train import TrainConfig
    from .unet import UNetConfig

    data = load_slices(args.slices)
    unet = UNetConfig(in_channels=data.data.shape[1], num_classes=len(args.class_names),
                      base_channels=args.base_channels, channel_mults=tuple(args.channel_mults), attention_levels=())
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                      precision=args.precision, unet=unet)
    checkpoint = train_classifier(data.data, data.labels, cfg, args.run_dir)
    sha = export_checkpoint(checkpoint, args.output, kind="classifier", name=args.name, version=args.version,
                            image_size=data.data.shape[-1], modalities=data.meta.get("modalities", ["image"]),
                            class_names=args.class_names, training={"slices": str(args.slices), "n": len(data)})
    print(f"{args.output} (SHA256 {sha})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cdmsegment", description=(
        "Weakly supervised segmentation with conditional diffusion models (Hu et al., MICCAI 2023)."))
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    return parser


COMMANDS = [add_segment_parser, add_info_parser, add_evaluate_parser, add_train_classifier_parser]


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except CDMSegmentError as e:
        print(f"cdmsegment {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"cdmsegment {args.command}: interrupted; no partial output was kept", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The ``cdmsegment`` command line: a thin parser over the same functions the Python API exposes."""

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional

from .cohort import add_segment_cohort_parser
from .training_commands import (add_calibrate_parser, add_export_parser, add_phantom_parser, add_set_defaults_parser,
                                add_slices_parser, add_train_classifier_parser, add_train_parser)
from .evaluation_commands import add_evaluate_parser, add_evaluate_volumes_parser
from ..core.errors import CDMSegmentError


class _OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line, like every other error of the command (the usage is in --help)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")


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
    p.add_argument("--method", default="cdm", help="cdm, cg-cdm (guided by the model's registered classifier or "
                   "--classifier), or a baseline: gradcam, gradcam++, scorecam, layercam, cg-diff (need --classifier)")
    p.add_argument("--classifier", default=None, help="noise-aware classifier for cg-cdm and the baselines (name or file)")
    p.add_argument("--target-class", type=int, default=None,
                   help="class index to segment (default: every class except 0 = normal)")
    p.add_argument("--preset", default="model", choices=("model", "paper"),
                   help="defaults measured for this model, or the paper's (Q~alpha_bar 0.90, R=10, tau=0.95)")
    p.add_argument("--noise-level", type=float, default=None, help="alpha_bar at the start (paper: 0.896)")
    p.add_argument("--steps", type=int, default=None, help="DDIM steps R (2R network evaluations per slice)")
    p.add_argument("--tau", type=float, default=None, help="condition interpolation tau in [0, 1)")
    p.add_argument("--noise-draws", type=int, default=None, help="average the heatmap over this many noise draws")
    p.add_argument("--guidance-scale", type=float, default=None,
                   help="classifier guidance scale s (cg-cdm; default: the scale measured for the classifier)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="slices per network batch (default: measured per device, 4 on a CPU)")
    p.add_argument("--precision", default="auto", help="auto (fp32 on CPU, fp16 on CUDA), fp32, bf16 or fp16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.set_defaults(func=run_segment)


def run_segment(args) -> None:
    from tqdm import tqdm

    from .segment_files import segment_files

    # disable=None: no bar when stderr is not a terminal, so logs and pipes get only the messages
    bar = tqdm(total=0, unit="slice", desc="segmenting", file=sys.stderr, leave=False, disable=None)

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
    from ..core.modelfile import load_model

    model = load_model(args.model, kind=args.kind)
    print(f"# {model.path} (SHA256 {model.sha256})")
    print(json.dumps(model.metadata, indent=2, sort_keys=True))


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(prog="cdmsegment", description=(
        "Weakly supervised segmentation with conditional diffusion models (Hu et al., MICCAI 2023)."))
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    return parser


COMMANDS = [add_segment_parser, add_segment_cohort_parser, add_info_parser, add_phantom_parser, add_slices_parser, add_train_parser,
            add_export_parser, add_calibrate_parser, add_set_defaults_parser, add_train_classifier_parser,
            add_evaluate_parser, add_evaluate_volumes_parser]


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

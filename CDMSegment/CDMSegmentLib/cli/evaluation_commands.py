"""Command-line front ends for evaluation: ``evaluate`` and ``train-classifier``."""

import sys
from pathlib import Path

from .training_commands import comma_list


def add_evaluate_parser(sub) -> None:
    p = sub.add_parser("evaluate", help="every method on the same slices of a data set with masks: table, CSV, figures")
    p.add_argument("data", type=Path, metavar="DATA", help="folder of cases in the BraTS layout (phantoms included), "
                   "or a .npz slice set with masks")
    p.add_argument("-o", "--output", required=True, type=Path, metavar="OUTDIR")
    p.add_argument("--model", default=None, help="diffusion model (name or file; default: the bundled model)")
    p.add_argument("--classifier", default=None, help="noise-aware classifier for cg-cdm, cg-diff and the CAMs")
    p.add_argument("--methods", type=comma_list(str), default=["cdm"],
                   help="comma-separated: cdm, cg-cdm, gradcam, gradcam++, scorecam, layercam, cg-diff")
    p.add_argument("--threshold-rule", type=comma_list(str), default=["otsu-slice", "volume-otsu"],
                   help="comma-separated: otsu-slice (the paper's), volume-otsu (the tool's), "
                        "model (calibrated: CDM's, and CG-CDM's when the classifier stores one)")
    p.add_argument("--cases", type=int, default=None, help="evaluate only the first N cases")
    p.add_argument("--preset", default="model", choices=("model", "paper"), help="base CDM settings")
    p.add_argument("--noise-level", type=comma_list(float), default=[None], help="CDM alpha_bar at the start; a list sweeps")
    p.add_argument("--steps", type=comma_list(int), default=[None], help="CDM DDIM steps R; a list sweeps")
    p.add_argument("--tau", type=comma_list(float), default=[None], help="CDM tau; a list sweeps")
    p.add_argument("--guidance-scale", type=comma_list(float), default=[None], help="CG-CDM scale s; a list sweeps")
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


def add_train_classifier_parser(sub) -> None:
    p = sub.add_parser("train-classifier", help="train the noise-aware slice classifier and export it as a model file")
    p.add_argument("slices", type=Path, metavar="SLICES.npz", help="slice set written by CDMSegment's data tools")
    p.add_argument("--run-dir", required=True, type=Path, help="checkpoint folder (an interrupted run resumes)")
    p.add_argument("-o", "--output", required=True, type=Path, metavar="MODEL.pt")
    p.add_argument("--steps", type=int, default=5000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--base-channels", type=int, default=32)
    p.add_argument("--channel-mults", type=comma_list(int), default=[1, 2, 2, 4])
    p.add_argument("--class-names", type=comma_list(str), default=["normal", "lesion"])
    p.add_argument("--name", default="cdmsegment-classifier")
    p.add_argument("--version", default="0.1.0")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"))
    p.set_defaults(func=run_train_classifier)


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
                      precision=args.precision, unet=unet)
    checkpoint = train_classifier(data.data, data.labels, cfg, args.run_dir)
    sha = export_checkpoint(checkpoint, args.output, kind="classifier", name=args.name, version=args.version,
                            image_size=data.data.shape[-1], modalities=data.meta.get("modalities", ["image"]),
                            class_names=args.class_names, training={"slices": str(args.slices), "n": len(data)})
    print(f"{args.output} (SHA256 {sha})")


def add_evaluate_volumes_parser(sub) -> None:
    p = sub.add_parser("evaluate-volumes", help="3D quality of the tool on held-out cases with masks, "
                       "against Otsu on intensity")
    p.add_argument("data", type=Path, metavar="DATA", help="folder of cases in the BraTS layout (phantoms included)")
    p.add_argument("-o", "--output", required=True, type=Path, metavar="OUTDIR")
    p.add_argument("--model", default=None, help="diffusion model (name or file; default: the bundled model)")
    p.add_argument("--cases", type=int, default=None, help="only the first N cases")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=16)
    p.set_defaults(func=run_evaluate_volumes)


def run_evaluate_volumes(args) -> None:
    from ..data.cases import find_brats_cases
    from ..core.modelfile import load_model
    from ..evaluation.volumes import evaluate_volumes, summary_table, write_scores

    cases = [c for c in find_brats_cases(args.data) if c.seg is not None][:args.cases]
    scores = evaluate_volumes(cases, load_model(args.model), device=args.device, batch_size=args.batch_size,
                              log=lambda m: print(m, file=sys.stderr))
    write_scores(scores, args.output, " ".join(["cdmsegment"] + sys.argv[1:]))
    print(summary_table(scores))

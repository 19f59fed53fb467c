"""Choose the crop margin and the noise draws by Dice on held-out phantom volumes.

Runs the volume runner at the bundled model's defaults with one change at a time (crop margin,
antithetic draws, fewer draws) on phantom volumes that training and calibration never saw, and
prints per setting: pooled 3D Dice (all voxels of all cases), mean 3D Dice over the cases with a
lesion, false positives on lesion-free cases (ml), seconds, and the heatmap's change against the
uncropped run (largest difference relative to the uncropped heatmap's maximum). The threshold is
the model's calibrated one throughout.

    cdmsegment phantom work/heldout --cases 6 --seed 7000   # the README's test seeds
    python bench/bench_choices.py work/heldout [--settings "NAME;..."]
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "CDMSegment"))

from CDMSegmentLib.core.reading import read_volume  # noqa: E402
from CDMSegmentLib.core.methods import CDMParams  # noqa: E402
from CDMSegmentLib.core.modelfile import load_model  # noqa: E402
from CDMSegmentLib.core.runner import segment_volume  # noqa: E402
from CDMSegmentLib.evaluation.metrics import dice  # noqa: E402

# name: (runner options, parameter overrides); "uncropped" is the reference the others are compared with
SETTINGS = {
    "uncropped": ({"crop_margin_px": -1}, {}),
    "margin 0": ({"crop_margin_px": 0}, {}),
    "margin 8": ({"crop_margin_px": 8}, {}),
    "margin 16": ({"crop_margin_px": 16}, {}),
    "margin 24": ({"crop_margin_px": 24}, {}),
    "margin 8, 4 antithetic draws": ({"crop_margin_px": 8}, {"antithetic": True}),
    "margin 8, 2 antithetic draws": ({"crop_margin_px": 8}, {"antithetic": True, "noise_draws": 2}),
    "margin 8, 2 draws": ({"crop_margin_px": 8}, {"noise_draws": 2}),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("cases", type=Path, help="a folder of phantom cases (cdmsegment phantom)")
    parser.add_argument("--settings", default=";".join(SETTINGS), help="names separated by semicolons, from: "
                        + "; ".join(SETTINGS))
    args = parser.parse_args()
    model = load_model("brain-flair-phantom")  # the README's figures were measured on it
    names = ["uncropped"] + [n for n in args.settings.split(";") if n != "uncropped"]
    folders = sorted(p for p in args.cases.iterdir() if p.is_dir())
    print(f"{len(folders)} cases in {args.cases}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    scores = {n: {"inter": 0, "sum": 0, "dice": [], "fp_ml": [], "seconds": 0.0, "change": 0.0} for n in names}
    for folder in folders:
        flair = read_volume(next(folder.glob("*_flair.nii.gz")))
        truth = read_volume(next(folder.glob("*_seg.nii.gz"))).array > 0
        voxel_ml = float(np.prod(flair.spacing_mm)) / 1000
        reference = None
        for name in names:
            options, overrides = SETTINGS[name]
            params = CDMParams.for_model(model, **overrides)
            start = time.perf_counter()
            result = segment_volume(model, [flair], params=params, device="cpu", log=lambda m: None, **options)
            s = scores[name]
            s["seconds"] += time.perf_counter() - start
            mask = result.mask > 0
            s["inter"] += int((mask & truth).sum())
            s["sum"] += int(mask.sum() + truth.sum())
            if truth.any():
                s["dice"].append(dice(mask, truth))
            else:
                s["fp_ml"].append(mask.sum() * voxel_ml)
            if reference is None:
                reference = result.heatmap
            s["change"] = max(s["change"], float(np.abs(result.heatmap - reference).max() / reference.max()))
        print(f"{folder.name}: " + ", ".join(f"{n} {scores[n]['dice'][-1] if truth.any() else 0:.3f}" for n in names),
              flush=True)
    print(f"\n| setting | pooled Dice | mean 3D Dice (lesion cases) | FP ml on lesion-free (mean) | s | "
          f"max heatmap change vs uncropped |\n|---|---|---|---|---|---|")
    for n in names:
        s = scores[n]
        fp = f"{np.mean(s['fp_ml']):.2f}" if s["fp_ml"] else "-"
        print(f"| {n} | {2 * s['inter'] / max(s['sum'], 1):.4f} | {np.mean(s['dice']):.4f} | {fp} | "
              f"{s['seconds']:.1f} | {s['change']:.4f} |")


if __name__ == "__main__":
    main()

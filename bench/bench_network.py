"""Milliseconds per network evaluation: batch 16 on the whole slice against batch 4 on the tissue window.

For a busy machine, where whole-volume runs one after another see different loads: the settings
are timed in alternation, round after round, in one process, and the medians compared. The
tissue window is the median window of the sample's batches (4 slices, 8 px margin) as the
runner computes it.

    python bench/bench_network.py [--rounds 5]
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "CDMSegment"))

from CDMSegmentLib.core.crop import crop_window, tissue_boxes  # noqa: E402
from CDMSegmentLib.core.reading import read_volume  # noqa: E402
from CDMSegmentLib.core.modelfile import MODELS_DIR, load_model  # noqa: E402
from CDMSegmentLib.core.slicing import Orientation, extract_slices  # noqa: E402


def sample_windows(size: int, batch: int) -> list:
    flair = read_volume(MODELS_DIR.parent / "Sample" / "CDMSegmentSample_flair.nrrd")
    o = Orientation.from_direction(flair.direction, flair.spacing_mm)
    mask, _ = extract_slices((flair.array != 0)[None].astype(np.float32), o, 0, size, background=0.0)
    tissue = mask[:, 0] > 0
    boxes = tissue_boxes(tissue[tissue.flatten(1).any(dim=1)])
    return [crop_window(boxes[lo:lo + batch], size, 8) for lo in range(0, len(boxes), batch)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    model = load_model("brain-flair-phantom")  # the README's figures were measured on it
    net, size = model.network, model.image_size
    windows = sample_windows(size, 4)
    areas = sorted((w[1] - w[0]) * (w[3] - w[2]) for w in windows)
    window = windows[[(w[1] - w[0]) * (w[3] - w[2]) for w in windows].index(areas[len(areas) // 2])]
    h, w = window[1] - window[0], window[3] - window[2]
    print(f"sample windows: mean {np.mean(areas) / size ** 2:.0%} of the slice; median window {h} x {w} px")
    settings = {"batch 16, 128 x 128": (16, size, size), "batch 4, 128 x 128": (4, size, size),
                f"batch 4, {h} x {w}": (4, h, w)}
    times = {name: [] for name in settings}
    with torch.no_grad():
        for _ in range(args.rounds):
            for name, (b, rows, cols) in settings.items():
                x = torch.randn(2 * b, 1, rows, cols)  # both CDM branches in one batch
                t = torch.full((2 * b,), 300)
                emb = net.class_embedding(torch.ones(2 * b, dtype=torch.long))
                net(x, t, emb)
                start = time.perf_counter()
                net(x, t, emb)
                times[name].append((time.perf_counter() - start) / (2 * b) * 1000)
    base = statistics.median(times["batch 16, 128 x 128"])
    print(f"| setting | ms per evaluation (median of {args.rounds}) | speed-up |\n|---|---|---|")
    for name, ms in times.items():
        print(f"| {name} | {statistics.median(ms):.0f} | {base / statistics.median(ms):.2f} |")


if __name__ == "__main__":
    main()

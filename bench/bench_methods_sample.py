"""CDM against CG-CDM on the bundled sample, through the runner the panel uses, at the defaults.

Seconds per volume on each device (CUDA twice: the first run includes start-up), Dice against
the sample's ground truth, and how far the CUDA heatmap (fp16 autocast, the default there) is
from the CPU one (fp32), relative to its maximum.

    python bench/bench_methods_sample.py [--devices cpu,cuda]
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "CDMSegment"))

from CDMSegmentLib.core.reading import read_volume  # noqa: E402
from CDMSegmentLib.evaluation.metrics import dice  # noqa: E402
from CDMSegmentLib.core.model_description import registered_classifier  # noqa: E402
from CDMSegmentLib.core.modelfile import MODELS_DIR, load_model  # noqa: E402
from CDMSegmentLib.core.runner import segment_volume  # noqa: E402

SAMPLE = MODELS_DIR.parent / "Sample"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", default="cpu,cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    model = load_model("brain-flair-phantom")  # the README's figures were measured on it
    classifier = load_model(registered_classifier(model), kind="classifier")
    flair = read_volume(SAMPLE / "CDMSegmentSample_flair.nrrd")
    truth = read_volume(SAMPLE / "CDMSegmentSample_seg.nrrd").array > 0
    devices = [d for d in args.devices.split(",") for _ in range(2 if d == "cuda" else 1)]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads"
          + (f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""))
    for method in ("cdm", "cg-cdm"):
        results = {}
        for device in devices:
            start = time.perf_counter()
            result = segment_volume(model, [flair], method=method, classifier=classifier, device=device,
                                    log=lambda m: None)
            results[device] = result
            print(f"{method:7s} {device:5s} {time.perf_counter() - start:7.2f} s  Dice {dice(result.mask > 0, truth):.3f}  "
                  f"threshold {result.threshold:.3g}")
        if {"cpu", "cuda"} <= set(results):
            cpu, cuda = results["cpu"].heatmap, results["cuda"].heatmap
            print(f"{method:7s} CUDA heatmap vs CPU: max difference {np.abs(cuda - cpu).max() / cpu.max():.4f} of the maximum")


if __name__ == "__main__":
    main()

"""Seconds per volume and per slice, network evaluations per slice and peak memory of the volume runner.

A volume of 155 slices at the model's size (BraTS has 155 axial slices) with content in every
slice, run through ``segment_volume`` on the CPU and, when there is one, on CUDA, in fp32
and in reduced precision. Speed-ups are ratios against fp32 on the same device, measured in
this run; the heatmap error of reduced precision is relative to that fp32 heatmap.

    python bench/bench_volume.py [--model NAME|FILE] [--slices 155] [--devices cpu,cuda]
"""

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "CDMSegment"))

from CDMSegmentLib.core.image import Volume  # noqa: E402
from CDMSegmentLib.core.methods import CDMParams, network_evaluations_per_slice  # noqa: E402
from CDMSegmentLib.core.modelfile import load_model  # noqa: E402
from CDMSegmentLib.core.runner import segment_volume  # noqa: E402


def brain_like_volume(slices: int, size: int, seed: int = 0) -> Volume:
    """An ellipsoidal 'head' with smooth texture and two bright blobs: content in every slice."""
    rng = np.random.default_rng(seed)
    k, j, i = np.meshgrid(np.linspace(-1, 1, slices), np.linspace(-1, 1, size), np.linspace(-1, 1, size),
                          indexing="ij")
    head = (j / 0.9) ** 2 + (i / 0.75) ** 2 + (k / 1.6) ** 2 < 1
    image = 300 + 40 * np.sin(6 * i) * np.cos(5 * j) + 10 * rng.standard_normal(head.shape)
    for c in ((0.2, 0.3, -0.2), (-0.4, -0.2, 0.3)):
        image += 400 * (((k - c[0]) ** 2 + (j - c[1]) ** 2 + (i - c[2]) ** 2) < 0.02)
    return Volume((image * head).astype(np.float32), (1.0, 1.0, 1.0))


def peak_memory_mb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak RSS (Linux: KiB)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--slices", type=int, default=155)
    parser.add_argument("--devices", default="cpu,cuda")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    model = load_model(args.model)
    volume = brain_like_volume(args.slices, model.image_size)
    params = CDMParams.for_model(model)
    evaluations = network_evaluations_per_slice("cdm", params)
    print(f"model {model.metadata['name']}: {model.image_size} px, {params}; {args.slices} slices; "
          f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    print(f"{'device':6} {'precision':9} {'batch':>5} {'s/volume':>9} {'s/slice':>8} {'evals/slice':>11} "
          f"{'peak MB':>8} {'speed-up':>8} {'heatmap rel. error':>18}")
    for device in args.devices.split(","):
        if device == "cuda" and not torch.cuda.is_available():
            print("cuda: not available, skipped")
            continue
        precisions = ("fp32", "fp16", "bf16") if device == "cuda" else ("fp32", "bf16")
        batch = args.batch_size * (8 if device == "cuda" else 1)
        reference, reference_seconds = None, None
        for precision in precisions:
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
                segment_volume(model, [volume], device=device, precision=precision, batch_size=batch,
                               log=lambda m: None)  # warm-up: kernels, cuDNN autotuning
            start = time.perf_counter()
            result = segment_volume(model, [volume], device=device, precision=precision, batch_size=batch,
                                    log=lambda m: None)
            if device == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            if reference is None:
                reference, reference_seconds = result.heatmap, seconds
            error = np.abs(result.heatmap - reference).sum() / max(np.abs(reference).sum(), 1e-12)
            print(f"{device:6} {precision:9} {batch:5d} {seconds:9.2f} {seconds / result.slices_run:8.4f} "
                  f"{evaluations:11d} {peak_memory_mb(device):8.0f} {reference_seconds / seconds:8.2f} {error:18.4f}")


if __name__ == "__main__":
    main()

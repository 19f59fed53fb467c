"""The CUDA out-of-memory fallback on real GPU memory: batch halving, then the CPU, with the heatmap unchanged.

PyTorch's per-process memory limit makes a GPU run out of memory on the bundled sample: at 1.5 GB
a batch of 1024 slices must come down, and at 11 MB not even one slice fits. Prints the
runner's messages, the device it finished on, and the change against an unlimited run.

    python bench/cuda_out_of_memory.py        (needs a CUDA GPU)
"""

import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "CDMSegment"))
from CDMSegmentLib.core.reading import read_volume  # noqa: E402
from CDMSegmentLib.core.modelfile import MODELS_DIR, load_model  # noqa: E402
from CDMSegmentLib.core.runner import segment_volume  # noqa: E402


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    model = load_model("brain-flair-phantom")  # the README's figures were measured on it
    vol = read_volume(MODELS_DIR.parent / "Sample" / "CDMSegmentSample_flair.nrrd")
    print(torch.__version__, torch.cuda.get_device_name(0))
    t = time.perf_counter()
    ref = segment_volume(model, [vol], device="cuda", batch_size=16, precision="fp32", log=print)
    print(f"reference: {time.perf_counter() - t:.2f} s, {int(ref.mask.sum())} voxels, device {ref.device}")
    total = torch.cuda.get_device_properties(0).total_memory
    for label, limit_gb, batch in [("halving", 1.5, 1024), ("to-cpu", 0.011, 8)]:
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(limit_gb * 2**30 / total, 0)
        messages = []
        t = time.perf_counter()
        r = segment_volume(model, [vol], device="cuda", batch_size=batch, precision="fp32",
                           log=lambda m: (messages.append(m), print("  log:", m)))
        rel = np.abs(r.heatmap - ref.heatmap).max() / ref.heatmap.max()
        agree = 2 * np.logical_and(r.mask, ref.mask).sum() / (r.mask.sum() + ref.mask.sum())
        print(f"{label}: limit {limit_gb} GB, start batch {batch}: {time.perf_counter() - t:.2f} s, device {r.device}, "
              f"{len(messages)} messages, max heatmap change {rel:.2e}, mask Dice vs reference {agree:.4f}")


if __name__ == "__main__":
    main()

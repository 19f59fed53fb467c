"""What running the model in its own process costs: the Slicer path against the bare command line and against
a run inside the calling process.

Three ways to segment the same slab of the bundled sample with the bundled model on the CPU:

  in-process   segment_volume with torch imported and the model loaded (what the old worker thread ran)
  bare CLI     ``python -m CDMSegmentLib.cli.segment_command segment`` on the file, as a user runs it
  child run    CDMSegmentLogic.process on a volume node in a slicer-core scene: the input written to a
               temporary file, the command line in a child Python, its outputs read through Slicer's
               storage nodes (what the panel and the console do)

and the child's fixed costs alone: starting Python and importing torch and the library. Ratios are against
the in-process run of the same repetition; the medians over the repetitions are printed.

    python bench/bench_child_process.py [--slices 12] [--repeats 3]
"""

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import SimpleITK as sitk

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "CDMSegment"))
sys.path.insert(0, str(ROOT / "Testing"))

from CDMSegment import CDMSegmentLogic  # noqa: E402
from CDMSegmentLib.core.reading import read_volume  # noqa: E402
from CDMSegmentLib.core.modelfile import load_model  # noqa: E402
from CDMSegmentLib.core.runner import segment_volume  # noqa: E402
from CDMSegmentLib.slicer_adapters import mrml  # noqa: E402
from CDMSegmentLib.slicer_adapters.child_process import LIBRARY_PARENT, SEGMENT_ENTRY  # noqa: E402
from conftest import add_volume, mrml_scene  # noqa: E402

SAMPLE = ROOT / "CDMSegment" / "Resources" / "Sample" / "CDMSegmentSample_flair.nrrd"


def cpu_name() -> str:
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--slices", type=int, default=12, help="axial slices around the middle of the sample")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    image = sitk.ReadImage(str(SAMPLE))
    middle = image.GetSize()[2] // 2
    slab = image[:, :, middle - args.slices // 2: middle - args.slices // 2 + args.slices]
    folder = Path(tempfile.mkdtemp(prefix="bench-child-"))
    case = folder / "slab.nrrd"
    sitk.WriteImage(slab, str(case))
    volume = read_volume(case)
    model = load_model("brain-flair-phantom")  # the README's figures were measured on it
    env = dict(os.environ, PYTHONPATH=str(LIBRARY_PARENT))
    start_command = [sys.executable, "-c", "import CDMSegmentLib.cli.segment_files"]
    cli_command = [sys.executable, "-m", SEGMENT_ENTRY, "segment", str(case), "--device", "cpu", "--overwrite", "-o",
                   str(folder / "out")]
    segment_volume(model, [volume], device="cpu", log=lambda m: None)  # warm-up: the TorchScript profiling runs

    rows = []
    with mrml_scene() as scene:
        node = add_volume(scene, sitk.GetArrayFromImage(slab), mrml.RAS_FROM_LPS @ volume.ijk_to_lps())
        logic = CDMSegmentLogic()
        for _ in range(args.repeats):
            rows.append({
                "in-process": timed(lambda: segment_volume(model, [volume], device="cpu", log=lambda m: None)),
                "start + imports": timed(lambda: subprocess.run(start_command, env=env, check=True)),
                "bare CLI": timed(lambda: subprocess.run(cli_command, env=env, check=True, capture_output=True)),
                "child run": timed(lambda: logic.process(node, model=model, device="cpu")),
            })
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{args.slices} slices of the sample ({slab.GetSize()[0]} x {slab.GetSize()[1]}), bundled model, CPU: "
          f"{cpu_name()}, {os.cpu_count()} cores, load average {load:.1f}; median of {args.repeats}")
    base = statistics.median(r["in-process"] for r in rows)
    for name in rows[0]:
        seconds = statistics.median(r[name] for r in rows)
        print(f"  {name:16s} {seconds:6.2f} s   x{seconds / base:5.2f} of in-process")
    child = statistics.median(r["child run"] for r in rows)
    cli = statistics.median(r["bare CLI"] for r in rows)
    print(f"  the child run adds {child - base:.2f} s to an in-process run, {child - cli:+.2f} s to the bare CLI "
          "(writing the input, reading the outputs into the scene)")


if __name__ == "__main__":
    main()

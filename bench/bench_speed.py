"""Speed of the runner's choices, in one run: seconds, network evaluations, GFLOP, GFLOP/s, memory and Dice.

The first settings run ``brain-flair-phantom`` (128 px), on which the runner's speed work was measured; the last
is the default model, ``brain-flair-cpu``, at its own defaults: its ratio is against the first setting given, in
the same run. Two volumes: the bundled sample (82 slices, 66 with content) and a 155-slice phantom with tissue on
every slice (``generate_case`` seed 7100, 1 mm, never used in training, calibration or testing), each
with its ground truth. Every setting runs in a fresh process (its peak RSS is its own) through the
volume runner, ``--repeats`` times; the table gives the median seconds and the ratios against the
first setting, the default before the speed work (16 slices per batch, whole slices, 4 independent
draws, TorchScript), measured in the same run. The ONNX Runtime settings need ``pip install onnx
onnxruntime`` (core/engine.py); the first run of a model exports its graph into the model cache, so
the first repeat of the first ONNX setting includes that export (a few seconds). GFLOP are counted by torch's FlopCounterMode around the run (it
sees inside TorchScript); achieved GFLOP/s are set against an fp32 (and bf16) matrix multiply timed
in the same run. On a shared machine read the ratios, not the seconds.

A model file of your own (``make retrain``'s, for example) joins the table with ``--candidate FILE``
(repeatable), at the default model's runner options: ``--settings 5 --candidate FILE`` gives its
seconds as a ratio against ``brain-flair-cpu`` in the same run.

    python bench/bench_speed.py [--repeats 3] [--volumes sample,phantom155] [--settings N,...] [--device cpu]
                                [--candidate FILE ...]
"""

import argparse
import multiprocessing
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "CDMSegment"))

from CDMSegmentLib.core.device import cpu_has_bf16  # noqa: E402
from CDMSegmentLib.core.image import Volume  # noqa: E402
from CDMSegmentLib.core.reading import read_volume  # noqa: E402
from CDMSegmentLib.core.errors import CDMSegmentError  # noqa: E402
from CDMSegmentLib.core.model_description import describe_model  # noqa: E402
from CDMSegmentLib.core.modelfile import MODELS_DIR  # noqa: E402

SAMPLE = MODELS_DIR.parent / "Sample"
# name: (runner options, CDM parameter overrides)
PHANTOM = {"model": "brain-flair-phantom"}  # the 128 px model the runner's speed work was measured on
DEFAULT_SETTING = "brain-flair-cpu, batch 4, ONNX Runtime, crop 8 px"  # the default model at its runner options
SETTINGS = {
    "before (batch 16, whole slice, torch)": (
        {**PHANTOM, "batch_size": 16, "crop_margin_px": -1, "engine": "torch"}, {}),
    "batch 4, torch": ({**PHANTOM, "batch_size": 4, "crop_margin_px": -1, "engine": "torch"}, {}),
    "batch 4, ONNX Runtime": ({**PHANTOM, "batch_size": 4, "crop_margin_px": -1, "engine": "onnxruntime"}, {}),
    "batch 4, ONNX Runtime, crop 8 px": ({**PHANTOM, "batch_size": 4, "crop_margin_px": 8, "engine": "onnxruntime"},
                                         {}),
    "batch 4, ONNX Runtime, crop 8 px, 2 antithetic draws": (
        {**PHANTOM, "batch_size": 4, "crop_margin_px": 8, "engine": "onnxruntime"},
        {"noise_draws": 2, "antithetic": True}),
    # the compact network trained on two CPU cores, at its own defaults (96 px, 2 draws, lesion intensity)
    DEFAULT_SETTING: (
        {"batch_size": 4, "crop_margin_px": 8, "engine": "onnxruntime", "model": "brain-flair-cpu"}, {}),
}
BF16_SETTING = ("brain-flair-cpu, batch 4, torch, bf16 autocast",  # the default model, as DEFAULT_SETTING
                ({"batch_size": 4, "precision": "bf16", "engine": "torch", "model": "brain-flair-cpu"}, {}))


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def matmul_gflops(dtype: torch.dtype, n: int, seconds: float = 1.0) -> float:
    """Peak-like GFLOP/s of an n x n matrix multiply in ``dtype`` on the CPU threads torch uses."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        runs += 1
    return 2 * n ** 3 * runs / (time.perf_counter() - start) / 1e9


def phantom_155(folder: Path) -> tuple:
    """(image path, truth path): a 1 mm phantom cut to 155 axial slices, all with tissue."""
    from CDMSegmentLib.data.phantom import generate_case

    case = generate_case(folder, 7100, 0, lesion_free_fraction=0.0, in_plane_mm=1.0, slice_mm=0.98)
    image, seg = read_volume(case["images"]["flair"]), read_volume(case["seg"])
    tissue = np.flatnonzero(image.array.reshape(image.array.shape[0], -1).any(axis=1))
    keep = slice(tissue[0], tissue[0] + 155)
    out = []
    for v, name in ((image, "phantom155_flair.nrrd"), (seg, "phantom155_seg.nrrd")):
        sitk.WriteImage(Volume(np.ascontiguousarray(v.array[keep]), v.spacing_mm, v.origin_mm, v.direction).to_sitk(),
                        str(folder / name), True)
        out.append(folder / name)
    return tuple(out)


def measure(image: str, truth: str, options: dict, overrides: dict, device: str) -> dict:
    """One run in this (fresh) process: seconds, evaluations, GFLOP, peak RSS and 3D Dice."""
    from torch.utils.flop_counter import FlopCounterMode

    from CDMSegmentLib.core.methods import CDMParams
    from CDMSegmentLib.core.modelfile import load_model
    from CDMSegmentLib.core.runner import segment_volume
    from CDMSegmentLib.evaluation.metrics import dice

    options = dict(options)
    model = load_model(options.pop("model", None))
    volume, mask = read_volume(image), read_volume(truth).array > 0
    params = CDMParams.for_model(model, **overrides)
    if options.get("engine") == "onnxruntime":
        from CDMSegmentLib.core.engine import with_engine

        with_engine(model, "onnxruntime")  # the graph is exported here, not under the FLOP counter (a dispatch mode)
    with FlopCounterMode(display=False) as flops:  # Python per operator: under 2% of a run, within noise here
        start = time.perf_counter()
        result = segment_volume(model, [volume], params=params, device=device, log=lambda m: None, **options)
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "slices": result.slices_run, "evaluations": result.network_evaluations,
            "gflop": flops.get_total_flops() / 1e9, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "dice": dice(result.mask > 0, mask), "engine": result.engine}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--volumes", default="sample,phantom155")
    parser.add_argument("--settings", default=",".join(str(i) for i in range(len(SETTINGS))),
                        help="indices into: " + "; ".join(f"{i} {n}" for i, n in enumerate(SETTINGS)))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--candidate", action="append", default=[], metavar="FILE",
                        help="a model file (or registered name) to time at the default model's runner options "
                        "(repeatable)")
    args = parser.parse_args()
    settings = [list(SETTINGS.items())[int(i)] for i in args.settings.split(",")]
    default_options = SETTINGS[DEFAULT_SETTING][0]
    for path in args.candidate:
        try:  # a missing, truncated or classifier file: one line here, not a traceback from a worker process
            describe_model(path)
        except CDMSegmentError as e:
            parser.error(f"--candidate {path}: {e}")
        settings.append((f"{Path(path).name}, {DEFAULT_SETTING.split(', ', 1)[1]}",
                         ({**default_options, "model": path}, {})))
    if args.device == "cpu" and cpu_has_bf16():
        settings.append(BF16_SETTING)  # never on a CPU without bf16 units: 7-100x slower there
    fp32_peak = matmul_gflops(torch.float32, 2048, 2.0)
    bf16_peak = matmul_gflops(torch.bfloat16, 1024 if cpu_has_bf16() else 256, 0.3)
    print(f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}; bf16 units: "
          f"{'yes' if cpu_has_bf16() else 'no'}; matmul peak fp32 {fp32_peak:.1f} GFLOP/s, bf16 {bf16_peak:.1f} GFLOP/s "
          "(the network's GFLOP over this peak is a volume's least possible time in fp32)")
    context = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        volumes = {"sample": (SAMPLE / "CDMSegmentSample_flair.nrrd", SAMPLE / "CDMSegmentSample_seg.nrrd")}
        if "phantom155" in args.volumes:
            volumes["phantom155"] = phantom_155(Path(tmp))
        for name in args.volumes.split(","):
            image, truth = volumes[name]
            print(f"\n{name}\n| setting | s / volume (median of {args.repeats}) | speed-up | evals / slice | "
                  f"GFLOP / eval | GFLOP/s (of fp32 peak) | s at the fp32 peak | peak RSS MB | Dice | Dice change |\n"
                  "|---|---|---|---|---|---|---|---|---|---|")
            reference = None
            for label, (options, overrides) in settings:
                runs = []
                for _ in range(args.repeats):
                    with context.Pool(1) as pool:
                        runs.append(pool.apply(measure, (str(image), str(truth), options, overrides, args.device)))
                seconds = statistics.median(r["seconds"] for r in runs)
                r = runs[0]
                assert r["engine"] == options.get("engine", r["engine"]), f"{label} ran on {r['engine']}"
                reference = reference or {"seconds": seconds, "dice": r["dice"]}
                if r["engine"] == "torch":
                    rate = r["gflop"] / seconds
                    flops = (f"{r['gflop'] / r['evaluations']:.2f} | {rate:.0f} ({rate / fp32_peak:.0%}) | "
                             f"{r['gflop'] / fp32_peak:.0f}")
                else:  # FlopCounterMode sees torch's operators only; ONNX Runtime runs the same graph unseen
                    flops = "not counted | not counted | not counted"
                print(f"| {label} | {seconds:.1f} | {reference['seconds'] / seconds:.2f} | "
                      f"{r['evaluations'] / r['slices']:.0f} | {flops} | {max(x['peak_mb'] for x in runs):.0f} | "
                      f"{r['dice']:.3f} | "
                      f"{r['dice'] - reference['dice']:+.3f} |", flush=True)


if __name__ == "__main__":
    main()

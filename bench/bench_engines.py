"""The inference engine: TorchScript (as run today) against eager torch, torch.compile, ONNX Runtime and OpenVINO.

One network evaluation as the runner makes it (4 slices, both CDM branches: 8 inputs of 128 x 128 at
the bundled model's noise level), fp32, on this CPU. Every engine runs the bundled model's own
weights: the TorchScript file as shipped; the same weights loaded into ``core/unet.py``'s module
for eager torch and torch.compile (inductor, which compiles C++ at run time and so needs a
compiler); the graph ``core/engine.py`` exports from that module for ONNX Runtime and OpenVINO. The engines are timed in alternation, round after round, in one process (a busy
machine loads them alike), and the medians compared with TorchScript's. Agreement is judged on
what the CDM uses: the difference eps(x_t, f(y1)) - eps(x_t, f(y0)) of the two branches, as its
largest deviation from TorchScript's relative to TorchScript's largest difference.

The achievable ceiling is printed beside them: an fp32 matrix multiply on the same threads, and
the seconds a 155-slice volume would take at the bundled defaults (8 evaluations per slice) if
the network ran at that rate.

    python bench/bench_engines.py [--rounds 5] [--batch 4] [--engines torchscript,eager,...]

Optional engines need their packages: ``pip install onnx onnxruntime openvino``; an engine whose
package is missing is reported and skipped.
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "CDMSegment"))

from CDMSegmentLib.core.engine import eager_network, onnx_file  # noqa: E402
from CDMSegmentLib.core.modelfile import load_model  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_speed import cpu_name, matmul_gflops  # noqa: E402

ENGINES = ("torchscript", "eager", "eager-channels-last", "torch.compile", "onnxruntime", "openvino")
GFLOP_PER_EVALUATION = 5.70  # bench_speed.py's FlopCounterMode count for the bundled network at 128 px


def build(engine: str, model, inputs, folder: Path):
    """A callable (x, t, emb) -> eps as numpy-comparable torch tensor, and the seconds it took to build."""
    start = time.perf_counter()
    if engine == "torchscript":
        run = model.network
    elif engine == "eager":
        run = eager_network(model)
    elif engine == "eager-channels-last":
        net = eager_network(model).to(memory_format=torch.channels_last)

        def run(x, t, e):
            return net(x.contiguous(memory_format=torch.channels_last), t, e)
    elif engine == "torch.compile":
        run = torch.compile(eager_network(model), mode="max-autotune-no-cudagraphs")
        with torch.no_grad():
            run(*inputs)  # compiles here, so the build time includes it
    else:
        graph = onnx_file(model, folder)  # the graph the runner's engine exports and caches
        if engine == "onnxruntime":
            import onnxruntime

            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads = torch.get_num_threads()
            session = onnxruntime.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])

            def run(x, t, e):
                out = session.run(None, {"x": x.numpy(), "t": t.numpy(), "emb": e.numpy()})[0]
                return torch.from_numpy(out)
        else:
            import openvino

            compiled = openvino.Core().compile_model(str(graph), "CPU", {"INFERENCE_PRECISION_HINT": "f32",
                                                                             "INFERENCE_NUM_THREADS": torch.get_num_threads()})

            def run(x, t, e):
                return torch.from_numpy(compiled([x.numpy(), t.numpy(), e.numpy()])[0].copy())
    return run, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4, help="slices per batch (the network sees twice as many)")
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for every engine (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = load_model("brain-flair-phantom")  # the README's figures were measured on it
    b = args.batch
    t_q = model.schedule().timestep_for_alpha_bar(model.defaults["noise_level"])
    f1, f0 = model.network.class_embedding(torch.tensor([1, 0])).detach()
    x_t = torch.randn(b, 1, model.image_size, model.image_size)
    inputs = (torch.cat([x_t, x_t]), torch.full((2 * b,), t_q, dtype=torch.long),
              torch.stack([f1] * b + [f0] * b))
    peak1 = matmul_gflops(torch.float32, 2048, 2.0)
    print(f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}; fp32 matmul {peak1:.0f} GFLOP/s "
          f"(a 155-slice volume at the bundled defaults needs {155 * 8 * GFLOP_PER_EVALUATION:.0f} GFLOP: "
          f"{155 * 8 * GFLOP_PER_EVALUATION / peak1:.0f} s at that rate); network batch {2 * b}")
    runs, built = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for engine in args.engines.split(","):
            try:
                runs[engine], built[engine] = build(engine, model, inputs, Path(tmp))
            except Exception as e:  # a missing package or a failing compiler: reported, not fatal
                print(f"{engine}: not run ({type(e).__name__}: {str(e).splitlines()[0][:160]})")
        with torch.no_grad():
            outputs = {name: run(*inputs).float() for name, run in runs.items()}
            times = {name: [] for name in runs}
            for _ in range(args.rounds):
                for name, run in runs.items():
                    start = time.perf_counter()
                    run(*inputs)
                    times[name].append((time.perf_counter() - start) / (2 * b))
    reference = outputs.get("torchscript")
    base = statistics.median(times["torchscript"]) if "torchscript" in times else None
    print(f"\n| engine | ms / evaluation (median of {args.rounds}) | speed vs TorchScript | GFLOP/s (of matmul) | "
          "CDM difference vs TorchScript | build s |\n|---|---|---|---|---|---|")
    for name in runs:
        ms = statistics.median(times[name]) * 1000
        rate = GFLOP_PER_EVALUATION / ms * 1000
        change = "-"
        if reference is not None:
            d_ref = reference[:b] - reference[b:]
            d = outputs[name][:b] - outputs[name][b:]
            change = f"{float((d - d_ref).abs().max() / d_ref.abs().max()):.1e}"
        print(f"| {name} | {ms:.1f} | {base * 1000 / ms if base else float('nan'):.2f} | {rate:.0f} ({rate / peak1:.0%}) | "
              f"{change} | {built[name]:.1f} |")


if __name__ == "__main__":
    main()

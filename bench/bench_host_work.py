"""Milliseconds of each stage of ``segment_volume`` other than the network, on the sample and a larger volume.

The stages are the runner's own calls, in its order: the voxels' copy to the device, normalisation, the
tissue mask, the image checks (plausibility without the OOD network passes), the OOD score's slice
preparation, resizing to model slices, the slices with content, the tissue boxes, the noise draws,
resizing the maps back, clamping them to the tissue and copying the heatmap and mask to the host, and
the threshold and mask. The network's maps are stood in for by the sample's lesion. Median of
``--repeats`` runs each. The larger volume is the sample resized to 155 x 240 x 240 (a BraTS grid),
made here, never written. On a CPU that other work keeps busy, torch's intra-op threads wait for each
other on every operation; OMP_NUM_THREADS=1 then shows the work itself.

    python bench/bench_host_work.py [--device cpu|cuda] [--repeats 5]
"""

import argparse
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "CDMSegment"))

from CDMSegmentLib.core.device import voxel_tensor  # noqa: E402
from CDMSegmentLib.core.image import Volume  # noqa: E402
from CDMSegmentLib.core.methods import CDMParams, calibrated_threshold, draw_noise  # noqa: E402
from CDMSegmentLib.core.modelfile import load_model  # noqa: E402
from CDMSegmentLib.core.ood import _chosen_slices, _settings  # noqa: E402
from CDMSegmentLib.core.plausibility import check_plausible  # noqa: E402
from CDMSegmentLib.core.reading import read_volume  # noqa: E402
from CDMSegmentLib.core.runner import _normalised, _tissue_boxes  # noqa: E402
from CDMSegmentLib.core.slicing import Orientation, extract_slices, insert_slices  # noqa: E402
from CDMSegmentLib.core.threshold import make_mask, resolve_threshold, voxels_for_ml  # noqa: E402
from CDMSegmentLib.core.tissue import slices_with_content, tissue_mask  # noqa: E402

SAMPLE = ROOT / "CDMSegment" / "Resources" / "Sample" / "CDMSegmentSample_flair.nrrd"
SAMPLE_LESION = SAMPLE.with_name("CDMSegmentSample_seg.nrrd")
LESION_HEAT = 0.01  # the stand-in heatmap's value on the lesion, 50 x the bundled model's threshold
LARGE_SHAPE = (155, 240, 240)
AXIS = 0  # axial, the runner's default


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or "unknown CPU"


def resized(volume: Volume, shape) -> Volume:
    """The volume linearly resampled to ``shape``, spacing scaled so its extent in mm stays."""
    zoom = [n / o for n, o in zip(shape, volume.array.shape)]
    array = ndimage.zoom(volume.array.astype(np.float32), zoom, order=1)
    spacing = tuple(s / z for s, z in zip(volume.spacing_mm, zoom[::-1]))  # spacing is (i, j, k)
    return Volume(array, spacing, volume.origin_mm, volume.direction)


def stages(model, volume: Volume, lesion: Volume, device: torch.device):
    """The runner's host-side stages in order, as (name, callable) pairs sharing their results in ``state``.
    The network's maps are stood in for by the ground-truth lesion at the model's size: a heatmap's extent."""
    state = {}
    params = CDMParams.for_model(model)
    orientation = Orientation.from_direction(volume.direction, volume.spacing_mm)
    size = model.image_size
    maps = extract_slices((lesion.array > 0.5)[None].astype(np.float32), orientation, AXIS, size, background=0.0,
                          device=device)[0][:, 0] * LESION_HEAT

    def sync(x):
        if device.type == "cuda":
            torch.cuda.synchronize()
        return x

    def run_content():
        state["with_content"] = slices_with_content(orientation.to_canonical(state["content"]).movedim(AXIS, 0))

    def run_maps_back():
        state["heatmap"] = insert_slices(maps, state["stack"])

    def run_clamp():
        heatmap = state["heatmap"].clamp_(min=0.0).masked_fill_(~state["content"], 0.0)
        state["clamped"], state["content_host"] = heatmap.cpu().numpy(), state["content"].cpu().numpy()

    def run_threshold():
        value = resolve_threshold(state["clamped"], "model", state["content_host"], calibrated_threshold("cdm", model))
        make_mask(state["clamped"], value, state["content_host"],
                  voxels_for_ml(model.defaults.get("min_component_ml", 0.0), volume.spacing_mm))

    return [
        ("voxels to device", lambda: state.__setitem__("raw", sync([voxel_tensor(volume.array, device)]))),
        ("normalisation", lambda: state.__setitem__("arrays", sync(_normalised(model, state["raw"])))),
        ("tissue mask", lambda: state.__setitem__("content", sync(tissue_mask(state["raw"])))),
        ("image checks", lambda: check_plausible(model.metadata, [volume], model.modalities)),
        ("OOD slices", lambda: sync(_chosen_slices([volume], model, _settings(model)["slices"], device,
                                                   state["arrays"]))),
        ("extract_slices", lambda: state.update(zip(("slices", "stack"), sync(
            extract_slices(state["arrays"], orientation, AXIS, size))))),
        ("slices with content", run_content),
        ("tissue boxes", lambda: _tissue_boxes(state["content"], orientation, AXIS, size, state["with_content"])),
        ("noise draws", lambda: sync(draw_noise(torch.from_numpy(state["with_content"]), state["slices"].shape[1:], 0,
                                                params).to(device))),
        ("insert_slices", run_maps_back),
        ("clamp, to host", run_clamp),
        ("threshold + mask", run_threshold),
    ]


def time_stages(model, volume: Volume, lesion: Volume, device: torch.device, repeats: int):
    """{stage: median ms}; every repeat runs all stages in order, as the runner does."""
    runs = {}
    for _ in range(repeats + 1):  # the first pass warms caches and kernels and is not counted
        for name, fn in stages(model, volume, lesion, device):
            start = time.perf_counter()
            fn()
            runs.setdefault(name, []).append((time.perf_counter() - start) * 1000)
    return {name: float(np.median(ms[1:])) for name, ms in runs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device = torch.device(args.device)
    model = load_model("brain-flair-phantom")  # the README's figures were measured on it
    sample = read_volume(SAMPLE)
    lesion = read_volume(SAMPLE_LESION)
    volumes = {"sample": (sample, lesion), "large": (resized(sample, LARGE_SHAPE), resized(lesion, LARGE_SHAPE))}
    gpu = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    print(f"{cpu_name()}, {torch.get_num_threads()} torch threads; device {device}{gpu}; torch {torch.__version__}; "
          f"median of {args.repeats}")
    timings = {name: time_stages(model, v, s, device, args.repeats) for name, (v, s) in volumes.items()}
    header = "".join(f"{f'{n} {v.array.shape[0]}x{v.array.shape[1]}x{v.array.shape[2]}':>26}"
                     for n, (v, _) in volumes.items())
    print(f"{'stage':20}{header}")
    totals = {n: sum(t.values()) for n, t in timings.items()}
    for stage in timings["sample"]:
        cells = "".join(f"{timings[n][stage]:12.1f} ms {100 * timings[n][stage] / totals[n]:9.1f} %" for n in volumes)
        print(f"{stage:20}{cells}")
    print(f"{'total':20}" + "".join(f"{totals[n]:12.1f} ms {100.0:9.1f} %" for n in volumes))


if __name__ == "__main__":
    main()

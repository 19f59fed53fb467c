"""What the Slicer panel offers and says, as plain values: the widget only copies them into Qt.

Kept here, without Qt, so that the choices (which models, which methods, which defaults) and the
texts a user reads are tested by pytest like the rest of the core.
"""

import importlib.metadata
import math
import zipfile
import zlib
from pathlib import Path
from typing import List, Optional, Tuple

from ..core.engine import ONNX_REQUIREMENTS, onnxruntime_available
from ..core.model_description import read_metadata
from ..core.model_metadata import ensemble_size
from ..core.plausibility import takes
from ..core.registry import REGISTRY_FILE, read_registry
from ..core.settings import CDMSettings


def model_choices(registry: Path = REGISTRY_FILE) -> List[str]:
    """The registered names of every diffusion model, the default one first. Classifiers are not
    offered: they guide a diffusion model and come with it (``modelfile.registered_classifier``)."""
    entries = [e for e in read_registry(registry) if e.get("kind", "diffusion") == "diffusion"]
    entries.sort(key=lambda e: not e.get("default", False))
    return [e["name"] for e in entries]


def registry_text(name: str, registry: Path = REGISTRY_FILE) -> str:
    """A registered model's description, shown until its file is at hand (downloaded and checked when the user
    picks it or runs)."""
    entry = next((e for e in read_registry(registry) if e["name"] == name), {})
    return (f"{name}: {entry.get('description', 'registered model')} Downloaded and checked when chosen or at the "
            "first Apply.")


# The parameter node's names (Slicer's camelCase) of the CDM settings the panel's Advanced section shows.
PANEL_SETTINGS = {"noiseLevel": "noise_level", "steps": "steps", "tau": "tau", "noiseDraws": "noise_draws",
                  "guidanceScale": "guidance_scale", "lesionIntensity": "lesion_intensity",
                  "minComponentMl": "min_component_ml"}


def sampler_defaults(model, classifier=None, method: str = "cdm") -> dict:
    """The Advanced section's sampler values (noise level, R, tau, noise draws, guidance scale) for ``method``: the
    model's measured defaults and the classifier's scale, and for CG-CDM the CDM settings its classifier was
    calibrated at (core.settings.CDMParams.for_model), so that its threshold is used where it was measured."""
    p = CDMSettings().params(model, classifier, method)
    return {name: getattr(p, field) for name, field in PANEL_SETTINGS.items() if hasattr(p, field)}


def advanced_defaults(model, classifier=None, method: str = "cdm") -> dict:
    """The Advanced section's values for a model (core.model_description.ModelDescription) and ``method``: its
    sampler_defaults, its lesion-intensity refinement (0, off, for a model without one) and its speck removal in
    ml (0, none, for a model without one)."""
    return {**sampler_defaults(model, classifier, method),
            "lesionIntensity": float(model.defaults.get("lesion_intensity", 0.0)),
            "minComponentMl": float(model.defaults.get("min_component_ml", 0.0))}


def noise_draws_step(model) -> int:
    """The step (and least value) of the panel's noise draws for ``model`` (a ModelDescription): 1, or for an
    ensemble of K networks K, as each draw runs through one of them in turn (core/ensemble.py)."""
    return ensemble_size(model.metadata)


def settings_from_parameters(parameters):
    """The ``core.settings.CDMSettings`` a parameter node (or any object with the PANEL_SETTINGS attributes) holds."""
    return CDMSettings(**{field: getattr(parameters, name) for name, field in PANEL_SETTINGS.items()})


def model_file_of(source: str, cache_dir: Optional[Path] = None, registry: Path = REGISTRY_FILE) -> Optional[Path]:
    """The file a model choice names, where it is on disk: a registered model's bundled (or already downloaded)
    file, or the path given; None for a registered model not downloaded yet."""
    entry = next((e for e in read_registry(registry) if e["name"] == source), None)
    if entry is None:
        return Path(source) if Path(source).is_file() else None
    found = [p for p in (registry.parent / entry["file"], cache_dir and Path(cache_dir) / entry["file"]) if p]
    return next((p for p in found if p.is_file()), None)


def peek_metadata(path: Optional[Path]) -> Optional[dict]:
    """A model file's metadata, read from its TorchScript archive without checking the file (no SHA256 to
    compute), for the panel to describe the model shown before it is chosen; None when it holds none. Choosing
    the model describes it with every check (core.model_description.describe_model)."""
    if path is None:
        return None
    try:
        metadata = read_metadata(path)
    except (OSError, EOFError, ValueError, TypeError, zlib.error, zipfile.BadZipFile):
        return None
    fields = ("name", "version", "modalities", "class_names", "image_size")
    return metadata if isinstance(metadata, dict) and all(f in metadata for f in fields) else None


def metadata_text(m: dict) -> str:
    """What the panel says about a model, from its metadata: name, inputs, classes, slice size, what it takes."""
    return (f"{m['name']} {m['version']}: {', '.join(m['modalities'])} -> {', '.join(m['class_names'][1:])}, "
            f"{m['image_size']} px slices\nTakes: {takes(m)}")


def model_text(model) -> str:
    return metadata_text(model.metadata)


def torch_build() -> str:
    """Which PyTorch build is installed, from its package metadata without importing it: 'cuda', 'rocm', 'cpu',
    or '' when none is. PyPI's Linux wheels carry no +cu tag but depend on NVIDIA's CUDA packages."""
    try:
        distribution = importlib.metadata.distribution("torch")
    except importlib.metadata.PackageNotFoundError:
        return ""
    local = distribution.version.partition("+")[2]
    if local.startswith("cu"):
        return "cuda"
    if local.startswith("rocm"):
        return "rocm"
    if local == "cpu":
        return "cpu"
    return "cuda" if any(r.startswith("nvidia-") for r in distribution.requires or []) else "cpu"


def runs_on_cpu(device: str, build: str, last_run_device: Optional[str] = None) -> bool:
    """Whether a run with the panel's device choice ('auto', 'cuda', 'cpu') will be on the CPU: as the last run
    was for 'auto' once one ran (the child chose), else as the PyTorch build suggests."""
    if device in ("cpu", "cuda"):
        return device == "cpu"
    if last_run_device:
        return last_run_device.startswith("cpu")
    return build not in ("cuda", "rocm")


def progress_text(done: float, total: float, unit: str, eta_seconds: Optional[float], message: str = "") -> str:
    """'12 of 155 slices, about 40 s left' (a download counts bytes and reads in MB)."""
    if not total:
        return message or "Starting..."
    scale = 1e6 if unit == "MB" else 1
    text = f"{done / scale:.0f} of {total / scale:.0f} {unit}"
    if eta_seconds is not None and done < total:
        text += f", about {_duration(eta_seconds)} left"
    return text + (f"\n{message}" if message else "")


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


def slider_range(heatmap_max: float) -> Tuple[float, float, int]:
    """(maximum, single step, decimals) of the threshold slider for a heatmap: 200 steps over its range,
    with the decimals to show one step (a CDM heatmap can peak at 0.002, and Qt rounds to the decimals)."""
    top = float(heatmap_max) if heatmap_max > 0 else 1.0
    step = top / 200
    return top, step, min(10, max(2, math.ceil(-math.log10(step)) + 1))


def result_text(summary: dict) -> str:
    """One status line for a finished run, from its summary (``cdmsegment segment --progress-lines``); the
    engine is named when it was ONNX Runtime (a summary without ``engine`` is torch's)."""
    thresholds = ", ".join(f"{t:.3g}" for t in summary["thresholds"])
    engine = " with ONNX Runtime" if summary.get("engine") == "onnxruntime" else ""
    return (f"{summary['slices_run']} of {summary['slices_total']} slices in {summary['seconds']:.0f} s on "
            f"{summary['device']}{engine}; {summary['voxels_segmented']} voxels ({summary['volume_ml']:.1f} ml) "
            f"segmented at threshold {thresholds}"
            + (", delineated by the lesion's intensity" if summary.get("refinement") and summary["voxels_segmented"]
               else "")
            + (", with the bright regions its heatmap supports" if summary.get("supported_voxels") else "")
            + "".join(f"\nWarning: {w}" for w in summary.get("warnings", [])))


# onnx and onnxruntime with their dependencies (numpy aside), as pip resolved them with numpy held at Slicer's
# (pip download, 2026): 35 MB for Slicer 5.6 (Python 3.9, numpy 1.26.1) on Windows, onnxruntime 1.19 and sympy;
# 37 MB for Slicer 5.10 (Python 3.12, numpy 2.0.2) on Linux, onnxruntime 1.32.
ONNX_DOWNLOAD_MB = 40


def cpu_engine_text() -> Tuple[str, bool]:
    """(the panel's line on what evaluates the network in a CPU run, whether to offer installing ONNX Runtime):
    what ``core.engine.choose_engine("auto", cpu)`` takes, found without importing torch or onnxruntime."""
    if onnxruntime_available():
        return "CPU engine: ONNX Runtime", False
    return "CPU engine: torch (ONNX Runtime is about 1.3x faster on a CPU)", True


def onnx_install_question() -> str:
    """What the install button asks before anything is installed: what, how big, and what stays."""
    return (f"Install ONNX Runtime into Slicer's Python ({' and '.join(ONNX_REQUIREMENTS)}, about "
            f"{ONNX_DOWNLOAD_MB} MB to download with their small dependencies)?\n\nRuns on the CPU then evaluate the "
            "network with it, about 1.3x faster, with torch's results up to float rounding. PyTorch stays installed "
            "and remains the fallback: GPU runs use it, and so does every run if ONNX Runtime is removed. numpy is left "
            "as it is.")


def onnx_install_requirements() -> List[str]:
    """pip's arguments for the install button: ``core.engine.ONNX_REQUIREMENTS`` with numpy held at the installed
    version, so that pip picks onnx and onnxruntime releases built for Slicer's numpy instead of replacing it.
    Raises importlib.metadata.PackageNotFoundError where numpy is not installed (never in Slicer)."""
    return [*ONNX_REQUIREMENTS, f"numpy=={importlib.metadata.version('numpy')}"]


def torch_version_problem(installed: str, minimum: str) -> Optional[str]:
    """A sentence for the user when the installed torch (e.g. '2.0.1+cu118') is older than ``minimum``, else None."""
    def numbers(version: str) -> Tuple[int, ...]:
        parts = []
        for part in version.split("+")[0].split(".")[:3]:
            digits = "".join(c for c in part if c.isdigit())
            parts.append(int(digits) if digits else 0)
        return tuple(parts)

    if numbers(installed) >= numbers(minimum):
        return None
    return (f"CDMSegment needs PyTorch {minimum} or newer, but {installed} is installed. Update it in the PyTorch "
            "module (Uninstall, restart Slicer, then Install), or from the Python console with "
            f"PyTorchUtils.PyTorchUtilsLogic().installTorch(torchVersionRequirement='>={minimum}').")

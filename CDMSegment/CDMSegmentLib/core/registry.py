"""The model registry, models.json: which models are bundled or downloadable, read without torch.

The panel lists the registered models from here when it opens, without importing torch
(which can initialise CUDA); loading a model (modelfile.py) needs torch.
"""

import json
import os
from pathlib import Path

from .errors import ModelFileError

MODELS_DIR = Path(__file__).resolve().parents[2] / "Resources" / "Models"
REGISTRY_FILE = MODELS_DIR / "models.json"


def read_registry(registry: Path = REGISTRY_FILE) -> list:
    """The entries of models.json: name, file, sha256, size_bytes, kind, optional url and default flag."""
    if not registry.exists():
        return []
    try:
        entries = json.loads(registry.read_text())["models"]
    except (ValueError, KeyError, TypeError, OSError) as e:
        raise ModelFileError(f"{registry} is not a valid model registry ({e}); restore it from the extension") from None
    for n, entry in enumerate(entries if isinstance(entries, list) else [None]):
        if not isinstance(entry, dict) or not all(isinstance(entry.get(k), str) for k in ("name", "file", "sha256")):
            raise ModelFileError(f"{registry} is not a valid model registry (entry {n} lacks a name, file or sha256); "
                                 "restore it from the extension")
    return entries


def default_model_name(kind: str = "diffusion", registry: Path = REGISTRY_FILE) -> str:
    """The registry's default model of ``kind``: the entry marked ``default`` (else the first); for a
    classifier, the one registered beside the default diffusion model, when it names one."""
    everything = read_registry(registry)
    entries = [e for e in everything if e.get("kind", "diffusion") == kind]
    if not entries:
        raise ModelFileError(f"no bundled {kind} model is registered in {registry}; give a model file with --model")
    if kind == "classifier":
        diffusion = [e for e in everything if e.get("kind", "diffusion") == "diffusion"]
        own = next((e for e in diffusion if e.get("default")), diffusion[0] if diffusion else {}).get("classifier")
        if any(e["name"] == own for e in entries):
            return own
    return next((e for e in entries if e.get("default")), entries[0])["name"]


def default_cache_dir() -> Path:
    """Where downloaded models and ONNX graphs go, one folder per user for the Slicer panel, the Python console
    and the command line: $CDMSEGMENT_CACHE, else ~/.cache/CDMSegment/models."""
    return Path(os.environ.get("CDMSEGMENT_CACHE", Path.home() / ".cache" / "CDMSegment" / "models"))

"""Model files: one TorchScript file with its metadata inside, checked against models.json.

A model file holds ``metadata.json`` as a TorchScript extra file. Loading verifies the
file's SHA256 against its registry entry (bundled and downloaded models), that the
metadata is complete and of a version this code reads, and fails with one clear line
otherwise - never a traceback.
"""

import hashlib
import io
import json
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple, Union

import torch

from .errors import CDMSegmentError, ModelFileError
from .registry import MODELS_DIR, REGISTRY_FILE, default_model_name, read_registry  # noqa: F401 (also used from here)
from .schedule import NoiseSchedule

FORMAT_VERSION = 1
METADATA_FILE = "metadata.json"
REQUIRED_KEYS = {
    "diffusion": ("format_version", "kind", "name", "version", "image_size", "in_channels", "modalities",
                  "class_names", "schedule", "num_timesteps", "defaults", "normalisation", "training"),
    "classifier": ("format_version", "kind", "name", "version", "image_size", "in_channels", "modalities",
                   "class_names", "schedule", "num_timesteps", "normalisation", "training"),
}


@dataclass
class LoadedModel:
    """A TorchScript network with its metadata. ``network`` is on the CPU until moved."""

    network: torch.jit.ScriptModule
    metadata: dict
    path: Path
    sha256: str

    @property
    def kind(self) -> str:
        return self.metadata["kind"]

    @property
    def image_size(self) -> int:
        return int(self.metadata["image_size"])

    @property
    def modalities(self) -> list:
        return list(self.metadata["modalities"])

    @property
    def class_names(self) -> list:
        return list(self.metadata["class_names"])

    @property
    def defaults(self) -> dict:
        return dict(self.metadata.get("defaults", {}))

    def target_classes(self, target_class: Optional[int] = None) -> list:
        """[target_class], or every class but 0 (normal) when None; a class the model lacks is an error."""
        last = len(self.class_names) - 1
        classes = [target_class] if target_class is not None else list(range(1, last + 1))
        if not classes or not all(0 < c <= last for c in classes):
            raise CDMSegmentError(f"target class must be one of 1..{last} ({', '.join(self.class_names[1:])})")
        return classes

    def schedule(self) -> NoiseSchedule:
        return NoiseSchedule(self.metadata["schedule"], int(self.metadata["num_timesteps"]))

    def noise_band(self) -> Tuple[int, int]:
        """(lo, hi), inclusive: the timesteps the network was trained on (``metadata["t_range"]``, written by
        ``cdmsegment train --t-range``); a model without one was trained on all of 0..T-1."""
        band = self.metadata.get("t_range")
        return (int(band[0]), int(band[1])) if band else (0, int(self.metadata["num_timesteps"]) - 1)

    def check_noise_level(self, alpha_bar: float, steps: int = 1, what: str = "noise level") -> int:
        """The timestep t of ``alpha_bar``, after checking that t and the ``steps`` - 1 below it (where the
        network is evaluated) lie in the training band. Raises CDMSegmentError naming the valid alpha_bar range."""
        schedule = self.schedule()
        t = schedule.timestep_for_alpha_bar(alpha_bar)
        lo, hi = self.noise_band()
        if t > hi or t - steps + 1 < lo:
            lowest, highest = (float(schedule.alpha_bar(b)) for b in (hi, lo + steps - 1))
            raise CDMSegmentError(
                f"{what} alpha_bar {alpha_bar:g}{f' with {steps} steps' if steps > 1 else ''} lies outside the noise "
                f"band this model was trained on (timesteps {lo}..{hi}): choose alpha_bar between {lowest:.3f} "
                f"and {highest:.3f}")
        return t


def sha256_of(path: Union[str, Path]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_model(network: torch.nn.Module, metadata: dict, path: Union[str, Path]) -> str:
    """Script ``network`` and write it with ``metadata`` inside, atomically; returns the file's SHA256."""
    _check_metadata(metadata, str(path))
    path = Path(path)
    scripted = torch.jit.script(network.eval().cpu())
    tmp = path.with_name(path.name + ".partial")
    torch.jit.save(scripted, str(tmp), _extra_files={METADATA_FILE: json.dumps(metadata, indent=1, sort_keys=True)})
    tmp.replace(path)
    return sha256_of(path)


def registered_classifier(model: "LoadedModel", registry: Path = REGISTRY_FILE) -> Optional[str]:
    """The name of the registered classifier that guides ``model`` (CG-CDM): the ``classifier`` of the
    registry entry whose SHA256 is the model file's, when that names a registered classifier."""
    entries = read_registry(registry)
    entry = next((e for e in entries if e.get("sha256") == model.sha256 and e.get("kind", "diffusion") == "diffusion"),
                 {})
    name = entry.get("classifier")
    return name if any(e["name"] == name and e.get("kind") == "classifier" for e in entries) else None


def with_defaults(model: "LoadedModel", defaults: dict, path: Union[str, Path], **metadata) -> str:
    """Write ``model`` again with ``defaults`` merged into its metadata (after a calibration) and top-level
    ``metadata`` keys (e.g. ``ood``, ``expects``) replaced; returns the SHA256."""
    return save_model(model.network, {**model.metadata, **metadata, "defaults": {**model.defaults, **defaults}}, path)


def resolve_model_path(name_or_path: Union[str, Path, None], kind: str = "diffusion",
                       registry: Path = REGISTRY_FILE) -> tuple:
    """-> (path, expected sha256 or None). A registered name, or a path to a model file."""
    if name_or_path is None:
        name_or_path = default_model_name(kind, registry)
    entries = read_registry(registry)
    entry = next((e for e in entries if e["name"] == str(name_or_path)), None)
    if entry is not None:
        return registry.parent / entry["file"], entry["sha256"]
    path = Path(name_or_path)
    if not path.exists():
        names = ", ".join(e["name"] for e in entries) or "none"
        raise ModelFileError(f"model {name_or_path!r} not found: not a file and not a registered model (registered: {names})")
    entry = next((e for e in entries if (registry.parent / e["file"]).resolve() == path.resolve()), None)
    return path, entry["sha256"] if entry else None


def load_model(name_or_path: Union[str, Path, None] = None, kind: str = "diffusion",
               registry: Path = REGISTRY_FILE, expected_sha256: Optional[str] = None) -> LoadedModel:
    """Load and check a model file; registered models must match their SHA256."""
    path, registered_sha = resolve_model_path(name_or_path, kind, registry)
    expected_sha256 = expected_sha256 or registered_sha
    if not path.is_file():
        raise ModelFileError(f"model file missing: {path}; reinstall the extension or load the model from a file")
    digest = sha256_of(path)
    if expected_sha256 and digest != expected_sha256:
        raise ModelFileError(f"model file {path} is corrupt or was replaced (SHA256 {digest[:12]}... "
                             f"expected {expected_sha256[:12]}...); delete it and reinstall or re-download it")
    if not expected_sha256:
        check_archive(path)
    extra = {METADATA_FILE: ""}
    try:
        data = path.read_bytes()
        network = torch.jit.load(io.BytesIO(data), map_location="cpu", _extra_files=extra)
    except Exception as e:  # torch raises RuntimeError, ValueError, zipfile errors... for a bad file
        raise ModelFileError(f"{path.name} is not a readable CDMSegment model (truncated or not TorchScript: "
                             f"{type(e).__name__}); use a model exported by 'cdmsegment export'") from None
    if not extra[METADATA_FILE]:
        raise ModelFileError(f"{path.name} is a TorchScript file without CDMSegment metadata; "
                             "use a model exported by 'cdmsegment export'")
    try:
        metadata = json.loads(extra[METADATA_FILE])
    except ValueError:
        raise ModelFileError(f"{path.name} has unreadable metadata; re-export it with 'cdmsegment export'") from None
    _check_metadata(metadata, path.name)
    if metadata["kind"] != kind:
        raise ModelFileError(f"{path.name} is a {metadata['kind']} model, but a {kind} model is needed here")
    return LoadedModel(network.eval(), metadata, path, digest)


def check_archive(path: Path) -> None:
    """A model file without a known SHA256 is checked against the CRC32 of every member of its TorchScript
    (zip) archive: a flipped bit in the weights otherwise loads and gives NaN heatmaps."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
            has_metadata = any(n.endswith(f"/extra/{METADATA_FILE}") for n in archive.namelist())
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error):
        raise ModelFileError(f"{path.name} is not a readable CDMSegment model (truncated or not a TorchScript "
                             "archive); use a model exported by 'cdmsegment export'") from None
    if bad is not None:
        raise ModelFileError(f"model file {path} is damaged ({bad.split('/')[-1]} fails its CRC check); "
                             "copy or download it again from its source")
    if not has_metadata:
        raise ModelFileError(f"{path.name} is a TorchScript file without CDMSegment metadata; "
                             "use a model exported by 'cdmsegment export'")


def _check_metadata(metadata: dict, where: str) -> None:
    kind = metadata.get("kind")
    if kind not in REQUIRED_KEYS:
        raise ModelFileError(f"{where}: unknown model kind {kind!r}; expected one of {', '.join(REQUIRED_KEYS)}")
    missing = [k for k in REQUIRED_KEYS[kind] if k not in metadata]
    if missing:
        raise ModelFileError(f"{where}: metadata lacks {', '.join(missing)}; re-export the model with 'cdmsegment export'")
    if metadata["format_version"] > FORMAT_VERSION:
        raise ModelFileError(f"{where} needs a newer CDMSegment (model format {metadata['format_version']}, "
                             f"this version reads {FORMAT_VERSION}); update the extension")
    if len(metadata["modalities"]) != metadata["in_channels"]:
        raise ModelFileError(f"{where}: metadata names {len(metadata['modalities'])} modalities for "
                             f"{metadata['in_channels']} input channels")

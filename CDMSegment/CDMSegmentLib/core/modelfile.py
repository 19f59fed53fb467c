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

from . import ranges
from .errors import CDMSegmentError, ModelFileError
from .model_metadata import check_metadata
from .registry import MODELS_DIR, REGISTRY_FILE, default_model_name, read_registry  # noqa: F401 (also used from here)
from .schedule import NoiseSchedule

FORMAT_VERSION = 1
METADATA_FILE = "metadata.json"


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
        target_class = ranges.check_optional("target_class", target_class)
        classes = [target_class] if target_class is not None else list(range(1, last + 1))
        if not all(0 < c <= last for c in classes):  # the metadata's schema holds at least one class beside normal
            choices = ", ".join(f"{n} ({name})" for n, name in enumerate(self.class_names) if n > 0)
            raise CDMSegmentError(f"target class {target_class} is not one of this model's classes: {choices}")
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
    check_metadata(metadata, str(path), FORMAT_VERSION)
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
    if path.is_dir():
        raise ModelFileError(f"{path} is a folder, not a model file; give the model's .pt file")
    if not path.is_file():
        raise ModelFileError(f"model file missing: {path}; reinstall the extension or load the model from a file")
    try:
        digest = sha256_of(path)
    except OSError as e:
        raise ModelFileError(f"cannot read model file {path}: {e.strerror or e}; check its permissions") from None
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
    check_metadata(metadata, path.name, FORMAT_VERSION)
    if metadata["kind"] != kind:
        raise ModelFileError(f"{path.name} is a {metadata['kind']} model, but a {kind} model is needed here")
    if not expected_sha256:
        check_not_impostor(path, metadata, registry)
    check_network(network.eval(), metadata, path.name)
    return LoadedModel(network, metadata, path, digest)


# Where CDMSegment's networks (core/unet.py, training/classifier.py) hold their sizes: parameter -> (dimension,
# the metadata's number it must equal). A network without these names is not judged here.
SIZES = {"stem.weight": (1, "input channels"), "head.2.weight": (0, "input channels"),
         "class_emb.weight": (0, "classes"), "linear.weight": (0, "classes")}


def check_network(network: torch.jit.ScriptModule, metadata: dict, where: str) -> None:
    """The network's weights have the input channels and classes the metadata says: a file whose metadata was
    edited, or put on another network, fails here in one line, not at the first batch of a run in a traceback.
    Read from the parameters' shapes (a test pass through a freshly loaded TorchScript network costs seconds)."""
    expected = {"input channels": metadata["in_channels"], "classes": len(metadata["class_names"])}
    shapes = {name: tuple(p.shape) for name, p in network.named_parameters() if name in SIZES}
    for name, shape in shapes.items():
        dim, what = SIZES[name]
        if shape[dim] != expected[what]:
            raise ModelFileError(f"{where}: its network has {shape[dim]} {what} where its metadata says "
                                 f"{expected[what]}; the metadata was edited or belongs to another network")


def _weights(path: Path) -> dict:
    """{storage name: (CRC32, size)} of a TorchScript archive's tensors (``<root>/data/<n>``), from its zip
    directory alone: equal for files holding the same weights, whatever their metadata or root folder name."""
    with zipfile.ZipFile(path) as archive:
        return {i.filename.split("/", 1)[-1]: (i.CRC, i.file_size) for i in archive.infolist()
                if i.filename.split("/", 1)[-1].startswith("data/")}


def _metadata_in(path: Path) -> dict:
    """A model file's metadata read from its archive alone, without loading the network."""
    with zipfile.ZipFile(path) as archive:
        name = next(n for n in archive.namelist() if n.endswith(f"/extra/{METADATA_FILE}"))
        return json.loads(archive.read(name))


def check_not_impostor(path: Path, metadata: dict, registry: Path = REGISTRY_FILE) -> None:
    """A file that is not registered must not carry the name and version of a registered model unless it holds
    that model's weights (its defaults may differ: ``cdmsegment set-defaults`` keeps the name): the run's
    summary names the model by them."""
    for entry in read_registry(registry):
        registered = registry.parent / entry["file"]
        if entry["name"] != metadata["name"] or entry.get("kind", "diffusion") != metadata["kind"] or \
                not registered.is_file():
            continue
        try:
            same_version = str(_metadata_in(registered).get("version")) == str(metadata["version"])
            same_weights = same_version and _weights(registered) == _weights(path)
        except (OSError, ValueError, StopIteration, zipfile.BadZipFile):
            continue  # the registered file is itself damaged: its own load says so
        if same_version and not same_weights:
            raise ModelFileError(f"{path.name} calls itself {metadata['name']} {metadata['version']}, a registered "
                                 f"model, but does not hold its weights (the registered file is {registered}, SHA256 "
                                 f"{entry['sha256'][:12]}...); give the new model a name or version of its own "
                                 "('cdmsegment export --name/--version') or use the registered one")


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

"""A model file described and checked without its network, and without torch.

Slicer's own process works from a ModelDescription alone: the panel shows the model, fills in its defaults, finds
its classifier, checks the inputs against it and hands the file's path to the run's child process, the only
place the network is loaded (importing torch in Slicer's process would initialise CUDA and, on Windows, lock
torch's files against an upgrade by the PyTorch extension). ``describe_model`` makes every check that needs no
network, each failing in one line: the file's SHA256 against its registry entry, or the CRC of its TorchScript
(zip) archive when it has none; its metadata against the schema (model_metadata.py); its kind; a file passing
itself off as a registered model. ``modelfile.load_model`` builds on it and adds the network.
"""

import hashlib
import json
import shlex
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

from . import ranges
from .errors import CDMSegmentError, ModelFileError
from .image import Volume, check_geometry, check_same_grid, check_voxel_type
from .model_metadata import check_metadata
from .registry import REGISTRY_FILE, default_model_name, read_registry

FORMAT_VERSION = 1
METADATA_FILE = "metadata.json"


@dataclass
class ModelDescription:
    """A checked model file: its metadata (model_metadata.py's schema), where it is, and its SHA256."""

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

    def noise_band(self) -> Tuple[int, int]:
        """(lo, hi), inclusive: the timesteps the network was trained on (``metadata["t_range"]``, written by
        ``cdmsegment train --t-range``); a model without one was trained on all of 0..T-1."""
        band = self.metadata.get("t_range")
        return (int(band[0]), int(band[1])) if band else (0, int(self.metadata["num_timesteps"]) - 1)


def sha256_of(path: Union[str, Path]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_metadata(path: Union[str, Path]):
    """The JSON a model file stores as TorchScript's extra file ``<root>/extra/metadata.json``, read from its zip
    archive without loading the network; None when it holds none (or an empty one). Unchecked: any JSON value.
    Raises OSError, EOFError, zlib.error or zipfile.BadZipFile for an unreadable archive, ValueError for text
    that is not JSON."""
    with zipfile.ZipFile(path) as archive:
        name = next((n for n in archive.namelist() if n.endswith(f"/extra/{METADATA_FILE}")), None)
        data = archive.read(name) if name else b""
    return json.loads(data) if data else None


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
        names = ", ".join(e["name"] for e in entries if e.get("kind", "diffusion") == kind) or "none"
        raise ModelFileError(f"model {name_or_path!r} not found: not a file and not a registered {kind} model "
                             f"(registered: {names})")
    entry = next((e for e in entries if (registry.parent / e["file"]).resolve() == path.resolve()), None)
    return path, entry["sha256"] if entry else None


def kind_of(name_or_path: Union[str, Path, None], registry: Path = REGISTRY_FILE) -> str:
    """'diffusion' or 'classifier': a registered name's kind, else what a model file's metadata says (diffusion
    when it says nothing readable: describe_model then says what is wrong with the file)."""
    if name_or_path is None:
        return "diffusion"
    entry = next((e for e in read_registry(registry) if e["name"] == str(name_or_path)), None)
    if entry is not None:
        return entry.get("kind", "diffusion")
    try:
        kind = (read_metadata(Path(name_or_path)) or {}).get("kind")
    except (OSError, EOFError, ValueError, zlib.error, zipfile.BadZipFile):
        kind = None
    return kind if kind in ("diffusion", "classifier") else "diffusion"


def describe_model(name_or_path: Union[str, Path, None] = None, kind: str = "diffusion",
                   registry: Path = REGISTRY_FILE, expected_sha256: Optional[str] = None) -> ModelDescription:
    """Find and check a model file without loading its network: a registered name (None: the registry's default
    model of ``kind``) or a path. Registered files must match their SHA256 (``expected_sha256`` when given, e.g.
    for a downloaded copy); others must pass their archive's CRC checks and not carry a registered model's name
    and version with other weights. Raises ModelFileError, one line saying what to do."""
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
    try:
        metadata = read_metadata(path)
    except (OSError, EOFError, zlib.error, zipfile.BadZipFile) as e:
        raise ModelFileError(f"{path.name} is not a readable CDMSegment model (truncated or not TorchScript: "
                             f"{type(e).__name__}); use a model exported by 'cdmsegment export'") from None
    except ValueError:
        raise ModelFileError(f"{path.name} has unreadable metadata; re-export it with 'cdmsegment export'") from None
    if metadata is None:
        raise without_metadata(path)
    check_metadata(metadata, path.name, FORMAT_VERSION)
    if metadata["kind"] != kind:
        raise ModelFileError(f"{path.name} is a {metadata['kind']} model, but a {kind} model is needed here")
    if not expected_sha256:
        check_not_impostor(path, metadata, registry)
    return ModelDescription(metadata, path, digest)


def check_archive(path: Path) -> None:
    """A model file without a known SHA256 is checked against the CRC32 of every member of its TorchScript
    (zip) archive: a flipped bit in the weights otherwise loads and gives NaN heatmaps."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
            names = archive.namelist()
            has_metadata = any(n.endswith(f"/extra/{METADATA_FILE}") for n in names)
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error):
        raise ModelFileError(f"{path.name} is not a readable CDMSegment model (truncated or not a TorchScript "
                             "archive); use a model exported by 'cdmsegment export'") from None
    if bad is not None:
        raise ModelFileError(f"model file {path} is damaged ({bad.split('/')[-1]} fails its CRC check); "
                             "copy or download it again from its source")
    if not has_metadata:
        raise without_metadata(path, names)


def without_metadata(path: Path, names: Optional[List[str]] = None) -> ModelFileError:
    """The error for a readable PyTorch archive that is not a CDMSegment model: a training run's checkpoint
    (torch.save: a pickle and tensors, no TorchScript code), which 'cdmsegment export' turns into one, or another
    TorchScript file. ``names``: the archive's member names, when the caller has read them already."""
    if names is None:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    if not any("/code/" in name for name in names):
        return ModelFileError(f"{path.name} is a training checkpoint, not a model file; make one from it with "
                              f"'cdmsegment export {shlex.quote(str(path))} -o MODEL.pt --name NAME'")
    return ModelFileError(f"{path.name} is a TorchScript file without CDMSegment metadata; "
                          "use a model exported by 'cdmsegment export'")


def _weights(path: Path) -> dict:
    """{storage name: (CRC32, size)} of a TorchScript archive's tensors (``<root>/data/<n>``), from its zip
    directory alone: equal for files holding the same weights, whatever their metadata or root folder name."""
    with zipfile.ZipFile(path) as archive:
        return {i.filename.split("/", 1)[-1]: (i.CRC, i.file_size) for i in archive.infolist()
                if i.filename.split("/", 1)[-1].startswith("data/")}


def check_not_impostor(path: Path, metadata: dict, registry: Path = REGISTRY_FILE, writing_to: Optional[Path] = None
                       ) -> None:
    """A file that is not registered must not carry the name and version of a registered model unless it holds
    that model's weights (its defaults may differ: ``cdmsegment set-defaults`` keeps the name): the run's
    summary names the model by them. writing_to: ``path`` is the unfinished file about to become this one
    (modelfile.save_model), which the error then says is not written."""
    for entry in read_registry(registry):
        registered = registry.parent / entry["file"]
        # compared as a reader sees them: "brain-flair-cpu " and " 6" are brain-flair-cpu 6
        if entry["name"] != str(metadata["name"]).strip() or entry.get("kind", "diffusion") != metadata["kind"] or \
                not registered.is_file():
            continue
        try:
            same_version = str((read_metadata(registered) or {}).get("version")).strip() == \
                str(metadata["version"]).strip()
            same_weights = same_version and _weights(registered) == _weights(path)
        except (OSError, EOFError, ValueError, AttributeError, zlib.error, zipfile.BadZipFile):
            continue  # the registered file is itself damaged: its own load says so
        if same_version and not same_weights:
            if writing_to is not None:
                raise ModelFileError(f"{writing_to} not written: it would call itself {metadata['name']} "
                                     f"{metadata['version']}, a registered model, without its weights; give it a name "
                                     "or version of its own (--name, --version)")
            raise ModelFileError(f"{path.name} calls itself {metadata['name']} {metadata['version']}, a registered "
                                 f"model, but does not hold its weights (the registered file is {registered}, SHA256 "
                                 f"{entry['sha256'][:12]}...); give the new model a name or version of its own "
                                 "('cdmsegment export --name/--version') or use the registered one")


def registered_classifier(model: ModelDescription, registry: Path = REGISTRY_FILE) -> Optional[str]:
    """The name of the registered classifier that guides ``model`` (CG-CDM): the ``classifier`` of the
    registry entry whose SHA256 is the model file's, when that names a registered classifier."""
    entries = read_registry(registry)
    entry = next((e for e in entries if e.get("sha256") == model.sha256 and e.get("kind", "diffusion") == "diffusion"),
                 {})
    name = entry.get("classifier")
    return name if any(e["name"] == name and e.get("kind") == "classifier" for e in entries) else None


def check_classifier_fits(model: ModelDescription, classifier: ModelDescription) -> None:
    """A noise-aware classifier guides the diffusion model on its own slices (CG-CDM, CG-Diff), or stands in
    for it on them (the CAMs): both must be made for the same slice size, modalities and number of classes. Raises
    CDMSegmentError, one line naming the difference and the classifier to use."""
    found = [(what, c, m) for what, c, m in (("px slices", classifier.image_size, model.image_size),
                                               ("modalities", classifier.modalities, model.modalities),
                                               ("classes", len(classifier.class_names), len(model.class_names)))
             if c != m]
    if not found:
        return
    what, c, m = found[0]
    show = (lambda v: ", ".join(v)) if isinstance(c, list) else str
    own = registered_classifier(model)
    raise CDMSegmentError(f"classifier {classifier.metadata['name']} was made for {show(c)} {what}, model "
                          f"{model.metadata['name']} for {show(m)}; give a classifier trained on the model's slices"
                          + (f" (its own: {own})" if own else " ('cdmsegment train-classifier')"))


def check_inputs(model: ModelDescription, volumes: Sequence[Volume]) -> None:
    """One volume per modality the model declares, all 3D scalar images on one grid."""
    names = model.modalities
    if not isinstance(volumes, (list, tuple)) or not all(isinstance(v, Volume) for v in volumes):
        wrong = next((v for v in volumes if not isinstance(v, Volume)), None) \
            if isinstance(volumes, (list, tuple)) else volumes
        raise CDMSegmentError(f"volumes must be a list of Volume, one per modality ({', '.join(names)}), got "
                              f"{'a list holding ' if wrong is not volumes else ''}{type(wrong).__name__}"
                              f"{'; write [volume]' if isinstance(volumes, Volume) else ''}")
    if len(volumes) != len(names):
        raise CDMSegmentError(f"model {model.metadata['name']} expects {len(names)} modalit"
                              f"{'y' if len(names) == 1 else 'ies'} ({', '.join(names)}), got {len(volumes)} input"
                              f"{'' if len(volumes) == 1 else 's'}")
    for v, n in zip(volumes, names):
        check_voxel_type(v.array, n)
        if v.array.ndim != 3:
            raise CDMSegmentError(f"{n}: expected a 3D volume, got an array of shape {v.array.shape}")
        thin = [axis for axis, size in zip("kji", v.array.shape) if size < 2]
        if thin:
            k, j, i = v.array.shape
            raise CDMSegmentError(f"{n}: the volume is one voxel wide along {' and '.join(reversed(thin))} (its size "
                                  f"is {i} x {j} x {k} voxels along i, j, k), so it is a single slice, not a volume; "
                                  "give a 3D volume")
        check_geometry(v, n)
    check_same_grid(volumes, names)

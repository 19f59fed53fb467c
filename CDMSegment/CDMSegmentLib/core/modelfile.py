"""Model files: one TorchScript file with its metadata inside, checked against models.json, and its network.

A model file holds ``metadata.json`` as a TorchScript extra file. ``load_model`` makes the checks of
``model_description.describe_model`` (the file's SHA256 against its registry entry, complete metadata of a
version this code reads, its kind), then loads the network and checks its sizes against the metadata; it fails
with one clear line otherwise - never a traceback. Only the process that runs the model loads it: Slicer's own
process works from the description (model_description.py), without torch.
"""

import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch

from .errors import CDMSegmentError, ModelFileError
from .model_description import (FORMAT_VERSION, METADATA_FILE, ModelDescription, check_not_impostor,
                                describe_model, sha256_of)
from .model_metadata import check_metadata
from .registry import MODELS_DIR, REGISTRY_FILE, read_registry  # noqa: F401 (also used from here)
from .schedule import NoiseSchedule


@dataclass
class LoadedModel(ModelDescription):
    """A described model file (metadata, path, SHA256 and what they give) with its TorchScript network, which is
    on the CPU until moved."""

    network: torch.jit.ScriptModule

    def schedule(self) -> NoiseSchedule:
        return NoiseSchedule(self.metadata["schedule"], int(self.metadata["num_timesteps"]))

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


def check_not_folder(path: Path) -> None:
    """A model file's path is not a folder: CDMSegmentError, one line, otherwise."""
    if Path(path).is_dir():
        raise CDMSegmentError(f"{path} is a folder; give the model file's own name, e.g. {Path(path) / 'model.pt'}")


def save_model(network: torch.nn.Module, metadata: dict, path: Union[str, Path]) -> str:
    """Script ``network`` and write it with ``metadata`` inside, atomically; returns the file's SHA256."""
    check_metadata(metadata, str(path), FORMAT_VERSION, writing=True)
    path = Path(path)
    check_not_folder(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    scripted = torch.jit.script(network.eval().cpu())
    tmp = path.with_name(path.name + ".partial")
    torch.jit.save(scripted, str(tmp), _extra_files={METADATA_FILE: json.dumps(metadata, indent=1, sort_keys=True)})
    try:  # a file its own load would refuse is not written (describe_model's check, on what is about to be written)
        check_not_impostor(tmp, metadata, writing_to=path)
    except ModelFileError:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(path)
    return sha256_of(path)


def with_defaults(model: LoadedModel, defaults: dict, path: Union[str, Path], **metadata) -> str:
    """Write ``model`` again with ``defaults`` merged into its metadata (after a calibration) and top-level
    ``metadata`` keys (e.g. ``ood``, ``expects``) replaced; returns the SHA256."""
    return save_model(model.network, {**model.metadata, **metadata, "defaults": {**model.defaults, **defaults}}, path)


def load_model(name_or_path: Union[str, Path, None] = None, kind: str = "diffusion",
               registry: Path = REGISTRY_FILE, expected_sha256: Optional[str] = None) -> LoadedModel:
    """Load and check a model file: ``describe_model``'s checks (registered models must match their SHA256),
    then its network, whose sizes must be the metadata's. Raises ModelFileError, one line."""
    return load_network(describe_model(name_or_path, kind, registry, expected_sha256))


def load_network(model: ModelDescription) -> LoadedModel:
    """The network of a described model file, loaded on the CPU and checked against its metadata."""
    path = model.path
    try:
        network = torch.jit.load(io.BytesIO(path.read_bytes()), map_location="cpu")
    except Exception as e:  # torch raises RuntimeError, ValueError, zipfile errors... for a bad file
        raise ModelFileError(f"{path.name} is not a readable CDMSegment model (truncated or not TorchScript: "
                             f"{type(e).__name__}); use a model exported by 'cdmsegment export'") from None
    check_network(network.eval(), model.metadata, path.name)
    return LoadedModel(model.metadata, path, model.sha256, network)


# Where CDMSegment's networks (core/unet.py, training/classifier.py) hold their sizes: parameter -> (dimension,
# the metadata's number it must equal). A network without these names is not judged here.
SIZES = {"stem.weight": (1, "input channels"), "head.2.weight": (0, "input channels"),
         "class_emb.weight": (0, "classes"), "linear.weight": (0, "classes")}


def check_network(network: torch.jit.ScriptModule, metadata: dict, where: str) -> None:
    """The network's weights have the input channels and classes the metadata says: a file whose metadata was
    edited, or put on another network, fails here in one line, not at the first batch of a run in a traceback.
    Read from the parameters' shapes (a test pass through a freshly loaded TorchScript network costs seconds)."""
    expected = {"input channels": metadata["in_channels"], "classes": len(metadata["class_names"])}
    for full_name, p in network.named_parameters():
        name = re.sub(r"^members\.\d+\.", "", full_name)  # an ensemble's member (core/ensemble.py) alike
        if name not in SIZES:
            continue
        shape = tuple(p.shape)
        dim, what = SIZES[name]
        if shape[dim] != expected[what]:
            raise ModelFileError(f"{where}: its network has {shape[dim]} {what} where its metadata says "
                                 f"{expected[what]}; the metadata was edited or belongs to another network")

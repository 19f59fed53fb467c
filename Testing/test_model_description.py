"""A model file described and checked without torch (core/model_description.py): what Slicer's process holds.

Each check runs in a fresh interpreter where torch cannot be imported, and is compared with what
``modelfile.load_model`` (the description plus the network, in the run's child process) says of the same file.
"""

import json
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from CDMSegmentLib.core.errors import ModelFileError
from CDMSegmentLib.core.model_description import ModelDescription, describe_model
from CDMSegmentLib.core.modelfile import LoadedModel, load_model
from CDMSegmentLib.core.registry import default_model_name

from conftest import make_tiny_model_file
from test_modelfile import edit, edit_defaults, registry_with, with_metadata

MODULE = Path(__file__).resolve().parent.parent / "CDMSegment"


def without_torch(code: str, *args) -> str:
    """Run ``code`` in a fresh interpreter where importing torch fails; its stdout."""
    done = subprocess.run([sys.executable, "-c", "import sys; sys.modules['torch'] = None\n" + code, *map(str, args)],
                          capture_output=True, text=True, timeout=120, cwd=MODULE, env={"PYTHONPATH": str(MODULE)})
    assert done.returncode == 0, done.stderr
    return done.stdout


DESCRIBE_THE_BUNDLED_MODEL = """
import json
import numpy as np
from CDMSegmentLib.core.image import Volume
from CDMSegmentLib.core.model_description import check_inputs, describe_model, registered_classifier
from CDMSegmentLib.core.settings import CDMSettings

model = describe_model()
classifier = describe_model(registered_classifier(model), kind="classifier")
check_inputs(model, [Volume(np.ones((4, 5, 6), np.float32))])
try:
    check_inputs(model, [Volume(np.ones((4, 5, 6), np.float32))] * 2)
except Exception as e:
    refused = str(e)
params = CDMSettings().params(model, classifier)
print(json.dumps({"metadata": model.metadata, "path": str(model.path), "sha256": model.sha256, "kind": model.kind,
                  "image_size": model.image_size, "modalities": model.modalities, "class_names": model.class_names,
                  "defaults": model.defaults, "noise_band": model.noise_band(), "targets": model.target_classes(),
                  "classifier": [classifier.kind, str(classifier.path)], "refused": refused,
                  "guidance_scale": params.guidance_scale, "steps": params.steps}))
"""


def test_the_bundled_model_is_described_without_torch_as_it_loads():
    described = json.loads(without_torch(DESCRIBE_THE_BUNDLED_MODEL))
    loaded = load_model()
    assert isinstance(loaded, ModelDescription) and isinstance(loaded, LoadedModel)
    assert described["metadata"] == loaded.metadata and described["sha256"] == loaded.sha256
    assert described["path"] == str(loaded.path)
    assert [described[k] for k in ("kind", "image_size", "modalities", "class_names", "defaults")] == \
        [loaded.kind, loaded.image_size, loaded.modalities, loaded.class_names, loaded.defaults]
    assert tuple(described["noise_band"]) == loaded.noise_band() and described["targets"] == loaded.target_classes()
    assert described["classifier"][0] == "classifier"
    classifier = load_model(Path(described["classifier"][1]), kind="classifier")
    assert described["guidance_scale"] == classifier.defaults["guidance_scale"]
    assert described["steps"] == loaded.defaults["steps"]
    assert described["refused"] == f"model {default_model_name()} expects 1 modality (flair), got 2 inputs"


def _flip_a_weight_byte(source: Path, path: Path) -> None:
    """A copy of ``source`` with one byte of a stored tensor inverted: the zip reads, its CRC check fails."""
    data = bytearray(source.read_bytes())
    with zipfile.ZipFile(source) as archive:
        member = next(i for i in archive.infolist() if "/data/" in i.filename and i.file_size > 0)
    name_length, extra_length = struct.unpack("<HH", data[member.header_offset + 26:member.header_offset + 30])
    data[member.header_offset + 30 + name_length + extra_length] ^= 0xFF
    path.write_bytes(data)


def _bad_files(tmp_path: Path, tiny_model_path: Path) -> dict:
    """name -> (model name or path, kind, registry or None): files each check refuses."""
    for folder in ("replaced", "impostor"):
        (tmp_path / folder).mkdir()
    replaced = registry_with(tmp_path / "replaced", tiny_model_path, sha="0" * 64)
    impostor_registry = registry_with(tmp_path / "impostor", tiny_model_path)
    entries = json.loads(impostor_registry.read_text())
    entries["models"][0]["name"] = "tiny-test"  # the name inside the file
    impostor_registry.write_text(json.dumps(entries))
    make_tiny_model_file(tmp_path / "other.pt", seed=5)  # the registered name and version, other weights
    (tmp_path / "truncated.pt").write_bytes(tiny_model_path.read_bytes()[:5000])
    _flip_a_weight_byte(tiny_model_path, tmp_path / "damaged.pt")
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(tmp_path / "foreign.pt"))
    (tmp_path / "notes.pt").write_text("hello")
    with_metadata(tiny_model_path, tmp_path / "broken.pt", edit_defaults(threshold="high"))
    with_metadata(tiny_model_path, tmp_path / "newer.pt", edit(format_version=99))
    (tmp_path / "folder").mkdir()
    given = {name: (tmp_path / f"{name}.pt", "diffusion", None) for name in ("truncated", "damaged", "foreign",
                                                                              "notes", "broken", "newer")}
    return {**given, "replaced": ("tiny", "diffusion", replaced),
            "impostor": (tmp_path / "other.pt", "diffusion", impostor_registry),
            "wrong kind": (tiny_model_path, "classifier", None), "folder": (tmp_path / "folder", "diffusion", None),
            "missing": ("nonexistent", "diffusion", replaced)}


DESCRIBE_EACH = """
import json, sys
from pathlib import Path
from CDMSegmentLib.core.errors import ModelFileError
from CDMSegmentLib.core.model_description import describe_model

said = {}
for name, (source, kind, registry) in json.loads(sys.argv[1]).items():
    try:
        describe_model(source, kind, *([Path(registry)] if registry else []))
        said[name] = None
    except ModelFileError as e:
        said[name] = str(e)
print(json.dumps(said))
"""


def test_a_bad_file_is_refused_without_torch_in_the_same_line_as_load_model(tmp_path, tiny_model_path):
    """The panel checks a chosen model in Slicer's process without torch; the run's child loads it again. Both
    must refuse a damaged, foreign or mislabelled file alike, in one line, so the panel says what the child would."""
    bad = _bad_files(tmp_path, tiny_model_path)
    described = json.loads(without_torch(DESCRIBE_EACH, json.dumps(
        {name: [str(source), kind, registry and str(registry)] for name, (source, kind, registry) in bad.items()})))
    for name, (source, kind, registry) in bad.items():
        with pytest.raises(ModelFileError) as caught:
            load_model(source, kind, *([registry] if registry else []))
        assert described[name] == str(caught.value), name
        assert "\n" not in described[name]
    assert "corrupt or was replaced" in described["replaced"] and "fails its CRC check" in described["damaged"]
    assert "does not hold its weights" in described["impostor"] and "a classifier model is needed" in described[
        "wrong kind"]


def test_what_only_the_network_shows_is_left_to_the_load(tmp_path, tiny_model_path):
    """Metadata that does not fit the weights is found from the network's parameter shapes: the description
    accepts the file, and loading it (in the run's child process) refuses it in one line."""
    with_metadata(tiny_model_path, tmp_path / "edited.pt", edit(class_names=["normal", "tumour", "oedema"]))
    assert describe_model(tmp_path / "edited.pt").class_names == ["normal", "tumour", "oedema"]
    with pytest.raises(ModelFileError, match="^edited.pt: its network has 2 classes where its metadata says 3"):
        load_model(tmp_path / "edited.pt")

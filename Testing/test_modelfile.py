import json
import shutil

import pytest
import torch

from CDMSegmentLib.core.errors import ModelFileError
from CDMSegmentLib.core.modelfile import load_model, read_registry, sha256_of

from conftest import make_tiny_model_file


def registry_with(tmp_path, model_path, sha=None):
    dest = tmp_path / "models"
    dest.mkdir(exist_ok=True)
    shutil.copy(model_path, dest / "tiny.pt")
    reg = dest / "models.json"
    reg.write_text(json.dumps({"models": [{"name": "tiny", "file": "tiny.pt", "kind": "diffusion",
                                           "sha256": sha or sha256_of(model_path), "default": True}]}))
    return reg


def test_round_trip_keeps_metadata_and_outputs(tiny_model_path):
    m = load_model(tiny_model_path)
    assert m.metadata["name"] == "tiny-test" and m.kind == "diffusion"
    assert m.modalities == ["FLAIR"] and m.class_names == ["normal", "tumour"] and m.image_size == 32
    x = torch.zeros(1, 1, 32, 32)
    out = m.network(x, torch.tensor([5]), m.network.class_embedding(torch.tensor([1])))
    assert out.shape == x.shape


def test_registered_name_and_default_resolve(tmp_path, tiny_model_path):
    reg = registry_with(tmp_path, tiny_model_path)
    assert load_model("tiny", registry=reg).sha256 == sha256_of(tiny_model_path)
    assert load_model(None, registry=reg).metadata["name"] == "tiny-test"
    assert read_registry(reg)[0]["name"] == "tiny"


def test_hash_mismatch_is_refused(tmp_path, tiny_model_path):
    reg = registry_with(tmp_path, tiny_model_path, sha="0" * 64)
    with pytest.raises(ModelFileError, match="corrupt or was replaced"):
        load_model("tiny", registry=reg)


def test_truncated_file_is_refused(tmp_path, tiny_model_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(tiny_model_path.read_bytes()[:5000])
    with pytest.raises(ModelFileError, match="not a readable CDMSegment model"):
        load_model(bad)


def test_foreign_torchscript_is_refused(tmp_path):
    path = tmp_path / "foreign.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(path))
    with pytest.raises(ModelFileError, match="without CDMSegment metadata"):
        load_model(path)


def test_not_a_model_at_all(tmp_path):
    path = tmp_path / "notes.pt"
    path.write_text("hello")
    with pytest.raises(ModelFileError, match="not a readable"):
        load_model(path)


def test_missing_model_names_the_registered_ones(tmp_path, tiny_model_path):
    reg = registry_with(tmp_path, tiny_model_path)
    with pytest.raises(ModelFileError, match=r"registered: tiny"):
        load_model("nonexistent", registry=reg)


def test_wrong_kind_is_refused(tiny_model_path):
    with pytest.raises(ModelFileError, match="a classifier model is needed"):
        load_model(tiny_model_path, kind="classifier")


def test_newer_format_and_incomplete_metadata_are_refused(tmp_path):
    from CDMSegmentLib.training.export import diffusion_metadata
    from CDMSegmentLib.core.modelfile import save_model
    from CDMSegmentLib.training.train import TrainConfig
    from CDMSegmentLib.core.unet import ConditionalUNet

    from conftest import TINY_UNET
    cfg = TrainConfig(unet=TINY_UNET)
    meta = diffusion_metadata(cfg, name="x", version="0", image_size=32, modalities=["flair"],
                              class_names=["normal", "tumour"], training={})
    with pytest.raises(ModelFileError, match="needs a newer CDMSegment"):
        save_model(ConditionalUNet(TINY_UNET), {**meta, "format_version": 99}, tmp_path / "a.pt")
    with pytest.raises(ModelFileError, match="metadata lacks defaults"):
        save_model(ConditionalUNet(TINY_UNET), {k: v for k, v in meta.items() if k != "defaults"}, tmp_path / "b.pt")
    with pytest.raises(ModelFileError, match="2 modalities for 1 input channels"):
        save_model(ConditionalUNet(TINY_UNET), {**meta, "modalities": ["t1", "t2"]}, tmp_path / "c.pt")
    assert not list(tmp_path.glob("*.pt"))


def test_save_reports_the_sha256(tmp_path):
    sha = make_tiny_model_file(tmp_path / "m.pt")
    assert sha == sha256_of(tmp_path / "m.pt")

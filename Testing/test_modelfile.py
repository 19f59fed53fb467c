import json
import shutil
from pathlib import Path

import pytest
import torch

from CDMSegmentLib.core.errors import ModelFileError
from CDMSegmentLib.core.modelfile import load_model, read_registry, save_model, sha256_of

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


def test_a_training_checkpoint_is_called_one_and_the_export_command_named(tmp_path):
    """A run folder's checkpoint.pt is a readable PyTorch archive too, but not TorchScript."""
    from CDMSegmentLib.core.unet import UNetConfig
    from CDMSegmentLib.training.train import TrainConfig, train_diffusion

    images, labels = torch.randint(0, 256, (4, 1, 16, 16), dtype=torch.uint8), torch.tensor([1, 0, 1, 0])
    checkpoint = train_diffusion(images, labels, TrainConfig(steps=1, batch_size=2, precision="fp32", unet=UNetConfig(
        base_channels=8, channel_mults=(1, 2), attention_levels=())), tmp_path / "run", progress=False)
    with pytest.raises(ModelFileError) as raised:
        load_model(checkpoint)
    # the path as given, so that the command runs where it is pasted
    assert str(raised.value) == ("checkpoint.pt is a training checkpoint, not a model file; make one from it with "
                                 f"'cdmsegment export {checkpoint} -o MODEL.pt --name NAME'")


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


def with_metadata(source, path, change) -> str:
    """A copy of model file ``source`` at ``path`` whose metadata is ``change(metadata)``, written past save_model's
    checks, as a hand edit or another exporter would; returns the file's SHA256."""
    model = load_model(source)
    torch.jit.save(model.network, str(path), _extra_files={"metadata.json": json.dumps(change(dict(model.metadata)))})
    return sha256_of(path)


def edit(**fields):
    return lambda m: {**m, **fields}


def edit_defaults(**fields):
    return lambda m: {**m, "defaults": {**m["defaults"], **fields}}


BROKEN = {
    "threshold a word": (edit_defaults(threshold="high"), "'defaults.threshold' must be a finite number >= 0, got 'high'"),
    "negative threshold": (edit_defaults(threshold=-1), "'defaults.threshold' must be a finite number >= 0, got -1"),
    "zero noise draws": (edit_defaults(noise_draws=0), "'defaults.noise_draws' must be a whole number in [1, 1000]"),
    "steps as text": (edit_defaults(steps="2"), "'defaults.steps' must be a whole number in [1, 10000], got '2'"),
    "batch size per device": (edit_defaults(batch_size={"cpu": 0}), "'defaults.batch_size.cpu' must be a whole number"),
    "expects as a string": (edit(expects="FLAIR"), "'expects' must be an object ({...}), got 'FLAIR'"),
    "training as a string": (edit(training="phantoms"), "'training' must be an object ({...}), got 'phantoms'"),
    "one class": (edit(class_names=["normal"]), "'class_names' must hold at least 2 class names (normal and a class "
                                                "to segment), got ['normal']"),
    "no timesteps": (edit(num_timesteps=0), "'num_timesteps' must be a whole number in [2, 100000], got 0"),
    "image size as text": (edit(image_size="32"), "'image_size' must be a whole number in [8, 4096], got '32'"),
    "format version as text": (edit(format_version="1"), "'format_version' must be a whole number >= 1, got '1'"),
    "modalities as a string": (edit(modalities="FLAIR"), "'modalities' must be a list ([...]), got 'FLAIR'"),
    "unknown schedule": (edit(schedule="quadratic"), "'schedule' must be one of linear, cosine, got 'quadratic'"),
    "normalisation without high": (edit(normalisation={"method": "percentile", "low": 1}),
                                   "'normalisation.high' is missing;"),
    "percentiles crossed": (edit(normalisation={"method": "percentile", "low": 99, "high": 1}),
                            "'normalisation' has low percentile 99 not below high 1"),
    "skull_stripped as text": (edit(expects={"skull_stripped": "yes"}), "'expects.skull_stripped' must be true or false"),
    "OOD threshold NaN": (edit(ood={"threshold": float("nan"), "mean": [0.0], "covariance": [[1.0]]}),
                          "'ood.threshold' must be a finite number > 0, got nan"),
    "OOD covariance of another size": (edit(ood={"threshold": 1.0, "mean": [0.0, 1.0], "covariance": [[1.0]]}),
                                       "do not match its 2 noise levels"),
    "metadata a list": (lambda m: [m], "its metadata is not a JSON object"),
}


@pytest.mark.parametrize("name", BROKEN)
def test_broken_metadata_is_one_line_naming_the_file_and_the_field(name, tmp_path, tiny_model_path):
    change, words = BROKEN[name]
    with_metadata(tiny_model_path, tmp_path / "broken.pt", change)
    with pytest.raises(ModelFileError) as caught:
        load_model(tmp_path / "broken.pt")
    message = str(caught.value)
    assert message.startswith("broken.pt: ") and words in message and "\n" not in message, message


def test_a_one_class_model_is_refused_when_loaded_and_a_missing_class_names_the_classes(tiny_model):
    with pytest.raises(Exception, match=r"^target class 3 is not one of this model's classes: 1 \(tumour\)$"):
        tiny_model.target_classes(3)


def test_a_folder_given_as_a_model_is_called_a_folder(tmp_path):
    with pytest.raises(ModelFileError, match=f"^{tmp_path} is a folder, not a model file; give the model's .pt file$"):
        load_model(tmp_path)


def test_a_file_with_a_registered_name_and_version_but_other_weights_is_refused(tmp_path, tiny_model_path):
    reg = registry_with(tmp_path, tiny_model_path)
    registered = json.loads(reg.read_text())
    registered["models"][0]["name"] = "tiny-test"  # the name inside the file
    reg.write_text(json.dumps(registered))
    make_tiny_model_file(tmp_path / "other.pt", seed=5)  # the same name and version, other weights
    with pytest.raises(ModelFileError, match="^other.pt calls itself tiny-test 0, a registered model, but does not "
                                             "hold its weights"):
        load_model(tmp_path / "other.pt", registry=reg)
    with_metadata(tiny_model_path, tmp_path / "recalibrated.pt", edit_defaults(steps=5))  # its weights, new defaults
    assert load_model(tmp_path / "recalibrated.pt", registry=reg).defaults["steps"] == 5
    with_metadata(tmp_path / "other.pt", tmp_path / "renamed.pt", edit(version="2"))  # a version of its own
    assert load_model(tmp_path / "renamed.pt", registry=reg).metadata["version"] == "2"


@pytest.mark.parametrize("change, words", [
    (edit(in_channels=2, modalities=["FLAIR", "T1"]), "its network has 1 input channels where its metadata says 2"),
    (edit(class_names=["normal", "tumour", "oedema"]), "its network has 2 classes where its metadata says 3"),
])
def test_metadata_that_does_not_fit_the_network_is_refused_when_loaded(change, words, tmp_path, tiny_model_path):
    """Such a file used to load and end the run's first batch in a TorchScript traceback."""
    with_metadata(tiny_model_path, tmp_path / "edited.pt", change)
    with pytest.raises(ModelFileError, match=f"^edited.pt: {words}; the metadata was edited"):
        load_model(tmp_path / "edited.pt")


def test_a_file_its_load_would_refuse_as_a_registered_models_impostor_is_not_written(tmp_path, tiny_model):
    """Every model writer (export, set-defaults, ensemble) goes through save_model, which refuses what describe_model
    would: a registered name and version on other weights; a version of its own is written."""
    registered = load_model("brain-flair-cpu").metadata
    metadata = {**tiny_model.metadata, "name": registered["name"], "version": registered["version"]}
    with pytest.raises(ModelFileError, match=f"^{tmp_path / 'x.pt'} not written: it would call itself "
                                             f"brain-flair-cpu {registered['version']}, a registered model"):
        save_model(tiny_model.network, metadata, tmp_path / "x.pt")
    assert list(tmp_path.iterdir()) == []
    save_model(tiny_model.network, {**metadata, "version": "tiny"}, tmp_path / "x.pt")
    assert load_model(tmp_path / "x.pt").metadata["version"] == "tiny"


@pytest.mark.parametrize("name, version", [("brain-flair-cpu ", None), (None, " {v}")])
def test_a_registered_name_or_version_with_blanks_is_still_the_registered_one(tmp_path, tiny_model, name, version):
    registered = load_model("brain-flair-cpu").metadata
    metadata = {**tiny_model.metadata, "name": name or registered["name"],
                "version": (version or "{v}").format(v=registered["version"])}
    with pytest.raises(ModelFileError, match="not written: it would call itself"):
        save_model(tiny_model.network, metadata, tmp_path / "x.pt")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("given", ["model file", "text", "image"])
def test_export_given_a_model_file_says_it_is_not_a_checkpoint_in_one_line(tiny_model_path, tmp_path, capsys, given):
    """A model file, a text and an image (torch's unpickler fails on each in its own way) get one line each."""
    from CDMSegmentLib.cli.main import main

    source = {"model file": tiny_model_path, "text": tmp_path / "notes.pt", "image": tmp_path / "scan.pt"}[given]
    if given == "text":
        source.write_text("hello\n")
    elif given == "image":
        source.write_bytes((Path(__file__).resolve().parents[1] / "CDMSegment" / "Resources" / "Sample" /
                            "CDMSegmentSample_flair.nrrd").read_bytes()[:4096])
    assert main(["export", str(source), "-o", str(tmp_path / "e.pt"), "--name", "e"]) != 0
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "is not the checkpoint.pt of a 'cdmsegment train' run" in err, err
    assert not (tmp_path / "e.pt").exists()


@pytest.mark.parametrize("command", ["export", "set-defaults"])
def test_export_and_set_defaults_replace_an_existing_model_file_only_with_overwrite(tmp_path, tiny_model_path, capsys,
                                                                                    command):
    """A model file replaced silently may be the only copy of a trained network: the existing file is refused in
    one line and left as it was, a folder too; --overwrite replaces the file."""
    from CDMSegmentLib.cli.main import main
    from CDMSegmentLib.core.unet import UNetConfig
    from CDMSegmentLib.training.train import TrainConfig, train_diffusion

    if command == "export":
        images, labels = torch.randint(0, 256, (4, 1, 16, 16), dtype=torch.uint8), torch.tensor([1, 0, 1, 0])
        checkpoint = train_diffusion(images, labels, TrainConfig(steps=1, batch_size=2, precision="fp32", unet=UNetConfig(
            base_channels=8, channel_mults=(1, 2), attention_levels=())), tmp_path / "run", progress=False)
        args = ["export", str(checkpoint), "--name", "mine"]
    else:
        args = ["set-defaults", str(tiny_model_path), "--version", "2"]
    out = tmp_path / "model.pt"
    out.write_bytes(b"an earlier model")
    assert main([*args, "-o", str(out)]) != 0
    err = capsys.readouterr().err
    assert err.strip() == f"cdmsegment {command}: error: {out} already exists; choose another output file or pass " \
                          "--overwrite", err
    assert out.read_bytes() == b"an earlier model" and not list(tmp_path.glob("*.partial"))
    (tmp_path / "folder").mkdir()
    assert main([*args, "-o", str(tmp_path / "folder"), "--overwrite"]) != 0
    assert "folder is a folder; give the model file's own name" in capsys.readouterr().err
    assert main([*args, "-o", str(out), "--overwrite"]) == 0
    written = load_model(out).metadata
    assert (written["name"], written["version"]) == (("mine", "1") if command == "export" else ("tiny-test", "2"))

"""The noise-aware classifier: shapes, training that learns and resumes exactly, export as a classifier model file."""

import pytest
import torch

from CDMSegmentLib.training.classifier import NoiseAwareClassifier, load_classifier_checkpoint, train_classifier
from CDMSegmentLib.core.errors import CDMSegmentError, ModelFileError
from CDMSegmentLib.training.export import export_checkpoint
from CDMSegmentLib.core.modelfile import load_model
from CDMSegmentLib.training.train import TrainConfig, load_checkpoint
from conftest import SIZE, TINY, blob_slices


def data():
    x = blob_slices(16, list(range(8)))
    return x, (torch.arange(16) < 8).long()


def cfg(steps=40):
    return TrainConfig(steps=steps, batch_size=8, lr=3e-3, warmup_steps=5, checkpoint_every=10, precision="fp32",
                       unet=TINY)


def test_features_are_the_last_encoder_map_and_logits_follow():
    net = NoiseAwareClassifier(TINY)
    x, t = torch.randn(2, 1, SIZE, SIZE), torch.tensor([0, 500])
    h = net.features(x, t)
    assert h.shape == (2, 16, SIZE // 2, SIZE // 2)
    assert torch.equal(net(x, t), net.classify_features(h))


def test_training_separates_blob_slices_from_healthy_ones_at_t0(tmp_path):
    x, y = data()
    ckpt = train_classifier(x, y, cfg(), tmp_path, progress=False)
    net, _, state = load_classifier_checkpoint(ckpt, weights="model")
    assert state["kind"] == "classifier" and state["step"] == 40
    pred = net(x, torch.zeros(16, dtype=torch.long)).argmax(1)
    assert (pred == y).float().mean() >= 0.9


def test_resumed_training_matches_an_uninterrupted_run(tmp_path):
    x, y = data()
    full = train_classifier(x, y, cfg(20), tmp_path / "full", progress=False)
    train_classifier(x, y, cfg(20), tmp_path / "cut", progress=False, stop_after=10)
    resumed = train_classifier(x, y, cfg(20), tmp_path / "cut", progress=False, log=lambda m: None)
    a = torch.load(full, weights_only=False)["ema"]
    b = torch.load(resumed, weights_only=False)["ema"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_classifier_checkpoint_is_neither_resumed_nor_loaded_as_a_diffusion_one(tmp_path):
    x, y = data()
    ckpt = train_classifier(x, y, cfg(2), tmp_path, progress=False)
    with pytest.raises(CDMSegmentError, match="classifier checkpoint"):
        load_checkpoint(ckpt)


def test_export_writes_a_classifier_model_file_with_metadata(tmp_path):
    x, y = data()
    ckpt = train_classifier(x, y, cfg(2), tmp_path, progress=False)
    export_checkpoint(ckpt, tmp_path / "c.pt", kind="classifier", name="c", version="1", image_size=SIZE,
                      modalities=["flair"], class_names=["normal", "lesion"], training={})
    model = load_model(tmp_path / "c.pt", kind="classifier")
    assert model.metadata["architecture"]["type"] == "NoiseAwareClassifier"
    assert model.metadata["training"]["steps"] == 2 and "defaults" not in model.metadata
    assert model.network.features(x[:1], torch.zeros(1, dtype=torch.long)).shape == (1, 16, 8, 8)
    with pytest.raises(ModelFileError, match="classifier model"):
        load_model(tmp_path / "c.pt")

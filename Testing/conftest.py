"""Shared tiny fixtures: synthetic slices (bright blobs on a dark disc), hand-made networks, tiny model files,
and (from scene_fixtures.py) a real MRML scene from slicer-core with the module logics Slicer creates at start-up."""

import http.server
import os
import sys
import threading
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "CDMSegment"))

from CDMSegmentLib.training.classifier import NoiseAwareClassifier  # noqa: E402
from CDMSegmentLib.evaluation.slices import EvalCase  # noqa: E402
from CDMSegmentLib.training.export import classifier_metadata, diffusion_metadata  # noqa: E402
from CDMSegmentLib.core.modelfile import load_model, save_model  # noqa: E402
from CDMSegmentLib.training.train import TrainConfig  # noqa: E402
from CDMSegmentLib.core.unet import ConditionalUNet, UNetConfig  # noqa: E402
from scene_fixtures import add_volume, matrix, mrml_scene, phantom, scene  # noqa: E402,F401 (for every test file)

SIZE = 16
SQUARE = (slice(2, 6), slice(2, 6))


class SquareClassifier(nn.Module):
    """Keys on a known square: features are the image split into 4 quadrant channels, logit 1 = 10 x the
    mean of channel 0 inside SQUARE (in quadrant 0), logit 0 its negative. Same interface as NoiseAwareClassifier."""

    def __init__(self, size: int = SIZE):
        super().__init__()
        q = torch.zeros(4, size, size)
        h = size // 2
        q[0, :h, :h] = q[1, :h, h:] = q[2, h:, :h] = q[3, h:, h:] = 1
        self.register_buffer("quadrants", q)
        self.gain = nn.Parameter(torch.ones(1))

    def features(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.gain * (x[:, :1] + 1) * self.quadrants[None]

    def classify_features(self, h: torch.Tensor) -> torch.Tensor:
        s = 10 * h[:, 0, SQUARE[0], SQUARE[1]].mean(dim=(1, 2))
        return torch.stack([-s, s], dim=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.classify_features(self.features(x, t))


class ZeroEps(nn.Module):
    """eps_theta = 0: DDIM then only rescales x, so inversion followed by decoding is exact."""

    def class_embedding(self, y: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.one_hot(y, 2).float()

    def forward(self, x: torch.Tensor, t: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)


def blob_slices(n: int, blob_at=None, size: int = SIZE, blob=SQUARE) -> torch.Tensor:
    """(n, 1, size, size): a dark disc (-0.2) on background (-1); slices in ``blob_at`` get a bright blob (0.8)."""
    yy, xx = np.mgrid[:size, :size]
    disc = (yy - size / 2 + 0.5) ** 2 + (xx - size / 2 + 0.5) ** 2 <= (size / 2 - 1) ** 2
    x = np.where(disc, -0.2, -1.0).astype(np.float32)[None, None].repeat(n, 0)
    for i in blob_at or []:
        x[i, 0, blob[0], blob[1]] = 0.8
    return torch.from_numpy(x)


@pytest.fixture(autouse=True, scope="session")
def model_cache(tmp_path_factory) -> Path:
    """A model cache (downloads, ONNX graphs) of the test session's own, for it and every process it starts,
    so no test reads or fills the user's."""
    folder = tmp_path_factory.mktemp("model-cache")
    os.environ["CDMSEGMENT_CACHE"] = str(folder)
    return folder


@pytest.fixture
def synthetic_cases():
    """Case A: 4 slices, lesion (the blob) on slices 1 and 2; case B: 3 healthy slices."""
    a = blob_slices(4, [1, 2])
    masks_a = (a[:, 0] > 0.5).numpy()
    b = blob_slices(3)
    return [EvalCase("A", a, masks_a, (1.5, 1.5)), EvalCase("B", b, np.zeros((3, SIZE, SIZE), bool), (1.5, 1.5))]


TINY = UNetConfig(base_channels=8, channel_mults=(1, 2), attention_levels=())


@pytest.fixture
def tiny_model_files(tmp_path):
    """(diffusion model path, classifier path): untrained tiny networks saved as real model files."""
    torch.manual_seed(0)
    cfg = TrainConfig(unet=TINY)
    common = dict(name="tiny", version="0", image_size=SIZE, modalities=["flair"], class_names=["normal", "lesion"],
                  training={"note": "untrained test network"})
    unet = ConditionalUNet(TINY)
    torch.nn.init.normal_(unet.head[-1].weight, std=0.1)  # the zero-initialised head would make every map 0
    save_model(unet, diffusion_metadata(cfg, **common), tmp_path / "diffusion.pt")
    save_model(NoiseAwareClassifier(TINY), classifier_metadata(cfg, **common), tmp_path / "classifier.pt")
    return tmp_path / "diffusion.pt", tmp_path / "classifier.pt"


@pytest.fixture
def tiny_models(tiny_model_files):
    d, c = tiny_model_files
    return load_model(d), load_model(c, kind="classifier")


TINY_UNET = UNetConfig(base_channels=8, channel_mults=(1, 2), attention_levels=(1,), groups=4)


def make_tiny_model_file(path: Path, *, image_size: int = 32, modalities=("FLAIR",), defaults=None, seed: int = 0):
    """An untrained but valid diffusion model file (weights random, output head non-zero)."""
    torch.manual_seed(seed)
    cfg = TrainConfig(unet=UNetConfig(**{**TINY_UNET.to_dict(), "in_channels": len(modalities)}))
    net = ConditionalUNet(cfg.unet)
    torch.nn.init.normal_(net.head[-1].weight, std=0.05)
    meta = diffusion_metadata(cfg, name="tiny-test", version="0", image_size=image_size, modalities=modalities,
                              class_names=["normal", "tumour"], training={"data": "none (test fixture)"},
                              defaults=defaults or {"noise_level": 0.9, "steps": 2, "tau": 0.0, "noise_draws": 1})
    return save_model(net, meta, path)


def make_tiny_classifier_file(path: Path, *, defaults=None, seed: int = 1):
    """An untrained classifier that can guide the model of make_tiny_model_file, with optional CG-CDM defaults."""
    torch.manual_seed(seed)
    cfg = TrainConfig(unet=TINY_UNET)
    meta = classifier_metadata(cfg, name="tiny-classifier", version="0", image_size=32, modalities=("FLAIR",),
                               class_names=["normal", "tumour"], training={"data": "none (test fixture)"})
    if defaults:
        meta["defaults"] = dict(defaults)
    return save_model(NoiseAwareClassifier(TINY_UNET), meta, path)


def randomised_cases_and_tiny_model(folder: Path, cases: int, seed: int):
    """(cases folder, model path): ``cases`` randomised cortical and healthy phantoms (coarse, quick) under
    ``folder``/data and a tiny FLAIR model beside them, for the whole-volume evaluation commands."""
    pytest.importorskip("nilearn")
    from CDMSegmentLib.data.randomised import generate_randomised

    data = folder / "data"
    generate_randomised(data, cases, seed, families=("cortical", "healthy"), in_plane_mm=3.0, slice_mm=4.0)
    model = folder / "tiny.pt"
    make_tiny_model_file(model, modalities=("flair",))
    return data, model


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("models") / "tiny.pt"
    make_tiny_model_file(path)
    return path


@pytest.fixture(scope="session")
def tiny_model(tiny_model_path):
    return load_model(tiny_model_path)


@pytest.fixture
def http_server(tmp_path):
    """A static HTTP server on loopback serving ``.directory``, at ``.url``."""
    directory = tmp_path / "served"
    directory.mkdir()
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(directory))
    handler.log_message = lambda *args: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield SimpleNamespace(directory=directory, url=f"http://127.0.0.1:{httpd.server_address[1]}")
    httpd.shutdown()
    httpd.server_close()


def fragments_beside_a_lesion():
    """Brain at 100 (2 mm voxels: 0.008 ml each); a 4x6x6 lesion at 250 the CDM found whole; and a 2x4x6 patch of
    normal tissue the CDM also marked, where every other voxel is 170 (a checkerboard: each bright voxel is a
    component of its own): over any floor, the refinement keeps 24 one-voxel fragments there."""
    image = np.zeros((10, 24, 24), np.float32)
    image[1:9, 2:22, 2:22] = 100
    lesion = np.zeros(image.shape, bool)
    lesion[3:7, 4:10, 4:10] = True
    image[lesion] = 250
    patch = np.zeros(image.shape, bool)
    patch[4:6, 14:18, 12:18] = True
    k, j, i = np.indices(image.shape)
    image[patch & ((k + j + i) % 2 == 0)] = 170
    return image, image > 0, lesion, lesion | patch

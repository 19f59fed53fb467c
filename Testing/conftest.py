"""Fixtures for the Slicer-side tests: a real MRML scene from slicer-core and a tiny model file.

The scene gets the module logics the Slicer application creates at start-up (colours,
subject hierarchy, segmentation converters); nothing is faked.
"""

import http.server
import threading
from functools import partial
from types import SimpleNamespace

import numpy as np
import pytest
import slicer
import vtk

from CDMSegmentLib.export import diffusion_metadata
from CDMSegmentLib.modelfile import load_model, save_model
from CDMSegmentLib.train import TrainConfig
from CDMSegmentLib.unet import ConditionalUNet, UNetConfig

TINY_DEFAULTS = {"noise_level": 0.9, "steps": 1, "tau": 0.5, "noise_draws": 1, "guidance_scale": 100.0}


@pytest.fixture
def scene():
    scene = slicer.vtkMRMLScene()
    logics = [slicer.vtkSlicerColorLogic(), slicer.vtkSlicerSubjectHierarchyModuleLogic(),
              slicer.vtkSlicerSegmentationsModuleLogic()]
    for logic in logics:
        logic.SetMRMLScene(scene)
    yield scene
    for logic in logics:
        logic.SetMRMLScene(None)
    scene.Clear(True)


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory):
    """An untrained 32 x 32 FLAIR model: enough to exercise every path, not to segment well."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    cfg = TrainConfig(num_timesteps=100, unet=UNetConfig(base_channels=16, channel_mults=(1, 2),
                                                         attention_levels=()))
    metadata = diffusion_metadata(cfg, name="tiny", version="0", image_size=32, modalities=["FLAIR"],
                                  class_names=["normal", "tumour"], training={"data": "none"},
                                  defaults=TINY_DEFAULTS)
    network = ConditionalUNet(cfg.unet)
    with torch.no_grad():  # the output layer starts at zero, which would give an all-zero heatmap
        for parameter in network.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    path = tmp_path_factory.mktemp("model") / "tiny.pt"
    save_model(network, metadata, path)
    return path


@pytest.fixture(scope="session")
def tiny_model(tiny_model_path):
    return load_model(tiny_model_path)


def matrix(a: np.ndarray) -> vtk.vtkMatrix4x4:
    m = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, float(a[r, c]))
    return m


def add_volume(scene, array: np.ndarray, ijk_to_ras: np.ndarray, name: str = "flair"):
    """A scalar volume node holding ``array`` (K, J, I) with the given IJK-to-RAS."""
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    node.SetIJKToRASMatrix(matrix(ijk_to_ras))
    slicer.util.updateVolumeFromArray(node, array)
    node.CreateDefaultDisplayNodes()
    return node


def phantom(shape=(10, 20, 24), seed: int = 0) -> np.ndarray:
    """A head-like blob with a bright lesion: int16 (K, J, I), zero background."""
    rng = np.random.default_rng(seed)
    k, j, i = np.indices(shape)
    centre = (np.array(shape) - 1) / 2
    r = np.sqrt(sum(((g - c) / (s / 2.2)) ** 2 for g, c, s in zip((k, j, i), centre, shape)))
    image = np.where(r < 1, 400 + 30 * rng.standard_normal(shape), 0)
    image[(r < 0.35) & (i > centre[2])] += 500
    return image.astype(np.int16)


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

"""A real MRML scene from slicer-core with the module logics Slicer creates at start-up (nothing is faked),
and small volumes to put in it. No torch here: the MRML tests also run, with this file as their only
fixture plugin, in the environment holding the newest slicer-core (``make test-newest-slicer``)."""

import contextlib
import sys
from pathlib import Path

import numpy as np
import pytest
import slicer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "CDMSegment"))

from CDMSegmentLib.slicer_adapters import mrml  # noqa: E402


@contextlib.contextmanager
def mrml_scene():
    """A real MRML scene with the module logics Slicer sets on it at start-up (colours, subject hierarchy,
    segmentations)."""
    scene = slicer.vtkMRMLScene()
    logics = [slicer.vtkSlicerColorLogic(), slicer.vtkSlicerSubjectHierarchyModuleLogic(),
              slicer.vtkSlicerSegmentationsModuleLogic()]
    for logic in logics:
        logic.SetMRMLScene(scene)
    yield scene
    for logic in logics:
        logic.SetMRMLScene(None)
    scene.Clear(True)


@pytest.fixture
def scene():
    with mrml_scene() as scene:
        yield scene


matrix = mrml.array_to_matrix


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

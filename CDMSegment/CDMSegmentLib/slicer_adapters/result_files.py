"""A run's files read into the scene through Slicer's own readers (the storage nodes behind File > Add Data),
as new nodes in the input's subject-hierarchy study.

Reading through the readers Slicer uses for any .nrrd and .seg.nrrd means the nodes are what a user
would get by loading the files by hand: a file Slicer reads wrongly would show wrongly here too, and
the tests catch it. The nodes keep no storage node: the files are temporary, and a node without one
is saved with the scene like any new node.
"""

from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
import slicer

from . import mrml
from ..core.errors import CDMSegmentError


def _read(storage, path: Path, node) -> None:
    storage.SetFileName(str(path))
    if not storage.ReadData(node):
        raise CDMSegmentError(f"Slicer could not read {path.name}, which the CDMSegment process wrote; "
                              "nothing was added to the scene")


def read_heatmap(scene, path: Path, name: str, ijk_to_ras: np.ndarray):
    """A scalar volume node read from ``path`` onto the input's grid ``ijk_to_ras``, shown as a heatmap."""
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", scene.GenerateUniqueName(name))
    _read(slicer.vtkMRMLVolumeArchetypeStorageNode(), path, node)
    _onto_grid(node, ijk_to_ras)
    mrml.show_as_heatmap(node)
    return node


def _onto_grid(node, ijk_to_ras: np.ndarray) -> None:
    """Slicer's volume reader turns a left-handed grid (a sagittal or coronal volume made in code can have
    one) into a right-handed one by reversing an axis: the same voxels in space, indexed the other way.
    Index them back, so that the heatmap stays voxel for voxel on the input's grid."""
    read = mrml.ijk_to_ras(node)
    if np.allclose(read, ijk_to_ras, atol=1e-6):
        return
    array = slicer.util.arrayFromVolume(node)
    size_ijk = np.array(array.shape[::-1])
    to_read = np.linalg.inv(read) @ ijk_to_ras  # input grid index -> index in the read volume
    signs = np.round(np.diag(to_read[:3, :3]))
    expected = np.diag(np.append(signs, 1.0))
    expected[:3, 3] = np.where(signs < 0, size_ijk - 1, 0)
    if not (np.abs(signs) == 1).all() or not np.allclose(to_read, expected, atol=1e-4):
        raise CDMSegmentError(f"Slicer read {node.GetName()!r} on another grid than the input's; nothing was "
                              "added to the scene")
    flipped = np.flip(array, axis=tuple(2 - a for a in range(3) if signs[a] < 0))
    node.SetIJKToRASMatrix(mrml.array_to_matrix(ijk_to_ras))
    slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(flipped))


def read_segmentation(scene, path: Path, name: str, heatmap_node, min_component_voxels: int,
                      refinement: Optional[dict] = None, input_node=None):
    """A segmentation node read from ``path``. Each segment is remembered as written (an edit is then
    recognised) on the heatmap's grid, with the speck removal and the lesion-intensity refinement (of
    ``input_node``'s voxels) it was made with, which a new threshold applies again (mrml.remake_segment)."""
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", scene.GenerateUniqueName(name))
    node.CreateDefaultDisplayNodes()
    _read(slicer.vtkMRMLSegmentationStorageNode(), path, node)
    grid, shape = mrml.ijk_to_ras(heatmap_node), slicer.util.arrayFromVolume(heatmap_node).shape
    segmentation = node.GetSegmentation()
    for n in range(segmentation.GetNumberOfSegments()):
        segment_id = segmentation.GetNthSegmentID(n)
        mrml.remember_written(node, segment_id, mrml.segment_mask(node, segment_id, grid, shape))
    node.SetAttribute(mrml.MIN_COMPONENT_ATTRIBUTE, str(int(min_component_voxels)))
    if refinement:
        mrml.remember_refinement(node, refinement, input_node)
    return node


def add_result_files(reference_node, ijk_to_ras: np.ndarray, paths: Sequence[Path], class_names: Sequence[str],
                     min_component_voxels: int, name: str, refinement: Optional[dict] = None) -> List:
    """Heatmap file(s) and the .seg.nrrd (last), made on the grid ``ijk_to_ras``, as new nodes beside
    ``reference_node`` (the run's first input): [heatmaps..., segmentation]. A file Slicer cannot read leaves the
    scene as it was. refinement: the run's lesion-intensity refinement (its summary's), None without one."""
    scene = reference_node.GetScene()
    before = node_ids(scene)
    several = len(class_names) > 1
    nodes = []
    try:
        for path, class_name in zip(paths[:-1], class_names):
            nodes.append(read_heatmap(scene, path, f"{name} {class_name} heatmap" if several else f"{name} heatmap",
                                      ijk_to_ras))
        nodes.append(read_segmentation(scene, paths[-1], f"{name} segmentation", nodes[0], min_component_voxels,
                                       refinement, reference_node))
        mrml.place_beside(scene, nodes, reference_node)
    except BaseException:
        for node_id in reversed(node_ids(scene)):
            if node_id not in before and scene.GetNodeByID(node_id) is not None:
                scene.RemoveNode(scene.GetNodeByID(node_id))
        raise
    return nodes


def node_ids(scene) -> List[str]:
    """The IDs of every node in the scene, in scene order."""
    return [scene.GetNthNode(n).GetID() for n in range(scene.GetNumberOfNodes())]

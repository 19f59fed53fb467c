"""The MRML adapter: volume nodes in, result nodes out. The only core file importing slicer or vtk.

Everything here uses classes that slicer-core (PyPI) provides too, never ``slicer.app``,
``slicer.modules`` or the ``slicer.mrmlScene`` global, so it runs the same inside Slicer
and in pytest on a real ``vtkMRMLScene``. Scenes are always passed explicitly.

Slicer's physical space is RAS, the core's (like ITK's) LPS: the two differ by the sign
of the first two rows of IJK-to-physical, nothing else.
"""

import hashlib
import json
from typing import Dict, Optional, Sequence

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

from ..core import ranges
from ..core.errors import CDMSegmentError
from ..core.image import Volume
from ..core.refine import apply_refinement
from ..core.terminology import segment_style
from ..core.threshold import make_mask

RAS_FROM_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
# Black-red-yellow-white, created by Slicer's Colors module in every scene.
HEAT_COLOR_NODE_ID = "vtkMRMLPETProceduralColorNodePET-Heat"
HEATMAP_OPACITY = 0.4  # the heatmap as foreground over the input in the slice views
WRITTEN_ATTRIBUTE = "CDMSegment.written."  # + segment id: digest of the mask CDMSegment last wrote
MIN_COMPONENT_ATTRIBUTE = "CDMSegment.minComponentVoxels"  # a run's speck removal, which a new threshold keeps
RESULT_SEGMENT_ATTRIBUTE = "CDMSegment.resultSegment"  # the segment a new threshold re-makes (else the first)
# a run's lesion-intensity refinement (JSON, core/runner.refine_mask), which a new threshold applies again to the
# voxels of the run's input, referenced by the segmentation under this role
REFINEMENT_ATTRIBUTE = "CDMSegment.refinement"
INPUT_REFERENCE_ROLE = "CDMSegment.input"


def _matrix_to_array(m: vtk.vtkMatrix4x4) -> np.ndarray:
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


def array_to_matrix(a: np.ndarray) -> vtk.vtkMatrix4x4:
    m = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, float(a[r, c]))
    return m


def ijk_to_ras(node) -> np.ndarray:
    """The node's own 4x4 IJK-to-RAS matrix (its voxel grid, ignoring any parent transform)."""
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return _matrix_to_array(m)


def world_ijk_to_ras(node, harden: bool = False) -> np.ndarray:
    """IJK-to-RAS in world space, where the user sees the volume.

    A parent transform is refused unless ``harden``: then a linear one is applied to the
    geometry used for the run (the input node keeps its transform; outputs are created in
    world space, without a transform, where they overlay the transformed input). A
    non-linear transform is always refused: applying it needs a resampling the user should see.
    """
    matrix = ijk_to_ras(node)
    transform = node.GetParentTransformNode()
    if transform is None:
        return matrix
    name = f"{node.GetName()!r} is under the transform {transform.GetName()!r}"
    if not transform.IsTransformToWorldLinear():
        raise CDMSegmentError(f"{name}, which is not linear; harden it first (Data module: right-click the "
                              "volume > Harden transform), which resamples the volume")
    if not harden:
        raise CDMSegmentError(f"{name}; harden it first (Data module: right-click the volume > Harden "
                              "transform) or run with hardenTransform=True to segment it where it is shown")
    to_world = vtk.vtkMatrix4x4()
    transform.GetMatrixTransformToWorld(to_world)
    return _matrix_to_array(to_world) @ matrix


def check_volume_node(node, label: str = "input") -> None:
    """Refuse what the model cannot read, in words: no node, no voxels, labelmaps, RGB/vector/4D, 2D."""
    if node is None:
        raise CDMSegmentError(f"{label}: no volume selected; choose a volume")
    name = f"{label} {node.GetName()!r}"
    # Vector (RGB), diffusion and 4D multi-volume nodes derive from the scalar volume node: test them first.
    if node.IsA("vtkMRMLVectorVolumeNode") or node.IsA("vtkMRMLTensorVolumeNode") \
            or not node.IsA("vtkMRMLScalarVolumeNode"):
        raise CDMSegmentError(f"{name} is a {node.GetClassName()[7:]} (vector, RGB, tensor or 4D); choose a scalar "
                              "(grey-level) 3D volume, e.g. one time point")
    if node.IsA("vtkMRMLLabelMapVolumeNode"):
        raise CDMSegmentError(f"{name} is a labelmap; choose the image volume it was drawn on")
    image = node.GetImageData()
    if image is None or image.GetNumberOfPoints() == 0:
        raise CDMSegmentError(f"{name} has no voxels; load the image again")
    if image.GetNumberOfScalarComponents() != 1:
        raise CDMSegmentError(f"{name} has {image.GetNumberOfScalarComponents()} components per voxel (RGB or "
                              "vector); convert it to a scalar volume first")
    dims = image.GetDimensions()
    if min(dims) < 2:
        raise CDMSegmentError(f"{name} is 2D ({dims[0]} x {dims[1]} x {dims[2]} voxels); choose a 3D volume")


def default_input_volume(scene, shown=None):
    """The volume to offer as input: ``shown`` (the volume in view) when it is a plain scalar volume, else the
    first plain scalar volume of the scene (never a labelmap, vector or diffusion volume), else None."""
    def plain(node):
        return node is not None and node.GetClassName() == "vtkMRMLScalarVolumeNode"

    if plain(shown):
        return shown
    # By index, not GetNodesByClass: the collection that returns is the caller's to UnRegister, else it leaks.
    count = scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")
    return next((n for n in (scene.GetNthNodeByClass(i, "vtkMRMLScalarVolumeNode") for i in range(count))
                 if plain(n)), None)


def volume_from_node(node, harden: bool = False, label: str = "input") -> Volume:
    """A copy of the node's voxels (K, J, I) with its world geometry in LPS.

    The copy is taken on the calling (main) thread, so the run never reads a node the
    user may change meanwhile, and never writes to it.
    """
    check_volume_node(node, label)
    ijk_to_lps = RAS_FROM_LPS @ world_ijk_to_ras(node, harden)
    spacing_mm = np.linalg.norm(ijk_to_lps[:3, :3], axis=0)
    if not np.isfinite(ijk_to_lps).all() or spacing_mm.min() <= 0 or \
            abs(np.linalg.det(ijk_to_lps[:3, :3] / spacing_mm)) < 1e-6:
        raise CDMSegmentError(f"{label} {node.GetName()!r} has a voxel spacing of "
                              f"{' x '.join(f'{s:g}' for s in node.GetSpacing())} mm or axes that are not independent; "
                              "set the spacing and directions in Volumes > Volume Information, or load the image again")
    direction = ijk_to_lps[:3, :3] / spacing_mm
    array = np.array(slicer.util.arrayFromVolume(node), copy=True)
    return Volume(array, tuple(spacing_mm), tuple(ijk_to_lps[:3, 3]), direction)


def _grid(shape, ijk_to_ras_matrix: np.ndarray):
    """An empty vtkOrientedImageData describing a (K, J, I) voxel grid (geometry only, no voxels)."""
    image = slicer.vtkOrientedImageData()
    image.SetExtent(0, shape[2] - 1, 0, shape[1] - 1, 0, shape[0] - 1)
    image.SetImageToWorldMatrix(array_to_matrix(ijk_to_ras_matrix))
    return image


def _oriented_image(array: np.ndarray, ijk_to_ras_matrix: np.ndarray):
    """A vtkOrientedImageData holding ``array`` (K, J, I) on the given grid (a segment's labelmap)."""
    image = _grid(array.shape, ijk_to_ras_matrix)
    image.AllocateScalars(numpy_support.get_vtk_array_type(array.dtype), 1)
    numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(array.shape)[:] = array
    return image


def show_as_heatmap(node) -> None:
    """Heat colour table from 0 to the 99.9th percentile of the volume's positive values."""
    node.CreateDefaultDisplayNodes()
    display = node.GetDisplayNode()
    if node.GetScene().GetNodeByID(HEAT_COLOR_NODE_ID) is not None:
        display.SetAndObserveColorNodeID(HEAT_COLOR_NODE_ID)
    heatmap = slicer.util.arrayFromVolume(node)
    top = float(np.percentile(heatmap[heatmap > 0], 99.9)) if (heatmap > 0).any() else 1.0
    display.AutoWindowLevelOff()
    display.SetWindowLevelMinMax(0.0, top)


def add_segmentation_node(scene, masks: Dict[str, np.ndarray], ijk_to_ras_matrix: np.ndarray, name: str):
    """A segmentation with one segment per class (name, colour, terminology from terminology.py),
    its reference geometry set to the input grid so the Segment Editor edits at input resolution."""
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    node.CreateDefaultDisplayNodes()
    segmentation = node.GetSegmentation()
    reference = _grid(next(iter(masks.values())).shape, ijk_to_ras_matrix)
    segmentation.SetConversionParameter(slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName(),
                                        slicer.vtkSegmentationConverter.SerializeImageGeometry(reference))
    for class_name, mask in masks.items():
        style = segment_style(class_name)
        segment_id = segmentation.AddEmptySegment(style.name, style.name, list(style.color))
        segment = segmentation.GetSegment(segment_id)
        # The tag, not SetTerminology: that accessor exists only from Slicer 5.10 (test_slicer_versions.py).
        segment.SetTag(segment.GetTerminologyEntryTagName(), style.terminology_string())
        set_segment_mask(node, segment_id, mask, ijk_to_ras_matrix)
    return node


def set_segment_mask(segmentation_node, segment_id: str, mask: np.ndarray, ijk_to_ras_matrix: np.ndarray) -> None:
    """Replace one segment's voxels with ``mask`` (K, J, I) on the given grid, remembering what was
    written (a node attribute, saved with the scene) so a later edit by the user can be recognised."""
    mask = mask.astype(np.uint8)
    image = _oriented_image(mask, ijk_to_ras_matrix)
    slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
        image, segmentation_node, segment_id, slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE)
    remember_written(segmentation_node, segment_id, mask)


def remember_written(segmentation_node, segment_id: str, mask: np.ndarray) -> None:
    """Note (in a node attribute, saved with the scene) that CDMSegment wrote ``mask`` into the segment."""
    segmentation_node.SetAttribute(WRITTEN_ATTRIBUTE + segment_id, _digest(mask))


def _digest(mask: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(mask > 0).tobytes()).hexdigest()


def segment_edited(segmentation_node, segment_id: str, ijk_to_ras_matrix: np.ndarray, shape) -> bool:
    """True when the segment no longer holds what CDMSegment wrote (the user edited it, or it is not ours)."""
    written = segmentation_node.GetAttribute(WRITTEN_ATTRIBUTE + segment_id)
    return written != _digest(segment_mask(segmentation_node, segment_id, ijk_to_ras_matrix, shape))


def segment_mask(segmentation_node, segment_id: str, ijk_to_ras_matrix: np.ndarray, shape) -> np.ndarray:
    """One segment as a uint8 (K, J, I) mask on the given grid, whatever its stored extent, layer or label value."""
    stored = slicer.vtkOrientedImageData()
    slicer.vtkSlicerSegmentationsModuleLogic.GetSegmentBinaryLabelmapRepresentation(
        segmentation_node, segment_id, stored)
    reference = _grid(shape, ijk_to_ras_matrix)
    resampled = slicer.vtkOrientedImageData()
    slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(stored, reference, resampled)
    array = numpy_support.vtk_to_numpy(resampled.GetPointData().GetScalars()).reshape(tuple(shape))
    # Segments can share one labelmap layer (a .seg.nrrd's do), each with its own label value.
    label = segmentation_node.GetSegmentation().GetSegment(segment_id).GetLabelValue()
    return (array == label).astype(np.uint8)


def place_beside(scene, nodes: Sequence, reference_node) -> None:
    """Put ``nodes`` in the subject-hierarchy folder (study) that holds ``reference_node``, when it has one."""
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    if hierarchy is None:
        return
    reference_item = hierarchy.GetItemByDataNode(reference_node)
    if not reference_item:
        return
    parent = hierarchy.GetItemParent(reference_item)
    for node in nodes:
        item = hierarchy.GetItemByDataNode(node)
        if item:
            hierarchy.SetItemParent(item, parent)
        else:
            hierarchy.CreateItem(parent, node)


def study_of(scene, node) -> Optional[int]:
    """The subject-hierarchy parent item of ``node`` (its study), or None when it is not in the hierarchy."""
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    item = hierarchy.GetItemByDataNode(node) if hierarchy is not None else 0
    return hierarchy.GetItemParent(item) if item else None


def result_segment_id(segmentation_node) -> str:
    """The segment of a run's result in a segmentation: the one it was written into, else the first."""
    segmentation = segmentation_node.GetSegmentation()
    noted = segmentation_node.GetAttribute(RESULT_SEGMENT_ATTRIBUTE)
    return noted if noted and segmentation.GetSegment(noted) is not None else segmentation.GetNthSegmentID(0)


def edited_segments(segmentation_node, names: Sequence[str], ijk_to_ras_matrix: np.ndarray, shape) -> list:
    """Those of ``names`` that are segments of the segmentation holding something CDMSegment did not write there
    (an edit by the user, or a segment that is not ours), on the given grid."""
    segmentation = segmentation_node.GetSegmentation()
    found = [(name, segmentation.GetSegmentIdBySegmentName(name)) for name in names]
    return [name for name, segment_id in found
            if segment_id and segment_edited(segmentation_node, segment_id, ijk_to_ras_matrix, shape)]


def merge_segments(target_node, result_node, ijk_to_ras_matrix: np.ndarray, shape, replace_edited: bool) -> bool:
    """Write a run's segments (``result_node``) into the segmentation the user chose: a segment of the same name
    gets the new voxels (its name and colour stay), others are added. False, and nothing written, when that
    would replace an edited segment and ``replace_edited`` is not set."""
    names = [result_node.GetSegmentation().GetNthSegment(n).GetName()
             for n in range(result_node.GetSegmentation().GetNumberOfSegments())]
    if not replace_edited and edited_segments(target_node, names, ijk_to_ras_matrix, shape):
        return False
    source, target = result_node.GetSegmentation(), target_node.GetSegmentation()
    first = None
    for name in names:
        source_id, target_id = source.GetSegmentIdBySegmentName(name), target.GetSegmentIdBySegmentName(name)
        mask = segment_mask(result_node, source_id, ijk_to_ras_matrix, shape)
        if target_id:
            set_segment_mask(target_node, target_id, mask, ijk_to_ras_matrix)
        else:
            target.CopySegmentFromSegmentation(source, source_id, False)
            target_id = target.GetNthSegmentID(target.GetNumberOfSegments() - 1)
            remember_written(target_node, target_id, mask)
        first = first or target_id
    target_node.SetAttribute(RESULT_SEGMENT_ATTRIBUTE, first)
    copy_remake_settings(result_node, target_node)
    return True


def remember_refinement(segmentation_node, refinement: dict, input_node) -> None:
    """Keep a run's lesion-intensity refinement and its input with the segmentation, for remake_segment."""
    segmentation_node.SetAttribute(REFINEMENT_ATTRIBUTE, json.dumps(refinement))
    segmentation_node.SetNodeReferenceID(INPUT_REFERENCE_ROLE, input_node.GetID() if input_node is not None else None)


def copy_remake_settings(source_node, target_node) -> None:
    """What remake_segment re-makes a segment with (speck removal, refinement, its input), from one
    segmentation to another (a result written into a chosen segmentation, or beside an edited one)."""
    target_node.SetAttribute(MIN_COMPONENT_ATTRIBUTE, source_node.GetAttribute(MIN_COMPONENT_ATTRIBUTE) or "0")
    refinement = source_node.GetAttribute(REFINEMENT_ATTRIBUTE)
    if refinement:
        remember_refinement(target_node, json.loads(refinement), source_node.GetNodeReference(INPUT_REFERENCE_ROLE))
    else:
        target_node.RemoveAttribute(REFINEMENT_ATTRIBUTE)
        target_node.SetNodeReferenceID(INPUT_REFERENCE_ROLE, None)


def remake_segment(heatmap_node, segmentation_node, threshold: float):
    """The run's segment (``result_segment_id``) re-made from the heatmap node at ``threshold`` (no model run), with the speck removal
    and the lesion-intensity refinement of the run that made it (the latter from the run's input volume). An
    edited segment is left as the user made it: the new mask goes into a new segmentation beside it, which is
    returned. A deleted heatmap, segmentation, segment or (for a refined result) input volume is an error."""
    for node, what in ((heatmap_node, "heatmap volume"), (segmentation_node, "segmentation")):
        if node is None or node.GetScene() is None:
            raise CDMSegmentError(f"the {what} of this result was deleted; press Apply to make a new result")
    if segmentation_node.GetSegmentation().GetNumberOfSegments() == 0:
        raise CDMSegmentError(f"{segmentation_node.GetName()!r} has no segment any more (it was deleted); "
                              "press Apply to make a new result")
    threshold = ranges.check("threshold", threshold)  # -1 would paint the whole box, NaN empty the segment
    heatmap = slicer.util.arrayFromVolume(heatmap_node)
    matrix = ijk_to_ras(heatmap_node)
    # No content mask needed: the heatmap is zero outside the content and thresholds are >= 0.
    mask = make_mask(heatmap, threshold, None, int(segmentation_node.GetAttribute(MIN_COMPONENT_ATTRIBUTE) or 0))
    refinement = segmentation_node.GetAttribute(REFINEMENT_ATTRIBUTE)
    if refinement:
        source = segmentation_node.GetNodeReference(INPUT_REFERENCE_ROLE)
        if source is None or source.GetScene() is None or source.GetImageData() is None:
            raise CDMSegmentError("the input volume this result was delineated on was deleted, so a new threshold "
                                  "cannot delineate the lesion the same way; press Apply to make a new result")
        mask = apply_refinement(mask, slicer.util.arrayFromVolume(source), None, json.loads(refinement), heatmap,
                                threshold)
    segment_id = result_segment_id(segmentation_node)
    if not segment_edited(segmentation_node, segment_id, matrix, heatmap.shape):
        set_segment_mask(segmentation_node, segment_id, mask, matrix)
        return segmentation_node
    scene = heatmap_node.GetScene()
    class_name = segmentation_node.GetSegmentation().GetSegment(segment_id).GetName()
    copy = add_segmentation_node(scene, {class_name: mask}, matrix, scene.GenerateUniqueName(segmentation_node.GetName()))
    copy_remake_settings(segmentation_node, copy)
    place_beside(scene, [copy], heatmap_node)
    return copy

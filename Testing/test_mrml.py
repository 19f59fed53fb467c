"""The MRML adapter on a real slicer-core scene: geometry, refusals, transforms, result nodes, storage."""

import numpy as np
import pytest
import SimpleITK as sitk
import slicer
import slicerio
import vtk

from CDMSegmentLib.slicer_adapters import mrml
from CDMSegmentLib.core.errors import CDMSegmentError
from CDMSegmentLib.core.image import Volume
from CDMSegmentLib.core.terminology import segment_style
from scene_fixtures import add_volume, matrix, phantom


def ijk_to_ras(direction_ras, spacing_mm, origin_ras):
    m = np.eye(4)
    m[:3, :3] = np.asarray(direction_ras, float) @ np.diag(spacing_mm)
    m[:3, 3] = origin_ras
    return m


def _oblique():
    a, b = np.radians(30), np.radians(-20)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return rz @ rx @ np.diag([-1, -1, 1])


# Direction columns (i, j, k axes in RAS), anisotropic spacing throughout.
GEOMETRIES = {
    "axial": ijk_to_ras(np.diag([-1, -1, 1]), (0.9, 1.1, 3.0), (12.5, -30.0, -40.0)),
    "sagittal": ijk_to_ras([[0, 0, -1], [1, 0, 0], [0, 1, 0]], (1.2, 0.8, 2.5), (40.0, -60.0, 5.0)),
    "coronal": ijk_to_ras([[-1, 0, 0], [0, 0, 1], [0, -1, 0]], (0.7, 0.7, 4.0), (-3.0, 20.0, 70.0)),
    "oblique": ijk_to_ras(_oblique(), (0.6, 1.3, 2.2), (1.5, -2.5, 3.5)),
}


@pytest.mark.parametrize("name", GEOMETRIES)
def test_volume_geometry_matches_what_itk_reads_from_the_file_mrml_writes(scene, tmp_path, name):
    node = add_volume(scene, phantom(), GEOMETRIES[name])
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(str(tmp_path / "flair.nrrd"))
    assert storage.WriteData(node)
    from_file = Volume.from_sitk(sitk.ReadImage(str(tmp_path / "flair.nrrd")))
    volume = mrml.volume_from_node(node)
    np.testing.assert_array_equal(volume.array, from_file.array)
    np.testing.assert_allclose(volume.ijk_to_lps(), from_file.ijk_to_lps(), atol=1e-9)
    np.testing.assert_allclose(mrml.RAS_FROM_LPS @ volume.ijk_to_lps(), GEOMETRIES[name], atol=1e-12)


def test_volume_from_node_copies_the_voxels(scene):
    node = add_volume(scene, phantom(), GEOMETRIES["axial"])
    volume = mrml.volume_from_node(node)
    volume.array[:] = 0
    assert slicer.util.arrayFromVolume(node).any()


def test_refuses_vector_labelmap_2d_and_empty_nodes(scene):
    rgb = scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "photo")
    slicer.util.updateVolumeFromArray(rgb, np.zeros((4, 5, 6, 3), np.uint8))
    with pytest.raises(CDMSegmentError, match="VectorVolumeNode \\(vector, RGB"):
        mrml.volume_from_node(rgb)
    label = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "labels")
    slicer.util.updateVolumeFromArray(label, np.zeros((4, 5, 6), np.uint8))
    with pytest.raises(CDMSegmentError, match="labelmap"):
        mrml.volume_from_node(label)
    flat = add_volume(scene, np.zeros((1, 5, 6), np.int16), np.eye(4), "slice")
    with pytest.raises(CDMSegmentError, match="is 2D"):
        mrml.volume_from_node(flat)
    empty = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    with pytest.raises(CDMSegmentError, match="no voxels"):
        mrml.volume_from_node(empty)
    with pytest.raises(CDMSegmentError, match="no volume selected"):
        mrml.volume_from_node(None)


def _linear_transform(scene, node):
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "shift")
    to_parent = np.eye(4)
    to_parent[:3, :3] = [[0, -1, 0], [1, 0, 0], [0, 0, 1]]
    to_parent[:3, 3] = (5, -7, 11)
    transform.SetMatrixTransformToParent(matrix(to_parent))
    node.SetAndObserveTransformNodeID(transform.GetID())
    return transform, to_parent


def test_linear_parent_transform_is_refused_unless_hardened_and_the_input_keeps_it(scene):
    node = add_volume(scene, phantom(), GEOMETRIES["oblique"])
    transform, to_parent = _linear_transform(scene, node)
    with pytest.raises(CDMSegmentError, match="under the transform 'shift'.*hardenTransform=True"):
        mrml.volume_from_node(node)
    volume = mrml.volume_from_node(node, harden=True)
    np.testing.assert_allclose(mrml.RAS_FROM_LPS @ volume.ijk_to_lps(), to_parent @ GEOMETRIES["oblique"],
                               atol=1e-9)
    assert node.GetParentTransformNode() is transform
    np.testing.assert_array_equal(mrml.ijk_to_ras(node), GEOMETRIES["oblique"])


def test_non_linear_parent_transform_is_always_refused(scene):
    node = add_volume(scene, phantom(), GEOMETRIES["axial"])
    grid = scene.AddNewNodeByClass("vtkMRMLGridTransformNode", "warp")
    displacement = slicer.vtkOrientedGridTransform()
    field = vtk.vtkImageData()
    field.SetDimensions(2, 2, 2)
    field.AllocateScalars(vtk.VTK_DOUBLE, 3)
    displacement.SetDisplacementGridData(field)
    grid.SetAndObserveTransformToParent(displacement)
    node.SetAndObserveTransformNodeID(grid.GetID())
    with pytest.raises(CDMSegmentError, match="not linear"):
        mrml.volume_from_node(node, harden=True)


def test_segments_have_names_colours_and_terminology(scene):
    node = add_volume(scene, phantom(), GEOMETRIES["axial"])
    heatmap = np.zeros(phantom().shape, np.float32)
    masks = {"tumour": np.zeros(heatmap.shape, np.uint8), "edema": np.ones(heatmap.shape, np.uint8)}
    segmentation_node = mrml.add_segmentation_node(scene, masks, mrml.ijk_to_ras(node), "seg")
    segmentation = segmentation_node.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == 2
    for n, class_name in enumerate(masks):
        segment, style = segmentation.GetNthSegment(n), segment_style(class_name)
        assert segment.GetName() == style.name
        np.testing.assert_allclose(segment.GetColor(), style.color)
        tag = vtk.reference("")  # the tag API of every supported Slicer (GetTerminology is 5.10+)
        assert segment.GetTag(segment.GetTerminologyEntryTagName(), tag)
        assert str(tag) == style.terminology_string()


def test_the_default_input_is_the_volume_in_view_else_the_scenes_first_plain_scalar_volume(scene):
    assert mrml.default_input_volume(scene) is None
    label = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "labels")
    scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "photo")
    scene.AddNewNodeByClass("vtkMRMLDiffusionWeightedVolumeNode", "dwi")
    assert mrml.default_input_volume(scene, label) is None
    first = add_volume(scene, phantom(), GEOMETRIES["axial"], "first")
    second = add_volume(scene, phantom(), GEOMETRIES["axial"], "second")
    assert mrml.default_input_volume(scene) is first  # Slicer --no-main-window: no view to ask
    assert mrml.default_input_volume(scene, second) is second
    assert mrml.default_input_volume(scene, label) is first


def test_seg_nrrd_written_by_mrml_reads_back_through_mrml_and_slicerio(scene, tmp_path):
    geometry = GEOMETRIES["oblique"]
    node = add_volume(scene, phantom(), geometry)
    mask = (phantom() > 600).astype(np.uint8)
    segmentation_node = mrml.add_segmentation_node(scene, {"tumour": mask}, geometry, "seg")
    path = str(tmp_path / "seg.seg.nrrd")
    storage = slicer.vtkMRMLSegmentationStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(path)
    assert storage.WriteData(segmentation_node)

    read_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "read")
    reader = slicer.vtkMRMLSegmentationStorageNode()
    scene.AddNode(reader)
    reader.SetFileName(path)
    assert reader.ReadData(read_node)
    segment_id = read_node.GetSegmentation().GetNthSegmentID(0)
    assert read_node.GetSegmentation().GetSegment(segment_id).GetName() == "Tumour"
    np.testing.assert_array_equal(mrml.segment_mask(read_node, segment_id, geometry, mask.shape), mask)

    seg = slicerio.read_segmentation(path)  # voxels indexed [i, j, k], as NRRD stores them
    assert [s["name"] for s in seg["segments"]] == ["Tumour"]
    label = seg["segments"][0]["labelValue"]
    np.testing.assert_allclose(seg["ijkToLPS"], mrml.RAS_FROM_LPS @ geometry, atol=1e-6)
    np.testing.assert_array_equal((seg["voxels"].transpose(2, 1, 0) == label).astype(np.uint8), mask)
    assert node.GetImageData() is not None


def test_an_edit_is_recognised(scene):
    node = add_volume(scene, phantom(), GEOMETRIES["sagittal"])
    mask = (phantom() > 600).astype(np.uint8)
    segmentation_node = mrml.add_segmentation_node(scene, {"tumour": mask}, mrml.ijk_to_ras(node), "seg")
    segment_id = segmentation_node.GetSegmentation().GetNthSegmentID(0)
    assert not mrml.segment_edited(segmentation_node, segment_id, mrml.ijk_to_ras(node), mask.shape)
    edited = mask.copy()
    edited[0, 0, 0] = 1
    slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
        mrml._oriented_image(edited, mrml.ijk_to_ras(node)), segmentation_node, segment_id,
        slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE)
    assert mrml.segment_edited(segmentation_node, segment_id, mrml.ijk_to_ras(node), mask.shape)


@pytest.mark.parametrize("threshold", [-1.0, float("nan"), float("inf"), "high"])
def test_a_threshold_outside_its_meaning_is_refused_and_the_segment_kept(scene, threshold):
    """-1 from the Python console would paint the whole box (the heatmap is >= 0), NaN would empty the segment."""
    heatmap = np.where(phantom() > 600, 1.0, 0.0).astype(np.float32)
    heatmap_node = add_volume(scene, heatmap, GEOMETRIES["axial"], "heatmap")
    segmentation_node = mrml.add_segmentation_node(scene, {"tumour": (heatmap > 0.5).astype(np.uint8)},
                                                   GEOMETRIES["axial"], "seg")
    segment_id = segmentation_node.GetSegmentation().GetNthSegmentID(0)
    with pytest.raises(CDMSegmentError, match="^threshold must be a finite number >= 0, got "):
        mrml.remake_segment(heatmap_node, segmentation_node, threshold)
    kept = mrml.segment_mask(segmentation_node, segment_id, GEOMETRIES["axial"], heatmap.shape)
    np.testing.assert_array_equal(kept > 0, heatmap > 0.5)

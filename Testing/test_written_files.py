"""Every file the project writes, read back through Slicer's own readers (slicer-core's storage nodes on a real
scene) and compared voxel for voxel and in geometry with what was meant.

Volumes have more columns than slices (54 x 65 x 4), where a segment extent written in the wrong order crops
the segment in Slicer, and one of them is oblique. The command line's files are checked here, and the nodes the logic
makes of them (result_files.py); the logic's whole run in test_module.py.
"""

import numpy as np
import pytest
import slicer
import SimpleITK as sitk

from CDMSegmentLib.cli.main import main
from CDMSegmentLib.cli.writers import write_heatmap, write_segmentation
from CDMSegmentLib.core.image import Volume
from CDMSegmentLib.core.reading import read_volume
from CDMSegmentLib.core.modelfile import load_model
from CDMSegmentLib.core.runner import segment_volume
from CDMSegmentLib.core.settings import CDMSettings
from CDMSegmentLib.core.terminology import segment_style
from CDMSegmentLib.core.errors import CDMSegmentError
from CDMSegmentLib.slicer_adapters import mrml
from CDMSegmentLib.slicer_adapters.result_files import add_result_files, node_ids
from conftest import add_volume, phantom
from test_mrml import GEOMETRIES

WIDE = (4, 65, 54)  # (K, J, I): 54 columns, 65 rows, 4 slices


def volume_on(geometry_ras: np.ndarray, array: np.ndarray) -> Volume:
    ijk_to_lps = mrml.RAS_FROM_LPS @ geometry_ras
    spacing = np.linalg.norm(ijk_to_lps[:3, :3], axis=0)
    return Volume(array, tuple(spacing), tuple(ijk_to_lps[:3, 3]), ijk_to_lps[:3, :3] / spacing)


def read_file(scene, path, node_class: str, storage_class):
    """A node of ``node_class`` read from ``path`` by Slicer's reader (a storage node)."""
    node = scene.AddNewNodeByClass(node_class, "read")
    storage = storage_class()
    scene.AddNode(storage)
    storage.SetFileName(str(path))
    assert storage.ReadData(node)
    return node


def read_volume_file(scene, path):
    return read_file(scene, path, "vtkMRMLScalarVolumeNode", slicer.vtkMRMLVolumeArchetypeStorageNode)


def read_segmentation_file(scene, path):
    return read_file(scene, path, "vtkMRMLSegmentationNode", slicer.vtkMRMLSegmentationStorageNode)


def reference_grid(segmentation_node):
    """(IJK-to-RAS, dimensions) of the reference geometry stored with a segmentation."""
    image = slicer.vtkOrientedImageData()
    stored = segmentation_node.GetSegmentation().GetConversionParameter(
        slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName())
    assert stored, "no reference geometry stored"
    slicer.vtkSegmentationConverter.DeserializeImageGeometry(stored, image, False)
    m = mrml.vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(m)
    return mrml._matrix_to_array(m), image.GetDimensions()


def assert_segments_read_as_written(scene, path, masks, geometry_ras, shape):
    node = read_segmentation_file(scene, path)
    segmentation = node.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == len(masks)
    for n, (class_name, mask) in enumerate(masks.items()):
        segment_id = segmentation.GetNthSegmentID(n)
        assert segmentation.GetSegment(segment_id).GetName() == segment_style(class_name).name
        read = mrml.segment_mask(node, segment_id, geometry_ras, shape)
        assert int(read.sum()) == int(mask.sum())
        np.testing.assert_array_equal(read, mask.astype(np.uint8))
    matrix, dimensions = reference_grid(node)
    np.testing.assert_allclose(matrix, geometry_ras, atol=1e-9)
    assert dimensions == tuple(reversed(shape))
    return node


def wide_masks(shape):
    """Two classes whose voxels reach the last columns and rows, beyond the slice count."""
    tumour = np.zeros(shape, np.uint8)
    tumour[1:3, 40:65, 30:54] = 1
    oedema = np.zeros(shape, np.uint8)
    oedema[3, 5:10, 45:54] = 1
    return {"tumour": tumour, "edema": oedema}


@pytest.mark.parametrize("name", ["axial", "oblique"])
def test_a_written_segmentation_loads_in_slicer_voxel_for_voxel_on_the_input_grid(scene, tmp_path, name):
    reference = volume_on(GEOMETRIES[name], np.zeros(WIDE, np.int16))
    masks = wide_masks(WIDE)
    write_segmentation(tmp_path / "case.seg.nrrd", masks, reference)
    assert_segments_read_as_written(scene, tmp_path / "case.seg.nrrd", masks, GEOMETRIES[name], WIDE)


def test_an_empty_segmentation_loads_with_the_input_geometry(scene, tmp_path):
    reference = volume_on(GEOMETRIES["oblique"], np.zeros(WIDE, np.int16))
    write_segmentation(tmp_path / "empty.seg.nrrd", {"tumour": np.zeros(WIDE, np.uint8)}, reference)
    assert_segments_read_as_written(scene, tmp_path / "empty.seg.nrrd", {"tumour": np.zeros(WIDE, np.uint8)},
                                    GEOMETRIES["oblique"], WIDE)


@pytest.mark.parametrize("name", ["axial", "oblique"])
def test_a_written_heatmap_loads_in_slicer_with_its_values_and_geometry(scene, tmp_path, name):
    reference = volume_on(GEOMETRIES[name], np.zeros(WIDE, np.int16))
    heatmap = np.random.default_rng(0).random(WIDE).astype(np.float32)
    write_heatmap(tmp_path / "h.nrrd", heatmap, reference)
    node = read_volume_file(scene, tmp_path / "h.nrrd")
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(node), heatmap)
    np.testing.assert_allclose(mrml.ijk_to_ras(node), GEOMETRIES[name], atol=1e-9)


@pytest.mark.parametrize("name", ["axial", "oblique"])
def test_the_command_line_files_load_in_slicer_as_the_run_made_them(scene, tmp_path, tiny_model_path, name):
    """What was meant is the run itself: the same volume segmented in this process, same settings and seed."""
    array = phantom(WIDE)
    case = tmp_path / "case.nrrd"
    sitk.WriteImage(volume_on(GEOMETRIES[name], array).to_sitk(), str(case))
    out = tmp_path / "out"
    assert main(["segment", str(case), "-o", str(out), "--model", str(tiny_model_path), "--device", "cpu",
                 "--steps", "1"]) == 0
    model = load_model(tiny_model_path)
    run = segment_volume(model, [read_volume(case)], device="cpu", params=CDMSettings(steps=1).params(model))
    assert run.mask.any() and run.mask[:, :, 8:].any()  # voxels beyond the slice count, where cropping bites
    heatmap_node = read_volume_file(scene, out / "case_heatmap.nrrd")
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(heatmap_node), run.heatmap)
    np.testing.assert_allclose(mrml.ijk_to_ras(heatmap_node), GEOMETRIES[name], atol=1e-5)
    assert_segments_read_as_written(scene, out / "case.seg.nrrd", {"tumour": run.mask}, GEOMETRIES[name], WIDE)


@pytest.mark.parametrize("name", GEOMETRIES)
def test_result_files_become_nodes_on_the_input_grid_in_its_study(scene, tmp_path, name):
    """result_files reads the run's files with the same readers, and puts a grid Slicer's reader reversed
    (a left-handed one: the sagittal and coronal cases here) back onto the input's."""
    node = add_volume(scene, phantom(WIDE), GEOMETRIES[name])
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    study = hierarchy.CreateStudyItem(hierarchy.CreateSubjectItem(hierarchy.GetSceneItemID(), "Patient 1"), "MR")
    hierarchy.CreateItem(study, node)
    reference = volume_on(GEOMETRIES[name], phantom(WIDE))
    masks = wide_masks(WIDE)
    heatmaps = np.random.default_rng(2).random((len(masks),) + WIDE).astype(np.float32)
    paths = [tmp_path / f"{class_name}_heatmap.nrrd" for class_name in masks] + [tmp_path / "s.seg.nrrd"]
    for path, heatmap in zip(paths, heatmaps):
        write_heatmap(path, heatmap, reference)
    write_segmentation(paths[-1], masks, reference)
    *heatmap_nodes, segmentation_node = add_result_files(node, GEOMETRIES[name], paths, list(masks), 7, "flair")
    for heatmap_node, heatmap in zip(heatmap_nodes, heatmaps):
        np.testing.assert_array_equal(slicer.util.arrayFromVolume(heatmap_node), heatmap)
        np.testing.assert_allclose(mrml.ijk_to_ras(heatmap_node), GEOMETRIES[name], atol=1e-9)
        assert heatmap_node.GetDisplayNode().GetColorNodeID() == mrml.HEAT_COLOR_NODE_ID
        assert heatmap_node.GetStorageNode() is None
    for n, mask in enumerate(masks.values()):
        segment_id = segmentation_node.GetSegmentation().GetNthSegmentID(n)
        np.testing.assert_array_equal(mrml.segment_mask(segmentation_node, segment_id, GEOMETRIES[name], WIDE), mask)
        assert not mrml.segment_edited(segmentation_node, segment_id, GEOMETRIES[name], WIDE)
    assert segmentation_node.GetAttribute(mrml.MIN_COMPONENT_ATTRIBUTE) == "7"
    outputs = heatmap_nodes + [segmentation_node]
    assert [hierarchy.GetItemParent(hierarchy.GetItemByDataNode(n)) for n in outputs] == [study] * 3
    # The files are temporary: the nodes must not point at them, or Save would think them stored.
    assert segmentation_node.GetStorageNode() is None
    assert [n.GetName() for n in outputs] == ["flair tumour heatmap", "flair edema heatmap", "flair segmentation"]


def test_a_file_slicer_cannot_read_adds_nothing(scene, tmp_path):
    """(A missing file: a cut one aborts slicer-core's NRRD reader, which is why the child writes atomically.)"""
    node = add_volume(scene, phantom(WIDE), GEOMETRIES["axial"])
    write_heatmap(tmp_path / "h.nrrd", np.zeros(WIDE, np.float32), volume_on(GEOMETRIES["axial"], phantom(WIDE)))
    before = node_ids(scene)
    with pytest.raises(CDMSegmentError, match="^Slicer could not read s.seg.nrrd, which the CDMSegment process wrote; "
                                              "nothing was added to the scene$"):
        add_result_files(node, GEOMETRIES["axial"], [tmp_path / "h.nrrd", tmp_path / "s.seg.nrrd"], ["tumour"], 0,
                         "flair")
    assert node_ids(scene) == before

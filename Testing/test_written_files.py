"""Every file the project writes, read back through Slicer's own readers (slicer-core's storage nodes on a real
scene) and compared voxel for voxel and in geometry with what was meant.

Volumes have more columns than slices (54 x 65 x 4), where a segment extent written in the wrong order crops
the segment in Slicer, and one of them is oblique. The command line's files are checked here; the logic's,
which it loads through the same readers, in test_child_process.py.
"""

import numpy as np
import pytest
import slicer
import SimpleITK as sitk

from CDMSegmentLib.cli.main import main
from CDMSegmentLib.cli.writers import write_heatmap, write_segmentation
from CDMSegmentLib.core.image import Volume, read_volume
from CDMSegmentLib.core.modelfile import load_model
from CDMSegmentLib.core.runner import segment_volume
from CDMSegmentLib.core.terminology import segment_style
from CDMSegmentLib.slicer_adapters import mrml
from conftest import phantom
from test_mrml import GEOMETRIES

WIDE = (4, 65, 54)  # (K, J, I): 54 columns, 65 rows, 4 slices


def volume_on(geometry_ras: np.ndarray, array: np.ndarray) -> Volume:
    ijk_to_lps = mrml.RAS_FROM_LPS @ geometry_ras
    spacing = np.linalg.norm(ijk_to_lps[:3, :3], axis=0)
    return Volume(array, tuple(spacing), tuple(ijk_to_lps[:3, 3]), ijk_to_lps[:3, :3] / spacing)


def read_volume_file(scene, path):
    """A scalar volume node read by Slicer's volume reader."""
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "read")
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(str(path))
    assert storage.ReadData(node)
    return node


def read_segmentation_file(scene, path):
    """A segmentation node read by Slicer's segmentation reader."""
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "read")
    storage = slicer.vtkMRMLSegmentationStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(str(path))
    assert storage.ReadData(node)
    return node


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
    from CDMSegmentLib.core.methods import CDMParams
    run = segment_volume(model, [read_volume(case)], device="cpu",
                         params=CDMParams.for_model(model, steps=1))
    assert run.mask.any() and run.mask[:, :, 8:].any()  # voxels beyond the slice count, where cropping bites
    heatmap_node = read_volume_file(scene, out / "case_heatmap.nrrd")
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(heatmap_node), run.heatmap)
    np.testing.assert_allclose(mrml.ijk_to_ras(heatmap_node), GEOMETRIES[name], atol=1e-5)
    assert_segments_read_as_written(scene, out / "case.seg.nrrd", {"tumour": run.mask}, GEOMETRIES[name], WIDE)

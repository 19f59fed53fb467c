"""From heatmap to mask (threshold.py) and from arrays to files (cli/writers.py)."""

import os
import stat

import numpy as np
import pytest
import SimpleITK as sitk
import slicerio
from scipy import ndimage

from CDMSegmentLib.core.errors import CDMSegmentError
from CDMSegmentLib.core.image import Volume
from CDMSegmentLib.cli.writers import atomic_outputs, file_stem, write_heatmap, write_segmentation
from CDMSegmentLib.core.threshold import make_mask, otsu_threshold, resolve_threshold


def test_otsu_lands_between_the_modes_of_a_bimodal_sample():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(0.1, 0.05, 3000), rng.normal(0.9, 0.05, 500)])
    thr = otsu_threshold(values)
    # Every threshold in the empty gap separates the classes equally well; Otsu takes the first.
    assert values[:3000].max() < thr < values[3000:].min()


@pytest.mark.parametrize("values", [np.array([]), np.full(10, 0.4)])
def test_otsu_of_an_empty_or_constant_sample_selects_nothing(values):
    assert otsu_threshold(values) == float("inf")


def test_model_threshold_needs_a_calibrated_value():
    heatmap = np.zeros((2, 3, 3), np.float32)
    assert resolve_threshold(heatmap, "model", calibrated=0.25) == 0.25
    with pytest.raises(CDMSegmentError, match="no calibrated threshold"):
        resolve_threshold(heatmap, "model")


@pytest.mark.parametrize("rule", ["banana", "", "0.1.2"])
def test_a_threshold_that_is_not_a_rule_or_a_number_is_refused(rule):
    with pytest.raises(CDMSegmentError, match="^threshold must be otsu, model or a finite number >= 0"):
        resolve_threshold(np.zeros((2, 2, 2)), rule)


@pytest.mark.parametrize("rule", [float("nan"), float("inf"), "nan"])
def test_a_non_finite_threshold_is_refused(rule):
    with pytest.raises(CDMSegmentError, match="finite"):
        resolve_threshold(np.zeros((2, 2, 2)), rule)


def test_numbers_and_numeric_strings_are_taken_as_they_are():
    heatmap = np.zeros((2, 2, 2))
    assert resolve_threshold(heatmap, 0.125) == 0.125
    assert resolve_threshold(heatmap, "0.125") == 0.125


def test_otsu_rule_looks_only_at_content_voxels():
    rng = np.random.default_rng(1)
    heatmap = np.zeros((4, 10, 10), np.float32)
    content = np.zeros(heatmap.shape, bool)
    content[:, 2:8, 2:8] = True
    heatmap[content] = rng.choice([2.0, 3.0], content.sum(), p=[0.8, 0.2]) + rng.normal(0, 0.05, content.sum())
    lower, upper = heatmap[content & (heatmap < 2.5)], heatmap[content & (heatmap > 2.5)]
    assert lower.max() < resolve_threshold(heatmap, "otsu", content) < upper.min()
    # Over the whole volume the zeros outside the content pull the threshold below the lower mode.
    assert resolve_threshold(heatmap, "otsu") < lower.min()


def test_make_mask_drops_components_smaller_than_the_minimum_and_keeps_larger_ones():
    heatmap = np.zeros((6, 10, 10), np.float32)
    heatmap[1:4, 1:4, 1:4] = 1.0  # 27 voxels
    heatmap[5, 8, 8:10] = 1.0  # 2 voxels
    heatmap[0, 8, 1] = 1.0  # 1 voxel
    mask = make_mask(heatmap, 0.5, min_component_voxels=3)
    assert mask.dtype == np.uint8
    assert mask.sum() == 27 and mask[1:4, 1:4, 1:4].all()
    assert make_mask(heatmap, 0.5, min_component_voxels=2).sum() == 29
    assert make_mask(heatmap, 0.5).sum() == 30
    assert make_mask(heatmap, 0.5, min_component_voxels=28).sum() == 0


def test_the_specks_removed_inside_the_masks_box_are_those_of_the_whole_volume():
    rng = np.random.default_rng(5)
    heatmap = np.zeros((30, 40, 50), np.float32)
    heatmap[8:20, 10:30, 12:40] = rng.random((12, 20, 28)) ** 3  # blobs and specks of every size
    heatmap[8, 10, 12] = heatmap[19, 29, 39] = 1.0  # single voxels at the box's corners
    mask = heatmap > 0.3
    labels, _ = ndimage.label(mask)
    sizes = np.bincount(labels.ravel())
    expected = (sizes >= 4)[labels] & mask
    assert 0 < expected.sum() < mask.sum()
    np.testing.assert_array_equal(make_mask(heatmap, 0.3, min_component_voxels=4), expected.astype(np.uint8))


def test_make_mask_is_strictly_above_the_threshold_and_inside_the_content():
    heatmap = np.array([[[0.2, 0.5, 0.7, 0.9]]], np.float32)
    content = np.array([[[True, True, True, False]]])
    assert make_mask(heatmap, 0.5, content).tolist() == [[[0, 0, 1, 0]]]


def test_atomic_outputs_leave_no_file_when_the_body_fails(tmp_path):
    existing = tmp_path / "case.seg.nrrd"
    existing.write_bytes(b"old")
    targets = [tmp_path / "case_heatmap.nrrd", existing]
    with pytest.raises(RuntimeError):
        with atomic_outputs(targets) as tmp:
            assert all(t.parent == tmp_path and t.name.startswith(".partial-") for t in tmp)
            for t in tmp:
                t.write_bytes(b"new")
            raise RuntimeError("disk full")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["case.seg.nrrd"]
    assert existing.read_bytes() == b"old"


def test_atomic_outputs_rename_every_file_on_success(tmp_path):
    targets = [tmp_path / "a_heatmap.nrrd", tmp_path / "a.seg.nrrd"]
    with atomic_outputs(targets) as tmp:
        for n, t in enumerate(tmp):
            t.write_text(str(n))
        assert not any(p.exists() for p in targets)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.seg.nrrd", "a_heatmap.nrrd"]
    assert [p.read_text(encoding="utf-8") for p in targets] == ["0", "1"]


def test_outputs_get_the_mode_of_any_new_file_not_the_temporary_files_0600(tmp_path):
    previous = os.umask(0o022)
    try:
        targets = [tmp_path / "a_heatmap.nrrd", tmp_path / "a.seg.nrrd"]
        reference = Volume(np.zeros((2, 3, 4), np.float32), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), np.eye(3))
        with atomic_outputs(targets) as tmp:
            write_heatmap(tmp[0], reference.array, reference)
            write_segmentation(tmp[1], {"tumour": reference.array > 0}, reference)
    finally:
        os.umask(previous)
    assert [stat.S_IMODE(p.stat().st_mode) for p in targets] == [0o644, 0o644]


@pytest.mark.parametrize("path, stem", [
    ("case_0.nii.gz", "case_0"), ("/data/BraTS_001.nii", "BraTS_001"), ("scan.NRRD", "scan"),
    ("edited.seg.nrrd", "edited"), ("t1.mha", "t1"), ("header.nhdr", "header"), ("IM0001.dcm", "IM0001"),
    ("volume.v2.nrrd", "volume.v2"), ("dicom/series_3", "series_3")])
def test_file_stem_strips_the_image_extension_only(path, stem):
    assert file_stem(path) == stem


def grid_volume(shape=(3, 4, 5)) -> Volume:
    direction = np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])  # a sagittal acquisition
    return Volume(np.zeros(shape, np.int16), (0.9, 1.1, 3.0), (-10.0, 20.0, 5.5), direction)


def test_write_heatmap_keeps_values_and_geometry(tmp_path):
    ref = grid_volume()
    heatmap = np.random.default_rng(0).random(ref.array.shape).astype(np.float64)
    write_heatmap(tmp_path / "h.nrrd", heatmap, ref)
    image = sitk.ReadImage(str(tmp_path / "h.nrrd"))
    assert image.GetPixelID() == sitk.sitkFloat32
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), heatmap.astype(np.float32))
    np.testing.assert_allclose(image.GetSpacing(), ref.spacing_mm)
    np.testing.assert_allclose(image.GetOrigin(), ref.origin_mm)
    np.testing.assert_allclose(np.reshape(image.GetDirection(), (3, 3)), ref.direction)


def test_two_classes_become_two_segments_with_label_values_1_and_2(tmp_path):
    ref = grid_volume()
    tumour = np.zeros(ref.array.shape, np.uint8)
    tumour[1, 1:3, 1:3] = 1
    oedema = np.zeros(ref.array.shape, np.uint8)
    oedema[2, 0, :] = 1
    write_segmentation(tmp_path / "c.seg.nrrd", {"tumour": tumour, "oedema": oedema}, ref)
    seg = slicerio.read_segmentation(str(tmp_path / "c.seg.nrrd"))
    by_name = {s["name"]: s for s in seg["segments"]}
    assert set(by_name) == {"Tumour", "Oedema"}
    assert by_name["Tumour"]["labelValue"] == 1 and by_name["Oedema"]["labelValue"] == 2
    assert by_name["Tumour"]["color"] != by_name["Oedema"]["color"]
    assert by_name["Oedema"]["terminology"]["type"][2] == "Edema"
    np.testing.assert_allclose(seg["ijkToLPS"], ref.ijk_to_lps(), atol=1e-6)
    labels = np.asarray(seg["voxels"])
    # slicerio reads voxels in (i, j, k) order
    expected = np.transpose(tumour + 2 * oedema, (2, 1, 0))
    np.testing.assert_array_equal(labels, expected)

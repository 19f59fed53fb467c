"""Phantom generator: anatomy, lesions, labels, geometry and reproducibility of the written BraTS-layout files."""

import csv

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage as ndi

from CDMSegmentLib.core.errors import CDMSegmentError
from CDMSegmentLib.data.phantom import generate_case, generate_phantoms
from CDMSegmentLib.core.slicing import Orientation

SPACING = dict(in_plane_mm=2.0, slice_mm=3.0)  # coarse, so the suite stays fast


def read(path):
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    outdir = tmp_path_factory.mktemp("phantoms")
    return outdir, generate_phantoms(outdir, 4, 3, modalities=("flair", "t1"), lesion_free_fraction=0.25, **SPACING)


def test_brats_layout_and_requested_geometry(phantoms):
    outdir, records = phantoms
    for r in records:
        folder = outdir / r["case"]
        assert sorted(p.name for p in folder.iterdir()) == sorted(
            f"{r['case']}_{m}.nii.gz" for m in ("flair", "t1", "seg"))
        for path in (r["images"]["flair"], r["images"]["t1"], r["seg"]):
            image = sitk.ReadImage(str(path))
            assert image.GetSpacing() == pytest.approx((2.0, 2.0, 3.0))
            assert image.GetDirection() == pytest.approx(tuple(np.eye(3).ravel()))


def test_masks_inside_brain_and_background_zero(phantoms):
    _, records = phantoms
    for r in records:
        flair, t1, seg = read(r["images"]["flair"]), read(r["images"]["t1"]), read(r["seg"])
        assert set(np.unique(seg)) <= {0, 1, 2}
        assert (flair[seg > 0] > 0).all()
        assert np.array_equal(flair > 0, t1 > 0)  # one brain mask for all modalities
        assert 0.1 < (flair > 0).mean() < 0.6
        assert flair[0].max() == 0 or flair[:, 0].max() == 0  # skull-stripped: a zero border


def test_flair_lesions_brighter_than_normal_tissue(phantoms):
    _, records = phantoms
    for r in [r for r in records if r["lesion_voxels"] > 0]:
        flair, seg = read(r["images"]["flair"]).astype(float), read(r["seg"])
        normal = flair[(flair > 0) & (seg == 0)]
        # measured 1.5-2.0 x the 75th percentile of normal brain (which is above white matter, darker than GM in FLAIR)
        assert flair[seg > 0].mean() > 1.3 * np.percentile(normal, 75)


def test_slice_labels_match_masks_and_lesion_free_cases_are_empty(phantoms):
    outdir, records = phantoms
    with open(outdir / "slice_labels.csv") as f:
        rows = list(csv.DictReader(f))
    assert set(rows[0]) == {"case", "axis", "slice", "label", "lesion_voxels"}
    for r in records:
        seg = read(r["seg"])
        mine = sorted((int(x["slice"]), int(x["label"]), int(x["lesion_voxels"])) for x in rows if x["case"] == r["case"])
        assert [m[0] for m in mine] == list(range(seg.shape[0]))
        assert [m[1] for m in mine] == [int(s.any()) for s in seg > 0]
        assert [m[2] for m in mine] == [int(s.sum()) for s in seg > 0]
    assert [r["lesions"] == 0 for r in records] == [False, False, False, True]  # fraction 0.25: case 3 of 0-3
    assert not read(records[3]["seg"]).any()
    assert all(r["lesion_voxels"] > 0 for r in records[:3])


def test_same_seed_identical_files_other_seed_differs(phantoms, tmp_path):
    outdir, records = phantoms
    again = generate_case(tmp_path / "a", 3, 1, modalities=("flair", "t1"), **SPACING)
    assert again["images"]["flair"].read_bytes() == records[1]["images"]["flair"].read_bytes()
    assert again["seg"].read_bytes() == records[1]["seg"].read_bytes()
    other = generate_case(tmp_path / "b", 4, 1, modalities=("flair",), **SPACING)
    assert not np.array_equal(read(other["images"]["flair"]), read(records[1]["images"]["flair"]))


def test_direction_argument_keeps_anatomy_in_place(phantoms, tmp_path):
    _, records = phantoms
    direction = np.array([[0, 0, -1], [1, 0, 0], [0, -1, 0]], dtype=float)  # array axis K is now L-R
    r = generate_case(tmp_path, 3, 0, modalities=("flair", "t1"), direction=direction, **SPACING)
    image = sitk.ReadImage(str(r["images"]["flair"]))
    assert np.allclose(np.array(image.GetDirection()).reshape(3, 3), direction)
    orientation = Orientation.from_direction(direction, image.GetSpacing())
    assert orientation.spacing_mm == pytest.approx((3.0, 2.0, 2.0))
    canonical = orientation.to_canonical(sitk.GetArrayFromImage(image))
    assert np.array_equal(canonical, read(records[0]["images"]["flair"]))
    reference = sitk.ReadImage(str(records[0]["images"]["flair"]))
    corner = np.array(reference.GetOrigin())  # the same physical corner, whatever the array order
    assert any(np.allclose(image.TransformIndexToPhysicalPoint(tuple(int(v) for v in idx)), corner)
               for idx in np.array(np.meshgrid(*[[0, n - 1] for n in image.GetSize()])).reshape(3, -1).T)


def moment_ellipsoid_iou(mask, spacing_mm):
    """IoU of a mask with the ellipsoid of equal second moments (1.0 for an ellipsoid, lower when lobulated)."""
    points = np.argwhere(mask) * spacing_mm
    mean = points.mean(axis=0)
    inverse = np.linalg.inv(5 * np.cov((points - mean).T))  # a solid ellipsoid's semi-axis^2 = 5 x variance
    grid = np.indices(mask.shape).reshape(3, -1).T * spacing_mm - mean
    ellipsoid = (np.einsum("ni,ij,nj->n", grid, inverse, grid) < 1).reshape(mask.shape)
    return (ellipsoid & mask).sum() / (ellipsoid | mask).sum()


def test_lesions_are_irregular_not_ellipsoids(tmp_path):
    spacing = np.array([1.5, 1.5, 1.5])
    z, y, x = np.indices((25, 41, 41)) * 1.5 - np.array([18, 30, 30])[:, None, None, None]
    assert moment_ellipsoid_iou((z / 15) ** 2 + (y / 25) ** 2 + (x / 18) ** 2 < 1, spacing) > 0.99
    ious = []
    for index in range(3):
        seg = read(generate_case(tmp_path, 5, index, lesion_free_fraction=0, in_plane_mm=1.5, slice_mm=1.5)["seg"])
        components, n = ndi.label(seg > 0)
        largest = components == 1 + np.argmax(ndi.sum(seg > 0, components, range(1, n + 1)))
        ious.append(moment_ellipsoid_iou(largest, spacing))
    assert max(ious) < 0.9  # measured 0.34-0.78 for seed 5


def test_invalid_arguments_raise_user_errors(tmp_path):
    with pytest.raises(CDMSegmentError, match="modality"):
        generate_phantoms(tmp_path, 1, 0, modalities=("dwi",))
    with pytest.raises(CDMSegmentError, match="at least 1"):
        generate_phantoms(tmp_path, 0, 0)
    with pytest.raises(CDMSegmentError, match="slice_mm"):
        generate_phantoms(tmp_path, 1, 0, slice_mm=20)
    with pytest.raises(CDMSegmentError, match="axis-aligned"):
        generate_case(tmp_path, 0, 0, direction=np.array([[0.8, -0.6, 0], [0.6, 0.8, 0], [0, 0, 1]]))

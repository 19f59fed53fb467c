"""Data: BraTS discovery, image-level slice labels, generic label tables, patient-level splits, compact slice sets."""

import csv
import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from CDMSegmentLib.data.cases import (Case, build_slice_dataset, find_brats_cases, find_labelled_volumes, load_case_slices,
                                read_split, split_cases, write_split)
from CDMSegmentLib.data.slicesets import SliceDataset, load_slices, save_slices
from CDMSegmentLib.core.errors import CDMSegmentError

SHAPE = (8, 10, 12)  # (K, J, I): 8 axial slices


def write(array, path, direction=np.eye(3), spacing=(1.0, 1.0, 2.0)):
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetDirection(tuple(np.asarray(direction, float).ravel()))
    sitk.WriteImage(image, str(path))


def tiny_case(folder, case_id, lesion_slices, seed, kinds=("flair", "t1", "t1ce", "t2"), direction=np.eye(3)):
    """A brain-like block (zero border, like skull-stripped BraTS) with a bright lesion in ``lesion_slices``."""
    rng = np.random.default_rng(seed)
    folder = folder / case_id
    folder.mkdir(parents=True)
    brain = np.zeros(SHAPE, bool)
    brain[1:7, 2:8, 2:10] = True
    seg = np.zeros(SHAPE, np.uint8)
    for k in lesion_slices:
        seg[k, 4:6, 4:7] = 2 if k % 2 else 1
    for kind in kinds:
        a = np.where(brain, rng.uniform(100, 200, SHAPE), 0) + 300 * (seg > 0)
        write(a.astype(np.int16), folder / f"{case_id}_{kind}.nii.gz", direction)
    write(seg, folder / f"{case_id}_seg.nii.gz", direction)
    return seg


@pytest.fixture
def brats(tmp_path):
    root = tmp_path / "BraTS2021"
    segs = {f"BraTS2021_{n:05d}": tiny_case(root, f"BraTS2021_{n:05d}", lesions, n)
            for n, lesions in enumerate([(2, 3, 4), (), (5,), (1, 2)])}
    return root, segs


def test_finds_brats_cases_with_all_modalities_and_seg(brats):
    root, segs = brats
    (root / "notes.txt").write_text("not an image")
    cases = find_brats_cases(root)
    assert [c.case_id for c in cases] == sorted(segs)
    for c in cases:
        assert sorted(c.images) == ["flair", "t1", "t1ce", "t2"]  # t1 is not confused with t1ce
        assert c.images["t1"].name == f"{c.case_id}_t1.nii.gz" and c.seg.name == f"{c.case_id}_seg.nii.gz"
        assert c.slice_labels is None


def test_labels_equal_mask_non_empty_per_slice(brats):
    root, segs = brats
    for case in find_brats_cases(root):
        x, y, content, masks = load_case_slices(case, ["flair", "t2"], 16, with_masks=True)
        assert x.shape == (8, 2, 16, 16) and x.dtype == torch.float32
        assert -1 <= x.min() and x.max() <= 1
        assert y.dtype == torch.int64
        assert y.tolist() == [int(s.any()) for s in segs[case.case_id] > 0]
        assert content.tolist() == [False, True, True, True, True, True, True, False]
        assert masks.dtype == torch.bool and masks.any(dim=(1, 2)).tolist() == y.bool().tolist()


def test_table_labels_follow_array_order_on_a_flipped_volume(tmp_path):
    seg = tiny_case(tmp_path, "flipped", (1, 2), 0, kinds=("flair",), direction=np.diag([1.0, 1.0, -1.0]))
    with open(tmp_path / "slice_labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["case", "axis", "slice", "label", "lesion_voxels"])
        w.writerows(["flipped", "axial", k, int(s.any()), int(s.sum())] for k, s in enumerate(seg > 0))
    (case,) = find_brats_cases(tmp_path)
    assert case.slice_labels == {k: int(k in (1, 2)) for k in range(8)}
    from_table = load_case_slices(case, ["flair"], 16)[1]
    from_mask = load_case_slices(Case(case.case_id, case.images, case.seg), ["flair"], 16)[1]
    assert from_table.tolist() == from_mask.tolist() == [0, 0, 0, 0, 0, 1, 1, 0]  # superior slice first


def test_missing_modality_is_a_clear_error(brats):
    root, _ = brats
    (root / "BraTS2021_00002" / "BraTS2021_00002_t1ce.nii.gz").unlink()
    case = find_brats_cases(root)[2]
    with pytest.raises(CDMSegmentError, match=r"case BraTS2021_00002 has no t1ce image .*it has flair, t1, t2"):
        load_case_slices(case, ["flair", "t1ce"], 16)
    (root.parent / "empty").mkdir()
    with pytest.raises(CDMSegmentError, match="no BraTS cases"):
        find_brats_cases(root.parent / "empty")


def test_split_by_patient_is_reproducible_and_round_trips(tmp_path):
    ids = [f"case{n:03d}" for n in range(23)]
    split = split_cases(ids, (0.6, 0.2, 0.2), seed=5)
    assert [len(split[k]) for k in ("train", "val", "test")] == [13, 5, 5]
    assert sorted(sum(split.values(), [])) == ids  # every patient in exactly one set
    assert split_cases(list(reversed(ids)), (0.6, 0.2, 0.2), seed=5) == split
    assert split_cases(ids, (0.6, 0.2, 0.2), seed=6) != split
    write_split(split, tmp_path / "split.json")
    assert read_split(tmp_path / "split.json") == split
    assert split_cases(ids[:3], (0.8, 0.1, 0.1), seed=0)["val"]  # small sets still get a case


def test_split_rejects_a_patient_in_two_sets_and_bad_fractions(tmp_path):
    (tmp_path / "bad.json").write_text(json.dumps({"train": ["a", "b"], "test": ["b"]}))
    with pytest.raises(CDMSegmentError, match="case b is in both train and test"):
        read_split(tmp_path / "bad.json")
    with pytest.raises(CDMSegmentError, match="summing to 1"):
        split_cases(["a", "b", "c"], (0.5, 0.2, 0.2))
    with pytest.raises(CDMSegmentError, match="cannot fill"):
        split_cases(["a", "b"], (0.6, 0.2, 0.2))


def test_npz_round_trip_within_quantisation_error(brats, tmp_path):
    root, segs = brats
    cases = find_brats_cases(root)
    dataset = build_slice_dataset(cases, ["flair"], 16, drop_empty=True)
    assert len(dataset) == 6 * len(cases)  # the two empty border slices of each case are dropped
    assert dataset.data.dtype == torch.uint8
    save_slices(tmp_path / "slices.npz", dataset)
    loaded = load_slices(tmp_path / "slices.npz")
    exact = torch.cat([load_case_slices(c, ["flair"], 16)[0][1:7] for c in cases])
    x, y = loaded[7]
    assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.shape == (1, 16, 16)
    assert max(float((loaded[i][0] - exact[i]).abs().max()) for i in range(len(loaded))) <= 1 / 255 + 1e-6
    assert loaded.labels.tolist() == dataset.labels.tolist()
    assert loaded.case_ids == dataset.case_ids and loaded.slice_index.tolist() == dataset.slice_index.tolist()
    assert loaded.meta["modalities"] == ["flair"] and loaded.meta["image_size"] == 16
    half = SliceDataset(exact, torch.zeros(len(exact)), storage="float16")
    assert float((half[3][0] - exact[3]).abs().max()) < 1e-3


def test_generic_folder_with_slice_and_volume_labels(tmp_path):
    brain = np.zeros(SHAPE, np.int16)
    brain[1:7, 2:8, 2:10] = np.random.default_rng(0).integers(50, 150, (6, 6, 8))
    write(brain, tmp_path / "patient_a.nii.gz")
    write(brain, tmp_path / "patient_b.nrrd")
    table = tmp_path / "labels.csv"
    table.write_text("case,slice,label\n" + "".join(f"patient_a,{k},{int(k in (3, 4))}\n" for k in range(1, 7))
                     + "patient_b.nrrd,,0\n")
    a, b = find_labelled_volumes(tmp_path, table)
    assert (a.case_id, b.case_id) == ("patient_a", "patient_b")
    assert load_case_slices(a, ["image"], 16)[1].tolist() == [0, 0, 0, 1, 1, 0, 0, 0]
    assert load_case_slices(b, ["image"], 16)[1].tolist() == [0] * 8
    table.write_text("case,label\npatient_a,1\n")
    with pytest.raises(CDMSegmentError, match="give per-slice labels"):
        find_labelled_volumes(tmp_path, table)
    table.write_text("case,slice,label\npatient_a,3,1\n")
    (a,) = find_labelled_volumes(tmp_path, table)
    with pytest.raises(CDMSegmentError, match="slices with image content have no label"):
        load_case_slices(a, ["image"], 16)
    table.write_text("case,slice,label\nmissing,3,1\n")
    with pytest.raises(CDMSegmentError, match="has no such volume"):
        find_labelled_volumes(tmp_path, table)


def test_slices_pools_several_case_folders_into_one_set(brats, tmp_path, capsys):
    from CDMSegmentLib.cli.main import main

    root, segs = brats
    other = tmp_path / "small_lesions"
    other_segs = {f"Small_{n:03d}": tiny_case(other, f"Small_{n:03d}", lesions, 100 + n)
                  for n, lesions in enumerate([(3,), (2, 5)])}
    out = tmp_path / "pooled.npz"
    assert main(["slices", str(root), str(other), "--subset", "all", "--image-size", "16", "-o", str(out)]) == 0
    pooled = load_slices(out)
    assert capsys.readouterr().out.splitlines()[-1] == (f"{len(pooled)} slices ({int((pooled.labels > 0).sum())} "
                                                        f"labelled > 0) -> {out}")
    alone = {folder: load_slices_of(folder, tmp_path / f"{folder.name}.npz") for folder in (root, other)}
    assert len(pooled) == len(alone[root]) + len(alone[other])
    all_segs = {**segs, **other_segs}
    assert sorted(set(pooled.case_ids)) == sorted(all_segs)
    for case_id, seg in all_segs.items():  # each slice keeps its case and its label (lesion on that slice or not)
        rows = [i for i, c in enumerate(pooled.case_ids) if c == case_id]
        assert [int(pooled.labels[i] > 0) for i in rows] == [int(seg[int(pooled.slice_index[i])].any()) for i in rows]


def load_slices_of(folder, out):
    from CDMSegmentLib.cli.main import main

    assert main(["slices", str(folder), "--subset", "all", "--image-size", "16", "-o", str(out)]) == 0
    return load_slices(out)


def test_slices_refuses_a_case_given_twice_and_a_slice_set_among_folders(brats, tmp_path, capsys):
    from CDMSegmentLib.cli.main import main

    root, _ = brats
    copy = tmp_path / "copy"
    tiny_case(copy, "BraTS2021_00002", (5,), 2)
    out = tmp_path / "pooled.npz"
    assert main(["slices", str(root), str(copy), "--subset", "all", "--image-size", "16", "-o", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"cdmsegment slices: error: case BraTS2021_00002 is in both {root} and {copy}: a case may be given once; "
                   "remove one copy or leave one folder out"]
    assert not out.exists()
    assert main(["slices", str(root), str(root / ".." / root.name), "-o", str(out)]) == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        f"cdmsegment slices: error: folder {root / '..' / root.name} is given twice (it is {root}, under another "
        "name); give each folder once"]
    assert not out.exists()
    load_slices_of(root, tmp_path / "one.npz")
    assert main(["slices", str(root), str(tmp_path / "one.npz"), "-o", str(out)]) == 1
    assert "several data arguments must all be BraTS-layout case folders" in capsys.readouterr().err
    assert not out.exists()

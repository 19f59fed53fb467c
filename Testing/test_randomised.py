"""Domain-randomised phantoms: drawn ranges, family geometry, acquisitions, hold-outs and reproducibility."""

import hashlib

import numpy as np
import pytest
import SimpleITK as sitk

from CDMSegmentLib.cli.main import main
from CDMSegmentLib.core.errors import CDMSegmentError
from CDMSegmentLib.core.reading import read_volume
from CDMSegmentLib.core.slicing import Orientation
from CDMSegmentLib.data.randomised import (ACQUISITIONS, FAMILIES, ContrastRanges, contrast_from, draw_parameters,
                                           generate_randomised, generate_randomised_case, read_case_table)

pytest.importorskip("nilearn")
COARSE = dict(in_plane_mm=2.0, slice_mm=3.0)  # keeps the suite fast; spacing is drawn otherwise


def sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_drawn_contrast_artefacts_and_acquisition_stay_in_their_ranges():
    contrast = ContrastRanges(grey_white=(1.1, 1.2), csf=(0.1, 0.2), lesion=(1.1, 1.3))
    rng = np.random.default_rng(0)
    draws = [draw_parameters(rng, family, contrast, None, None, None, tuple(ACQUISITIONS))
             for family in FAMILIES for _ in range(40)]
    for key, lo, hi in (("grey_white", 1.1, 1.2), ("csf_ratio", 0.1, 0.2), ("lesion_ratio", 1.1, 1.3),
                        ("slice_mm", 1.0, 6.0), ("noise", 0.01, 0.08), ("bias_std", 0.0, 0.3)):
        values = np.array([d[key] for d in draws])
        assert lo <= values.min() and values.max() <= hi, key
        assert values.max() - values.min() > 0.5 * (hi - lo), key  # spread over the range, not one value
    assert {d["acquisition"] for d in draws} == set(ACQUISITIONS)
    assert any(d["necrosis_ratio"] < 1 for d in draws) and any(d["rim_ratio"] > 0 for d in draws)
    for family, (_, (lo, hi), *_) in FAMILIES.items():
        targets = [d["target_ml"] for d in draws if d["family"] == family]
        assert all(lo <= t <= hi for t in targets), family


@pytest.mark.parametrize("family, size_ml", [("ms", (0.1, 0.3)), ("cortical", (1.0, 5.0)),
                                             ("core-oedema", (100.0, 150.0)), ("infiltrative", None)])
def test_lesion_volume_lands_in_the_range_asked(tmp_path, family, size_ml):
    r = generate_randomised_case(tmp_path, 3, 0, family, size_ml=size_ml, in_plane_mm=1.0, slice_mm=1.0)
    lo, hi = size_ml or FAMILIES[family][1]
    assert lo <= r["fine_lesion_ml"] <= hi * 1.001
    assert r["lesion_ml"] == pytest.approx(r["fine_lesion_ml"], rel=0.35)  # the written mask: partial volume only
    seg = read_volume(r["seg"])
    assert seg.array.sum() > 0 and set(np.unique(seg.array)) <= {0, 1, 2}


def test_ms_lesions_sit_in_white_matter_and_cortical_ones_do_not(tmp_path):
    ms = generate_randomised_case(tmp_path, 4, 0, "ms", **COARSE)
    cortical = generate_randomised_case(tmp_path, 4, 1, "cortical", **COARSE)
    assert ms["lesion_wm_fraction"] > 0.7
    assert cortical["lesion_wm_fraction"] < ms["lesion_wm_fraction"] - 0.2


def test_metastases_are_few_small_lesions_across_the_grey_white_junction(tmp_path):
    for index in range(3):
        r = generate_randomised_case(tmp_path, 8, index, "metastases", **COARSE)
        assert 0.2 <= r["fine_lesion_ml"] <= 25.0 * 1.001
        assert 0.2 < r["lesion_wm_fraction"] < 0.8  # half in grey matter, half in white: neither family's seat
        lesions = sitk.ConnectedComponent(sitk.ReadImage(str(r["seg"])) > 0)
        assert 1 <= sitk.GetArrayViewFromImage(lesions).max() <= 6


def test_lesions_are_brighter_than_grey_matter_by_the_drawn_ratio(tmp_path):
    r = generate_randomised_case(tmp_path, 5, 0, "core-oedema", contrast=contrast_from(lesion=(2.0, 2.0)),
                                 size_ml=(40.0, 60.0), **COARSE)
    flair = read_volume(r["images"]["flair"]).array.astype(float)
    seg = read_volume(r["seg"]).array
    normal = flair[(flair > 0) & (seg == 0)]
    assert np.median(flair[seg == 2]) > 1.4 * np.percentile(normal, 90)


def test_acquisition_sets_the_thick_axis_and_stores_it_as_slices(tmp_path):
    for acquisition, canonical in ACQUISITIONS.items():
        r = generate_randomised_case(tmp_path / acquisition, 6, 0, "healthy", in_plane_mm=2.0, slice_mm=5.0,
                                     acquisitions=(acquisition,))
        image = read_volume(r["images"]["flair"])
        assert image.spacing_mm[2] == pytest.approx(5.0)  # array axis 0 (K) is the slice direction
        orientation = Orientation.from_direction(image.direction, image.spacing_mm)
        assert orientation.spacing_mm[canonical] == pytest.approx(5.0)
        assert r["lesion_ml"] == 0 and read_volume(r["seg"]).array.max() == 0


def test_held_out_families_are_not_written_and_cases_csv_says_which(tmp_path):
    records = generate_randomised(tmp_path, 3, 7, families=("ms", "healthy"), **COARSE)
    table = read_case_table(tmp_path)
    assert [table[r["case"]]["family"] for r in records] == ["ms", "healthy", "ms"]
    assert table[records[0]["case"]]["lesion_ml"] == pytest.approx(records[0]["lesion_ml"])
    labels = (tmp_path / "slice_labels.csv").read_text(encoding="utf-8").splitlines()
    assert len(labels) - 1 == sum(len(r["slice_rows"]) for r in records)


def test_same_seed_same_files_other_seed_other_files(tmp_path):
    a = generate_randomised_case(tmp_path / "a", 11, 2, "multifocal", **COARSE)
    b = generate_randomised_case(tmp_path / "b", 11, 2, "multifocal", **COARSE)
    c = generate_randomised_case(tmp_path / "c", 12, 2, "multifocal", **COARSE)
    assert sha(a["images"]["flair"]) == sha(b["images"]["flair"]) and sha(a["seg"]) == sha(b["seg"])
    assert sha(a["images"]["flair"]) != sha(c["images"]["flair"])


@pytest.mark.parametrize("kwargs, message", [
    (dict(families=("glioma",)), "unknown lesion family"),
    (dict(acquisitions=("oblique",)), "unknown acquisition"),
    (dict(size_ml=(5.0, 1.0)), "lesion volume range"),
])
def test_bad_arguments_say_what_to_choose(tmp_path, kwargs, message):
    with pytest.raises(CDMSegmentError, match=message):
        generate_randomised(tmp_path, 1, 0, **kwargs)
    assert not any(tmp_path.iterdir())


def test_bad_contrast_range_is_refused():
    with pytest.raises(CDMSegmentError, match="lesion contrast range"):
        contrast_from(lesion=(2.0, 1.0))


def test_command_line_holds_out_families_and_contrast(tmp_path, capsys):
    out = tmp_path / "held_out"
    assert main(["phantom", str(out), "--cases", "2", "--families", "cortical,healthy", "--lesion-contrast", "1.1,1.2",
                 "--in-plane-mm", "2", "--slice-mm", "3", "--seed", "5"]) == 0
    table = read_case_table(out)
    assert sorted(r["family"] for r in table.values()) == ["cortical", "healthy"]
    assert all(1.1 <= r["lesion_ratio"] <= 1.2 for r in table.values())
    assert sitk.ReadImage(str(next(out.rglob("*_flair.nii.gz")))).GetPixelID() == sitk.sitkInt16
    assert main(["phantom", str(tmp_path / "x"), "--lesion-ml", "1,2"]) == 1
    assert "add --families" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--families", "metastasis"], "unknown lesion family ['metastasis']; choose from core-oedema"),
    (["--families", "all", "--lesion-ml", "0,1"], "lesion volume range (--lesion-ml) must be LO,HI ml"),
    (["--families", "all", "--lesion-contrast", "3,1"], "(--lesion-contrast) must be LO,HI with 0.5 <= LO <= HI <= 5, "
                                                        "got 3,1"),
    (["--families", "all", "--lesion-ml", "1"], "--lesion-ml needs LO,HI, got 1"),
    (["--lesion-ml", "1,2"], "--lesion-ml applies to randomised phantoms"),
])
def test_command_line_refusals_are_one_line_naming_the_option(tmp_path, capsys, args, message):
    assert main(["phantom", str(tmp_path / "out"), "--cases", "2", *args]) == 1
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1  # no progress bar before the error
    assert not (tmp_path / "out").exists()


def test_command_line_refuses_a_plain_file_as_the_output_folder(tmp_path, capsys):
    plain = tmp_path / "plain"
    plain.write_text("keep me")
    assert main(["phantom", str(plain), "--families", "healthy", "--cases", "1"]) == 1
    assert "plain is a file, not a folder" in capsys.readouterr().err
    assert plain.read_text() == "keep me"

"""The fault suite's input side (issue 19): no output ever replaces an input, fine inputs as scanners and
tools write them are read, wrong inputs are refused with one line saying what was found.

Each refusal is checked as test_faults.py checks its matrix: one line on stderr, no traceback, no output and
every input byte unchanged. The runs that must succeed use tiny volumes and the tiny test model.
"""

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from CDMSegmentLib.cli.main import main
from CDMSegmentLib.cli.segment_files import segment_files
from CDMSegmentLib.cli.writers import file_stem, write_segmentation
from CDMSegmentLib.core.errors import CDMSegmentError
from CDMSegmentLib.core.image import Volume
from CDMSegmentLib.core.modelfile import load_model, save_model
from conftest import make_tiny_model_file, phantom
from test_cli import assert_one_error_line, run_cli, write_case

EXPECTS = {"modality": "FLAIR", "skull_stripped": True, "description": "skull-stripped brain MRI (FLAIR)"}


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    """The tiny test model, declaring what it takes as the bundled one does."""
    folder = tmp_path_factory.mktemp("model")
    make_tiny_model_file(folder / "plain.pt")
    plain = load_model(folder / "plain.pt")
    save_model(plain.network, {**plain.metadata, "expects": EXPECTS}, folder / "flair.pt")
    return folder / "flair.pt"


@pytest.fixture(scope="module")
def two_modality_model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model2") / "two.pt"
    make_tiny_model_file(path, modalities=("FLAIR", "T1"))
    return path


def digests(folder: Path) -> dict:
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def refused(argv, capfd, *words, code: int = 1) -> str:
    """Run ``cdmsegment`` with argv; it must end in one error line holding ``words``: -> that line."""
    got, out, err = run_cli([str(a) for a in argv], capfd)
    assert got == code, err
    assert_one_error_line(err)
    assert out == ""
    for w in words:
        assert w in err, err
    return err


def segmentation_file(path: Path) -> Path:
    """A .seg.nrrd as this package writes it (one segment over a phantom's bright part)."""
    array = phantom((6, 20, 24))
    write_segmentation(path, {"tumour": array > 600}, Volume(array, (1.0, 1.2, 2.5)))
    return path


# ---- no output over an input -------------------------------------------------------------------------------

def test_a_segmentation_given_as_input_into_its_own_folder_is_refused_even_with_overwrite(tmp_path, model_path,
                                                                                            capfd):
    own = tmp_path / "own"
    own.mkdir()
    segmentation_file(own / "case.seg.nrrd")
    before = digests(own)
    refused(["segment", own / "case.seg.nrrd", "-o", own, "--overwrite", "--model", model_path, "--device", "cpu"],
            capfd)
    assert digests(own) == before


def test_an_output_that_is_an_input_by_another_path_or_a_link_is_refused(tmp_path, two_modality_model, capfd):
    """Two modalities where the second is named as the first's heatmap: the same file, spelled three ways."""
    own = tmp_path / "own"
    own.mkdir()
    write_case(own / "a.nii.gz", phantom((6, 20, 24)))
    write_case(own / "a_heatmap.nrrd", phantom((6, 20, 24), seed=1))
    (tmp_path / "link").symlink_to(own, target_is_directory=True)
    before = digests(own)
    for out in (own, tmp_path / "own" / ".." / "own", tmp_path / "link"):
        refused(["segment", own / "a.nii.gz", own / "a_heatmap.nrrd", "-o", out, "--overwrite", "--model",
                 two_modality_model, "--device", "cpu"], capfd, "is the input", "not even with --overwrite")
    assert digests(own) == before
    assert sorted(p.name for p in own.iterdir()) == ["a.nii.gz", "a_heatmap.nrrd"]


def test_a_hard_link_to_the_input_in_the_output_folder_is_refused(tmp_path, model_path, capfd):
    source = write_case(tmp_path / "case_0.nii.gz", phantom((6, 20, 24)))
    out = tmp_path / "out"
    out.mkdir()
    os.link(source, out / "case_0.seg.nrrd")
    before = digests(tmp_path)
    refused(["segment", source, "-o", out, "--overwrite", "--model", model_path, "--device", "cpu"], capfd,
            f"{out / 'case_0.seg.nrrd'} is the input {source}")
    assert digests(tmp_path) == before


def test_a_cohort_never_writes_one_case_over_another_cases_input(tmp_path, model_path, capfd):
    own = tmp_path / "own"
    own.mkdir()
    write_case(own / "x.nii.gz", phantom((6, 20, 24)))
    write_case(own / "x_heatmap.nrrd", phantom((6, 20, 24), seed=1))  # case x's heatmap would be this file
    before = digests(own)
    code = main(["segment-cohort", str(own / "x.nii.gz"), str(own / "x_heatmap.nrrd"), "-o", str(own),
                 "--overwrite", "--model", str(model_path), "--device", "cpu"])
    err = capfd.readouterr().err
    assert code == 1 and "is the input" in err, err
    assert {p: d for p, d in digests(own).items() if p in before} == before


def test_a_cohort_summary_never_replaces_its_case_list(tmp_path, model_path, capfd):
    out = tmp_path / "out"
    out.mkdir()
    write_case(tmp_path / "x.nii.gz", phantom((6, 20, 24)))
    (out / "cohort_summary.csv").write_text(f"{tmp_path / 'x.nii.gz'}\n")
    before = digests(out)
    refused(["segment-cohort", "--list", out / "cohort_summary.csv", "-o", out, "--overwrite", "--model",
             model_path, "--device", "cpu"], capfd, "is the input")
    assert digests(out) == before


# ---- output names -------------------------------------------------------------------------------------------

def test_outputs_of_dot_and_dot_dot_are_named_after_the_folder(tmp_path, monkeypatch):
    study = tmp_path / "study" / "series"
    study.mkdir(parents=True)
    monkeypatch.chdir(study)
    assert file_stem(".") == "series" and file_stem("..") == "study" and file_stem("./") == "series"
    assert file_stem(Path("..") / "series") == "series" and file_stem("/") == "image"


def test_a_dicom_folder_given_as_dot_writes_outputs_named_after_it(tmp_path, model_path, monkeypatch, capfd):
    from test_faults import dicom_series

    folder = dicom_series(tmp_path / "AX_FLAIR", phantom((6, 20, 24)), "1.2.826.0.1.3680043.2.1125.9.601", "AX FLAIR")
    monkeypatch.chdir(folder)
    code, out, err = run_cli(["segment", ".", "-o", tmp_path / "out", "--model", model_path, "--device", "cpu"],
                             capfd)
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["AX_FLAIR.seg.nrrd", "AX_FLAIR_heatmap.nrrd"]


def test_an_output_name_too_long_for_the_file_system_is_refused_before_the_run(tmp_path, model_path, capfd):
    name_max = os.pathconf(tmp_path, "PC_NAME_MAX")
    source = write_case(tmp_path / ("c" * (name_max - 5) + ".nii"), phantom((6, 20, 24)))  # its heatmap: too long
    before = digests(tmp_path)
    err = refused(["segment", source, "-o", tmp_path / "out", "--model", model_path, "--device", "cpu"], capfd,
                  f"bytes long, and the file system of {tmp_path / 'out'} takes at most {name_max}",
                  "give the input a shorter name")
    assert ".partial-" not in err and "segmenting" not in err
    assert digests(tmp_path) == before and not (tmp_path / "out").exists()


def test_an_output_name_that_just_fits_is_written(tmp_path, model_path, capfd):
    """The longest name the file system takes: the temporary name beside it must fit too."""
    name_max = os.pathconf(tmp_path, "PC_NAME_MAX")
    stem = "c" * (name_max - len("_heatmap.nrrd"))
    source = write_case(tmp_path / f"{stem}.nii", phantom((6, 20, 24)))
    code, out, err = run_cli(["segment", source, "-o", tmp_path / "out", "--model", model_path, "--device", "cpu"],
                             capfd)
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [f"{stem}.seg.nrrd", f"{stem}_heatmap.nrrd"]

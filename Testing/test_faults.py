"""The fault matrix: every kind of broken file, wrong input, unusable output folder and interrupted run ends in
exactly one line on stderr, a non-zero exit, no traceback, no file left behind and every input byte unchanged.

Inputs are real files: a real anatomy (nilearn's MNI152 template, skull-stripped) turned into a head CT, a head
with its skull and a raw MRI; NIfTI files cut short; DICOM series written by SimpleITK with two series or a
missing slice; model files with a flipped bit. Downloads are in test_download.py (a server on 127.0.0.1).
"""

import hashlib
import os
import resource
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import nilearn
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy import ndimage

from CDMSegmentLib.cli.segment_files import segment_files
from CDMSegmentLib.cli.writers import atomic_outputs
from CDMSegmentLib.core.errors import CDMSegmentError
from CDMSegmentLib.core.modelfile import load_model, save_model
from conftest import make_tiny_model_file, phantom
from test_cli import assert_one_error_line, run_cli, write_case

PACKAGE_DIR = Path(__file__).resolve().parent.parent / "CDMSegment"
MNI = Path(nilearn.__file__).parent / "datasets" / "data" / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
EXPECTS = {"modality": "FLAIR", "skull_stripped": True, "description": "skull-stripped brain MRI (FLAIR)"}
STEP = 4  # MNI152 at 4 mm: real anatomy, small enough for a tiny model on a CPU


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    """The tiny test model, declaring what it takes as the bundled one does."""
    folder = tmp_path_factory.mktemp("model")
    make_tiny_model_file(folder / "plain.pt")
    plain = load_model(folder / "plain.pt")
    save_model(plain.network, {**plain.metadata, "expects": EXPECTS}, folder / "flair.pt")
    return folder / "flair.pt"


def mni_brain() -> tuple:
    """(array (K, J, I) float32 with a zero background, spacing_mm): the MNI152 brain at 4 mm."""
    image = sitk.ReadImage(str(MNI))
    array = sitk.GetArrayFromImage(image)[::STEP, ::STEP, ::STEP].astype(np.float32)
    return array, tuple(s * STEP for s in image.GetSpacing())


def write(path: Path, array: np.ndarray, spacing) -> Path:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    sitk.WriteImage(image, str(path))
    return path


def head(shell_voxels: int, background: str = "zero") -> np.ndarray:
    """The brain in a scalp-and-skull shell ``shell_voxels`` thick (300), on a zero or a noise background."""
    brain, _ = mni_brain()
    inside = brain > 0
    shell = ndimage.binary_dilation(inside, iterations=shell_voxels) & ~inside
    out = np.where(inside, brain, np.where(shell, 300.0, 0.0)).astype(np.float32)
    if background == "noise":
        noise = np.random.default_rng(0).rayleigh(8.0, out.shape).astype(np.float32)
        out = np.where(out == 0, noise, out)
    return out


def head_ct() -> np.ndarray:
    """Hounsfield units: brain 35, skull 1000, air -1000 around it."""
    brain, _ = mni_brain()
    inside = brain > 0
    skull = ndimage.binary_dilation(inside, iterations=2) & ~inside
    return np.where(inside, 35.0, np.where(skull, 1000.0, -1000.0)).astype(np.int16)


def dicom_series(folder: Path, array: np.ndarray, uid: str, description: str, drop=(), tags=None, only=None,
                 sop_suffix: str = "") -> Path:
    """One MR file per slice of ``array`` at 2.5 mm, as a scanner writes them; slices in ``drop`` left out;
    ``tags`` override the scanner's on every slice, or on the slices in ``only``."""
    folder.mkdir(exist_ok=True)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((1.0, 1.0, 2.5))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(image.GetDepth()):
        if k in drop:
            continue
        s = image[:, :, k]
        position = image.TransformIndexToPhysicalPoint((0, 0, k))
        for tag, value in {"0008|0060": "MR", "0020|000d": "1.2.826.0.1.3680043.2.1125.9", "0020|000e": uid,
                           "0008|103e": description, "0020|0013": str(k + 1),
                           "0020|0032": "\\".join(f"{c:.4f}" for c in position), "0020|0037": "1\\0\\0\\0\\1\\0",
                           "0018|0050": "2.5", "0008|0018": f"{uid}.{k + 1}{sop_suffix}",
                           **((tags or {}) if only is None or k in only else {})}.items():
            s.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{uid[-3:]}{sop_suffix}_{k:03d}.dcm"))
        writer.Execute(s)
    return folder


def cut(path: Path, fraction: float = 0.5) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])
    return path


def flip_byte(path: Path, at: float = 0.6) -> Path:
    data = bytearray(path.read_bytes())
    data[int(len(data) * at)] ^= 0x10
    path.write_bytes(bytes(data))
    return path


def nrrd_with(tmp: Path, old: bytes, new: bytes) -> Path:
    path = write_case(tmp / "header.nrrd", phantom((6, 20, 24)))
    header, body = path.read_bytes().split(b"\n\n", 1)
    assert old in header
    path.write_bytes(header.replace(old, new) + b"\n\n" + body)
    return path


def nrrd_header_only(tmp: Path) -> Path:
    """An attached-data NRRD whose file stops within its header: no blank line, no voxels."""
    path = write_case(tmp / "header_only.nrrd", phantom((6, 20, 24)))
    path.write_bytes(path.read_bytes().split(b"\n\n", 1)[0] + b"\n")
    return path


def nhdr_without_data(tmp: Path) -> Path:
    """A detached NRRD header (.nhdr) whose data file is not beside it."""
    path = write_case(tmp / "detached.nhdr", phantom((6, 20, 24)))
    data = [f for f in tmp.iterdir() if f != path]
    assert len(data) == 1, data
    data[0].unlink()
    return path


def nifti_zero_pixdim(tmp: Path) -> Path:
    path = tmp / "pixdim.nii"
    image = sitk.GetImageFromArray(phantom((6, 20, 24)))
    image.SetSpacing((1.0, 1.0, 2.5))
    sitk.WriteImage(image, str(path))
    data = bytearray(path.read_bytes())
    struct.pack_into("<f", data, 88, 0.0)  # pixdim[3]: the slice thickness
    path.write_bytes(bytes(data))
    return path


def two_series(tmp: Path) -> Path:
    folder = dicom_series(tmp / "study", phantom((6, 20, 24)), "1.2.826.0.1.3680043.2.1125.9.101", "AX FLAIR")
    return dicom_series(folder, phantom((3, 20, 24), seed=1), "1.2.826.0.1.3680043.2.1125.9.102", "LOCALIZER")


def nan_model(tmp: Path) -> Path:
    """A model file intact as a file (CRCs right) whose weights give NaN: what a bad export or fp16 overflow gives."""
    make_tiny_model_file(tmp / "base.pt")
    model = load_model(tmp / "base.pt")
    with torch.no_grad():
        next(model.network.parameters()).fill_(float("nan"))
    save_model(model.network, {**model.metadata, "expects": EXPECTS}, tmp / "nan.pt")
    return tmp / "nan.pt"


def damaged_model(tmp: Path, model_path: Path) -> Path:
    (tmp / "damaged.pt").write_bytes(model_path.read_bytes())
    return flip_byte(tmp / "damaged.pt", 0.5)


def t1_series(tmp: Path) -> Path:
    brain, _ = mni_brain()
    return dicom_series(tmp / "t1", brain[8:14].astype(np.int16), "1.2.826.0.1.3680043.2.1125.9.201", "AX T1 SE",
                        tags={"0018|0080": "500", "0018|0081": "12"})


def case(tmp: Path) -> Path:
    return write_case(tmp / "case_0.nii.gz", phantom((6, 20, 24)))


# name -> (make(tmp, model_path) -> (argv after 'segment', without -o), exit code, words the line must hold)
FAULTS = {
    "nii.gz cut in half": (lambda t, m: [cut(case(t)), "--model", m], 1, "truncated"),
    "nii cut short": (lambda t, m: [cut(write_case(t / "c.nii", phantom((6, 20, 24))), 0.8), "--model", m], 1,
                      "truncated"),
    "nii.gz with a flipped bit": (lambda t, m: [flip_byte(case(t)), "--model", m], 1, "damaged"),
    "mha cut short": (lambda t, m: [cut(write_case(t / "c.mha", phantom((6, 20, 24)))), "--model", m], 1,
                      "truncated"),
    "nrrd cut short": (lambda t, m: [cut(write_case(t / "c.nrrd", phantom((6, 20, 24)))), "--model", m], 1,
                       "truncated"),
    "two DICOM series": (lambda t, m: [two_series(t), "--model", m], 1,
                         "holds 2 DICOM series: 1.2.826.0.1.3680043.2.1125.9.101 'AX FLAIR' (6 slices); "
                         "1.2.826.0.1.3680043.2.1125.9.102 'LOCALIZER' (3 slices); choose one with --series"),
    "DICOM series with a slice missing": (
        lambda t, m: [dicom_series(t / "gap", phantom((8, 20, 24)), "1.2.826.0.1.3680043.2.1125.9.301", "AX FLAIR",
                                   drop=(4,)), "--model", m], 1,
        "not evenly spaced (usually 2.50 mm apart, but 7.50 -> 12.50 mm)"),
    "DICOM series with two echoes at each position": (
        lambda t, m: [dicom_series(dicom_series(t / "echoes", phantom((4, 20, 24)), "1.2.826.0.1.3680043.2.1125.9.401",
                                                "AX FLAIR"), phantom((4, 20, 24), seed=2),
                                   "1.2.826.0.1.3680043.2.1125.9.401", "AX FLAIR", tags={"0020|0013": "9"},
                                   sop_suffix=".2"), "--model", m], 1, "several slices share one position"),
    "DICOM series mixing orientations": (
        lambda t, m: [dicom_series(t / "mixed", phantom((4, 20, 24)), "1.2.826.0.1.3680043.2.1125.9.501", "MIXED",
                                   tags={"0020|0037": "1\\0\\0\\0\\0\\-1"}, only=(2,)), "--model", m], 1,
        "different orientations"),
    "nrrd of its header only": (lambda t, m: [nrrd_header_only(t), "--model", m], 1, "it holds no voxels"),
    "nhdr without its data file": (lambda t, m: [nhdr_without_data(t), "--model", m], 1,
                                   "names a data file that cannot be opened"),
    "zero spacing": (lambda t, m: [nrrd_with(t, b"(0,0,2.5)", b"(0,0,0)"), "--model", m], 1, "voxel size of zero"),
    "singular direction": (lambda t, m: [nrrd_with(t, b"(0,0,2.5)", b"(1,0,0)"), "--model", m], 1, "degenerate"),
    "NIfTI pixdim against sform": (lambda t, m: [nifti_zero_pixdim(t), "--model", m], 1, "contradicts itself"),
    "model file with a flipped bit": (lambda t, m: [case(t), "--model", damaged_model(t, m)], 1,
                                      "fails its CRC check"),
    "model file cut short": (lambda t, m: [case(t), "--model", cut(damaged_model(t, m))], 1, "not a readable"),
    "model giving NaN": (lambda t, m: [case(t), "--model", nan_model(t)], 1, "NaN or infinite"),
    "head CT": (lambda t, m: [write(t / "ct.nii.gz", head_ct(), mni_brain()[1]), "--model", m], 1,
                "looks like a CT"),
    "raw MRI, noise background": (lambda t, m: [write(t / "raw.nii.gz", head(3, "noise"), mni_brain()[1]),
                                                "--model", m], 1, "is not skull-stripped"),
    "skull and scalp on": (lambda t, m: [write(t / "head.nii.gz", head(4), mni_brain()[1]), "--model", m], 1,
                           "skull and scalp seem to be still on"),
    "T1 series for a FLAIR model": (lambda t, m: [t1_series(t), "--model", m], 1, "T1-weighted series"),
    "output is a file": (lambda t, m: [case(t), "--model", m, "-o", _file(t)], 1, "is a file, not a folder"),
    "output under /proc": (lambda t, m: [case(t), "--model", m, "-o", "/proc/cdmsegment-out"], 1,
                           "cannot write outputs to /proc/cdmsegment-out"),
}


def _file(tmp: Path) -> Path:
    (tmp / "taken").write_bytes(b"a file where the output folder should be")
    return tmp / "taken" / "out"


def digests(folder: Path) -> dict:
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("name", FAULTS)
def test_a_fault_is_one_line_no_file_and_inputs_unchanged(name, tmp_path, model_path, capfd):
    """capfd: what ITK writes straight to file descriptor 2 counts too."""
    make, code, words = FAULTS[name]
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    argv = [str(a) for a in make(inputs, model_path)]
    if "-o" not in argv:
        argv += ["-o", str(tmp_path / "out")]
    before = digests(inputs)
    got, out, err = run_cli(["segment", *argv, "--device", "cpu"], capfd)
    assert got == code, err
    assert_one_error_line(err)
    assert words in err, err
    assert out == ""
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    assert digests(inputs) == before


def test_series_chooses_one_of_several(tmp_path, model_path, capsys):
    folder = two_series(tmp_path)
    code, out, err = run_cli(["segment", folder, "-o", tmp_path / "out", "--model", model_path, "--device", "cpu",
                              "--series", "1.2.826.0.1.3680043.2.1125.9.101"], capsys)
    assert code == 0, err
    heatmap = sitk.ReadImage(str(tmp_path / "out" / "study_heatmap.nrrd"))
    assert heatmap.GetSize() == (24, 20, 6)


def test_force_runs_a_clear_mismatch_and_says_so_beside_the_result(tmp_path, model_path, capsys):
    ct = write(tmp_path / "ct.nii.gz", head_ct(), mni_brain()[1])
    code, out, err = run_cli(["segment", ct, "-o", tmp_path / "out", "--model", model_path, "--device", "cpu",
                              "--force"], capsys)
    assert code == 0, err
    assert "warning: FLAIR looks like a CT" in out and "(run anyway, as asked)" in out


def test_a_borderline_image_runs_with_a_warning_and_the_model_sha256(tmp_path, model_path, capsys):
    borderline = write(tmp_path / "big.nii.gz", head(2), mni_brain()[1])  # non-zero part between 2300 and 3000 ml
    code, out, err = run_cli(["segment", borderline, "-o", tmp_path / "out", "--model", model_path, "--device",
                              "cpu"], capsys)
    assert code == 0, err
    assert "does not look skull-stripped" in out and "(run anyway" not in out
    assert f"(SHA256 {hashlib.sha256(model_path.read_bytes()).hexdigest()})" in out


def test_a_skull_stripped_mri_passes_without_a_warning(tmp_path, model_path, capsys):
    brain = write(tmp_path / "brain.nii.gz", *mni_brain())
    # the tiny model stores no threshold: the threshold given, so that only the input's findings could warn
    code, out, err = run_cli(["segment", brain, "-o", tmp_path / "out", "--model", model_path, "--device", "cpu",
                              "--threshold", "otsu"], capsys)
    assert code == 0, err
    assert "warning" not in out + err


def test_an_output_that_appears_during_the_run_is_kept(tmp_path, model_path):
    source = case(tmp_path)
    out = tmp_path / "out"

    def someone_writes(done, total):
        if done == total:
            out.mkdir(exist_ok=True)
            (out / "case_0.seg.nrrd").write_bytes(b"written by someone else meanwhile")

    with pytest.raises(CDMSegmentError, match="appeared while this run was writing and was kept"):
        segment_files([source], out, model=model_path, device="cpu", progress=someone_writes, log=lambda m: None)
    assert [p.name for p in out.iterdir()] == ["case_0.seg.nrrd"]
    assert (out / "case_0.seg.nrrd").read_bytes() == b"written by someone else meanwhile"


def test_two_runs_into_one_folder_use_different_temporary_names(tmp_path):
    target = [tmp_path / "case_0_heatmap.nrrd"]
    with pytest.raises(KeyboardInterrupt):
        with atomic_outputs(target) as first, atomic_outputs(target) as second:
            assert first[0] != second[0] and first[0].name.endswith("case_0_heatmap.nrrd")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_output_folder_is_refused_before_the_run(tmp_path, model_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o500)
    code, _, err = run_cli(["segment", case(tmp_path), "-o", out, "--model", model_path, "--device", "cpu"], capsys)
    assert code == 1 and "choose a folder you can write to" in err
    assert_one_error_line(err)


def _cli(model_path, source, out, device="cpu", options=(), **popen):
    env = {**os.environ, "PYTHONPATH": str(PACKAGE_DIR), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "CDMSegmentLib.cli.main", "segment", str(source), "-o", str(out),
                             "--model", str(model_path), "--device", device, *options], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, **popen)


def test_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, model_path):
    """RLIMIT_FSIZE makes every write past 16 KiB fail with EFBIG, as a full disk does with ENOSPC."""
    noise = np.random.default_rng(0).integers(0, 1000, (6, 100, 120)).astype(np.int16)  # a heatmap that stays big
    source = write_case(tmp_path / "case_0.nii.gz", noise)

    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 14, 1 << 14))

    # --engine torch: the limit also stops ONNX Runtime's graph from being cached, and the run saying that it
    # stays on torch is a line of its own (test_engine.py); here only the outputs meet the full disk
    run = _cli(model_path.parent / "plain.pt", source, tmp_path / "out", options=("--engine", "torch"),
               preexec_fn=small_files)
    _, err = run.communicate(timeout=300)
    assert run.returncode == 1, err
    assert_one_error_line(err)
    assert "free some disk space" in err
    assert not any((tmp_path / "out").iterdir())


def test_sigterm_during_a_run_cleans_up_like_sigint(tmp_path, model_path):
    array, spacing = mni_brain()
    source = write(tmp_path / "brain.nii.gz", np.concatenate([array] * 8), spacing)  # long enough to be stopped
    run = _cli(model_path.parent / "plain.pt", source, tmp_path / "out", device="auto")  # no expects: no refusal
    first = run.stderr.readline()  # 'device: ...', said as the run starts
    assert first.startswith("device:"), first
    time.sleep(0.5)
    run.send_signal(signal.SIGTERM)
    _, err = run.communicate(timeout=120)
    assert run.returncode == 128 + signal.SIGTERM, first + err
    assert err.strip().splitlines() == ["cdmsegment segment: terminated; no partial output was kept"]
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_help_and_info_say_what_the_model_takes(model_path, capsys):
    code, out, _ = run_cli(["segment", "--help"], capsys)
    assert code == 0 and "skull-stripped brain MRI (FLAIR)" in " ".join(out.split()).replace("- ", "-")  # wrapped
    code, out, _ = run_cli(["info", model_path], capsys)
    assert code == 0 and "  takes          skull-stripped brain MRI (FLAIR)" in out.splitlines()

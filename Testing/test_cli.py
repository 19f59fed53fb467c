"""``cdmsegment`` end to end: the files a good run writes, and one line and no file for every bad input."""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import slicerio

from CDMSegmentLib.cli.main import build_parser, main
from CDMSegmentLib.core.modelfile import load_model, save_model, sha256_of
from CDMSegmentLib.core.registry import REGISTRY_FILE
from conftest import phantom

PACKAGE_DIR = Path(__file__).resolve().parent.parent / "CDMSegment"
SPACING = (1.0, 1.2, 2.5)
ORIGIN = (3.0, -4.0, 5.0)
DIRECTION = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)  # RAS-aligned axes, as many scanners write


def write_case(path: Path, array: np.ndarray, is_vector: bool = False) -> Path:
    image = sitk.GetImageFromArray(array, isVector=is_vector)
    if image.GetDimension() == 3:
        image.SetSpacing(SPACING)
        image.SetOrigin(ORIGIN)
        image.SetDirection(DIRECTION)
    sitk.WriteImage(image, str(path))
    return path


def run_cli(argv, capsys):
    """-> (exit code, stdout, stderr) of the command run in this process."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse usage errors
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def segment_args(inputs, out_dir, model, *extra):
    return [str(a) for a in ["segment", *inputs, "-o", out_dir, "--model", model, "--device", "cpu", *extra]]


def assert_one_error_line(err: str) -> None:
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("cdmsegment ") and "error:" in lines[0]
    assert "Traceback" not in err


def segment_and_read_heatmap(inputs, out_dir, model, capsys, stem, size, direction):
    """Run a segmentation that must succeed: -> (stdout, heatmap image), checked to lie on the input grid."""
    code, out, err = run_cli(segment_args(inputs, out_dir, model), capsys)
    assert code == 0, err
    assert sorted(p.name for p in out_dir.iterdir()) == [f"{stem}.seg.nrrd", f"{stem}_heatmap.nrrd"]
    heatmap = sitk.ReadImage(str(out_dir / f"{stem}_heatmap.nrrd"))
    assert heatmap.GetPixelID() == sitk.sitkFloat32 and heatmap.GetSize() == size
    np.testing.assert_allclose(heatmap.GetSpacing(), SPACING, atol=1e-3)
    np.testing.assert_allclose(heatmap.GetOrigin(), ORIGIN, atol=1e-3)
    np.testing.assert_allclose(heatmap.GetDirection(), direction, atol=1e-6)
    return out, heatmap


def test_a_good_run_writes_a_heatmap_and_a_segmentation_on_the_input_grid(tmp_path, tiny_model_path, capsys):
    array = phantom((6, 20, 24))
    case = write_case(tmp_path / "case_0.nii.gz", array)
    out_dir = tmp_path / "out"
    out, heatmap = segment_and_read_heatmap([case], out_dir, tiny_model_path, capsys, "case_0", (24, 20, 6),
                                            DIRECTION)
    summary = out.splitlines()
    assert len(summary) == 1 and summary[0].startswith("6 of 6 slices run, ")
    assert str(out_dir / "case_0.seg.nrrd") in summary[0]
    values = sitk.GetArrayFromImage(heatmap)
    assert values.min() >= 0 and values.max() > 0
    assert (values[array == 0] == 0).all()

    seg = slicerio.read_segmentation(str(out_dir / "case_0.seg.nrrd"))
    assert len(seg["segments"]) == 1
    segment = seg["segments"][0]
    assert segment["name"] == "Tumour" and segment["labelValue"] == 1
    assert len(segment["color"]) == 3 and 0 < sum(segment["color"]) <= 3
    assert segment["terminology"]["type"][2] == "Neoplasm"
    ijk_to_lps = np.eye(4)
    ijk_to_lps[:3, :3] = np.array(DIRECTION).reshape(3, 3) @ np.diag(SPACING)
    ijk_to_lps[:3, 3] = ORIGIN
    np.testing.assert_allclose(seg["ijkToLPS"], ijk_to_lps, atol=1e-6)
    labels = np.asarray(seg["voxels"])
    # slicerio may crop the labelmap to its extent; the written one spans the whole grid.
    assert labels.shape in ((24, 20, 6), (6, 20, 24))
    assert set(np.unique(labels)) <= {0, 1} and labels.sum() > 0


def write_dicom_series(folder: Path, array: np.ndarray) -> Path:
    """One MR file per slice with position, orientation and spacing tags, as a scanner writes them."""
    folder.mkdir()
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(SPACING)
    image.SetOrigin(ORIGIN)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(image.GetDepth()):
        s = image[:, :, k]
        position = image.TransformIndexToPhysicalPoint((0, 0, k))
        for tag, value in {"0008|0060": "MR", "0020|000d": "1.2.826.0.1.3680043.2.1125.1",
                           "0020|000e": "1.2.826.0.1.3680043.2.1125.1.2", "0020|0013": str(k + 1),
                           "0020|0032": "\\".join(f"{c:.4f}" for c in position),
                           "0020|0037": "1\\0\\0\\0\\1\\0", "0018|0050": f"{SPACING[2]}",
                           "0008|0018": f"1.2.826.0.1.3680043.2.1125.1.2.{k + 1}"}.items():
            s.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{k:03d}.dcm"))
        writer.Execute(s)
    return folder


def test_a_dicom_series_folder_is_read_as_one_volume_and_named_after_the_folder(tmp_path, tiny_model_path, capsys):
    array = phantom((5, 20, 24))
    series = write_dicom_series(tmp_path / "flair_series", array)
    _, heatmap = segment_and_read_heatmap([series], tmp_path / "out", tiny_model_path, capsys, "flair_series",
                                          (24, 20, 5), np.eye(3).ravel())
    values = sitk.GetArrayFromImage(heatmap)
    assert values.max() > 0 and (values[array == 0] == 0).all()


def bad_2d(tmp):
    return [write_case(tmp / "slice.nii.gz", phantom((1, 20, 24))[0])]


def bad_rgb(tmp):
    return [write_case(tmp / "rgb.nrrd", np.repeat(phantom((4, 20, 24))[..., None], 3, axis=-1), is_vector=True)]


def bad_4d(tmp):
    return [write_case(tmp / "series.nii.gz", np.stack([phantom((4, 20, 24))] * 2))]


def bad_two_inputs(tmp):
    return [write_case(tmp / "a.nii.gz", phantom((4, 20, 24))), write_case(tmp / "b.nii.gz", phantom((4, 20, 24)))]


def bad_random_bytes(tmp):
    path = tmp / "noise.nii.gz"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    return [path]


def bad_all_zero(tmp):
    return [write_case(tmp / "zeros.nii.gz", np.zeros((4, 20, 24), np.int16))]


def bad_nan(tmp):
    array = phantom((4, 20, 24)).astype(np.float32)
    array[2, 10, 12] = np.nan
    return [write_case(tmp / "nan.nrrd", array)]  # ITK's NIfTI IO turns NaN into 0; NRRD keeps it


BAD_INPUTS = {"2d": (bad_2d, "3D"), "rgb": (bad_rgb, "components"), "4d": (bad_4d, "3D"),
              "two-inputs": (bad_two_inputs, "FLAIR"), "random-bytes": (bad_random_bytes, "cannot read"),
              "all-zero": (bad_all_zero, "all zeros"), "nan": (bad_nan, "NaN")}


@pytest.mark.parametrize("name", BAD_INPUTS)
def test_a_bad_input_exits_with_one_line_and_writes_nothing(name, tmp_path, tiny_model_path, capsys):
    make, expected = BAD_INPUTS[name]
    inputs = make(tmp_path)
    out_dir = tmp_path / "out"
    code, out, err = run_cli(segment_args(inputs, out_dir, tiny_model_path), capsys)
    assert code == 1
    assert_one_error_line(err)
    assert expected in err
    assert out == ""
    assert not out_dir.exists() or not any(out_dir.iterdir())


def test_a_missing_model_exits_with_one_line_and_writes_nothing(tmp_path, capsys):
    case = write_case(tmp_path / "case_0.nii.gz", phantom((4, 20, 24)))
    code, _, err = run_cli(segment_args([case], tmp_path / "out", tmp_path / "missing.pt"), capsys)
    assert code == 1
    assert_one_error_line(err)
    assert "missing.pt" in err and "not found" in err
    assert not (tmp_path / "out").exists()


def test_a_non_numeric_threshold_is_a_one_line_usage_error(tmp_path, tiny_model_path, capsys):
    case = write_case(tmp_path / "case_0.nii.gz", phantom((4, 20, 24)))
    code, _, err = run_cli(segment_args([case], tmp_path / "out", tiny_model_path, "--threshold", "banana"), capsys)
    assert code == 2
    assert_one_error_line(err)
    assert "'banana'" in err
    assert not (tmp_path / "out").exists()


def test_existing_outputs_are_kept_without_overwrite(tmp_path, tiny_model_path, capsys):
    case = write_case(tmp_path / "case_0.nii.gz", phantom((4, 20, 24)))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "case_0.seg.nrrd").write_bytes(b"the user's edited segmentation")
    code, _, err = run_cli(segment_args([case], out_dir, tiny_model_path), capsys)
    assert code == 1
    assert_one_error_line(err)
    assert "--overwrite" in err
    assert [p.name for p in out_dir.iterdir()] == ["case_0.seg.nrrd"]
    assert (out_dir / "case_0.seg.nrrd").read_bytes() == b"the user's edited segmentation"
    assert f"{out_dir / 'case_0.seg.nrrd'} already exists; choose another output folder or pass --overwrite" in err
    (out_dir / "case_0_heatmap.nrrd").write_bytes(b"an earlier heatmap")
    code, _, err = run_cli(segment_args([case], out_dir, tiny_model_path), capsys)
    assert code == 1
    assert_one_error_line(err)
    assert (f"{out_dir / 'case_0_heatmap.nrrd'} and {out_dir / 'case_0.seg.nrrd'} already exist; choose another "
            "output folder or pass --overwrite") in err  # every file that would be replaced, not the first alone
    assert (out_dir / "case_0.seg.nrrd").read_bytes() == b"the user's edited segmentation"


def test_every_option_of_every_command_says_what_it_does():
    """--help of each command documents each of its arguments (argparse's own -h aside), in words that render."""
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert {"segment", "info", "segment-cohort", "train", "evaluate"} <= set(commands)
    missing = []
    for name, command in commands.items():
        command.format_help()  # a %-placeholder that does not fill in raises here
        for action in command._actions:
            if not isinstance(action, argparse._HelpAction) and not (action.help or "").strip():
                missing.append(f"{name} {'/'.join(action.option_strings) or action.dest}")
    assert missing == []


def test_info_prints_a_short_summary_of_the_model(tiny_model_path, tmp_path, capsys):
    tiny = load_model(tiny_model_path)
    metadata = {**tiny.metadata, "ood": {"threshold": 2.5, "mean": [0.0], "covariance": [[1.0]]},
                "intended_use": "Research use only.",
                "expects": {"description": "skull-stripped brain MRI (FLAIR)"},
                "defaults": {**tiny.defaults, "batch_size": {"cpu": 4, "cuda": 64}, "min_component_ml": 0.25,
                             "calibration": {"data": "held-out phantoms"}}}
    path = tmp_path / "my models" / "model.pt"  # a space: the path is neither wrapped nor split in the command
    path.parent.mkdir()
    save_model(tiny.network, metadata, path)
    code, out, _ = run_cli(["info", path], capsys)
    lines = out.splitlines()
    assert code == 0 and len(lines) < 30
    rows = []  # the lines, with each long row's wrapped continuation (indented under its text) joined back
    for line in lines:
        if line.startswith(" " * 17):
            rows[-1] += " " + line.strip()
        else:
            rows.append(line)
    assert rows == [
        "tiny-test 0: diffusion model",
        f"  file           {path}",
        f"  SHA256         {sha256_of(path)}",
        "  takes          skull-stripped brain MRI (FLAIR)",
        "  modalities     FLAIR",
        "  classes        0 normal, 1 tumour",
        "  image size     32 x 32 px slices",
        "  schedule       linear, T = 1000",
        "  defaults       noise level 0.9, steps 2, tau 0, noise draws 1, min component 0.25 ml, batch size cpu 4, "
        "cuda 64",
        "  OOD threshold  2.5: warns above it, refuses above 3.75 unless --force",
        "  CPU engine     ONNX Runtime (what --engine auto uses on a CPU)",
        "  trained on     none (test fixture)",
        "  intended use   Research use only.",
        f"All its metadata: cdmsegment info '{path}' --json"]


def test_info_gives_the_noise_band_a_model_was_trained_on(tiny_model_path, tmp_path, capsys):
    tiny = load_model(tiny_model_path)
    path = tmp_path / "band.pt"
    save_model(tiny.network, {**tiny.metadata, "t_range": [40, 599]}, path)
    code, out, _ = run_cli(["info", path], capsys)
    schedule = load_model(path).schedule()
    expected = (f"trained on timesteps 40..599 (alpha_bar {float(schedule.alpha_bar(40)):.2f} to "
                f"{float(schedule.alpha_bar(599)):.2f})")
    assert code == 0 and expected in " ".join(out.split())
    code, out, _ = run_cli(["info", tiny_model_path], capsys)
    assert "trained on timesteps" not in out


def test_info_says_when_cpu_runs_would_go_faster_with_onnxruntime(tiny_model_path, capsys, monkeypatch):
    from CDMSegmentLib.core import engine

    monkeypatch.setattr(engine.importlib.util, "find_spec", lambda name: None)
    code, out, _ = run_cli(["info", tiny_model_path], capsys)
    assert code == 0
    assert "  CPU engine     torch; pip install onnx onnxruntime makes CPU runs about 1.3x faster" in out.splitlines()


def test_info_on_a_registered_classifier_or_a_classifier_file_needs_no_kind(capsys):
    code, out, err = run_cli(["info", "brain-flair-phantom-classifier"], capsys)
    assert code == 0, err
    assert out.startswith("brain-flair-phantom-classifier ") and "--kind classifier --json" not in out
    path = str(REGISTRY_FILE.parent / "brain-flair-phantom-classifier.pt")
    code, out, err = run_cli(["info", path, "--json"], capsys)
    assert code == 0 and json.loads(out)["kind"] == "classifier"


def test_a_series_uid_for_an_input_that_is_not_a_folder_is_refused(tmp_path, tiny_model_path, capsys):
    case = write_case(tmp_path / "case_0.nii.gz", phantom((3, 20, 24)))
    code, _, err = run_cli(segment_args([case], tmp_path / "out", tiny_model_path, "--series", "1.2.3"), capsys)
    assert code == 1 and "--series chooses among the series of a DICOM folder, but no input is a folder" in err
    assert_one_error_line(err)
    assert not (tmp_path / "out").exists()


def test_the_default_classifier_is_the_default_models_own(capsys):
    code, out, err = run_cli(["info", "--kind", "classifier"], capsys)
    assert code == 0 and out.startswith("brain-flair-cpu-classifier 1: classifier model"), err
    code, out, err = run_cli(["info", "--kind", "classifier", "--json"], capsys)
    assert json.loads(out)["image_size"] == load_model().image_size


def test_an_unknown_model_lists_the_registered_models_of_its_kind_only(capsys):
    code, _, err = run_cli(["info", "brain-flair-nonexistent"], capsys)
    registered = err.split("(registered: ")[1]
    assert code == 1 and "brain-flair-phantom" in registered and "classifier" not in registered


def test_info_json_prints_the_models_whole_metadata_alone(tiny_model_path, capsys):
    code, out, _ = run_cli(["info", tiny_model_path, "--json"], capsys)
    assert code == 0
    assert json.loads(out) == load_model(tiny_model_path).metadata


@pytest.mark.parametrize("extra, code", [((), 1), (("--threshold", "banana"), 2)])
def test_as_a_process_an_error_is_one_stderr_line_without_traceback(extra, code, tmp_path, tiny_model_path):
    case = write_case(tmp_path / "zeros.nii.gz", np.zeros((4, 20, 24), np.int16))
    env = {**os.environ, "PYTHONPATH": str(PACKAGE_DIR), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "CDMSegmentLib.cli.main",
                             *segment_args([case], tmp_path / "out", tiny_model_path, *extra)],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == code
    assert_one_error_line(result.stderr)
    assert not (tmp_path / "out").exists()


def test_set_defaults_writes_a_new_model_file_with_the_measured_defaults(tmp_path, tiny_model_path, capsys):
    (tmp_path / "defaults.json").write_text(json.dumps({"steps": 3, "threshold": 0.25}))
    code, out, err = run_cli(["set-defaults", tiny_model_path, tmp_path / "defaults.json", "-o", tmp_path / "new.pt"],
                             capsys)
    assert code == 0 and "sha256" in out
    assert "note:" not in err  # a model of one's own, not a registered one: its defaults are calibrated in place
    code, out, _ = run_cli(["info", tmp_path / "new.pt", "--json"], capsys)
    defaults = json.loads(out)["defaults"]
    assert defaults["steps"] == 3 and defaults["threshold"] == 0.25
    assert defaults["noise_level"] == 0.9  # the defaults not given are kept
    assert json.loads(out)["version"] != "3"
    code, out, err = run_cli(["set-defaults", tmp_path / "new.pt", "--version", "3", "-o", tmp_path / "v3.pt"], capsys)
    assert code == 0 and "note:" not in err
    code, out, _ = run_cli(["info", tmp_path / "v3.pt", "--json"], capsys)
    assert json.loads(out)["version"] == "3" and json.loads(out)["defaults"] == defaults  # nothing else changed


def test_set_defaults_on_a_registered_model_says_when_new_defaults_keep_its_version(tmp_path, capsys):
    (tmp_path / "defaults.json").write_text(json.dumps({"threshold": 0.0003}))
    code, out, err = run_cli(["set-defaults", "brain-flair-cpu", tmp_path / "defaults.json", "-o", tmp_path / "a.pt"],
                             capsys)
    version = load_model("brain-flair-cpu").metadata["version"]
    assert code == 0 and f"note: the defaults threshold changed and the file keeps version {version}; give --version" in err
    code, out, err = run_cli(["set-defaults", "brain-flair-cpu", tmp_path / "defaults.json", "--version", "9", "-o",
                              tmp_path / "b.pt"], capsys)
    assert code == 0 and "note:" not in err


@pytest.mark.parametrize("content", ["not json", "[1, 2]"])
def test_set_defaults_refuses_bad_defaults_with_one_line_and_no_file(content, tmp_path, tiny_model_path, capsys):
    (tmp_path / "defaults.json").write_text(content)
    code, _, err = run_cli(["set-defaults", tiny_model_path, tmp_path / "defaults.json", "-o", tmp_path / "new.pt"],
                           capsys)
    assert code == 1
    assert_one_error_line(err)
    assert not (tmp_path / "new.pt").exists()


@pytest.mark.parametrize("defaults, line", [
    ({"strong_finding_ml": -1}, "metadata field 'defaults.strong_finding_ml' must be"),
    ({"strong_finding_ml": 0.5, "strong_finding_peak": 0}, "without a strong_finding_peak above 0"),
    ({"small_lesion_ml": 0.5, "small_lesion_floor": 2.0, "small_lesion_peak": 0}, "threshold; here 0)"),
    ({"small_lesion_ml": 0.5, "small_lesion_floor": 0.5, "small_lesion_peak": 0.2}, "median intensity; here 0.5)")])
def test_set_defaults_refuses_out_of_range_or_disagreeing_defaults_before_writing(defaults, line, tmp_path,
                                                                                  tiny_model_path, capsys):
    (tmp_path / "defaults.json").write_text(json.dumps(defaults))
    code, _, err = run_cli(["set-defaults", tiny_model_path, tmp_path / "defaults.json", "-o", tmp_path / "new.pt"],
                           capsys)
    assert code == 1 and line in err and "damaged" not in err
    assert_one_error_line(err)
    assert not (tmp_path / "new.pt").exists() and not list(tmp_path.glob("new.pt*"))


def test_cgcdm_with_the_bundled_model_is_guided_by_its_registered_classifier(tmp_path, capsys):
    # Bright blobs, not a brain: the bundled model's own OOD score refuses them unless forced.
    case = write_case(tmp_path / "case_0.nii.gz", phantom((3, 40, 48)))
    guided = tmp_path / "guided"
    code, out, err = run_cli(["segment", case, "-o", guided, "--device", "cpu", "--method", "cg-cdm", "--force"],
                             capsys)
    assert code == 0, err
    code, _, err = run_cli(["segment", case, "-o", tmp_path / "plain", "--device", "cpu", "--force"], capsys)
    assert code == 0, err
    heatmaps = [sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / d / "case_0_heatmap.nrrd")))
                for d in ("guided", "plain")]
    assert heatmaps[0].shape == (3, 40, 48)
    assert np.abs(heatmaps[0] - heatmaps[1]).max() > 1e-3 * heatmaps[1].max()  # the classifier guided it
    model, classifier = load_model(), load_model("brain-flair-cpu-classifier", kind="classifier")
    assert (f" by cg-cdm with model brain-flair-cpu {model.metadata['version']} (SHA256 {model.sha256}) and classifier "
            f"brain-flair-cpu-classifier 1 (SHA256 {classifier.sha256}, guidance scale "
            f"{classifier.defaults['guidance_scale']:g}) at threshold ") in out
    header = sitk.ReadImage(str(guided / "case_0.seg.nrrd"))
    assert header.GetMetaData("CDMSegment_Method") == "cg-cdm"
    assert header.GetMetaData("CDMSegment_Classifier") == f"brain-flair-cpu-classifier {classifier.metadata['version']}"
    assert header.GetMetaData("CDMSegment_ClassifierSHA256") == classifier.sha256
    # CG-CDM runs where its classifier's scale and threshold were measured; plain CDM where the model's threshold was
    measured_at = classifier.defaults["calibration"]["cdm_settings"]
    guided_settings = json.loads(header.GetMetaData("CDMSegment_Settings"))
    plain_settings = json.loads(sitk.ReadImage(str(tmp_path / "plain" / "case_0.seg.nrrd")).GetMetaData(
        "CDMSegment_Settings"))
    assert {k: guided_settings[k] for k in measured_at} == measured_at
    assert plain_settings["noise_level"] == model.defaults["noise_level"] != measured_at["noise_level"]
    # each records what it used: the guidance scale only where the classifier guided
    assert guided_settings["guidance_scale"] == classifier.defaults["guidance_scale"]
    assert "guidance_scale" not in plain_settings and plain_settings["noise_draws"] == model.defaults["noise_draws"]


def test_a_classifier_made_for_other_slices_than_the_models_is_refused(tmp_path, capsys):
    case = write_case(tmp_path / "case_0.nii.gz", phantom((3, 40, 48)))
    code, _, err = run_cli(["segment", case, "-o", tmp_path / "out", "--device", "cpu", "--method", "cg-cdm",
                            "--classifier", "brain-flair-phantom-classifier", "--force"], capsys)
    assert code == 1
    assert_one_error_line(err)
    assert ("classifier brain-flair-phantom-classifier was made for 128 px slices, model brain-flair-cpu for 96; "
            "give a classifier trained on the model's slices (its own: brain-flair-cpu-classifier)") in err
    assert not (tmp_path / "out").exists()


def test_cgcdm_without_a_registered_or_given_classifier_is_one_line(tmp_path, tiny_model_path, capsys):
    case = write_case(tmp_path / "case_0.nii.gz", phantom((3, 20, 24)))
    code, _, err = run_cli(segment_args([case], tmp_path / "out", tiny_model_path, "--method", "cg-cdm"), capsys)
    assert code == 1 and "needs a noise-aware classifier" in err
    assert_one_error_line(err)
    assert not (tmp_path / "out").exists()


def test_the_summary_says_when_the_lesion_was_delineated_by_its_intensity(tmp_path, capsys):
    from conftest import make_tiny_model_file

    model = tmp_path / "refining.pt"
    make_tiny_model_file(model, defaults={"noise_level": 0.9, "steps": 1, "tau": 0.0, "noise_draws": 1,
                                          "lesion_intensity": 0.7, "lesion_intensity_floor": 1.2})
    case = write_case(tmp_path / "case_0.nii.gz", phantom((3, 20, 24)))
    said = "; the CDM's mask delineated by the lesion's intensity)"
    code, out, err = run_cli(segment_args([case], tmp_path / "out", model, "--threshold", "otsu", "--force"), capsys)
    assert code == 0 and said in out, err
    code, out, err = run_cli(segment_args([case], tmp_path / "off", model, "--threshold", "otsu", "--force",
                                          "--lesion-intensity", "0"), capsys)
    assert code == 0 and said not in out and "voxels segmented (" in out, err


def test_the_summary_says_when_the_heatmap_supports_bright_regions_under_its_threshold(tmp_path, capsys):
    """A threshold above the heatmap's maximum leaves the CDM's mask empty; the bright regions whose mean heatmap
    is high enough still make a mask, and the summary says so instead of 'no voxel reached the threshold'."""
    from conftest import make_tiny_model_file

    model = tmp_path / "supporting.pt"
    make_tiny_model_file(model, defaults={"noise_level": 0.9, "steps": 1, "tau": 0.0, "noise_draws": 1,
                                          "lesion_intensity": 0.7, "lesion_intensity_floor": 1.2,
                                          "heatmap_floor": 1.0, "heatmap_support": 1e-3})
    case = write_case(tmp_path / "case_0.nii.gz", phantom((3, 20, 24)))
    code, out, err = run_cli(segment_args([case], tmp_path / "out", model, "--threshold", "otsu", "--force"), capsys)
    assert code == 0, err
    heatmap = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / "case_0_heatmap.nrrd")))
    above = f"{2 * heatmap.max():.6g}"
    code, out, err = run_cli(segment_args([case], tmp_path / "above", model, "--threshold", above, "--force"), capsys)
    assert code == 0, err
    segmented = int(out.split(" voxels segmented")[0].split()[-1])
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "above" / "case_0.seg.nrrd")))
    assert segmented > 0 and int((mask > 0).sum()) == segmented
    assert "; the CDM's mask delineated by the lesion's intensity, with the bright regions its heatmap supports)" in out
    assert "no voxel of the heatmap reached" not in out
    refinement = json.loads(sitk.ReadImage(str(tmp_path / "above" / "case_0.seg.nrrd")).GetMetaData(
        "CDMSegment_Refinement"))
    assert refinement["heatmap_support"] == 1e-3 and refinement["heatmap_floor"] == 1.0
    # a support no component reaches: on, but it added nothing, and the summary does not claim it did
    unreached = tmp_path / "unreached.pt"
    make_tiny_model_file(unreached, defaults={"noise_level": 0.9, "steps": 1, "tau": 0.0, "noise_draws": 1,
                                              "lesion_intensity": 0.7, "lesion_intensity_floor": 1.2,
                                              "heatmap_floor": 1.0, "heatmap_support": 1e6})
    code, out, err = run_cli(segment_args([case], tmp_path / "unreached", unreached, "--threshold", "otsu", "--force"),
                             capsys)
    assert code == 0 and "; the CDM's mask delineated by the lesion's intensity)" in out, err
    assert "heatmap supports" not in out


def test_the_summary_gives_the_threshold_and_says_when_no_voxel_reached_it(tmp_path, capsys):
    from conftest import make_tiny_model_file

    model = tmp_path / "refining.pt"
    make_tiny_model_file(model, defaults={"noise_level": 0.9, "steps": 1, "tau": 0.0, "noise_draws": 1,
                                          "lesion_intensity": 0.7, "lesion_intensity_floor": 1.2})
    case = write_case(tmp_path / "case_0.nii.gz", phantom((3, 20, 24)))
    code, out, err = run_cli(segment_args([case], tmp_path / "out", model, "--threshold", "otsu", "--force"), capsys)
    assert code == 0, err
    heatmap = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / "case_0_heatmap.nrrd")))
    shown = float(out.split(" at threshold ")[1].split(":")[0])
    assert 0 < shown < heatmap.max()  # Otsu's level on this heatmap, as the summary gives it
    # the files' headers say how they were made, the threshold to full precision
    for name in ("case_0_heatmap.nrrd", "case_0.seg.nrrd"):
        header = sitk.ReadImage(str(tmp_path / "out" / name))
        field = lambda key: header.GetMetaData("CDMSegment_" + key)  # noqa: E731
        assert field("ModelSHA256") == sha256_of(model) and field("Method") == "cdm" and field("Seed") == "0"
        assert f"{float(field('Threshold')):.3g}" == f"{shown:.3g}"
        assert json.loads(field("Settings"))["noise_level"] == 0.9
        assert json.loads(field("Refinement"))["lesion_intensity"] == 0.7
        assert not header.HasMetaDataKey("CDMSegment_Classifier")
    above = f"{2 * heatmap.max():.6g}"
    code, out, err = run_cli(segment_args([case], tmp_path / "above", model, "--threshold", above, "--force"), capsys)
    assert code == 0, err
    assert f"0 voxels segmented (0.0 ml; no voxel of the heatmap reached the threshold {float(above):.3g} " \
           f"(its maximum: {heatmap.max():.3g})), " in out
    assert "delineated" not in out
    # reached, but every component smaller than the speck removal: the summary says what removed it
    code, out, err = run_cli(segment_args([case], tmp_path / "specks", model, "--threshold", "otsu", "--force",
                                          "--min-component-ml", "1e6"), capsys)
    assert code == 0, err
    assert "0 voxels segmented (0.0 ml; the heatmap reached the threshold, but nothing was left after the removal " \
           "of components under " in out and "voxels (--min-component-ml) and the lesion-intensity refinement)" in out
    # a model whose smallest finding kept is larger than anything found: the summary names that rule too
    huge = tmp_path / "huge.pt"
    make_tiny_model_file(huge, defaults={"noise_level": 0.9, "steps": 1, "tau": 0.0, "noise_draws": 1,
                                         "lesion_intensity": 0.7, "lesion_intensity_floor": 1.2, "min_finding_ml": 1e6})
    code, out, err = run_cli(segment_args([case], tmp_path / "huge", huge, "--threshold", "otsu", "--force"), capsys)
    assert code == 0, err
    assert "0 voxels segmented" in out and "then of the findings under " in out and "(the model's min_finding_ml)" in out

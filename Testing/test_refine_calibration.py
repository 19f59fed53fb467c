"""Choosing the lesion-intensity refinement on validation volumes (evaluation/refine_calibration.py)."""

import json

import numpy as np
import pytest

from CDMSegmentLib.cli.main import main
from CDMSegmentLib.evaluation.refine_calibration import GRID, RefinementRun, choose_refinement, score_refinement

from conftest import make_tiny_model_file, randomised_cases_and_tiny_model


def run_with(lesion_value: float, cdm_false_spot: bool = False) -> RefinementRun:
    """Brain at 100 with a bright normal rim at 160; a 4x6x6 lesion at ``lesion_value`` (none when 0) whose
    middle the CDM found; with ``cdm_false_spot`` the CDM also fires on one voxel of the rim."""
    image = np.zeros((10, 24, 24), np.float32)
    image[1:9, 2:22, 2:22] = 100
    image[1:9, 19:21, 2:22] = 160
    truth = np.zeros(image.shape, bool)
    mask = np.zeros(image.shape, bool)
    if lesion_value:
        truth[3:7, 4:10, 4:10] = True
        image[truth] = lesion_value
        mask[4:6, 5:9, 5:9] = True
    if cdm_false_spot:
        mask[4, 19, 10] = True
    return RefinementRun(mask, image, image > 0, truth, 0.001)


def test_the_choice_delineates_faint_and_bright_lesions_and_keeps_the_rim_out():
    runs = [run_with(140.0), run_with(250.0), run_with(0.0, cdm_false_spot=True)]
    best, scores = choose_refinement(runs, max_fp_ml=0.0)
    assert len(scores) == np.prod([len(v) for v in GRID.values()])
    assert best.mean_dice == pytest.approx(1.0) and best.false_positive_ml == 0.0
    # the rim (1.6 x the median) joins wherever the floor lets a one-voxel touch count
    assert score_refinement(runs, {"lesion_intensity": 0.6, "lesion_intensity_floor": 1.2,
                                   "lesion_support": 0.0}).false_positive_ml == pytest.approx(0.32)
    assert best.settings["lesion_support"] > 0 or best.settings["lesion_intensity_floor"] >= 1.6


def test_without_a_lesion_volume_there_is_nothing_to_choose_on():
    with pytest.raises(ValueError, match="none has a lesion"):
        choose_refinement([run_with(0.0)])


def test_without_a_lesion_free_volume_the_false_positive_limit_cannot_be_checked():
    with pytest.raises(ValueError, match="all 2 have a lesion; add lesion-free cases"):
        choose_refinement([run_with(140.0), run_with(250.0)])


def test_calibrate_refinement_writes_the_models_defaults_with_the_choice(tmp_path, capsys):
    data, model = randomised_cases_and_tiny_model(tmp_path, 2, 5)
    out = tmp_path / "defaults.json"
    code = main(["calibrate-refinement", str(model), str(data), "-o", str(out), "--per-family", "1", "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    written = json.loads(out.read_text())
    for name, values in GRID.items():
        assert written[name] in values
    assert written["refinement_calibration"]["volumes"] == 2
    code = main(["set-defaults", str(model), str(out), "-o", str(tmp_path / "refined.pt")])
    assert code == 0, capsys.readouterr().err


def brats_case(folder, name: str, lesion: bool) -> None:
    """One case in the BraTS layout, no cases.csv: a bright box in a brain, masked when ``lesion``."""
    import SimpleITK as sitk

    run = run_with(250.0 if lesion else 0.0)
    (folder / name).mkdir(parents=True)
    sitk.WriteImage(sitk.GetImageFromArray(run.image), str(folder / name / f"{name}_flair.nii.gz"))
    sitk.WriteImage(sitk.GetImageFromArray(run.truth.astype(np.uint8)), str(folder / name / f"{name}_seg.nii.gz"))


def test_calibrate_refinement_refuses_a_set_without_lesion_free_volumes_before_any_run(tmp_path, capsys):
    data = tmp_path / "val"
    for n in range(2):
        brats_case(data, f"case_{n}", lesion=True)
    model = tmp_path / "tiny.pt"
    make_tiny_model_file(model, modalities=("flair",))
    code = main(["calibrate-refinement", str(model), str(data), "-o", str(tmp_path / "r.json"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 1 and "no cases.csv" in err and "all 2 have a lesion; add lesion-free cases" in err
    assert "CDM run" not in err and not (tmp_path / "r.json").exists()


def test_calibrate_refinement_refuses_an_output_path_through_a_file_before_any_run(tmp_path, capsys):
    data = tmp_path / "val"
    brats_case(data, "case_0", lesion=True)
    brats_case(data, "case_1", lesion=False)
    (tmp_path / "notes.txt").write_text("a file\n")
    model = tmp_path / "tiny.pt"
    make_tiny_model_file(model, modalities=("flair",))
    code = main(["calibrate-refinement", str(model), str(data), "-o", str(tmp_path / "notes.txt" / "sub" / "r.json"),
                 "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 1 and "notes.txt is a file, not a folder; choose another output path" in err
    assert "CDM run" not in err
    # a folder that does not exist yet is made, as segment makes its output folder
    out = tmp_path / "new" / "sub" / "r.json"
    assert main(["calibrate-refinement", str(model), str(data), "-o", str(out), "--device", "cpu"]) == 0
    written = json.loads(out.read_text())
    assert written["refinement_calibration"]["volumes"] == 2 and not list(out.parent.glob(".*partial*"))

"""Choosing the lesion-intensity refinement on validation volumes (evaluation/refine_calibration.py)."""

import json

import numpy as np
import pytest

from CDMSegmentLib.cli.main import main
from CDMSegmentLib.evaluation.refine_calibration import (FINDING_GRID, GRID, SMALL_GRID, STRONG_GRID, SUPPORT_GRID,
                                                         RefinementRun, RefinementScore, choose_best,
                                                         choose_refinement, score_refinement, stage_combinations)

from conftest import fragments_beside_a_lesion, make_tiny_model_file, randomised_cases_and_tiny_model


SPACING_MM = (2.0, 2.0, 2.0)  # 0.008 ml per voxel: the grid's speck removals are 6, 12 and 31 voxels


def run_from(image: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> RefinementRun:
    """A run whose heatmap is 1 on ``mask`` and 0 elsewhere, thresholded at 0.5: the CDM's mask is ``mask``."""
    return RefinementRun(mask.astype(np.float32), 0.5, image, image > 0, truth, SPACING_MM)


def run_with(lesion_value: float, cdm_false_spot: bool = False) -> RefinementRun:
    """Brain at 100 with a bright normal rim at 160; a 4x6x6 lesion at ``lesion_value`` (none when 0) whose
    middle (32 voxels, 0.256 ml) the CDM found; with ``cdm_false_spot`` the CDM also fires on 8 voxels (0.064 ml)
    of the rim."""
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
        mask[4:6, 19:21, 10:12] = True
    return run_from(image, truth, mask)


def test_the_choice_delineates_faint_and_bright_lesions_and_keeps_the_rim_out():
    runs = [run_with(140.0), run_with(250.0), run_with(0.0, cdm_false_spot=True)]
    best, scores = choose_refinement(runs, max_fp_ml=0.0)
    assert len(scores) == sum(len(stage_combinations(stage))
                              for stage in (GRID, SUPPORT_GRID, STRONG_GRID, SMALL_GRID, FINDING_GRID))
    assert best.settings["heatmap_support"] == 0.0  # the heatmap is 0 outside the CDM's mask: nothing to add
    assert best.settings["strong_finding_ml"] == 0.0  # every finding is kept whole already: the rule stays off
    assert best.settings["small_lesion_ml"] == 0.0  # and no small bright component has any heatmap
    assert best.settings["min_finding_ml"] == 0.0  # nothing small is left to remove: of equals, the first (all kept)
    assert best.mean_dice == pytest.approx(1.0) and best.false_positive_ml == 0.0
    # the rim (1.6 x the median, 8 x 2 x 20 voxels) joins wherever the spot is kept and the floor lets it count
    assert score_refinement(runs, {"min_component_ml": 0.05, "lesion_intensity": 0.6, "lesion_intensity_floor": 1.2,
                                   "lesion_support": 0.0}).false_positive_ml == pytest.approx(320 * 0.008)
    assert score_refinement(runs, {"min_component_ml": 0.1, "lesion_intensity": 0.6, "lesion_intensity_floor": 1.2,
                                   "lesion_support": 0.0}).false_positive_ml == 0.0
    assert (best.settings["min_component_ml"] >= 0.1 or best.settings["lesion_support"] > 0
            or best.settings["lesion_intensity_floor"] >= 1.6)


def faint_lesion_runs(lesion: bool) -> RefinementRun:
    """Brain at 100 (spacing 2 mm: 0.008 ml per voxel), a block at 125 (4x6x6 = 144 voxels, a lesion or normal
    tissue) where the heatmap is 0.4, under the threshold 1: the CDM's mask is empty."""
    image = np.zeros((10, 24, 24), np.float32)
    heatmap = np.zeros(image.shape, np.float32)
    image[1:9, 2:22, 2:22] = 100
    image[3:7, 4:10, 4:10] = 125
    heatmap[3:7, 4:10, 4:10] = 0.4
    truth = (image == 125) if lesion else np.zeros(image.shape, bool)
    return RefinementRun(heatmap, 1.0, image, image > 0, truth, SPACING_MM)


def test_the_second_stage_adds_the_heatmap_support_only_where_it_finds_lesions():
    lesion_free = run_with(0.0)
    best, _ = choose_refinement([faint_lesion_runs(True), lesion_free], max_fp_ml=0.0)
    assert best.mean_dice == pytest.approx(1.0) and best.false_positive_ml == 0.0
    assert best.settings["heatmap_support"] in (0.4,) and best.settings["heatmap_floor"] <= 1.2
    # the same faint block where it is normal tissue: adding it costs 144 x 0.008 ml, so the support stays off
    best, _ = choose_refinement([run_with(250.0), faint_lesion_runs(False)], max_fp_ml=0.5)
    assert best.settings["heatmap_support"] == 0.0 and best.false_positive_ml == 0.0
    assert score_refinement([faint_lesion_runs(False)], {**best.settings, "heatmap_floor": 1.2,
                                                         "heatmap_support": 0.4}).false_positive_ml \
        == pytest.approx(144 * 0.008)


def bright_cortex_runs():
    """Brain at 100 with a bright cortex at 170 (8x2x20 voxels). A lesion at 200 (4x6x6 = 144 voxels) reaching
    into it, of which the CDM found 40 voxels (32 on the lesion): 40 of the 416 voxels of lesion and cortex
    together. A lesion-free volume where the CDM fires on 40 voxels of the cortex (0.32 ml of its 320 voxels)."""
    def brain():
        image = np.zeros((10, 24, 24), np.float32)
        image[1:9, 2:22, 2:22] = 100
        image[1:9, 19:21, 2:22] = 170
        return image

    image = brain()
    image[3:7, 15:21, 8:14] = 200
    found = np.zeros(image.shape, bool)
    found[4:6, 14:19, 9:13] = True
    free = np.zeros(image.shape, bool)
    free[2:7, 19:21, 14:18] = True
    return [run_from(image, image == 200, found), run_from(brain(), np.zeros(image.shape, bool), free)]


@pytest.mark.parametrize("max_fp_ml", [0.5, 0.0])
def test_the_third_stage_keeps_strong_findings_own_voxels_only_within_the_false_positive_limit(max_fp_ml):
    """The support (0.2) drops both findings; keeping the strong ones' own bright voxels finds 32 of the lesion's
    144 voxels (Dice 0.36) and costs the 40 cortex voxels on the lesion-free volume (0.32 ml)."""
    best, _ = choose_refinement(bright_cortex_runs(), max_fp_ml=max_fp_ml)
    if max_fp_ml:
        assert best.settings["strong_finding_ml"] == STRONG_GRID["strong_finding_ml"][1]
        assert best.settings["strong_finding_peak"] == 2.0  # the heatmap's peak (1) is twice its threshold (0.5)
        assert best.mean_dice == pytest.approx(2 * 32 / (144 + 32))
        assert best.false_positive_ml == pytest.approx(40 * 0.008)
    else:
        assert best.settings["strong_finding_ml"] == 0.0
        assert best.mean_dice == 0.0 and best.false_positive_ml == 0.0


def test_each_stage_scores_a_step_that_is_off_once_with_the_first_of_its_other_values():
    for stage, switch in ((SUPPORT_GRID, "heatmap_support"), (STRONG_GRID, "strong_finding_ml"),
                          (SMALL_GRID, "small_lesion_ml")):
        combinations = stage_combinations(stage)
        off = [c for c in combinations if not c[switch]]
        assert off == [{key: (0.0 if key == switch else values[0]) for key, values in stage.items()}]
        on = int(np.prod([len(values) for values in stage.values()]) * (1 - 1 / len(stage[switch])))
        assert len(combinations) == on + 1 and len({tuple(c.items()) for c in combinations}) == on + 1
    assert len(stage_combinations(GRID)) == int(np.prod([len(values) for values in GRID.values()]))


def small_lesion_runs(normal_spot_heatmap: float):
    """A volume (spacing 2 mm) with a lesion the CDM found (a 4x6x6 block at 250, its middle 32 voxels in the
    heatmap's mask) and a small one it did not (2x3x3 = 18 voxels at 250, 0.144 ml, where the heatmap peaks at 0.5
    on one voxel, under the threshold 1 and too little on average for the heatmap's support); a lesion-free volume
    with a small bright normal spot of the same size whose heatmap peaks at ``normal_spot_heatmap``."""
    def brain():
        image = np.zeros((10, 24, 24), np.float32)
        image[1:9, 2:22, 2:22] = 100
        image[4:6, 15:18, 15:18] = 250
        return image, np.zeros(image.shape, np.float32)

    image, heatmap = brain()
    truth = np.zeros(image.shape, bool)
    truth[3:7, 4:10, 4:10] = True
    image[truth] = 250
    heatmap[4:6, 5:9, 5:9] = 2.0
    heatmap[4, 16, 16] = 0.5
    free, free_heatmap = brain()
    free_heatmap[4, 16, 16] = normal_spot_heatmap
    return [RefinementRun(heatmap, 1.0, image, image > 0, truth | (image == 250), SPACING_MM),
            RefinementRun(free_heatmap, 1.0, free, free > 0, np.zeros(free.shape, bool), SPACING_MM)]


@pytest.mark.parametrize("normal_spot_heatmap", [0.0, 0.5])
def test_the_fourth_stage_adds_the_small_lesions_the_heatmap_reaches_where_the_normal_ones_stay_out(
        normal_spot_heatmap):
    best, _ = choose_refinement(small_lesion_runs(normal_spot_heatmap), max_fp_ml=0.1)
    if not normal_spot_heatmap:
        assert best.settings["small_lesion_ml"] == SMALL_GRID["small_lesion_ml"][1]  # 0.25 ml holds 18 voxels
        assert best.settings["small_lesion_peak"] <= 0.4
        assert best.mean_dice == pytest.approx(1.0) and best.false_positive_ml == 0.0
    else:  # the normal spot would cost 0.144 ml, over the limit: the step stays off and the lesion is missed
        assert best.settings["small_lesion_ml"] == 0.0
        assert best.mean_dice == pytest.approx(2 * 144 / (144 + 18 + 144)) and best.false_positive_ml == 0.0


def test_within_the_dice_tolerance_of_the_best_the_fewest_false_positives_win():
    scores = [RefinementScore({"n": 1}, 0.8505, 0.438), RefinementScore({"n": 2}, 0.8507, 0.441),
              RefinementScore({"n": 3}, 0.8400, 0.100), RefinementScore({"n": 4}, 0.8600, 0.900),
              RefinementScore({"n": 5}, 0.8506, 0.438)]
    assert choose_best(scores, max_fp_ml=0.5).settings == {"n": 5}  # 0.438 ml twice: the better Dice
    assert choose_best(scores, max_fp_ml=0.5, dice_tolerance=0.0).settings == {"n": 2}
    assert choose_best(scores, max_fp_ml=0.5, dice_tolerance=0.02).settings == {"n": 3}
    assert choose_best(scores, max_fp_ml=1.0).settings == {"n": 4}  # 0.0093 ahead of the rest
    assert choose_best(scores, max_fp_ml=0.05).settings == {"n": 3}  # none within the limit: the fewest


def small_spot_runs(spot_is_lesion: bool):
    """A volume where the CDM fires on 8 voxels (0.064 ml, kept only by the grid's 0.05 ml speck removal) of a
    bright 2x3x3 blob, a lesion or not; the other volume holds what the first lacks: a lesion-free brain, or a
    large lesion the CDM found (32 voxels)."""
    image = np.zeros((10, 24, 24), np.float32)
    image[1:9, 2:22, 2:22] = 100
    image[4:6, 10:13, 10:13] = 250
    spot = np.zeros(image.shape, bool)
    spot[4:6, 10:12, 10:12] = True
    blob = image == 250
    if spot_is_lesion:
        return [run_from(image, blob, spot), run_from(image.copy(), np.zeros(image.shape, bool),
                                                      np.zeros(image.shape, bool))]
    other = run_with(250.0)
    return [other, run_from(image, np.zeros(image.shape, bool), spot)]


@pytest.mark.parametrize("spot_is_lesion", [True, False])
def test_the_speck_removal_keeps_small_components_only_where_they_are_lesions(spot_is_lesion):
    best, _ = choose_refinement(small_spot_runs(spot_is_lesion), max_fp_ml=0.0)
    assert best.mean_dice == pytest.approx(1.0) and best.false_positive_ml == 0.0
    if spot_is_lesion:
        assert best.settings["min_component_ml"] == 0.05
    else:
        assert best.settings["min_component_ml"] >= 0.1


def test_the_runs_mask_is_the_runners_speck_removal_at_the_volumes_spacing():
    run = small_spot_runs(True)[0]
    assert run.mask(0.05).sum() == 8 and not run.mask(0.1).any()
    assert run.voxel_ml == pytest.approx(0.008)


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


def test_calibrate_refinement_pools_several_folders_and_refuses_one_given_twice_or_a_case_in_two(tmp_path, capsys):
    """A folder of volumes with lesions and one of lesion-free volumes: neither alone can measure the choice,
    pooled they can; the same folder twice, or a case id in two folders, is one line before any run."""
    model = tmp_path / "tiny.pt"
    make_tiny_model_file(model, modalities=("flair",))
    brats_case(tmp_path / "lesions", "case_0", lesion=True)
    brats_case(tmp_path / "lesions", "case_1", lesion=True)
    brats_case(tmp_path / "healthy", "case_2", lesion=False)
    out = tmp_path / "r.json"
    code = main(["calibrate-refinement", str(model), str(tmp_path / "lesions"), str(tmp_path / "healthy"), "-o",
                 str(out), "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    written = json.loads(out.read_text())
    assert written["refinement_calibration"]["volumes"] == 3
    for name, values in {**GRID, **SUPPORT_GRID, **STRONG_GRID}.items():
        assert written[name] in values
    brats_case(tmp_path / "again", "case_1", lesion=False)
    for folders, line in (([tmp_path / "lesions", tmp_path / "lesions"], "is given twice; give each folder once"),
                          ([tmp_path / "lesions", tmp_path / "again"], "case case_1 is in both")):
        capsys.readouterr()
        code = main(["calibrate-refinement", str(model), *map(str, folders), "-o", str(tmp_path / "x.json"),
                     "--device", "cpu"])
        err = capsys.readouterr().err
        assert code == 1 and line in err and "CDM run" not in err and not (tmp_path / "x.json").exists()
    (tmp_path / "notes.txt").write_text("not cases\n")
    code = main(["calibrate-refinement", str(model), str(tmp_path / "lesions"), str(tmp_path / "notes.txt"), "-o",
                 str(tmp_path / "x.json"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 1 and f"{tmp_path / 'notes.txt'} is a file, not a folder: give the folder that holds" in err
    (tmp_path / "a_folder").mkdir()
    code = main(["calibrate-refinement", str(model), str(tmp_path / "lesions"), str(tmp_path / "healthy"), "-o",
                 str(tmp_path / "a_folder"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 1 and f"{tmp_path / 'a_folder'} is a folder; -o names the defaults JSON to write" in err
    assert "CDM run" not in err and list((tmp_path / "a_folder").iterdir()) == []


def test_the_fifth_stage_removes_the_fragments_the_refinement_leaves_beside_a_lesion():
    """Brain at 100; a lesion at 250 the CDM found whole, and a patch of normal tissue the CDM also marked whose
    bright voxels (170, a checkerboard) are one-voxel components over every floor of the grid: only the smallest
    finding kept removes them, and the lesion (1.15 ml) stays."""
    image, _, truth, cdm_mask = fragments_beside_a_lesion()
    free = np.where(image > 0, 100, 0).astype(np.float32)
    runs = [run_from(image, truth, cdm_mask), run_from(free, np.zeros(free.shape, bool), np.zeros(free.shape, bool))]
    before = score_refinement(runs, {"min_component_ml": 0.05, "lesion_intensity": 0.8, "lesion_intensity_floor": 1.5,
                                     "lesion_support": 0.2})
    assert before.mean_dice == pytest.approx(2 * 144 / (144 + 144 + 24))
    best, _ = choose_refinement(runs, max_fp_ml=0.0)
    # 0.02 ml is 2 voxels at 2 mm, the first size that removes one-voxel fragments (0.01 ml rounds to 1 voxel)
    assert best.settings["min_finding_ml"] == FINDING_GRID["min_finding_ml"][2] == 0.02
    assert best.mean_dice == pytest.approx(1.0)


def test_the_help_lists_the_fifth_stages_sizes(capsys):
    with pytest.raises(SystemExit):
        main(["calibrate-refinement", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    sizes = ", ".join(f"{v:g}" for v in FINDING_GRID["min_finding_ml"][:-1]) + f" or {FINDING_GRID['min_finding_ml'][-1]:g}"
    assert f"min_finding_ml {sizes} ml" in text, text

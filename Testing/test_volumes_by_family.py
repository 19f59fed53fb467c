"""Volume evaluation by lesion family and size, with the two intensity baselines."""

import csv
import json

import numpy as np
import pytest
from scipy import ndimage

from CDMSegmentLib.cli.main import main
from CDMSegmentLib.core.device import choose_device
from CDMSegmentLib.core.errors import CDMSegmentError
from CDMSegmentLib.core.modelfile import load_model
from CDMSegmentLib.core.ood import ood_score
from CDMSegmentLib.core.reading import read_volume
from CDMSegmentLib.evaluation.intensity_baselines import (fit_intensity_threshold, intensity_otsu_mask,
                                                          intensity_threshold_mask)
from CDMSegmentLib.evaluation.volumes import (VolumeScore, case_line, dice_parts_table, family_table, size_table,
                                             summary_table)

from conftest import randomised_cases_and_tiny_model



def bright_lesion_volume(lesion_value: float, seed: int):
    """(image, truth): brain at 300-400 with a 4x4x4 lesion at ``lesion_value``; zero background."""
    rng = np.random.default_rng(seed)
    image = np.zeros((12, 16, 16), np.float32)
    image[2:10, 2:14, 2:14] = rng.uniform(300, 400, (8, 12, 12))
    truth = np.zeros(image.shape, bool)
    truth[4:8, 5:9, 5:9] = True
    image[truth] = lesion_value
    return image, truth


def test_the_calibrated_threshold_separates_lesion_from_brain_and_beats_otsu_on_a_healthy_volume():
    pairs = [bright_lesion_volume(700.0, s) for s in range(3)]
    healthy = bright_lesion_volume(350.0, 9)[0]
    threshold, pooled = fit_intensity_threshold(pairs + [(healthy, np.zeros(healthy.shape, bool))])
    assert pooled == pytest.approx(1.0) and 400 / 350 < threshold < 700 / 350  # brain at most 1.14 x its median
    image, truth = pairs[0]
    assert np.array_equal(intensity_threshold_mask(image, threshold), truth)
    assert intensity_threshold_mask(healthy, threshold).sum() == 0
    assert intensity_otsu_mask(healthy).sum() > 0.2 * (healthy > 0).sum()  # Otsu always finds something


def test_fitting_needs_a_lesion():
    image = bright_lesion_volume(350.0, 0)[0]
    with pytest.raises(CDMSegmentError, match="cases with lesion masks"):
        fit_intensity_threshold([(image, np.zeros(image.shape, bool))])


def score(case, method, family, lesion_ml, dice_3d, detected, fp=0.0, lesions=(0, 0), false_regions=0):
    return VolumeScore(case, method, lesion_ml, 0.0, dice_3d, dice_3d, fp, 1.0, family, detected,
                       lesions=lesions[1], lesions_found=lesions[0], false_regions=false_regions)


def test_tables_group_by_family_and_by_lesion_volume():
    scores = [score("a", "CDM", "ms", 2.0, 0.2, 1.0, lesions=(1, 8), false_regions=3),
              score("b", "CDM", "ms", 3.0, 0.0, 0.0, lesions=(0, 4)),
              score("c", "CDM", "core-oedema", 120.0, 0.8, 1.0, lesions=(1, 1)),
              score("d", "CDM", "healthy", 0.0, float("nan"), float("nan"), fp=4.0, false_regions=2)]
    families = family_table(scores)
    # lesions pooled over the family's volumes: 1 of 12, not the mean of 1/8 and 0/4
    assert "| ms | CDM | 2 | 0.100 | 50 % | 1 of 12 (8 %) | 0 | - | 1.5 |" in families
    assert "| core-oedema | CDM | 1 | 0.800 | 100 % | 1 of 1 (100 %) | 0 | - | 0.0 |" in families
    assert "| healthy | CDM | 0 | - | - | - | 1 | 4.00 | 2.0 |" in families
    assert all(line.count("|") == 10 for line in families.splitlines())  # every row has the header's 9 columns
    # the header says which volumes each false-positive figure covers (the healthy row: 4 ml, 2 regions)
    header = families.splitlines()[0].split("|")
    assert header[8].strip() == "false positives on lesion-free volumes (ml, mean)"
    assert header[9].strip() == "false regions per volume (all volumes)"
    sizes = size_table(scores)
    assert "| 1-5 | CDM | 2 | 0.100 | 50 % | 1 of 12 (8 %) |" in sizes
    assert "| 100-inf | CDM | 1 | 0.800 | 100 % | 1 of 1 (100 %) |" in sizes
    assert "healthy" not in sizes and all(line.count("|") == 7 for line in sizes.splitlines())


def test_the_dice_parts_table_pools_the_missed_volume_and_leaves_lesion_free_volumes_out():
    def parts(case, family, lesion_ml, dice_3d, missed_ml, false_ml, found_dice):
        return VolumeScore(case, "CDM", lesion_ml, 0.0, dice_3d, dice_3d, 0.0, 1.0, family, 1.0,
                           missed_lesion_ml=missed_ml, false_region_ml=false_ml, found_dice=found_dice)
    scores = [parts("a", "ms", 2.0, 0.5, 1.0, 0.5, 0.8), parts("b", "ms", 6.0, 0.7, 0.0, 0.1, 0.9),
              parts("c", "cortical", 3.0, 0.0, 3.0, 0.2, float("nan")),
              VolumeScore("d", "CDM", 0.0, 1.0, float("nan"), float("nan"), 1.0, 1.0, "healthy", false_region_ml=1.0)]
    table = dice_parts_table(scores)
    # 1 of 8 ml missed (pooled, not the mean of 50 % and 0 %); false regions 0.3 ml a volume; found Dice 0.85 on 2
    assert "| ms | CDM | 2 | 0.600 | 12 % | 0.30 | 0.850 (2) |" in table
    assert "| cortical | CDM | 1 | 0.000 | 100 % | 0.20 | - |" in table  # nothing found: no delineation, no NaN
    assert "healthy" not in table and "nan" not in table
    assert all(line.count("|") == 8 for line in table.splitlines())


def test_the_summary_shows_no_nan_and_no_spread_of_one_case():
    one_lesion = summary_table([score("a", "CDM", "ms", 2.0, 0.25, 1.0)])
    assert "| CDM | 1 | 0.250 | 0.250 | 0 | - | 1.0 |" in one_lesion
    both = summary_table([score("a", "CDM", "ms", 2.0, 0.25, 1.0), score("b", "CDM", "ms", 2.0, 0.75, 1.0),
                          score("d", "CDM", "healthy", 0.0, float("nan"), float("nan"), fp=4.0)])
    assert "| CDM | 2 | 0.500 +- 0.250 | 0.500 | 1 | 4.00 / 4.00 | 1.0 |" in both
    only_healthy = summary_table([score("d", "CDM", "healthy", 0.0, float("nan"), float("nan"), fp=4.0)])
    assert "| CDM | 0 | - | - | 1 | 4.00 / 4.00 | 1.0 |" in only_healthy and "nan" not in only_healthy


def test_a_case_line_names_the_refined_mask_as_the_tables_do():
    refined = "CDM + lesion intensity (0.7, floor 1.4)"
    line = case_line(3, 36, [score("c", "CDM", "ms", 2.0, 0.34, 1.0, fp=0.5), score("c", refined, "ms", 2.0, 0.543, 1.0),
                             score("c", "Otsu on intensity", "ms", 2.0, 0.1, 1.0, fp=9.0)])
    assert line.startswith(f"3/36 c ms: 3D Dice CDM 0.340, {refined} 0.543, false positives CDM 0.50 ml, {refined} ")
    assert "default" not in line and "Otsu" not in line
    healthy = case_line(1, 36, [score("h", "CDM", "healthy", 0.0, float("nan"), float("nan"), fp=4.0),
                                score("h", refined, "healthy", 0.0, float("nan"), float("nan"), fp=0.25)])
    assert healthy.startswith(f"1/36 h healthy: lesion-free, false positives CDM 4.00 ml, {refined} 0.25 ml, ")


def test_evaluate_volumes_reports_every_family_and_both_baselines(tmp_path, capsys):
    data, model = randomised_cases_and_tiny_model(tmp_path, 4, 3)
    code = main(["evaluate-volumes", str(data), "-o", str(tmp_path / "out"), "--model", str(model), "--device", "cpu",
                 "--per-family", "1", "--fit-threshold-on", str(data)])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "| cortical | intensity threshold (calibrated) | 1 |" in out.out
    assert "| healthy | Otsu on intensity | 0 | - | - | - | 1 |" in out.out
    with open(tmp_path / "out" / "volumes.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    # CDM, CDM grown through the intensity and the intensity components it touches (at the fitted threshold), and
    # the two baselines, on each case
    assert len(rows) == 2 * 5 and {r["family"] for r in rows} == {"cortical", "healthy"}
    methods = [r["method"] for r in rows[:5]]
    assert methods[0] == "CDM" and methods[1].startswith("CDM + intensity growth (") and len(set(methods)) == 5
    assert all(r["ood_score"] == "nan" for r in rows)  # the tiny model has no OOD reference
    # lesion-wise detection: every method counts the lesions of the case's own mask file, and finds at most those
    for row in rows:
        truth = read_volume(next((data / row["case"]).glob("*_seg.nii.gz"))).array > 0
        assert int(row["lesions"]) == ndimage.label(truth)[1] and 0 <= int(row["lesions_found"]) <= int(row["lesions"])
        assert (int(row["lesions"]) > 0) == (row["family"] == "cortical")
        assert int(row["lesions_found"]) == 0 or float(row["detected"]) == 1.0
        # the Dice's parts: missed lesion volume within the lesion, false regions within the false positives
        assert 0 <= float(row["missed_lesion_ml"]) <= float(row["lesion_ml"]) + 1e-9
        assert 0 <= float(row["false_region_ml"]) <= float(row["false_positive_ml"]) + 1e-9
        assert (row["found_dice"] == "nan") == (int(row["lesions_found"]) == 0)
    assert ("| family | method | volumes with lesion | 3D Dice (mean) | lesion volume in lesions missed (pooled) |"
            in out.out)
    otsu = next(r for r in rows if r["method"] == "Otsu on intensity" and r["family"] == "cortical")
    assert otsu["lesions_found"] == otsu["lesions"]  # Otsu takes half the brain, and so every lesion
    report = (tmp_path / "out" / "volumes.md").read_text(encoding="utf-8")
    assert "| family |" in report
    # the model by name, version and SHA256, so that the figures can be traced to the exact weights
    model_file = load_model(model)
    assert (f"\n\nModel: {model_file.metadata['name']} {model_file.metadata['version']} (SHA256 "
            f"{model_file.sha256}, ") in report
    # the words of the tables defined above them, and each table under its own heading
    assert "\n\nTerms: *3D Dice* is computed per volume" in report and "*Lesions found*: of the lesions" in report
    assert "| method | volumes with lesion | 3D Dice (mean +- sd) |" in report
    headings = [line[4:] for line in report.splitlines() if line.startswith("### ")]
    assert headings == ["All volumes", "By lesion family", "Where the 3D Dice goes, by lesion family",
                        "By lesion volume"]
    assert report.index("### By lesion family\n\n| family | method | volumes with lesion | 3D Dice (mean) | detected") > 0
    # the fitted threshold is written beside the tables that use it, as the screen says it
    fitted = next(line for line in out.err.splitlines() if line.startswith("Calibrated intensity threshold: "))
    assert f"\n\n{fitted}\n\n" in report and f"cases of {data})." in fitted
    # every method paired with the calibrated threshold, in the file and on the screen: the cortical case's CDM
    # Dice minus the threshold's, from the same rows
    cdm, threshold = (next(float(r["dice_3d"]) for r in rows if r["method"] == m and r["family"] == "cortical")
                      for m in ("CDM", "intensity threshold (calibrated)"))
    assert f"| all | CDM | 1 | {cdm - threshold:+.3f} | " in report and "Paired with the intensity threshold" in out.out
    # each case's line: a lesion-free case has no Dice (not NaN), and no OOD score without a reference
    lines = [line for line in out.err.splitlines() if line[:2] in ("1/", "2/")]
    cortical, healthy = sorted(lines, key=lambda line: "healthy" in line)
    assert " cortical: 3D Dice CDM 0." in cortical and "nan" not in cortical
    assert " healthy: lesion-free, false positives CDM " in healthy and "nan" not in healthy + cortical
    assert "OOD" not in healthy and not healthy.endswith(" ")


def test_evaluate_volumes_keeps_an_earlier_run_without_overwrite(tmp_path, capsys):
    data, model = randomised_cases_and_tiny_model(tmp_path, 4, 3)
    out = tmp_path / "out"
    out.mkdir()
    (out / "volumes.md").write_text("an earlier run")
    argv = ["evaluate-volumes", str(data), "-o", str(out), "--model", str(model), "--device", "cpu", "--cases", "1"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert f"{out / 'volumes.md'} already exists; choose another output folder or pass --overwrite" in err
    assert (out / "volumes.md").read_text() == "an earlier run" and not (out / "volumes.csv").exists()
    assert main(argv + ["--overwrite"]) == 0
    assert (out / "volumes.md").read_text().startswith("Command: `cdmsegment ")
    assert len((out / "volumes.csv").read_text().splitlines()) == 1 + 2  # CDM and Otsu on one case


def test_evaluate_volumes_scores_the_ood_reference_on_the_automatic_device(tmp_path, capsys):
    """--device auto (make retrain's default) reaches the OOD score as the device it stands for: each volume's
    score is the one `cdmsegment ood` gives, beside its Dice."""
    data, model = randomised_cases_and_tiny_model(tmp_path, 2, 5)
    reference = {"noise_levels": [0.95, 0.8, 0.5], "slices": 2, "seed": 0, "mean": [0.0, 0.0, 0.0],
                 "covariance": np.eye(3).tolist(), "threshold": 1e6, "reference_volumes": 9}
    (tmp_path / "ood.json").write_text(json.dumps(reference))
    with_ood = tmp_path / "with_ood.pt"
    assert main(["set-defaults", str(model), "--ood", str(tmp_path / "ood.json"), "-o", str(with_ood)]) == 0
    code = main(["evaluate-volumes", str(data), "-o", str(tmp_path / "out"), "--model", str(with_ood),
                 "--device", "auto"])
    err = capsys.readouterr().err
    assert code == 0, err
    said = []  # what --device auto says on the machine running the tests
    choose_device("auto", log=said.append)
    assert [line for line in err.splitlines() if line.startswith("device: ")] == said  # said once
    with open(tmp_path / "out" / "volumes.csv", newline="") as f:
        cdm_rows = [r for r in csv.DictReader(f) if r["method"] == "CDM"]
    assert len(cdm_rows) == 2
    for row in cdm_rows:
        volume = read_volume(next((data / row["case"]).glob("*_flair.nii.gz")))
        expected = ood_score(load_model(with_ood), [volume]).score
        assert float(row["ood_score"]) == pytest.approx(expected, rel=1e-5) and np.isfinite(expected)
        assert row["ood_flag"] == ""  # far below the threshold of 1e6
    first = next((data / cdm_rows[0]["case"]).glob("*_flair.nii.gz"))
    assert main(["ood", str(first), "--model", str(with_ood), "--device", "auto"]) == 0
    assert [line for line in capsys.readouterr().err.splitlines() if line.startswith("device: ")] == said

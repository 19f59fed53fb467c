"""The harness end to end on tiny synthetic cases: every method, both rules, files with the expected columns."""

import csv
import math

import numpy as np
import pytest

from CDMSegmentLib.baselines.cgdiff import CGDiffParams
from CDMSegmentLib.cli.main import build_parser
from CDMSegmentLib.core.errors import CDMSegmentError
from CDMSegmentLib.evaluation.slices import MethodRun, Variant, evaluate_cases, masks_for_rule, score, variants
from CDMSegmentLib.core.methods import CDMParams
from CDMSegmentLib.core.names import METHODS
from CDMSegmentLib.evaluation.report import COLUMNS, write_report

FAST = CGDiffParams(noise_level=0.5, steps=2, guidance_scale=10.0)


def test_every_method_both_rules_to_table_csv_and_figures(synthetic_cases, tiny_models, tmp_path):
    model, classifier = tiny_models
    runs = evaluate_cases(synthetic_cases, variants(METHODS, CDMParams(noise_level=0.9, steps=1), FAST),
                          model=model, classifier=classifier, rules=("otsu-slice", "volume-otsu", "model"),
                          log=lambda m: None)
    rows = [r for run in runs for r in run.rows]
    assert len(rows) == 2 * len(METHODS)  # 'model' is skipped: the tiny model stores no calibrated threshold
    assert {r["lesion_slices"] for r in rows} == {2} and {r["healthy_slices"] for r in rows} == {5}
    assert {r["healthy_cases"] for r in rows} == {1} and {r["lesion_cases"] for r in rows} == {1}
    by = {(r["method"].split()[0], r["rule"]): r for r in rows}
    assert by[("cdm", "otsu-slice")]["diffusion_evals_per_slice"] == 2
    assert by[("cg-diff", "otsu-slice")]["diffusion_evals_per_slice"] == 4
    assert by[("scorecam", "otsu-slice")]["classifier_passes_per_slice"] == 17
    assert all(r["seconds_per_slice"] > 0 for r in rows)
    paths = write_report(runs, synthetic_cases, tmp_path, "cdmsegment evaluate DATA --methods all")
    with open(paths["csv"]) as f:
        table = list(csv.DictReader(f))
    assert tuple(table[0]) == COLUMNS and len(table) == len(rows)
    text = paths["markdown"].read_text(encoding="utf-8")
    assert "cdmsegment evaluate DATA --methods all" in text and "| method | threshold | Dice |" in text
    assert paths["heatmaps"].stat().st_size > 1000 and paths["dice_vs_time"].stat().st_size > 1000


def test_a_perfect_heatmap_scores_one_and_healthy_slices_show_the_otsu_problem(synthetic_cases):
    """The heatmap *is* the ground truth plus faint noise. Per-slice Otsu marks noise on every healthy slice;
    volume Otsu spares the healthy slices of a case with a lesion but still marks noise in a healthy case;
    only a fixed (calibrated) threshold spares both."""
    rng = np.random.default_rng(0)
    heat = [c.masks.astype(np.float32) + 0.01 * rng.random(c.masks.shape, dtype=np.float32) * c.content()
            for c in synthetic_cases]
    run = MethodRun(Variant("cdm", CDMParams(), FAST), heat, 0.1, 20, 0)
    per_slice = score(run, synthetic_cases, "otsu-slice", None)
    volume = score(run, synthetic_cases, "volume-otsu", None)
    assert per_slice["dice"] == 1.0 and per_slice["hd95_mm"] == 0.0 and per_slice["auroc"] == 1.0
    assert per_slice["healthy_slices_with_fp"] == 1.0 and per_slice["fp_pixels_per_healthy_case"] > 0
    assert volume["dice"] == 1.0 and volume["dice_3d"] == 1.0
    assert volume["healthy_slices_with_fp"] == 3 / 5 and volume["fp_pixels_per_healthy_case"] > 0  # case B's 3
    calibrated = score(run, synthetic_cases, "model", 0.5)
    assert calibrated["dice_3d"] == 1.0 and calibrated["healthy_slices_with_fp"] == 0.0
    assert calibrated["fp_pixels_per_healthy_case"] == 0.0


def test_an_empty_prediction_gives_hd95_na_with_a_count(synthetic_cases):
    heat = [np.zeros(c.masks.shape, np.float32) for c in synthetic_cases]
    row = score(MethodRun(Variant("cdm", CDMParams(), FAST), heat, 0.1, 20, 0), synthetic_cases, "otsu-slice", None)
    assert math.isnan(row["hd95_mm"]) and row["hd95_undefined"] == 2 and row["dice"] == 0.0


def test_sweeps_expand_only_over_the_methods_they_apply_to():
    vs = variants(["cdm", "cg-cdm", "gradcam"], CDMParams(), FAST, noise_levels=[0.9, 0.8], steps=[1, 2],
                  guidance_scales=[0.0, 10.0])
    assert [v.method for v in vs].count("cdm") == 4
    assert [v.method for v in vs].count("cg-cdm") == 8
    assert [v.method for v in vs].count("gradcam") == 1
    assert len({v.label for v in vs}) == len(vs)


def test_bad_rules_and_methods_are_rejected(synthetic_cases, tiny_models):
    with pytest.raises(CDMSegmentError, match="unknown method"):
        variants(["cdm", "nope"], CDMParams(), FAST)
    with pytest.raises(CDMSegmentError, match="unknown threshold rule"):
        evaluate_cases(synthetic_cases, [], model=None, classifier=None, rules=("median",))
    with pytest.raises(CDMSegmentError, match="unknown threshold rule"):
        masks_for_rule("median", np.zeros((1, 2, 2)), np.ones((1, 2, 2), bool), None)


def test_the_cli_parses_comma_separated_sweeps():
    args = build_parser().parse_args(["evaluate", "DATA", "-o", "out", "--methods", "cdm,cg-cdm,gradcam",
                                      "--noise-level", "0.9,0.8", "--steps", "1,2,10", "--threshold-rule",
                                      "otsu-slice,volume-otsu", "--cgdiff-steps", "50"])
    assert args.methods == ["cdm", "cg-cdm", "gradcam"] and args.noise_level == [0.9, 0.8]
    assert args.steps == [1, 2, 10] and args.tau == [None] and args.cgdiff_steps == 50

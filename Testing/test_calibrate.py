"""Calibration: the threshold search and the sweep that writes a model's defaults."""

import numpy as np
import pytest
import torch

from CDMSegmentLib.training.calibrate import best_threshold, defaults_from, sweep
from CDMSegmentLib.core.errors import CDMSegmentError
from CDMSegmentLib.core.methods import CDMParams, calibrated_threshold
from CDMSegmentLib.core.modelfile import load_model, with_defaults


def test_best_threshold_separates_lesion_from_background():
    rng = np.random.default_rng(0)
    masks = torch.zeros(4, 16, 16, dtype=torch.bool)
    masks[:2, 4:8, 4:8] = True  # case "a" has a lesion on two slices, case "b" is healthy
    heatmaps = torch.from_numpy(rng.uniform(0.01, 0.1, (4, 16, 16)).astype(np.float32))
    heatmaps[masks] += 1.0
    row = best_threshold(heatmaps, masks, ["a", "a", "b", "b"])
    # candidates are quantiles of the map, so the best one lies at the top of the background
    assert 0.09 <= row["threshold"] < 1.01
    assert row["pooled_dice"] > 0.95 and row["mean_case_dice"] > 0.95
    assert row["healthy_fp_fraction"] < 0.01


def test_all_zero_heatmaps_are_refused():
    with pytest.raises(CDMSegmentError, match="ignores the label"):
        best_threshold(torch.zeros(2, 8, 8), torch.zeros(2, 8, 8, dtype=torch.bool), ["a", "b"])


def test_sweep_scores_every_setting_best_first(tiny_model_path):
    model = load_model(tiny_model_path)
    slices = torch.rand(6, 1, 32, 32) * 2 - 1
    masks = torch.zeros(6, 32, 32, dtype=torch.bool)
    masks[:3, 10:20, 10:20] = True
    rows = sweep(model, slices, masks, ["a"] * 3 + ["b"] * 3, {"tau": [0.0, 0.5], "steps": [1]},
                 torch.device("cpu"), log=lambda m: None, precision="fp32", batch_size=4)
    assert [r["tau"] for r in rows] != [] and {r["tau"] for r in rows} == {0.0, 0.5}
    assert rows[0]["pooled_dice"] >= rows[1]["pooled_dice"]
    assert all(r["evaluations_per_slice"] == 2 for r in rows)
    defaults = defaults_from(rows[0])
    assert set(defaults) == {"noise_level", "steps", "tau", "noise_draws", "threshold", "calibration"}


def test_a_classifier_sweep_calibrates_cgcdm_and_its_defaults_go_into_the_classifier(tiny_models, tmp_path):
    model, classifier = tiny_models
    slices = torch.rand(6, 1, 16, 16) * 2 - 1
    masks = torch.zeros(6, 16, 16, dtype=torch.bool)
    masks[:3, 4:9, 4:9] = True
    rows = sweep(model, slices, masks, ["a"] * 3 + ["b"] * 3, {"steps": [1], "tau": [0.0], "guidance_scale": [0.0, 5.0]},
                 torch.device("cpu"), log=lambda m: None, classifier=classifier, precision="fp32", batch_size=4)
    assert {r["method"] for r in rows} == {"cg-cdm"} and {r["guidance_scale"] for r in rows} == {0.0, 5.0}
    assert rows[0]["threshold"] != rows[1]["threshold"]  # guidance changes the heatmap, so its threshold
    defaults = defaults_from(rows[0])
    assert set(defaults) == {"guidance_scale", "cg_cdm_threshold", "calibration"}
    assert defaults["calibration"]["cdm_settings"]["steps"] == 1

    path = tmp_path / "calibrated.pt"
    with_defaults(classifier, defaults, path)
    saved = load_model(path, kind="classifier")
    assert saved.defaults["guidance_scale"] == rows[0]["guidance_scale"]
    assert calibrated_threshold("cg-cdm", model, saved) == pytest.approx(rows[0]["threshold"])
    assert CDMParams.for_model(model, classifier=saved).guidance_scale == rows[0]["guidance_scale"]
    assert CDMParams.for_model(model, "paper", classifier=saved).guidance_scale == 100.0  # the paper's s
    x, t = torch.rand(2, 1, 16, 16), torch.tensor([5, 50])
    assert torch.equal(saved.network(x, t), classifier.network(x, t))  # same weights, new metadata


def test_each_method_uses_only_its_own_calibrated_threshold(tiny_models, tmp_path):
    model, classifier = tiny_models
    assert calibrated_threshold("cg-cdm", model, classifier) is None  # nothing measured for this classifier yet
    with_defaults(classifier, {"cg_cdm_threshold": 0.5}, tmp_path / "c.pt")
    calibrated = load_model(tmp_path / "c.pt", kind="classifier")
    assert calibrated_threshold("cg-cdm", model, calibrated) == 0.5
    assert calibrated_threshold("cdm", model, calibrated) is None  # the tiny diffusion model stores none
    assert calibrated_threshold("gradcam", model, calibrated) is None


def test_cgcdm_runs_at_the_cdm_settings_its_classifier_was_calibrated_at(tiny_models, tmp_path):
    """A classifier's guidance scale and threshold hold at the CDM settings they were measured at; a model whose
    own defaults moved on (another noise level) must not carry them there."""
    model, classifier = tiny_models
    measured_at = {"noise_level": 0.9, "steps": 1, "tau": 0.0, "noise_draws": 2}
    with_defaults(classifier, {"guidance_scale": 3.0, "cg_cdm_threshold": 0.5,
                               "calibration": {"cdm_settings": measured_at}}, tmp_path / "c.pt")
    calibrated = load_model(tmp_path / "c.pt", kind="classifier")
    own = CDMParams.for_model(model)
    assert (own.noise_level, own.noise_draws) != (0.9, 2)
    guided = CDMParams.for_model(model, classifier=calibrated, method="cg-cdm")
    assert (guided.noise_level, guided.steps, guided.tau, guided.noise_draws, guided.guidance_scale) == (
        0.9, 1, 0.0, 2, 3.0)
    sampler = lambda p: (p.noise_level, p.steps, p.tau, p.noise_draws)  # noqa: E731
    for method in ("cdm", "gradcam"):  # the model's own, where its threshold was measured
        assert sampler(CDMParams.for_model(model, classifier=calibrated, method=method)) == sampler(own)
    assert CDMParams.for_model(model, classifier=calibrated, method="cg-cdm", noise_level=0.7).noise_level == 0.7
    assert CDMParams.for_model(model, "paper", classifier=calibrated, method="cg-cdm").noise_level != 0.9


@pytest.mark.parametrize("size, modalities, masks, message", [
    (48, ["flair"], True, "holds 48 px slices but the model tiny-test needs 32 px; make it with 'cdmsegment slices ... "
                          "--image-size 32'"),
    (32, ["t1"], True, "holds t1 slices but the model tiny-test needs flair"),
    (32, ["flair"], False, "has no masks; make it with 'cdmsegment slices --with-masks'"),
])
def test_calibrate_refuses_slices_the_model_cannot_take_before_any_network_run(tmp_path, capsys, size, modalities,
                                                                               masks, message):
    from CDMSegmentLib.cli.main import main
    from CDMSegmentLib.data.slicesets import SliceDataset, save_slices
    from conftest import make_tiny_model_file

    model = tmp_path / "tiny.pt"
    make_tiny_model_file(model, modalities=("flair",))
    assert load_model(model).image_size == 32
    lesion = torch.zeros(4, size, size, dtype=torch.bool)
    lesion[:2, 8:16, 8:16] = True
    data = tmp_path / "val.npz"
    save_slices(data, SliceDataset(torch.rand(4, 1, size, size) * 2 - 1, [1, 1, 0, 0], ["a", "a", "b", "b"],
                                   meta={"modalities": modalities, "image_size": size},
                                   masks=lesion if masks else None))
    out = tmp_path / "defaults.json"
    code = main(["calibrate", str(model), str(data), "-o", str(out), "--device", "cpu", "--steps", "1", "--tau", "0"])
    err = capsys.readouterr().err
    assert code == 1 and message in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and not out.with_suffix(".sweep.json").exists()

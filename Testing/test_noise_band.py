"""A model trained on a band of noise levels (cdmsegment train --t-range) is used inside that band only:
segment, the calibration sweep and the OOD score refuse a level outside it with one line."""

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import TINY_UNET, phantom
from test_cli import assert_one_error_line, run_cli, segment_args, write_case
from CDMSegmentLib.core.errors import CDMSegmentError
from CDMSegmentLib.core.image import Volume
from CDMSegmentLib.core.modelfile import load_model, save_model
from CDMSegmentLib.core.ood import denoising_errors
from CDMSegmentLib.data.slicesets import SliceDataset, save_slices
from CDMSegmentLib.training.export import diffusion_metadata
from CDMSegmentLib.training.train import TrainConfig
from CDMSegmentLib.core.unet import ConditionalUNet

BAND = (100, 300)  # T = 1000 linear: alpha_bar 0.895 .. 0.394


@pytest.fixture(scope="module")
def band_model_path(tmp_path_factory):
    torch.manual_seed(0)
    cfg = TrainConfig(unet=TINY_UNET, t_range=BAND)
    net = ConditionalUNet(cfg.unet)
    torch.nn.init.normal_(net.head[-1].weight, std=0.05)
    meta = diffusion_metadata(cfg, name="tiny-band", version="0", image_size=32, modalities=["FLAIR"],
                              class_names=["normal", "tumour"], training={"data": "none (test fixture)"},
                              defaults={"noise_level": 0.6, "steps": 2, "tau": 0.0, "noise_draws": 1})
    path = tmp_path_factory.mktemp("band") / "band.pt"
    save_model(net, meta, path)
    return path


def test_the_band_is_recorded_in_the_model_and_a_model_without_one_covers_every_timestep(band_model_path,
                                                                                       tiny_model_path):
    assert load_model(band_model_path).metadata["t_range"] == list(BAND)
    assert load_model(band_model_path).noise_band() == BAND
    old = load_model(tiny_model_path)
    del old.metadata["t_range"]
    assert old.noise_band() == (0, 999)


def test_a_noise_level_is_checked_with_the_timesteps_its_steps_reach(band_model_path):
    model = load_model(band_model_path)
    t = model.check_noise_level(0.6, steps=2)
    assert BAND[0] <= t - 1 and t <= BAND[1]
    with pytest.raises(CDMSegmentError, match=r"alpha_bar 0.95 lies outside the noise band this model was trained on "
                                              r"\(timesteps 100..300\): choose alpha_bar between 0.394 and 0.895"):
        model.check_noise_level(0.95)
    with pytest.raises(CDMSegmentError, match="alpha_bar 0.2 "):
        model.check_noise_level(0.2)
    # t = 100 is in the band, but 4 steps would go down to t = 97
    with pytest.raises(CDMSegmentError, match="with 4 steps lies outside.*between 0.394 and 0.889"):
        model.check_noise_level(0.895, steps=4)


def brain(tmp_path):
    return write_case(tmp_path / "case.nrrd", phantom((6, 20, 24)))


def test_segment_refuses_a_noise_level_outside_the_band_and_runs_inside_it(band_model_path, tmp_path, capsys):
    case = brain(tmp_path)
    code, out, err = run_cli(segment_args([case], tmp_path / "out", band_model_path, "--noise-level", "0.98",
                                          "--force"), capsys)
    assert code == 1 and "outside the noise band" in err and "choose alpha_bar between 0.394 and 0.893" in err  # 2 steps
    assert_one_error_line(err)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    code, out, err = run_cli(segment_args([case], tmp_path / "out", band_model_path, "--force"), capsys)
    assert code == 0, err


def test_the_calibration_sweep_keeps_to_the_band_and_refuses_a_level_asked_outside_it(band_model_path, tmp_path,
                                                                                      capsys):
    x = torch.full((4, 1, 32, 32), -1.0)
    x[:, :, 8:24, 8:24] = 0.0
    x[:2, :, 10:16, 10:16] = 0.9
    masks = torch.zeros(4, 32, 32, dtype=torch.bool)
    masks[:2, 10:16, 10:16] = True
    save_slices(tmp_path / "val.npz", SliceDataset(x, torch.tensor([1, 1, 0, 0]), ["a", "a", "b", "b"], masks=masks))
    out = tmp_path / "defaults.json"
    code, _, err = run_cli(["calibrate", band_model_path, tmp_path / "val.npz", "-o", out, "--device", "cpu",
                            "--precision", "fp32", "--tau", "0", "--steps", "1"], capsys)
    assert code == 0, err
    swept = {row["noise_level"] for row in json.loads(out.with_suffix(".sweep.json").read_text())}
    assert swept == {0.8, 0.65, 0.5}  # of the default grid 0.98 .. 0.5, the levels inside 0.394 .. 0.895
    code, _, err = run_cli(["calibrate", band_model_path, tmp_path / "val.npz", "-o", tmp_path / "d2.json",
                            "--noise-level", "0.5,0.95", "--device", "cpu"], capsys)
    assert code == 1 and "alpha_bar 0.95" in err and "outside the noise band" in err
    assert_one_error_line(err)


def test_the_ood_score_refuses_levels_outside_the_band(band_model_path):
    model = load_model(band_model_path)
    volume = Volume(phantom((6, 20, 24)))
    assert denoising_errors(model, [volume], noise_levels=[0.8, 0.5]).shape == (2,)
    with pytest.raises(CDMSegmentError, match="OOD score's noise level alpha_bar 0.95 lies outside"):
        denoising_errors(model, [volume], noise_levels=[0.95, 0.5])

"""The fault suite, continued (test_faults.py holds inputs and outputs): settings outside their meaning, model
files that are not what they claim, and every way a run can end (signals at any moment, a run killed outright,
memory running out). Each ends in one line, a non-zero exit, no traceback and no partial file."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from CDMSegmentLib.core.modelfile import load_model
from test_cli import assert_one_error_line, run_cli, write_case
from test_faults import PACKAGE_DIR, case

ENV = {**os.environ, "PYTHONPATH": str(PACKAGE_DIR), "OMP_NUM_THREADS": "1"}


def broken_model(tmp: Path, source: Path, change) -> Path:
    """A copy of ``source`` whose metadata is ``change(metadata)``, written past save_model's checks."""
    model = load_model(source)
    path = tmp / "broken.pt"
    torch.jit.save(model.network, str(path), _extra_files={"metadata.json": json.dumps(change(dict(model.metadata)))})
    return path


MODEL_FAULTS = {
    "threshold 'high'": (lambda m: {**m, "defaults": {**m["defaults"], "threshold": "high"}},
                         "broken.pt: metadata field 'defaults.threshold' must be a finite number >= 0, got 'high'"),
    "expects as a string": (lambda m: {**m, "expects": "FLAIR"},
                            "broken.pt: metadata field 'expects' must be an object ({...}), got 'FLAIR'"),
    "training as a string": (lambda m: {**m, "training": "phantoms"},
                             "broken.pt: metadata field 'training' must be an object ({...}), got 'phantoms'"),
    "one class": (lambda m: {**m, "class_names": ["normal"]},
                  "broken.pt: metadata field 'class_names' must hold at least 2 class names"),
    "num_timesteps 0": (lambda m: {**m, "num_timesteps": 0},
                        "broken.pt: metadata field 'num_timesteps' must be a whole number in [2, 100000], got 0"),
    "noise draws 0": (lambda m: {**m, "defaults": {**m["defaults"], "noise_draws": 0}},
                      "broken.pt: metadata field 'defaults.noise_draws' must be a whole number in [1, 1000], got 0"),
    "heatmap sign 0": (lambda m: {**m, "heatmap_sign": 0}, "broken.pt: metadata field 'heatmap_sign' must be one of"),
}


@pytest.mark.parametrize("command", ["info", "segment"])
@pytest.mark.parametrize("name", MODEL_FAULTS)
def test_a_model_file_with_broken_metadata_is_one_line_naming_the_file_and_the_field(name, command, tmp_path,
                                                                                    tiny_model_path, capfd):
    change, words = MODEL_FAULTS[name]
    model = broken_model(tmp_path, tiny_model_path, change)
    argv = ["info", model] if command == "info" else ["segment", case(tmp_path), "-o", tmp_path / "out", "--model",
                                                      model, "--device", "cpu"]
    code, out, err = run_cli(argv, capfd)
    assert code == 1 and out == ""
    assert_one_error_line(err)
    assert words in err, err
    assert not (tmp_path / "out").exists()


def test_a_folder_given_as_a_model_says_it_is_a_folder(tmp_path, capfd):
    code, _, err = run_cli(["info", tmp_path], capfd)
    assert code == 1
    assert err == f"cdmsegment info: error: {tmp_path} is a folder, not a model file; give the model's .pt file\n"


SETTING_FAULTS = {
    "--threshold -1": ["--threshold", "-1"],
    "--min-component-ml nan": ["--min-component-ml", "nan"],
    "--noise-draws 0": ["--noise-draws", "0"],
    "--steps 0": ["--steps", "0"],
    "--tau 1": ["--tau", "1"],
    "--noise-level 0": ["--noise-level", "0"],
    "--guidance-scale inf": ["--guidance-scale", "inf"],
    "--batch-size 0": ["--batch-size", "0"],
    "--seed -1": ["--seed=-1"],
    "--target-class 0": ["--target-class", "0"],
}


@pytest.mark.parametrize("name", SETTING_FAULTS)
def test_a_setting_outside_its_meaning_is_one_usage_line_before_anything_runs(name, tmp_path, tiny_model_path, capfd):
    code, out, err = run_cli(["segment", case(tmp_path), "-o", tmp_path / "out", "--model", tiny_model_path,
                              *SETTING_FAULTS[name]], capfd)
    assert code == 2 and out == ""
    assert_one_error_line(err)
    assert "must be" in err
    assert not (tmp_path / "out").exists()

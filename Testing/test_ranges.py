"""Every numeric setting is checked by one range (core/ranges.py), whichever way it comes in: each option of each
command, the Python API's settings objects, the runner's keywords and the MRML adapter's threshold."""

import argparse
import math

import numpy as np
import pytest

from CDMSegmentLib.cli.main import build_parser
from CDMSegmentLib.core import ranges
from CDMSegmentLib.core.errors import CDMSegmentError
from CDMSegmentLib.core.methods import CDMParams
from CDMSegmentLib.core.runner import segment_volume
from CDMSegmentLib.core.settings import CDMSettings
from CDMSegmentLib.core.threshold import resolve_threshold
from CDMSegmentLib.core.image import Volume
from scene_fixtures import phantom
from test_cli import run_cli


def outside(rng: ranges.Range) -> list:
    """Values each range must refuse: NaN, both infinities, and one number just past each bound."""
    values = ["nan", "inf", "-inf"]
    if rng.low is not None:
        values.append(repr(rng.low if rng.low_open else rng.low - 1))
    if rng.high is not None:
        values.append(repr(rng.high if rng.high_open else rng.high + 1))
    if rng.integer:
        values.append("1.5")
    return values


def numeric_options():
    """(command, option string, range) for every option of every command that takes numbers."""
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    for name, command in commands.items():
        for action in command._actions:
            assert action.type not in (int, float), f"{name} {action.option_strings}: unchecked number"
            rng = getattr(action.type, "range", None)
            if rng is not None:
                yield name, action.option_strings[0], rng


def test_every_numeric_option_of_every_command_refuses_nan_infinity_and_out_of_range_in_one_line(capsys):
    walked = 0
    for command, flag, rng in numeric_options():
        for value in outside(rng):
            code, out, err = run_cli([command, f"{flag}={value}"], capsys)  # = : "-inf" is no option
            assert code == 2, (command, flag, value, err)
            assert len(err.splitlines()) == 1 and f"argument {flag}: must be" in err, err
            assert "Traceback" not in err and out == ""
            walked += 1
    assert walked > 100  # segment's settings, the trainers', the evaluations'


@pytest.mark.parametrize("argv, words", [
    (["--threshold", "-1"], "argument --threshold: must be otsu, model or a finite number >= 0, got '-1'"),
    (["--min-component-ml", "nan"], "argument --min-component-ml: must be a finite number >= 0, got 'nan'"),
    (["--noise-draws", "0"], "argument --noise-draws: must be a whole number in [1, 1000], got '0'"),
    (["--tau", "1"], "argument --tau: must be a number in [0, 1), got '1'"),
    (["--noise-level", "1"], "argument --noise-level: must be a number in (0, 1), got '1'"),
    (["--seed", "-3"], "argument --seed: must be a whole number in [0, 4.29497e+09], got '-3'"),
    (["--batch-size", "0"], "argument --batch-size: must be a whole number in [1, 65536], got '0'"),
    (["--target-class", "0"], "argument --target-class: must be a whole number >= 1, got '0'"),
])
def test_the_issues_settings_are_one_line_naming_the_option_and_its_range(argv, words, capsys):
    code, _, err = run_cli(["segment", "in.nrrd", "-o", "out", *argv], capsys)
    assert code == 2
    assert err == f"cdmsegment segment: error: {words}; see cdmsegment segment --help\n"


@pytest.mark.parametrize("keywords", [dict(threshold=-1), dict(threshold=math.nan), dict(threshold="high"),
                                      dict(noise_draws=0), dict(min_component_ml=math.nan), dict(steps=2.5),
                                      dict(steps=True), dict(tau=1.0), dict(noise_level=0.0),
                                      dict(guidance_scale=-1.0), dict(preset="fast")])
def test_the_python_api_and_the_panel_settings_refuse_what_the_command_line_refuses(keywords):
    with pytest.raises(CDMSegmentError, match=f"^{next(iter(keywords))} must be"):
        CDMSettings(**keywords)


def test_settings_in_range_pass_as_numbers_of_their_kind():
    s = CDMSettings(steps=np.int64(2), noise_draws=3.0, threshold=0.0, tau=0.0, min_component_ml=0)
    assert (s.steps, s.noise_draws, s.threshold) == (2, 3, 0.0) and type(s.steps) is int
    assert CDMSettings(threshold="otsu").threshold == "otsu"


@pytest.mark.parametrize("keywords", [dict(noise_draws=0), dict(steps=0), dict(tau=math.nan)])
def test_sampler_parameters_built_directly_are_checked_too(keywords):
    with pytest.raises(CDMSegmentError, match="must be"):
        CDMParams(**keywords)


@pytest.mark.parametrize("keywords", [dict(batch_size=0), dict(seed=-1), dict(threshold=-1.0),
                                      dict(threshold=math.inf), dict(min_component_voxels=-2)])
def test_the_runner_refuses_its_keywords_before_reading_the_image(keywords, tiny_model):
    with pytest.raises(CDMSegmentError, match="must be"):
        segment_volume(tiny_model, [Volume(phantom(), (1.0, 1.0, 1.0))], device="cpu", log=lambda m: None,
                       **keywords)


def test_a_threshold_resolved_from_a_number_is_checked():
    heatmap = np.ones((2, 3, 3), np.float32)
    with pytest.raises(CDMSegmentError, match="^threshold must be a finite number >= 0, got -1.0$"):
        resolve_threshold(heatmap, -1.0)
    assert resolve_threshold(heatmap, "0.5") == 0.5

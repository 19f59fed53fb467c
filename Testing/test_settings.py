"""The CDM settings as one object (core/settings.py): the command line gives back what the launcher wrote, and
None means the model's measured default."""

import pytest

from CDMSegmentLib.cli.segment_command import SEGMENT_COMMANDS, make_parser
from CDMSegmentLib.core.errors import CDMSegmentError
from CDMSegmentLib.core.settings import PAPER_DEFAULTS, CDMSettings


@pytest.mark.parametrize("settings", [
    CDMSettings(),
    CDMSettings(preset="paper", threshold="otsu"),
    CDMSettings(noise_level=0.8123456789, steps=3, tau=0.0, noise_draws=4, guidance_scale=12.5, threshold=0.000123,
                min_component_ml=0.25),
    CDMSettings(threshold="model", min_component_ml=0.0)])
def test_the_command_line_gives_back_the_settings_it_was_made_from(settings):
    args = make_parser(SEGMENT_COMMANDS).parse_args(["segment", "in.nrrd", "-o", "out", *settings.command_line()])
    assert CDMSettings.from_arguments(args) == settings


def test_none_takes_the_models_measured_default_or_the_papers(tiny_model):
    measured = tiny_model.defaults
    params = CDMSettings(tau=0.5).params(tiny_model)
    assert (params.noise_level, params.steps, params.tau) == (measured["noise_level"], measured["steps"], 0.5)
    paper = CDMSettings(preset="paper").params(tiny_model)
    assert (paper.noise_level, paper.steps, paper.tau) == tuple(PAPER_DEFAULTS[k] for k in ("noise_level", "steps",
                                                                                             "tau"))


def test_the_minimum_component_size_is_in_ml_at_any_spacing(tiny_model):
    assert CDMSettings(min_component_ml=0.1).min_component_voxels(tiny_model, (0.5, 0.5, 2.0)) == 200
    assert CDMSettings(min_component_ml=0.1).min_component_voxels(tiny_model, (1.0, 1.0, 1.0)) == 100
    assert CDMSettings().min_component_voxels(tiny_model, (1.0, 1.0, 1.0)) == 0  # the tiny model stores none
    with pytest.raises(CDMSegmentError, match="^min_component_ml must be a finite number >= 0, got -1$"):
        CDMSettings(min_component_ml=-1)

"""CG-Diff with an oracle: a zero-eps network makes inversion + decoding exact, so only guidance leaves a map."""

import pytest
import torch

from CDMSegmentLib.baselines.cgdiff import PAPER_LEVEL, CGDiffParams, cgdiff_heatmap, cgdiff_timesteps
from CDMSegmentLib.core.errors import CDMSegmentError
from CDMSegmentLib.core.methods import CDMParams, build_method, classifier_passes_per_slice, network_evaluations_per_slice
from CDMSegmentLib.core.schedule import NoiseSchedule
from conftest import SIZE, SquareClassifier, ZeroEps, blob_slices


def test_timesteps_run_from_the_clean_image_to_level_l_evenly():
    assert cgdiff_timesteps(499, 500) == [-1] + list(range(500))
    assert cgdiff_timesteps(499, 5) == [-1, 99, 199, 299, 399, 499]
    with pytest.raises(CDMSegmentError, match="at most L \\+ 1"):
        cgdiff_timesteps(9, 11)
    with pytest.raises(CDMSegmentError, match="at least 1"):
        cgdiff_timesteps(9, 0)


def test_paper_level_is_l_500_of_1000():
    assert NoiseSchedule("linear", 1000).timestep_for_alpha_bar(PAPER_LEVEL) == 499


def test_without_guidance_the_oracle_reconstruction_is_exact():
    x = blob_slices(2, [0])
    maps = cgdiff_heatmap(ZeroEps(), NoiseSchedule("linear", 1000), SquareClassifier(), x, t_end=499, steps=25,
                          guidance_scale=0.0)
    assert maps.shape == (2, SIZE, SIZE)
    assert float(maps.abs().max()) < 1e-5


def test_guidance_towards_normal_changes_only_what_the_classifier_sees():
    x = blob_slices(2, [0])
    maps = cgdiff_heatmap(ZeroEps(), NoiseSchedule("linear", 1000), SquareClassifier(), x, t_end=499, steps=25,
                          guidance_scale=1.0)
    inside = maps[:, 2:6, 2:6]
    outside = maps.clone()
    outside[:, 2:6, 2:6] = 0
    assert float(inside.min()) > 1e-3
    assert float(outside.max()) < 1e-5


def test_registry_counts_and_checks(tiny_models):
    model, classifier = tiny_models
    params = CGDiffParams(noise_level=0.5, steps=3, guidance_scale=10.0)
    fn = build_method("cg-diff", model, CDMParams(), classifier=classifier, cgdiff=params)
    assert fn(blob_slices(2, [1]), torch.arange(2)).shape == (2, SIZE, SIZE)
    assert network_evaluations_per_slice("cg-diff", CDMParams(), CGDiffParams()) == 1000
    assert classifier_passes_per_slice("cg-diff", CDMParams(), CGDiffParams()) == 500
    with pytest.raises(CDMSegmentError, match="needs a noise-aware classifier"):
        build_method("cg-diff", model, CDMParams())
    with pytest.raises(CDMSegmentError, match="steps"):
        build_method("cg-diff", model, CDMParams(), classifier=classifier, cgdiff=CGDiffParams(0.999, 500))

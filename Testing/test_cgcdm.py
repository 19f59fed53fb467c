"""CG-CDM: classifier guidance on both CDM branches. Scale 0 is the CDM exactly; guidance changes the map."""

import torch

from CDMSegmentLib.core.cdm import cdm_heatmap
from CDMSegmentLib.core.methods import CDMParams, build_method, network_evaluations_per_slice
from CDMSegmentLib.core.names import METHODS
from CDMSegmentLib.core.schedule import NoiseSchedule
from conftest import SquareClassifier, ZeroEps, blob_slices


def cdm_and_cg_cdm(tiny_models, guidance_scale: float):
    """The CDM and CG-CDM maps of the same slices, noise and settings."""
    model, classifier = tiny_models
    x = blob_slices(3, [1])
    params = CDMParams(noise_level=0.9, steps=2, tau=0.5, guidance_scale=guidance_scale)
    cdm = build_method("cdm", model, params, seed=3)(x, torch.arange(3))
    cg = build_method("cg-cdm", model, params, classifier=classifier, seed=3)(x, torch.arange(3))
    return cdm, cg


def test_scale_zero_equals_cdm_to_the_bit(tiny_models):
    cdm, cg = cdm_and_cg_cdm(tiny_models, 0.0)
    assert torch.equal(cdm, cg)


def test_guidance_changes_the_map(tiny_models):
    cdm, cg = cdm_and_cg_cdm(tiny_models, 100.0)
    assert (cdm - cg).abs().max() > 1e-4


def test_guidance_alone_marks_the_region_the_classifier_keys_on():
    """With eps = 0 both CDM branches agree; only the guidance (weights 1 vs tau on y1) separates them."""
    x = blob_slices(1, [0])
    schedule = NoiseSchedule("linear", 1000)
    kwargs = dict(t_start=100, steps=3, tau=0.5, noise=torch.zeros_like(x))
    assert float(cdm_heatmap(ZeroEps(), schedule, x, **kwargs).abs().max()) == 0.0
    guided = cdm_heatmap(ZeroEps(), schedule, x, classifier=SquareClassifier(), guidance_scale=1.0, **kwargs)[0]
    outside = guided.clone()
    outside[2:6, 2:6] = 0
    assert float(guided[2:6, 2:6].min()) > 0 and float(outside.abs().max()) == 0.0


def test_cg_cdm_is_in_the_registry_with_the_cdm_cost():
    assert "cg-cdm" in METHODS
    assert network_evaluations_per_slice("cg-cdm", CDMParams(steps=10)) == 20

"""Heatmap methods by name, each a callable on a batch of model-sized slices.

The volume runner and the evaluation harness see only this interface:
``method(x_0 (B, C, H, W), slice_ids (B,)) -> (B, H, W)``, larger where the target
class is. Noise is drawn per slice from (seed, slice id) on the CPU, so a heatmap does
not depend on the batch size or the device beyond float rounding (below 1e-6 on the CPU).
The CDM methods also take ``noise=`` (draws, B, C, H, W) already on the device: the volume
runner draws it for all slices before its loop, so no host-device copy sits inside it.
"""

from typing import Callable, Optional

import torch

from .cdm import cdm_heatmap
from .device import autocast
from .ensemble import ensemble_members
from .errors import CDMSegmentError
from .model_description import check_classifier_fits
from .modelfile import LoadedModel
from .names import CAM_METHODS, CDM_METHODS, CLASSIFIER_METHODS, METHODS
from .settings import CDMParams

MethodFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# The baselines are imported only when one is built: the Slicer module ships the core without them.
CG_CDM_THRESHOLD = "cg_cdm_threshold"  # the key of CG-CDM's calibrated threshold in a classifier's defaults


def calibrated_threshold(method: str, model: Optional[LoadedModel],
                         classifier: Optional[LoadedModel] = None) -> Optional[float]:
    """The heatmap threshold measured on held-out data for ``method``, if any: CDM's is stored in the
    diffusion model, CG-CDM's in the classifier that guides it (``cdmsegment calibrate --classifier``)."""
    source, key = {"cdm": (model, "threshold"), "cg-cdm": (classifier, CG_CDM_THRESHOLD)}.get(method, (None, ""))
    value = source.defaults.get(key) if source is not None else None
    return None if value is None else float(value)


def slice_noise(slice_ids: torch.Tensor, shape, seed: int, draw: int) -> torch.Tensor:
    """Reproducible eps for each slice: (B, *shape) float32 on the CPU."""
    out = torch.empty((len(slice_ids),) + tuple(shape))
    for n, sid in enumerate(slice_ids.tolist()):
        g = torch.Generator().manual_seed(seed * 1_000_003 + draw * 10_007 + int(sid))
        out[n] = torch.randn(tuple(shape), generator=g)
    return out


def draw_noise(slice_ids: torch.Tensor, shape, seed: int, params: CDMParams) -> torch.Tensor:
    """eps of every draw for each slice: (noise_draws, B, *shape) float32 on the CPU. Antithetic draws
    2k and 2k + 1 are eps_k and -eps_k, so draw 0 is the same with and without ``antithetic``."""
    if params.antithetic:
        return torch.stack([slice_noise(slice_ids, shape, seed, d // 2) * (1 - 2 * (d % 2))
                            for d in range(params.noise_draws)])
    return torch.stack([slice_noise(slice_ids, shape, seed, d) for d in range(params.noise_draws)])


def network_evaluations_per_slice(method: str, params: CDMParams, cgdiff=None) -> int:
    """Forward passes of the diffusion network per slice (classifier gradients not counted; CAMs use none).
    cgdiff: CG-Diff's settings (``baselines.cgdiff.CGDiffParams``; default: Wolleb et al.'s)."""
    if method in CDM_METHODS:
        return 2 * params.steps * params.noise_draws
    if method == "cg-diff":
        return 2 * _cgdiff_params(cgdiff).steps
    return 0


def _cgdiff_params(cgdiff):
    from ..baselines.cgdiff import CGDiffParams

    return cgdiff or CGDiffParams()


def classifier_passes_per_slice(method: str, params: CDMParams, cgdiff=None,
                                feature_channels: int = 0) -> int:
    """Forward-and-backward passes of the classifier per slice (Score-CAM: one forward per feature channel, plus one)."""
    if method == "cg-cdm":
        return 2 * params.steps * params.noise_draws
    if method == "cg-diff":
        return _cgdiff_params(cgdiff).steps
    if method == "scorecam":
        return 1 + feature_channels
    return 1 if method in CAM_METHODS else 0


def _check_class(c: int, class_names: list) -> None:
    if not 0 <= c < len(class_names):
        raise CDMSegmentError(f"class {c} does not exist; the model knows {len(class_names)} classes: "
                              f"{', '.join(class_names)}")


def build_method(method: str, model: Optional[LoadedModel], params: CDMParams, *, target_class: int = 1,
                 normal_class: int = 0, classifier: Optional[LoadedModel] = None, seed: int = 0,
                 cgdiff=None) -> MethodFn:
    """The heatmap function for ``method`` with the networks already on their device. The CDM's noise draws
    take turns on an ensemble's networks (core/ensemble.py): draw d runs through member d mod K.

    model: the diffusion model (not used by the CAM methods, which may pass None). classifier:
    the noise-aware classifier, needed by the methods in CLASSIFIER_METHODS. cgdiff: CG-Diff's
    settings (default: Wolleb et al.'s).
    """
    if method not in METHODS:
        raise CDMSegmentError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if method in CLASSIFIER_METHODS and classifier is None:
        raise CDMSegmentError(f"{method} needs a noise-aware classifier; give one with --classifier "
                              "(train one with 'cdmsegment train-classifier')")
    if method not in CAM_METHODS and model is None:
        raise CDMSegmentError(f"{method} needs the diffusion model; give one with --model")
    if method in CLASSIFIER_METHODS and model is not None:
        check_classifier_fits(model, classifier)
    for c in (target_class, normal_class):
        _check_class(c, (classifier if method in CAM_METHODS else model).class_names)
    if method in CAM_METHODS:
        from ..baselines.cam import build_cam_method

        return build_cam_method(method, classifier, target_class)
    if method == "cg-diff":
        from ..baselines.cgdiff import build_cgdiff_method

        return build_cgdiff_method(model, classifier, _cgdiff_params(cgdiff), normal_class)
    schedule = model.schedule()
    t_start = model.check_noise_level(params.noise_level, params.steps)
    guide = classifier.network if method == "cg-cdm" else None
    sign = float(model.metadata.get("heatmap_sign", 1.0))
    members = ensemble_members(model.network)  # draw d runs through member d mod K (core/ensemble.py)
    if params.noise_draws % len(members):
        raise CDMSegmentError(f"{model.metadata['name']} is an ensemble of {len(members)} networks and each noise "
                              f"draw runs through one of them in turn: give noise draws as a multiple of "
                              f"{len(members)} (--noise-draws {len(members)}), not {params.noise_draws}")

    def heatmap(x_0: torch.Tensor, slice_ids: torch.Tensor, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        """noise: (noise_draws, B, C, H, W) on x_0's device (default: ``draw_noise`` for these slices)."""
        if noise is None:
            noise = draw_noise(slice_ids.cpu(), x_0.shape[1:], seed, params).to(x_0.device)
        total = torch.zeros(x_0.shape[0], *x_0.shape[2:], device=x_0.device)
        for draw in range(params.noise_draws):
            total += cdm_heatmap(members[draw % len(members)], schedule, x_0, t_start=t_start, steps=params.steps,
                                 tau=params.tau,
                                 target_class=target_class, normal_class=normal_class, noise=noise[draw].to(x_0.dtype),
                                 classifier=guide, guidance_scale=params.guidance_scale).float()
        return sign * total / params.noise_draws

    return heatmap


def run_in_batches(fn: MethodFn, slices: torch.Tensor, device: torch.device, *, batch_size: int = 16,
                   precision: str = "fp32", first_id: int = 0) -> torch.Tensor:
    """(N, C, S, S) slices -> (N, S, S) maps on the CPU, ``batch_size`` slices at a time on ``device``.

    Slice ids run from ``first_id``, so that slices of several cases each get their own noise.
    """
    out = torch.zeros(slices.shape[0], *slices.shape[2:])
    for lo in range(0, len(out), batch_size):
        ids = torch.arange(lo, min(lo + batch_size, len(out)))
        with torch.no_grad(), autocast(device, precision):
            out[ids] = fn(slices[ids].to(device), ids + first_id).float().cpu()
    return out

"""Heatmap methods by name, each a callable on a batch of model-sized slices.

The volume runner and the evaluation harness see only this interface:
``method(x_0 (B, C, H, W), slice_ids (B,)) -> (B, H, W)``, larger where the target
class is. Noise is drawn per slice from (seed, slice id) on the CPU, so a heatmap does
not depend on the batch size or the device beyond float rounding (below 1e-6 on the CPU).
The CDM methods also take ``noise=`` (draws, B, C, H, W) already on the device: the volume
runner draws it for all slices before its loop, so no host-device copy sits inside it.
"""

from dataclasses import dataclass, fields, replace
from typing import Callable, Optional

import torch

from . import ranges
from .cdm import cdm_heatmap
from .device import autocast
from .errors import CDMSegmentError
from .modelfile import LoadedModel

# The paper's settings (Q = 400 of T = 4000 linear ~ alpha_bar 0.90, R = 10, tau = 0.95).
PAPER_DEFAULTS = {"noise_level": 0.896, "steps": 10, "tau": 0.95, "noise_draws": 1, "guidance_scale": 100.0}


@dataclass(frozen=True)
class CDMParams:
    """noise_level: alpha_bar at the start (the paper's Q, chosen by alpha_bar so any T works);
    steps: R; tau; noise_draws: heatmaps averaged over this many noise draws; guidance_scale: s (CG-CDM);
    antithetic: draws come in pairs eps, -eps (the noise's odd terms cancel within a pair)."""

    noise_level: float = PAPER_DEFAULTS["noise_level"]
    steps: int = PAPER_DEFAULTS["steps"]
    tau: float = PAPER_DEFAULTS["tau"]
    noise_draws: int = 1
    guidance_scale: float = PAPER_DEFAULTS["guidance_scale"]
    antithetic: bool = False

    def __post_init__(self):
        """Evaluation sweeps and the baselines build these directly: the same ranges as every other way in."""
        for f in fields(self):
            if f.name != "antithetic":
                object.__setattr__(self, f.name, ranges.check(f.name, getattr(self, f.name)))

    @classmethod
    def for_model(cls, model: LoadedModel, preset: str = "model", classifier: Optional[LoadedModel] = None,
                  **overrides) -> "CDMParams":
        """The model's own measured defaults ('model') or the paper's ('paper'); None overrides are ignored.
        With the 'model' preset, a classifier's measured guidance scale replaces the paper's s."""
        if preset not in ("model", "paper"):
            raise CDMSegmentError(f"unknown preset {preset!r}; use 'model' or 'paper'")
        names = {f.name for f in fields(cls)}
        base = {k: v for k, v in (model.defaults if preset == "model" else PAPER_DEFAULTS).items() if k in names}
        if preset == "model" and classifier is not None and "guidance_scale" in classifier.defaults:
            base["guidance_scale"] = float(classifier.defaults["guidance_scale"])
        params = replace(cls(), **base)
        return replace(params, **{k: v for k, v in overrides.items() if v is not None})


MethodFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
CDM_METHODS = ("cdm", "cg-cdm")
# The baselines are imported only when one is built: the Slicer module ships the core without them.
CAM_METHODS = ("gradcam", "gradcam++", "scorecam", "layercam")
METHODS = CDM_METHODS + CAM_METHODS + ("cg-diff",)
CLASSIFIER_METHODS = ("cg-cdm", "cg-diff") + CAM_METHODS  # the methods that need a noise-aware classifier
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
    """The heatmap function for ``method`` with the networks already on their device.

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

    def heatmap(x_0: torch.Tensor, slice_ids: torch.Tensor, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        """noise: (noise_draws, B, C, H, W) on x_0's device (default: ``draw_noise`` for these slices)."""
        if noise is None:
            noise = draw_noise(slice_ids.cpu(), x_0.shape[1:], seed, params).to(x_0.device)
        total = torch.zeros(x_0.shape[0], *x_0.shape[2:], device=x_0.device)
        for draw in range(params.noise_draws):
            total += cdm_heatmap(model.network, schedule, x_0, t_start=t_start, steps=params.steps, tau=params.tau,
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

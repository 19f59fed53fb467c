"""The evaluation harness: every method on the same slices, the same threshold rules, the same metrics, timed.

Slices are model-sized (as the networks see them) and metrics are computed there, as in the
paper; HD95 uses the slices' pixel size in mm. Three threshold rules:
- ``otsu-slice``: Otsu on each slice's heatmap (the paper's protocol; it always finds something);
- ``volume-otsu``: one Otsu threshold over all slices of a case (what ``cdmsegment segment`` does);
- ``model``: the threshold calibrated for the method on held-out data: CDM's in the diffusion
  model, CG-CDM's in the classifier (other methods have none; their rows are left out).
Dice, IoU and HD95 are means over slices with lesion; false positives are counted on healthy
slices and healthy cases; 3D Dice is per case with lesion. Seconds per slice are wall time of
the method alone, measured in the same run for every method.
"""

import itertools
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..baselines.cgdiff import CGDiffParams
from ..core.errors import CDMSegmentError
from ..core.methods import (CDMParams, build_method, calibrated_threshold, classifier_passes_per_slice,
                            network_evaluations_per_slice, run_in_batches)
from ..core.names import CAM_METHODS, CDM_METHODS, METHODS
from .metrics import dice, false_positive_pixels, hd95, iou, nan_mean, pixel_auroc
from ..core.modelfile import LoadedModel
from ..core.threshold import otsu_threshold

THRESHOLD_RULES = ("otsu-slice", "volume-otsu", "model")
CONTENT_LEVEL = -0.99  # normalised background is exactly -1; resampling blurs its edge a little


@dataclass
class EvalCase:
    """One case as the networks see it. slices: (N, C, S, S) in [-1, 1]; masks: (N, S, S) bool ground truth."""

    case_id: str
    slices: torch.Tensor
    masks: np.ndarray
    pixel_mm: Tuple[float, float]

    def content(self) -> np.ndarray:
        """(N, S, S) bool: pixels inside the imaged anatomy (any modality above background)."""
        return (self.slices > CONTENT_LEVEL).any(dim=1).numpy()


@dataclass(frozen=True)
class Variant:
    """One method with one setting: a row group of the results."""

    method: str
    params: CDMParams
    cgdiff: CGDiffParams

    @property
    def label(self) -> str:
        if self.method in CDM_METHODS:
            p = self.params
            scale = f" s={p.guidance_scale:g}" if self.method == "cg-cdm" else ""
            return f"{self.method} a={p.noise_level:g} R={p.steps} tau={p.tau:g}{scale}"
        if self.method == "cg-diff":
            c = self.cgdiff
            return f"cg-diff a={c.noise_level:g} steps={c.steps} s={c.guidance_scale:g}"
        return self.method


@dataclass
class MethodRun:
    variant: Variant
    heatmaps: List[np.ndarray]  # per case (N, S, S) float32, >= 0, zero outside the content
    seconds_per_slice: float
    diffusion_evaluations: int
    classifier_passes: int
    rows: List[dict] = field(default_factory=list)


def variants(methods: Sequence[str], base: CDMParams, cgdiff: CGDiffParams, *, noise_levels=(None,), steps=(None,),
             taus=(None,), guidance_scales=(None,)) -> List[Variant]:
    """Every method x every combination of the ablation values that apply to it (None: the base value)."""
    out = []
    for method in methods:
        if method not in METHODS:
            raise CDMSegmentError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
        if method not in CDM_METHODS:
            out.append(Variant(method, base, cgdiff))
            continue
        scales = guidance_scales if method == "cg-cdm" else (None,)
        for q, r, tau, s in itertools.product(noise_levels, steps, taus, scales):
            over = {k: v for k, v in dict(noise_level=q, steps=r, tau=tau, guidance_scale=s).items() if v is not None}
            out.append(Variant(method, replace(base, **over), cgdiff))
    return out


def run_variant(variant: Variant, cases: Sequence[EvalCase], model: Optional[LoadedModel],
                classifier: Optional[LoadedModel], *, batch_size: int = 16, seed: int = 0,
                device: torch.device = torch.device("cpu"), target_class: int = 1,
                log: Callable[[str], None] = print) -> MethodRun:
    """Heatmaps of every case's slices with one method; timing covers the method calls only."""
    fn = build_method(variant.method, model, variant.params, target_class=target_class, classifier=classifier,
                      seed=seed, cgdiff=variant.cgdiff)
    heatmaps, seconds, n = [], 0.0, 0
    for case in cases:
        start = time.perf_counter()
        out = run_in_batches(fn, case.slices, device, batch_size=batch_size, first_id=n)
        seconds += time.perf_counter() - start
        n += len(out)
        heatmaps.append(np.where(case.content(), np.maximum(out.numpy(), 0.0), 0.0).astype(np.float32))
    channels = _feature_channels(classifier)
    log(f"{variant.label}: {seconds / max(n, 1):.3f} s per slice over {n} slices")
    return MethodRun(variant, heatmaps, seconds / max(n, 1),
                     network_evaluations_per_slice(variant.method, variant.params, variant.cgdiff),
                     classifier_passes_per_slice(variant.method, variant.params, variant.cgdiff, channels))


def _feature_channels(classifier: Optional[LoadedModel]) -> int:
    """Channels of the classifier's CAM target layer, from its metadata (Score-CAM runs one pass per channel)."""
    arch = (classifier.metadata.get("architecture", {}) if classifier is not None else {})
    return int(arch.get("base_channels", 0)) * int((arch.get("channel_mults") or [0])[-1])


def masks_for_rule(rule: str, heatmaps: np.ndarray, content: np.ndarray, calibrated: Optional[float]) -> np.ndarray:
    """Binary masks (N, S, S) of one case's heatmaps (N, S, S) under a threshold rule (see the module docstring)."""
    if rule == "otsu-slice":
        thresholds = np.array([otsu_threshold(h[c]) if c.any() else np.inf for h, c in zip(heatmaps, content)])
        return (heatmaps > thresholds[:, None, None]) & content
    if rule == "volume-otsu":
        return (heatmaps > otsu_threshold(heatmaps[content])) & content
    if rule == "model":
        return (heatmaps > calibrated) & content
    raise CDMSegmentError(f"unknown threshold rule {rule!r}; use {', '.join(THRESHOLD_RULES)}")


def score(run: MethodRun, cases: Sequence[EvalCase], rule: str, calibrated: Optional[float]) -> dict:
    """One results row: the metrics of one method under one threshold rule (NaN counts alongside)."""
    d2, j2, h95, fp_slices, fp_volumes, d3, any_fp = [], [], [], [], [], [], []
    for case, heat in zip(cases, run.heatmaps):
        pred = masks_for_rule(rule, heat, case.content(), calibrated)
        lesion = case.masks.reshape(len(case.masks), -1).any(axis=1)
        for p, t, has in zip(pred, case.masks, lesion):
            if has:
                d2.append(dice(p, t))
                j2.append(iou(p, t))
                h95.append(hd95(p, t, case.pixel_mm))
            else:
                fp_slices.append(false_positive_pixels(p, t))
                any_fp.append(bool(p.any()))
        if lesion.any():
            d3.append(dice(pred, case.masks))
        else:
            fp_volumes.append(int(pred.sum()))
    hd, hd_undefined = nan_mean(h95)
    return {
        "method": run.variant.label, "rule": rule,
        "dice": nan_mean(d2)[0], "iou": nan_mean(j2)[0], "hd95_mm": hd, "hd95_undefined": hd_undefined,
        "lesion_slices": len(d2), "dice_3d": nan_mean(d3)[0], "lesion_cases": len(d3),
        "fp_pixels_per_healthy_slice": nan_mean(fp_slices)[0],
        "healthy_slices_with_fp": float(np.mean(any_fp)) if any_fp else float("nan"), "healthy_slices": len(fp_slices),
        "fp_pixels_per_healthy_case": nan_mean(fp_volumes)[0], "healthy_cases": len(fp_volumes),
        "auroc": pixel_auroc(np.concatenate([h[c.content()] for h, c in zip(run.heatmaps, cases)]),
                             np.concatenate([c.masks[c.content()] for c in cases])),
        "seconds_per_slice": run.seconds_per_slice, "diffusion_evals_per_slice": run.diffusion_evaluations,
        "classifier_passes_per_slice": run.classifier_passes,
    }


def evaluate_cases(cases: Sequence[EvalCase], variant_list: Sequence[Variant], *, model: Optional[LoadedModel],
                   classifier: Optional[LoadedModel], rules: Sequence[str] = ("otsu-slice", "volume-otsu"),
                   batch_size: int = 16, seed: int = 0, device: str = "cpu",
                   log: Callable[[str], None] = print) -> List[MethodRun]:
    """Run every variant on ``cases`` and score it under every rule; rows end up in each MethodRun.rows."""
    unknown = [r for r in rules if r not in THRESHOLD_RULES]
    if unknown:
        raise CDMSegmentError(f"unknown threshold rule {unknown[0]!r}; use {', '.join(THRESHOLD_RULES)}")
    if not cases:
        raise CDMSegmentError("no cases to evaluate")
    dev = torch.device(device)
    for m in (model, classifier):
        if m is not None:
            m.network.to(dev)
    runs = []
    for variant in variant_list:
        run = run_variant(variant, cases, model, classifier, batch_size=batch_size, seed=seed, device=dev, log=log)
        calibrated = calibrated_threshold(variant.method, model, classifier)
        for rule in rules:
            if rule == "model" and calibrated is None:
                continue
            run.rows.append(score(run, cases, rule, calibrated))
        runs.append(run)
    return runs


def load_eval_cases(data: Path, modalities: Sequence[str], image_size: int, max_cases: Optional[int] = None,
                    normalisation: Optional[dict] = None) -> List[EvalCase]:
    """Cases with masks, axial, slices with content only: from a BraTS-layout folder (phantoms included)
    through ``data.py`` exactly as for training, or from a ``.npz`` slice set made with
    ``cdmsegment slices --with-masks`` (e.g. to evaluate on a machine without SimpleITK)."""
    if data.suffix == ".npz":
        return _npz_cases(data, modalities, image_size, max_cases)
    from ..data.cases import case_pixel_mm, find_brats_cases, load_case_slices

    cases = [c for c in find_brats_cases(data) if c.seg is not None][:max_cases]
    if not cases:
        raise CDMSegmentError(f"no case under {data} has a segmentation (_seg file); evaluation needs masks")
    out = []
    for case in cases:
        slices, _, has_content, masks = load_case_slices(case, modalities, image_size, "axial", with_masks=True,
                                                         normalisation=normalisation)
        keep = has_content.numpy()
        pixel = case_pixel_mm(case, modalities[0], image_size)
        out.append(EvalCase(case.case_id, slices[keep], masks[keep].numpy(), (pixel, pixel)))
    return out


def _npz_cases(path: Path, modalities: Sequence[str], image_size: int, max_cases: Optional[int]) -> List[EvalCase]:
    from ..data.slicesets import load_slices

    data = load_slices(path, image_size=image_size, modalities=modalities, with_masks=True, needed_by="the models")
    ids = list(dict.fromkeys(data.case_ids))[:max_cases]
    out = []
    for case_id in ids:
        sel = np.array([c == case_id for c in data.case_ids])
        pixel = data.meta["pixel_mm"][case_id]
        out.append(EvalCase(case_id, data.as_float(sel), data.masks[sel].numpy(), (pixel, pixel)))
    return out


def evaluate_files(data_dir, output_dir, *, model=None, classifier=None, methods: Sequence[str] = ("cdm",),
                   rules: Sequence[str] = ("otsu-slice", "volume-otsu"), max_cases: Optional[int] = None,
                   preset: str = "model", noise_levels=(None,), steps=(None,), taus=(None,), guidance_scales=(None,),
                   cgdiff: Optional[CGDiffParams] = None, batch_size: int = 16, seed: int = 0, device: str = "cpu",
                   command: str = "", log: Callable[[str], None] = print) -> dict:
    """``cdmsegment evaluate``: load the models and cases, run and score every variant, write the report.

    model/classifier: registered names or files (the classifier is needed by cg-cdm, cg-diff and
    the CAMs; a CAM-only run needs no diffusion model). Returns the report's paths.
    """
    from ..core.modelfile import load_model
    from .report import summary_lines, write_report

    needs_model = any(m not in CAM_METHODS for m in methods)
    diffusion = load_model(model) if needs_model or model is not None else None
    guide = load_model(classifier, kind="classifier") if classifier is not None else None
    reference = diffusion or guide
    if reference is None:
        raise CDMSegmentError("give a classifier with --classifier for the CAM methods")
    if diffusion is not None and guide is not None and (
            diffusion.image_size, diffusion.modalities) != (guide.image_size, guide.modalities):
        raise CDMSegmentError(f"the classifier sees {guide.image_size} px {'+'.join(guide.modalities)} slices but the "
                              f"diffusion model {diffusion.image_size} px {'+'.join(diffusion.modalities)}; "
                              "train the classifier on the diffusion model's slice set")
    base = CDMParams.for_model(diffusion, preset, guide) if diffusion is not None else CDMParams()
    variant_list = variants(methods, base, cgdiff or CGDiffParams(), noise_levels=noise_levels, steps=steps,
                            taus=taus, guidance_scales=guidance_scales)
    cases = load_eval_cases(Path(data_dir), reference.modalities, reference.image_size, max_cases,
                            reference.metadata.get("normalisation"))
    log(f"{len(cases)} cases, {sum(len(c.masks) for c in cases)} slices, {len(variant_list)} method settings")
    runs = evaluate_cases(cases, variant_list, model=diffusion, classifier=guide, rules=rules, batch_size=batch_size,
                          seed=seed, device=device, log=log)
    for line in summary_lines(runs):
        log(line)
    return write_report(runs, cases, Path(output_dir), command)

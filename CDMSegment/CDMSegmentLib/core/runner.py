"""The volume runner: a 3D image in, a heatmap and a mask on exactly its voxel grid out.

volume(s) -> canonical orientation and slice axis -> per-volume normalisation ->
model-sized slices with content -> batches on the device -> heatmap per slice ->
back onto the input grid -> one volume-level threshold -> mask.
"""

import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .device import PRECISIONS, autocast, check_finite, choose_device, cpu_has_bf16, is_out_of_memory, voxel_tensor
from .engine import choose_engine, with_engine
from . import ranges
from .errors import MEMORY_ADVICE, Cancelled, CDMSegmentError
from .image import Volume
from .intensity import normalise_volume
from .crop import crop_window, tissue_boxes
from .methods import CDMParams, build_method, calibrated_threshold, draw_noise, network_evaluations_per_slice
from .model_description import check_classifier_fits, check_inputs
from .names import CDM_METHODS, CLASSIFIER_METHODS
from .modelfile import LoadedModel
from .ood import ood_score
from .plausibility import check_plausible, ood_finding
from .settings import check_threshold
from .slicing import Orientation, extract_slices, insert_slices
from .refine import grow_through_intensity, refinement_parts
from .threshold import make_mask, resolve_threshold, voxels_for_ml
from .tissue import slices_with_content, tissue_mask

@dataclass
class SegmentationResult:
    heatmap: np.ndarray  # (K, J, I) float32, >= 0, on the input grid
    mask: np.ndarray  # (K, J, I) uint8 (1 = target class)
    threshold: float  # in heatmap units
    slices_total: int
    slices_run: int  # slices with content, the others are skipped
    network_evaluations: int
    seconds: float
    device: str
    min_component_voxels: int = 0  # the speck removal the mask was made with (a later threshold keeps it)
    warnings: list = field(default_factory=list)  # borderline plausibility findings, shown beside the result
    engine: str = "torch"  # what evaluated the network: torch or onnxruntime (core/engine.py)
    # the lesion-intensity refinement the mask was delineated with (refine_mask), None without one: a new
    # threshold re-makes the mask the same way from it
    refinement: Optional[dict] = None
    supported_voxels: int = 0  # of the mask, those the heatmap's support (and small lesions) added to the
    # lesion-intensity result


def _is_cancelled(cancel) -> bool:
    if cancel is None:
        return False
    return cancel.is_set() if isinstance(cancel, threading.Event) else bool(cancel())


def _normalised(model: LoadedModel, raw: Sequence[torch.Tensor]) -> torch.Tensor:
    """(M, K, J, I) float32 on the voxels' device: each modality normalised as the model's metadata says."""
    out = []
    for a, n in zip(raw, model.modalities):
        try:
            out.append(normalise_volume(a, model.metadata["normalisation"]))
        except CDMSegmentError as e:
            raise CDMSegmentError(f"{n}: {e}") from None
    return torch.stack(out)


# Slices per batch when neither the caller nor the model's ``batch_size`` default (per device type) says.
# CPU: 4 slices ran the sample 1.6x faster than 16 on two idle AVX2 cores (a small batch's activations stay in
# cache; bench/bench_network.py times it), with the same heatmap. CUDA: not measured yet; a GPU wants large
# batches, and out of memory halves them.
BATCH_SIZE = {"cpu": 4, "cuda": 64}


def default_batch_size(model: LoadedModel, device: torch.device) -> int:
    """Slices per batch on ``device``: the model's measured ``batch_size`` for its type, else BATCH_SIZE."""
    measured = model.defaults.get("batch_size", {})
    return int(measured.get(device.type, BATCH_SIZE.get(device.type, 16)))


def segment_volume(model: LoadedModel, volumes: Sequence[Volume], *, method: str = "cdm", target_class: int = 1,
                   params: Optional[CDMParams] = None, classifier: Optional[LoadedModel] = None,
                   device: str = "auto", axis: Union[str, int] = "auto", batch_size: Optional[int] = None,
                   threshold: Union[str, float, None] = None, min_component_voxels: Optional[int] = None,
                   precision: str = "auto", engine: str = "auto", seed: int = 0, crop_margin_px: Optional[int] = None,
                   force: bool = False, grow_above: Optional[float] = None, lesion_intensity: Optional[float] = None,
                   progress: Optional[Callable[[int, int], None]] = None, cancel=None,
                   log: Callable[[str], None] = print) -> SegmentationResult:
    """Run ``method`` slice by slice over the volume and threshold the heatmap at volume level.

    volumes: one Volume per model modality, on one grid. threshold: 'model' (calibrated on held-out
    data for this method, the default when there is one), 'otsu' (over the volume) or a number.
    min_component_voxels: 3D components smaller than this are dropped (default: the model's
    ``min_component_ml`` at this volume's spacing). batch_size: slices per batch (default:
    ``default_batch_size``). crop_margin_px: run CDM only on each batch's tissue bounding box plus
    this many model pixels (default: the model's ``crop_margin_px``, else the whole slice; a
    negative value forces the whole slice); the other methods always see the whole slice. progress(done, total)
    counts slices with content (tissue: core/tissue.py); cancel (callable or threading.Event) stops between
    batches with Cancelled. force: run on an image the model was not made for (core/plausibility.py).
    engine: 'auto', 'torch' or 'onnxruntime' for the diffusion network of the CDM methods (core/engine.py).
    grow_above: grow the CDM's mask through the bright components it touches (core/refine.py), in multiples
    of the brain's median intensity (default: the model's ``grow_above``, else none; 0 turns it off).
    lesion_intensity: make the CDM's mask the bright components it covers, above this share of the median
    intensity under it (core/refine.lesion_intensity_components, with the model's ``lesion_intensity_floor``
    and ``lesion_support``; default: the model's ``lesion_intensity``, else none; 0 turns it off), joined with the
    bright components the heatmap supports where the model has ``heatmap_support`` (refine_mask); applied
    before ``grow_above``.
    Everything from the input's voxels to the heatmap on the input grid stays on the device: the volumes
    cross to it once, the heatmap and the tissue mask come back once for the threshold and the mask.
    """
    start = time.perf_counter()
    check_inputs(model, volumes)
    if classifier is not None and method in CLASSIFIER_METHODS:
        check_classifier_fits(model, classifier)
    dev = choose_device(device, log)
    # the choices that conflict with each other are refused before the image is read or scored
    if precision not in PRECISIONS:
        raise CDMSegmentError(f"unknown precision {precision!r}; use {', '.join(PRECISIONS)}")
    requested, engine = engine, choose_engine(engine, dev, precision) if method in CDM_METHODS else "torch"
    batch_size, seed = ranges.check_optional("batch_size", batch_size), ranges.check("seed", seed)
    threshold, crop_margin_px = check_threshold(threshold), ranges.check_optional("crop_margin_px", crop_margin_px)
    min_component_voxels = ranges.check_optional("min_component_voxels", min_component_voxels)
    grow_above = ranges.check_optional("grow_above", grow_above)
    lesion_intensity = ranges.check_optional("lesion_intensity", lesion_intensity)
    raw = [voxel_tensor(v.array, dev) for v in volumes]
    arrays = _normalised(model, raw)  # the OOD check's input too
    warnings = check_plausible(model.metadata, volumes, model.modalities, force,
                               lambda: [ood_finding(ood_score(model, volumes, device=dev, normalised=arrays))])
    for warning in warnings:
        log(f"warning: {warning}")
    at_calibration = params is None or params == CDMParams.for_model(model, classifier=classifier, method=method)
    params = params or CDMParams.for_model(model, classifier=classifier, method=method)
    defaults = model.defaults
    calibrated = calibrated_threshold(method, model, classifier)
    if threshold is None and calibrated is None:  # said beside the result, as the input's findings are
        warnings = list(warnings) + [f"{model.metadata['name']} stores no calibrated threshold for {method}, so the "
                                     "heatmap is cut at Otsu's threshold of this volume; measure one with "
                                     "'cdmsegment calibrate'"]
    threshold = threshold if threshold is not None else ("model" if calibrated is not None else "otsu")
    ref = volumes[0]
    if min_component_voxels is None:  # the model's default is in ml, so it means the same at any spacing
        min_component_voxels = voxels_for_ml(defaults.get("min_component_ml", 0.0), ref.spacing_mm)
    orientation = Orientation.from_direction(ref.direction, ref.spacing_mm)
    canonical_axis = orientation.canonical_axis(axis)
    content_voxels = tissue_mask(raw)
    batch_size = batch_size or default_batch_size(model, dev)
    if dev.type == "cpu" and precision == "bf16" and not cpu_has_bf16():
        log("this CPU has no bf16 units (AMX or AVX-512 BF16): bf16 will run slower than fp32")
    slices, stack = extract_slices(arrays, orientation, canonical_axis, model.image_size)
    with_content = slices_with_content(orientation.to_canonical(content_voxels).movedim(canonical_axis, 0))
    margin = defaults.get("crop_margin_px") if crop_margin_px is None else crop_margin_px
    margin = int(margin) if method == "cdm" and margin is not None and margin >= 0 else None
    boxes = _tissue_boxes(content_voxels, orientation, canonical_axis, model.image_size, with_content)
    noise = (draw_noise(torch.from_numpy(with_content), slices.shape[1:], seed, params).to(dev)
             if method in CDM_METHODS else None)
    run_model, engine = with_engine(model, engine, log=log, required=requested == "onnxruntime")
    maps = _run_batches(run_model, classifier, method, params, target_class, seed, slices, with_content, boxes, noise,
                        margin, batch_size, dev, precision, progress, cancel, log)
    heatmap = insert_slices(maps, stack).clamp_(min=0.0).masked_fill_(~content_voxels.to(maps.device), 0.0)
    heatmap, content_voxels = heatmap.cpu().numpy(), content_voxels.cpu().numpy()
    value = resolve_threshold(heatmap, threshold, content_voxels, calibrated)
    mask = make_mask(heatmap, value, content_voxels, min_component_voxels)
    mask, refinement, supported_voxels = refine_mask(mask, volumes[0].array, content_voxels, defaults, method,
                                                     lesion_intensity, heatmap=heatmap, threshold=value,
                                                     min_component_voxels=min_component_voxels,
                                                     calibrated_threshold=calibrated if at_calibration else None,
                                                     spacing_mm=ref.spacing_mm)
    grow_above = defaults.get("grow_above", 0.0) if grow_above is None else grow_above
    if grow_above and method in CDM_METHODS:
        mask = grow_through_intensity(mask, volumes[0].array, content_voxels, float(grow_above))
    return SegmentationResult(heatmap, mask, value, int(slices.shape[0]), len(with_content),
                              len(with_content) * network_evaluations_per_slice(method, params),
                              time.perf_counter() - start, str(maps.device), min_component_voxels, warnings, engine,
                              refinement, supported_voxels)


def refine_mask(mask: np.ndarray, image: np.ndarray, content: np.ndarray, defaults: dict, method: str,
                lesion_intensity: Optional[float] = None, *, heatmap: Optional[np.ndarray] = None,
                threshold: Optional[float] = None, min_component_voxels: int = 0,
                calibrated_threshold: Optional[float] = None,
                spacing_mm: Optional[Tuple[float, float, float]] = None) -> Tuple[np.ndarray, Optional[dict], int]:
    """(mask, refinement, supported voxels): the CDM methods' mask delineated by the lesion's intensity
    (core/refine.lesion_intensity_components) with ``lesion_intensity`` (default: the model's, none without
    one; 0: off) and the model's floor and support, joined with the bright components the ``heatmap`` (made
    into ``mask`` at ``threshold``) supports where the model's ``heatmap_support`` is above 0
    (core/refine.heatmap_supported_components, components of at least ``min_component_voxels``); other methods'
    masks, and a mask with the refinement off, unchanged (refinement None). refinement: lesion_intensity,
    lesion_intensity_floor, lesion_support and brain_median (the content's median intensity), with heatmap
    support also heatmap_floor, heatmap_support and min_component_voxels, and with a ``calibrated_threshold`` (the
    method's calibrated threshold, where the refinement's numbers were chosen) that and min_component_voxels: what
    remaking the mask at another threshold needs (core/refine.refinement_parts), and where the model has
    ``strong_finding_ml`` above 0 also strong_finding_voxels (that volume at ``spacing_mm``, the voxel spacing in mm)
    and strong_finding_peak (core/refine.strong_findings), and where it has ``small_lesion_ml`` above 0 also
    small_lesion_voxels (that volume at ``spacing_mm``), small_lesion_floor and small_lesion_peak
    (core/refine.small_lesion_components), and where it has ``min_finding_ml`` above 0 min_finding_voxels (that
    volume at ``spacing_mm``: the refined mask's smaller components are removed). supported voxels: how many the
    heatmap's support and the small lesions added (0 without them). Raises CDMSegmentError for a model with strong
    findings, small lesions or a min_finding_ml given no spacing_mm, strong findings without a strong_finding_peak
    above 0, or small lesions without a small_lesion_peak above 0 and a small_lesion_floor of 1 or more (both
    refused by core/refine.refinement_parts)."""
    fraction = defaults.get("lesion_intensity", 0.0) if lesion_intensity is None else lesion_intensity
    if not fraction or method not in CDM_METHODS:
        return mask, None, 0
    refinement = {"lesion_intensity": float(fraction),
                  "lesion_intensity_floor": float(defaults.get("lesion_intensity_floor", 0.0)),
                  "lesion_support": float(defaults.get("lesion_support", 0.0)),
                  "brain_median": float(np.median(image[content.astype(bool)])) if content.any() else 0.0}
    if defaults.get("heatmap_support") or calibrated_threshold is not None:
        refinement.update(min_component_voxels=int(min_component_voxels))
    if defaults.get("heatmap_support"):
        refinement.update(heatmap_floor=float(defaults.get("heatmap_floor", 0.0)),
                          heatmap_support=float(defaults["heatmap_support"]))
    if calibrated_threshold is not None:
        refinement.update(calibrated_threshold=float(calibrated_threshold))
    if defaults.get("strong_finding_ml"):
        if spacing_mm is None:
            raise CDMSegmentError("this model keeps the bright voxels of its strong findings, which needs the voxel "
                                  "spacing")
        refinement.update(strong_finding_voxels=voxels_for_ml(defaults["strong_finding_ml"], spacing_mm),
                          strong_finding_peak=float(defaults.get("strong_finding_peak", 0.0)))
    if defaults.get("small_lesion_ml"):
        if spacing_mm is None:
            raise CDMSegmentError("this model adds the small bright lesions its heatmap reaches, which needs the voxel "
                                  "spacing")
        refinement.update(small_lesion_voxels=voxels_for_ml(defaults["small_lesion_ml"], spacing_mm),
                          small_lesion_floor=float(defaults.get("small_lesion_floor", 0.0)),
                          small_lesion_peak=float(defaults.get("small_lesion_peak", 0.0)))
    if defaults.get("min_finding_ml"):
        if spacing_mm is None:
            raise CDMSegmentError("this model removes findings smaller than its min_finding_ml, which needs the voxel "
                                  "spacing")
        refinement.update(min_finding_voxels=voxels_for_ml(defaults["min_finding_ml"], spacing_mm))
    refined, added = refinement_parts(mask, image, content, refinement, heatmap, threshold)
    return (refined | added).astype(np.uint8), refinement, int(added.sum())


def _tissue_boxes(content_voxels: torch.Tensor, orientation: Orientation, axis: int, size: int,
                  with_content: np.ndarray) -> np.ndarray:
    """(len(with_content), 4) tissue boxes in model pixels: the (K, J, I) content mask resized as the image
    is, on its device."""
    resized, _ = extract_slices(content_voxels[None], orientation, axis, size, background=0.0)
    return tissue_boxes(resized[torch.from_numpy(with_content).to(resized.device), 0] > 0)


def _run_batches(model, classifier, method, params, target_class, seed, slices, with_content, boxes, noise, margin,
                 batch_size, dev, precision, progress, cancel, log) -> torch.Tensor:
    """(N, S, S) maps on the device the run ended on; slices without content stay 0. Inside the loop only
    the device works: inputs, noise and maps are already there, and the crop windows on the host."""
    total = len(with_content)
    maps = torch.zeros(slices.shape[0], *slices.shape[2:], device=dev)
    done = 0
    if progress:
        progress(0, total)
    while done < total:
        try:
            fn = build_method(method, _on(model, dev), params, target_class=target_class, classifier=_on(classifier, dev),
                              seed=seed)
            positions = torch.from_numpy(with_content).to(dev)
            for lo in range(done, total, batch_size):
                if _is_cancelled(cancel):
                    raise Cancelled()
                hi = min(lo + batch_size, total)
                ids = positions[lo:hi]
                r0, r1, c0, c1 = (crop_window(boxes[lo:hi], slices.shape[-1], margin) if margin is not None
                                  else (0, slices.shape[-2], 0, slices.shape[-1]))
                extra = {"noise": noise[:, lo:hi, :, r0:r1, c0:c1]} if noise is not None else {}
                with torch.no_grad(), autocast(dev, precision):
                    maps[ids, r0:r1, c0:c1] = check_finite(fn(slices[ids, :, r0:r1, c0:c1],
                                                              torch.from_numpy(with_content[lo:hi]), **extra).float(),
                                                           dev, precision)
                done = hi
                if progress:
                    progress(done, total)
            return maps
        except (RuntimeError, torch.jit.Error) as e:  # how CUDA out of memory can arrive (device.py)
            if not is_out_of_memory(e):
                raise
        # Here, after the except block, the error and the batch its frames held are freed.
        torch.cuda.empty_cache()
        batch_size, new_dev = after_out_of_memory(batch_size, dev, log)
        if new_dev != dev:
            dev, slices, maps = new_dev, slices.to(new_dev), maps.to(new_dev)
            noise = noise.to(new_dev) if noise is not None else None
    return maps


def after_out_of_memory(batch_size: int, device: torch.device, log: Callable[[str], None]):
    """The next try after running out of GPU memory: half the batch, then batch 1 on the CPU; says which."""
    if device.type == "cpu" and batch_size == 1:
        raise CDMSegmentError(f"out of memory even on the CPU with one slice at a time; {MEMORY_ADVICE}")
    if batch_size > 1:
        log(f"out of GPU memory: retrying with batch size {batch_size // 2}")
        return batch_size // 2, device
    log("out of GPU memory even with batch size 1: continuing on the CPU")
    return 1, torch.device("cpu")


def _on(model: Optional[LoadedModel], device: torch.device) -> Optional[LoadedModel]:
    if model is not None:
        model.network.to(device)
    return model

"""Choosing a model's defaults on held-out data: noise level, steps, tau, noise draws and the threshold.

The paper's settings (Q ~ alpha_bar 0.90, R = 10, tau = 0.95) are one point of the grid;
a model stores whichever setting measured best on its validation cases, and the
threshold that setting needs, so the tool's default is a measured choice. With a
classifier the sweep is CG-CDM's: the guidance scale s and its threshold, stored in the
classifier (the scale multiplies that classifier's gradients).
"""

import itertools
import json
import time
from dataclasses import asdict
from typing import Callable, Dict, List, Optional

import numpy as np
import torch

from ..core.errors import CDMSegmentError
from ..core.methods import CG_CDM_THRESHOLD, CDMParams, build_method, network_evaluations_per_slice, run_in_batches
from ..core.modelfile import LoadedModel


def run_heatmaps(model: LoadedModel, params: CDMParams, slices: torch.Tensor, device: torch.device,
                 batch_size: int = 256, precision: str = "fp16",
                 classifier: Optional[LoadedModel] = None) -> torch.Tensor:
    """(N, C, S, S) slices -> (N, S, S) heatmaps >= 0 on the CPU, as the volume runner makes them
    (CDM, or CG-CDM guided by ``classifier``)."""
    for m in (model, classifier):
        if m is not None:
            m.network.to(device)
    fn = build_method("cg-cdm" if classifier is not None else "cdm", model, params, classifier=classifier)
    return run_in_batches(fn, slices, device, batch_size=batch_size, precision=precision).clamp_min(0)


def best_threshold(heatmaps: torch.Tensor, masks: torch.Tensor, case_ids: List[str], quantiles: int = 64) -> Dict:
    """The single threshold with the best pooled Dice over all cases (healthy ones included, so false
    positives cost), with the mean per-case Dice of lesion cases and the false-positive voxel
    fraction on lesion-free cases at that threshold."""
    content = heatmaps > 0
    values = heatmaps[content]
    if values.numel() == 0:
        raise CDMSegmentError("the heatmaps are all zero on the calibration set: the model ignores the label")
    sample = values[torch.randperm(values.numel(), generator=torch.Generator().manual_seed(0))[:200000]]
    candidates = torch.quantile(sample.float(), torch.linspace(0.5, 0.9995, quantiles)).unique()
    ids = np.array(case_ids)
    best = None
    for thr in candidates.tolist():
        pred = heatmaps > thr
        inter = float((pred & masks).sum())
        pooled = 2 * inter / max(1.0, float(pred.sum() + masks.sum()))
        if best is None or pooled > best["pooled_dice"]:
            best = {"threshold": thr, "pooled_dice": pooled}
    pred = heatmaps > best["threshold"]
    dices, fp = [], []
    for case in np.unique(ids):
        sel = torch.from_numpy(ids == case)
        p, g = pred[sel], masks[sel]
        if g.any():
            dices.append(2 * float((p & g).sum()) / float(p.sum() + g.sum()))
        else:
            fp.append(float(p.sum()) / p.numel())
    best.update(mean_case_dice=float(np.mean(dices)) if dices else float("nan"),
                healthy_fp_fraction=float(np.mean(fp)) if fp else float("nan"))
    return best


def sweep(model: LoadedModel, slices: torch.Tensor, masks: torch.Tensor, case_ids: List[str], grid: Dict[str, list],
          device: torch.device, log: Callable[[str], None] = print, classifier: Optional[LoadedModel] = None,
          **run_options) -> List[dict]:
    """Every combination of ``grid`` (keys of CDMParams; settings not in it are the paper's), each
    with its best threshold; best first. With ``classifier``, the method is CG-CDM."""
    method = "cg-cdm" if classifier is not None else "cdm"
    rows = []
    keys = list(grid)
    for values in itertools.product(*(grid[k] for k in keys)):
        params = CDMParams.for_model(model, "paper", **dict(zip(keys, values)))
        start = time.perf_counter()
        heatmaps = run_heatmaps(model, params, slices, device, classifier=classifier, **run_options)
        seconds = time.perf_counter() - start
        row = {"method": method, **asdict(params), **best_threshold(heatmaps, masks, case_ids),
               "seconds_per_slice": seconds / len(slices),
               "evaluations_per_slice": network_evaluations_per_slice(method, params)}
        log(json.dumps(row))
        rows.append(row)
    return sorted(rows, key=lambda r: -r["pooled_dice"])


def defaults_from(row: dict) -> dict:
    """The metadata ``defaults`` entry for a sweep row: the diffusion model's for CDM; for CG-CDM the
    classifier's (its guidance scale and threshold, with the CDM settings they were measured at)."""
    cdm_keys = ("noise_level", "steps", "tau", "noise_draws")
    calibration = {k: row[k] for k in ("pooled_dice", "mean_case_dice", "healthy_fp_fraction")}
    if row.get("method") == "cg-cdm":
        return {"guidance_scale": row["guidance_scale"], CG_CDM_THRESHOLD: row["threshold"],
                "calibration": {**calibration, "cdm_settings": {k: row[k] for k in cdm_keys}}}
    return {**{k: row[k] for k in cdm_keys + ("threshold",)}, "calibration": calibration}

"""Is this volume what the model learned? An out-of-distribution score from the model's own denoising error.

A diffusion model is a denoiser: on images like its training data it predicts the noise
added at level alpha_bar well, on others (another contrast, a skull, a CT) its error
departs from the usual. We measure, on a few axial slices of the volume and at a few noise
levels, the mean squared error of the predicted noise inside the content,
``e_l = log mean (eps_theta(x_t, t, f(y0)) - eps)^2`` per level l (median over slices).
The model's metadata (``metadata["ood"]``) holds the mean and covariance of ``e`` on
held-out data and a threshold on the Mahalanobis distance of a volume's ``e`` from them,
chosen there to give few false alarms. The covariance matters: on valid inputs the levels'
errors rise and fall together (with the image's own noise), while a T1 or a CT changes how
the error falls from level to level (measured: README, "The bundled models").
Deterministic by seed (fixed slices, seeded eps).
"""

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np
import torch

from .device import choose_device
from .errors import CDMSegmentError
from .image import Volume
from .intensity import normalise_volume
from .modelfile import LoadedModel
from .slicing import Orientation, extract_slices

NOISE_LEVELS = (0.95, 0.8, 0.5)  # alpha_bar: image detail, structure, shape
# slices per volume for a new reference (a model keeps the count its reference was measured with). With
# brain-flair-cpu, 16 instead of 8 narrowed the spread of valid volumes' scores more than it moved the T1 volumes'
# (README, "What it takes"): the highest of 48 validation phantoms fell from 1.60 to 1.19 times the threshold,
# the T1 volumes from 1.81-1.96 to 1.66-1.84 times.
SLICES = 16
MIN_CONTENT = 0.05  # a slice counts when this fraction of it is content (not background)


@dataclass
class OODResult:
    score: float  # Mahalanobis distance of the errors from the reference's; larger = further from the training data
    threshold: float  # the model's; flagged when score > threshold
    errors: np.ndarray  # (L,) log mean squared noise-prediction error per noise level

    @property
    def flagged(self) -> bool:
        return bool(self.score > self.threshold)


def _settings(model: LoadedModel) -> dict:
    reference = model.metadata.get("ood") or {}
    return {"noise_levels": reference.get("noise_levels", list(NOISE_LEVELS)),
            "slices": int(reference.get("slices", SLICES)), "seed": int(reference.get("seed", 0))}


def _chosen_slices(volumes: Sequence[Volume], model: LoadedModel, count: int, device: Union[str, torch.device],
                   normalised: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(S, C, H, W) on ``device``: ``count`` axial slices evenly spaced over those with content, at the model's
    size, normalised (unless given ``normalised``) and resized there."""
    arrays = normalised if normalised is not None else torch.stack(
        [normalise_volume(v.array, model.metadata["normalisation"], device) for v in volumes])
    ref = volumes[0]
    orientation = Orientation.from_direction(ref.direction, ref.spacing_mm)
    slices, _ = extract_slices(arrays, orientation, 0, model.image_size)
    content = (slices > -1 + 1e-3).any(dim=1).float().mean(dim=(1, 2))
    candidates = torch.nonzero(content >= MIN_CONTENT).flatten()
    if len(candidates) == 0:
        raise CDMSegmentError("the volume has no slice with content; nothing to check")
    picks = np.unique(np.round(np.linspace(0, len(candidates) - 1, count + 2)[1:-1]).astype(int))
    return slices[candidates[torch.from_numpy(picks).to(candidates.device)]]


def denoising_errors(model: LoadedModel, volumes: Sequence[Volume], *, noise_levels: Optional[Sequence[float]] = None,
                     slices: Optional[int] = None, seed: Optional[int] = None,
                     device: Union[str, torch.device] = "cpu",
                     normalised: Optional[torch.Tensor] = None) -> np.ndarray:
    """(L,) log mean squared error of the model's noise prediction, per noise level alpha_bar.

    volumes: one per model modality, on one grid; normalised: the same already through ``normalise_volume``
    ((M, K, J, I) on ``device``), when the caller has them. Defaults (levels, slice count, seed) are the
    model's OOD reference's, so the measure is the one calibrated. 2 x slices x L network
    evaluations at most (one batch per level).
    """
    settings = _settings(model)
    noise_levels = list(noise_levels if noise_levels is not None else settings["noise_levels"])
    seed = settings["seed"] if seed is None else int(seed)
    x_0 = _chosen_slices(volumes, model, settings["slices"] if slices is None else int(slices), device, normalised)
    inside = (x_0 > -1 + 1e-3).any(dim=1, keepdim=True).float()
    schedule = model.schedule()
    network = model.network.to(device)
    generator = torch.Generator().manual_seed(seed)
    errors = []
    with torch.no_grad():
        for alpha_bar in noise_levels:
            t = torch.full((x_0.shape[0],), model.check_noise_level(alpha_bar, what="the OOD score's noise level"),
                           dtype=torch.long, device=device)
            eps = torch.randn(x_0.shape, generator=generator).to(device)
            x_t = schedule.q_sample(x_0, t, eps)
            emb = network.class_embedding(torch.zeros_like(t))
            squared = (network(x_t, t, emb).float() - eps) ** 2 * inside
            per_slice = squared.sum(dim=(1, 2, 3)) / (inside.sum(dim=(1, 2, 3)) * x_0.shape[1])
            errors.append(float(torch.log(per_slice.median())))
    return np.array(errors)


def score_from_errors(errors: np.ndarray, reference: dict) -> float:
    """Mahalanobis distance sqrt((e - mean)^T C^-1 (e - mean)) of a volume's errors from the reference's."""
    difference = np.asarray(errors, dtype=float) - np.asarray(reference["mean"])
    return float(np.sqrt(difference @ np.linalg.solve(np.asarray(reference["covariance"]), difference)))


def ood_score(model: LoadedModel, volumes: Sequence[Volume], *, device: Union[str, torch.device] = "cpu",
              normalised: Optional[torch.Tensor] = None) -> Optional[OODResult]:
    """The volume's OOD score against the model's reference; None for a model without one (an older file).
    device: 'auto', 'cpu', 'cuda[:N]' (as ``segment``) or a torch.device; CDMSegmentError for another word or
    for CUDA without a GPU. normalised: the volumes already normalised on ``device`` (the runner's: computed
    once for both)."""
    reference = model.metadata.get("ood")
    if not reference:
        return None
    if isinstance(device, str):  # the tool's device words, 'auto' included (core/device.choose_device)
        device = choose_device(device, log=lambda m: None)
    errors = denoising_errors(model, volumes, device=device, normalised=normalised)
    return OODResult(score_from_errors(errors, reference), float(reference["threshold"]), errors)


def check_reference_volumes(count: int, noise_levels: Sequence[float] = NOISE_LEVELS) -> None:
    """Raises CDMSegmentError unless ``count`` volumes are enough for a reference at ``noise_levels``: at least
    3 per level, so that their covariance is estimated at all (before any network runs, in calibrate-ood)."""
    needed = 3 * len(noise_levels)
    if count < needed:
        raise CDMSegmentError(f"the OOD reference needs at least {needed} held-out volumes (3 per noise level), got "
                              f"{count}; give a folder with more, e.g. from 'cdmsegment phantom OUT --families all "
                              f"--cases 60'")


def ood_reference(errors: np.ndarray, *, noise_levels: Sequence[float], slices: int, seed: int,
                  false_alarm: float = 0.05) -> dict:
    """metadata["ood"] from held-out volumes' errors (N, L): their mean and covariance, and a threshold.

    The covariance gets a small ridge (1e-4) so that it stays invertible. The threshold is the
    (1 - false_alarm) quantile of the held-out distances, raised by 10 % because distances
    measured on the volumes that set the covariance run a little short.
    """
    errors = np.asarray(errors, dtype=float)
    if errors.ndim != 2 or errors.shape[1] != len(noise_levels):
        raise CDMSegmentError(f"the OOD reference needs one error per volume and noise level ({len(noise_levels)} "
                              f"levels), got an array of shape {errors.shape}")
    check_reference_volumes(errors.shape[0], noise_levels)
    if not 0 < false_alarm < 0.5:
        raise CDMSegmentError(f"false-alarm rate must be between 0 and 0.5, got {false_alarm}")
    covariance = np.cov(errors, rowvar=False) + 1e-4 * np.eye(errors.shape[1])
    reference = {"noise_levels": [float(a) for a in noise_levels], "slices": int(slices), "seed": int(seed),
                 "mean": errors.mean(axis=0).tolist(), "covariance": covariance.tolist()}
    distances = np.array([score_from_errors(e, reference) for e in errors])
    reference["threshold"] = float(np.quantile(distances, 1 - false_alarm) * 1.1)
    reference["reference_volumes"] = int(errors.shape[0])
    return reference

"""Model files of one recipe, trained from different seeds, written as one ensemble file (core/ensemble.py)."""

from pathlib import Path
from typing import Sequence, Union

from ..core.engine import eager_network
from ..core.ensemble import UNetEnsemble
from ..core.errors import CDMSegmentError
from ..core.model_metadata import ENSEMBLE_TYPE
from ..core.modelfile import LoadedModel, save_model

# What every member must share: the ensemble runs them on the same slices, noise levels and labels
SHARED = ("architecture", "image_size", "in_channels", "modalities", "class_names", "schedule", "num_timesteps",
          "t_range", "normalisation", "heatmap_sign")
# Measured on one network, or the record of such a measurement; the ensemble's own must be measured again
# (calibrate, calibrate-ood, calibrate-refinement), so none is carried over
RECALIBRATED = ("threshold", "calibration", "refinement_calibration")


def ensemble_metadata(models: Sequence[LoadedModel], name: str, version: str) -> dict:
    """The ensemble's metadata: the first member's, its architecture marked as an ensemble of len(models), its
    training the members' own records, without the first's threshold and OOD calibration.

    Raises CDMSegmentError (one line naming the member and the field) when there are fewer than two members,
    one is not a diffusion model or is already an ensemble, or they differ in a field of SHARED."""
    if len(models) < 2:
        raise CDMSegmentError("an ensemble needs two or more model files")
    first = models[0]
    for n, model in enumerate(models):
        if model.metadata["kind"] != "diffusion":
            raise CDMSegmentError(f"{model.path.name} is a {model.metadata['kind']}, not a diffusion model")
        if model.metadata.get("architecture", {}).get("type") != "ConditionalUNet":
            raise CDMSegmentError(f"{model.path.name} is not one ConditionalUNet (an ensemble already?); give the "
                                  "members' own model files")
        for key in SHARED:
            mine, theirs = model.metadata.get(key), first.metadata.get(key)
            if mine != theirs:
                if isinstance(mine, dict) and isinstance(theirs, dict):  # name the first field that differs
                    sub = next(k for k in sorted(set(mine) | set(theirs)) if mine.get(k) != theirs.get(k))
                    key, mine, theirs = f"{key}.{sub}", mine.get(sub), theirs.get(sub)
                raise CDMSegmentError(f"{model.path.name} differs from {first.path.name} in its {key} ({mine!r} "
                                      f"against {theirs!r}): the members of an ensemble must come from one recipe")
        twin = next((m for m in models[:n] if m.sha256 == model.sha256), None)
        if twin is not None:
            raise CDMSegmentError(f"{model.path.name} is {twin.path.name} again: copies of one network make no "
                                  "ensemble; give networks trained from different seeds (train --seed)")
    metadata = {key: value for key, value in first.metadata.items() if key != "ood"}
    metadata.update(name=name, version=version,
                    architecture={**first.metadata["architecture"], "type": ENSEMBLE_TYPE, "members": len(models)},
                    defaults={**{k: v for k, v in first.defaults.items() if k not in RECALIBRATED},
                              "noise_draws": noise_draws_for(int(first.defaults.get("noise_draws", 1)), len(models))},
                    training={"data": first.metadata["training"].get("data", ""),
                              "seconds": round(sum(float(m.metadata["training"].get("seconds", 0)) for m in models), 1),
                              "members": [dict(m.metadata["training"], file=m.path.name, sha256=m.sha256)
                                          for m in models]})
    return metadata


def noise_draws_for(draws: int, networks: int) -> int:
    """The least multiple of ``networks`` that is at least ``draws``: every network runs as often as the others."""
    return networks * -(-max(draws, 1) // networks)


def write_ensemble(models: Sequence[LoadedModel], output: Union[str, Path], name: str, version: str) -> str:
    """Write the members' networks as one ensemble model file at ``output`` (atomically); returns its SHA256.
    Raises CDMSegmentError as ``ensemble_metadata``."""
    metadata = ensemble_metadata(models, name, version)
    return save_model(UNetEnsemble([eager_network(m) for m in models]), metadata, output)

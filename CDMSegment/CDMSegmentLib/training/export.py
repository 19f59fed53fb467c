"""From a training checkpoint to a model file: EMA weights, TorchScript, metadata inside."""

from pathlib import Path
from typing import Optional, Sequence

from .classifier import load_classifier_checkpoint
from ..core.intensity import DEFAULT_NORMALISATION
from ..core.modelfile import FORMAT_VERSION, save_model
from ..core.settings import PAPER_DEFAULTS
from .train import load_checkpoint

NOT_CLINICAL = "Research use only; not a medical device and not for clinical decisions."


def diffusion_metadata(train_cfg, *, name: str, version: str, training: dict, image_size: Optional[int] = None,
                       modalities: Optional[Sequence[str]] = None, class_names: Optional[Sequence[str]] = None,
                       defaults: Optional[dict] = None,
                       intended_use: str = NOT_CLINICAL, heatmap_sign: float = 1.0) -> dict:
    """Everything a user of the model file needs to run it correctly, without the training code."""
    return {
        "format_version": FORMAT_VERSION, "kind": "diffusion", "name": name, "version": version,
        "image_size": int(image_size or train_cfg.image_size), "in_channels": train_cfg.unet.in_channels,
        "modalities": list(modalities or train_cfg.modalities), "class_names": list(class_names or train_cfg.class_names),
        "schedule": train_cfg.schedule, "num_timesteps": train_cfg.num_timesteps, "t_range": list(train_cfg.t_band),
        # CG-CDM's guidance scale is measured for, and stored in, its classifier (calibrate --classifier)
        "defaults": dict(defaults if defaults is not None else {k: v for k, v in PAPER_DEFAULTS.items()
                                                                if k != "guidance_scale"}),
        "normalisation": dict(DEFAULT_NORMALISATION), "training": dict(training),
        "architecture": {"type": "ConditionalUNet", **train_cfg.unet.to_dict()},
        "intended_use": intended_use, "heatmap_sign": float(heatmap_sign),
    }


def classifier_metadata(train_cfg, *, name: str, version: str, image_size: int, modalities: Sequence[str],
                        class_names: Sequence[str], training: dict, intended_use: str = NOT_CLINICAL) -> dict:
    """The noise-aware classifier's metadata: what the diffusion model's says, minus heatmap defaults."""
    metadata = diffusion_metadata(train_cfg, name=name, version=version, image_size=image_size, modalities=modalities,
                                  class_names=class_names, training=training, intended_use=intended_use)
    for key in ("defaults", "heatmap_sign"):
        del metadata[key]
    metadata.update(kind="classifier", architecture={"type": "NoiseAwareClassifier", **train_cfg.unet.to_dict()})
    return metadata


def export_checkpoint(checkpoint: Path, output: Path, kind: str = "diffusion", **metadata_fields) -> str:
    """Write the EMA network of a ``kind`` checkpoint to ``output``; returns the file's SHA256 for models.json."""
    load, build_metadata = {"diffusion": (load_checkpoint, diffusion_metadata),
                            "classifier": (load_classifier_checkpoint, classifier_metadata)}[kind]
    net, cfg, state = load(checkpoint)
    training = dict(metadata_fields.pop("training", {}))
    training.setdefault("steps", state["step"])
    training.setdefault("seconds", round(state["seconds"], 1))
    training.setdefault("config", cfg.to_dict())
    metadata = build_metadata(cfg, training=training, **metadata_fields)
    return save_model(net, metadata, output)

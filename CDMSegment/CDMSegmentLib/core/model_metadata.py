"""The schema of a model file's metadata, checked as a whole when the file is loaded or saved.

Every field the code reads is described here once, with what it may hold; a model file whose metadata breaks
it is refused in one line naming the file and the field (``tiny.pt: metadata field 'defaults.threshold' must
be a finite number >= 0, got 'high'``), instead of a traceback wherever the field is first used. Fields
not listed here pass unchecked, so a newer exporter's extra fields do not break this reader; a new optional
field is one line of SCHEMA.
"""

from typing import Any, Callable, Dict, Optional, Tuple

from . import ranges
from .errors import CDMSegmentError, ModelFileError

# The noise schedules core/schedule.py computes, by the name a model file stores. Defined here, without torch:
# Slicer's process checks a model file's metadata and never imports torch (model_description.py).
SCHEDULES = ("linear", "cosine")

# metadata["architecture"]["type"] of an ensemble file (core/ensemble.py), whose "members" says how many networks
ENSEMBLE_TYPE = "ConditionalUNetEnsemble"


def ensemble_size(metadata: dict) -> int:
    """How many networks a model file holds: its architecture's members for an ensemble, else 1."""
    architecture = metadata.get("architecture") or {}
    return int(architecture.get("members", 1)) if architecture.get("type") == ENSEMBLE_TYPE else 1


# A check returns what is wrong with a value ('must be ...'), or None when it is fine.
Check = Callable[[Any], Optional[str]]


def number(rng: ranges.Range) -> Check:
    def check(value):
        try:
            rng.check("value", value)
        except CDMSegmentError:
            return f"must be {rng}"
        return None
    return check


def text(value) -> Optional[str]:
    return None if isinstance(value, str) and value.strip() else "must be a non-empty text"


def version_text(value) -> Optional[str]:
    return None if isinstance(value, (int, str)) and not isinstance(value, bool) and str(value).strip() else \
        "must be a non-empty text or a whole number"


def flag(value) -> Optional[str]:
    return None if isinstance(value, bool) else "must be true or false"


def one_of(*choices) -> Check:
    return lambda value: None if value in choices else f"must be one of {', '.join(map(str, choices))}"


def obj(fields: Optional[Dict[str, Tuple[bool, Check]]] = None, values: Optional[Check] = None) -> Check:
    """A JSON object: ``fields`` (name -> (required, check)), unlisted keys free; or every value by ``values``."""
    def check(value):
        if not isinstance(value, dict):
            return "must be an object ({...})"
        for key, (required, sub) in (fields or {}).items():
            if key not in value:
                if required:
                    return _At(key, "is missing")
                continue
            found = sub(value[key])
            if found:
                return _At(key, found)
        for key, item in value.items() if values else ():
            found = values(item)
            if found:
                return _At(key, found)
        return None
    return check


def list_of(item: Check, min_length: int = 0, what: str = "") -> Check:
    def check(value):
        if not isinstance(value, list):
            return "must be a list ([...])"
        if len(value) < min_length:
            return f"must hold at least {min_length} {what or 'items'}"
        for n, v in enumerate(value):
            found = item(v)
            if found:
                return _At(str(n), found)
        return None
    return check


class _At(str):
    """A finding inside a field: its path below the field and what is wrong there."""

    def __new__(cls, key: str, found: str):
        path, reason = (f"{key}.{found.path}", found.reason) if isinstance(found, _At) else (key, found)
        self = super().__new__(cls, reason)
        self.path, self.reason = path, reason
        return self


def setting(name: str) -> Tuple[bool, Check]:
    return False, number(ranges.SETTINGS[name])


DEFAULTS = obj({**{name: setting(name) for name in ("noise_level", "steps", "tau", "noise_draws", "guidance_scale",
                                                    "threshold", "cg_cdm_threshold", "min_component_ml",
                                                    "grow_above", "lesion_intensity", "lesion_intensity_floor",
                                                    "lesion_support", "heatmap_floor", "heatmap_support",
                                                    "strong_finding_ml", "strong_finding_peak",
                                                    "small_lesion_ml", "small_lesion_floor", "small_lesion_peak",
                                                    "min_finding_ml", "crop_margin_px")},
                "batch_size": (False, obj(values=number(ranges.SETTINGS["batch_size"]))),  # per device type
                "antithetic": (False, flag),
                "calibration": (False, obj())})
PERCENT = number(ranges.Range(low=0.0, high=100.0))

SCHEMA: Dict[str, Tuple[Tuple[str, ...], Check]] = {  # field -> (the kinds that must have it, check)
    "format_version": (("diffusion", "classifier"), number(ranges.Range(integer=True, low=1))),
    "name": (("diffusion", "classifier"), text),
    "version": (("diffusion", "classifier"), version_text),
    "image_size": (("diffusion", "classifier"), number(ranges.OPTIONS["image_size"])),
    "in_channels": (("diffusion", "classifier"), number(ranges.Range(integer=True, low=1, high=64))),
    "modalities": (("diffusion", "classifier"), list_of(text, 1, "modality names")),
    # class 0 is normal: a model that can segment something knows at least one class beside it
    "class_names": (("diffusion", "classifier"), list_of(text, 2, "class names (normal and a class to segment)")),
    "schedule": (("diffusion", "classifier"), one_of(*SCHEDULES)),
    "num_timesteps": (("diffusion", "classifier"), number(ranges.OPTIONS["timesteps"])),
    "defaults": (("diffusion",), DEFAULTS),
    # the training noise band (cdmsegment train --t-range): the timesteps LO, HI the network was trained on
    "t_range": ((), list_of(number(ranges.Range(integer=True, low=0)), 2, "timesteps (LO, HI)")),
    "normalisation": (("diffusion", "classifier"), obj({"method": (True, one_of("percentile")),
                                                        "low": (True, PERCENT), "high": (True, PERCENT)})),
    "training": (("diffusion", "classifier"), obj()),
    "expects": ((), obj({"description": (False, text), "modality": (False, text), "skull_stripped": (False, flag)})),
    "ood": ((), obj({"threshold": (True, number(ranges.Range(low=0.0, low_open=True))),
                     "mean": (True, list_of(number(ranges.Range()), 1, "values")),
                     "covariance": (True, list_of(list_of(number(ranges.Range()), 1, "values"), 1, "rows")),
                     "noise_levels": (False, list_of(number(ranges.SETTINGS["noise_level"]), 1, "levels")),
                     "slices": (False, number(ranges.OPTIONS["count"])),
                     "seed": (False, number(ranges.SETTINGS["seed"]))})),
    "heatmap_sign": ((), one_of(1, -1)),
    "intended_use": ((), text),
    "architecture": ((), obj({"type": (False, text)})),
}
KINDS = ("diffusion", "classifier")


def check_metadata(metadata: Any, where: str, newest_format: int, writing: bool = False) -> None:
    """Raise ModelFileError, one line naming ``where`` (the file) and the field, unless ``metadata`` fits SCHEMA
    and its fields agree with each other. writing: the metadata is about to be written (the line says that
    nothing was, rather than that the file is damaged)."""
    if not isinstance(metadata, dict):
        raise ModelFileError(f"{where}: its metadata is not a JSON object; re-export the model with 'cdmsegment export'")
    kind = metadata.get("kind")
    if kind not in KINDS:
        raise ModelFileError(f"{where}: unknown model kind {kind!r}; expected one of {', '.join(KINDS)}")
    missing = [k for k, (kinds, _) in SCHEMA.items() if kind in kinds and k not in metadata]
    if missing:
        raise ModelFileError(f"{where}: metadata lacks {', '.join(missing)}; re-export the model with 'cdmsegment export'")
    for key, (_, check) in SCHEMA.items():
        found = check(metadata[key]) if key in metadata else None
        if found:
            _refuse(where, f"{key}.{found.path}" if isinstance(found, _At) else key, found, metadata, writing)
    if metadata["format_version"] > newest_format:
        raise ModelFileError(f"{where} needs a newer CDMSegment (model format {metadata['format_version']}, "
                             f"this version reads {newest_format}); update the extension")
    _check_agreement(metadata, f"{where} not written" if writing else where)


def _refuse(where: str, path: str, reason: str, metadata: dict, writing: bool) -> None:
    value = metadata
    for key in path.split("."):
        value = value[int(key)] if isinstance(value, list) else value.get(key) if isinstance(value, dict) else None
    shown = repr(value)
    shown = shown if len(shown) <= 40 else shown[:37] + "..."
    got = "" if reason == "is missing" else f", got {shown}"
    if writing:
        raise ModelFileError(f"{where} not written: metadata field '{path}' {reason}{got}; give a value in range "
                             "(in the defaults JSON or the command's options)")
    raise ModelFileError(f"{where}: metadata field '{path}' {reason}{got}; the file is damaged or was edited by "
                         "hand: re-export the model ('cdmsegment export' or 'cdmsegment set-defaults')")


def _check_agreement(metadata: dict, where: str) -> None:
    """The fields that must agree with each other."""
    if len(metadata["modalities"]) != metadata["in_channels"]:
        raise ModelFileError(f"{where}: metadata names {len(metadata['modalities'])} modalities for "
                             f"{metadata['in_channels']} input channels")
    norm = metadata["normalisation"]
    if norm["low"] >= norm["high"]:
        raise ModelFileError(f"{where}: metadata field 'normalisation' has low percentile {norm['low']} not below "
                             f"high {norm['high']}")
    defaults = metadata.get("defaults") or {}
    if defaults.get("strong_finding_ml") and not defaults.get("strong_finding_peak"):
        raise ModelFileError(f"{where}: metadata field 'defaults.strong_finding_ml' is {defaults['strong_finding_ml']} "
                             "without a strong_finding_peak above 0 (the heatmap's peak a strong finding needs, in "
                             "multiples of the threshold); give both in the defaults JSON of 'cdmsegment set-defaults'")
    if defaults.get("small_lesion_ml"):
        wrong = ([f"small_lesion_peak above 0 (the heatmap's peak a small lesion needs, in multiples of the "
                  f"threshold; here {defaults.get('small_lesion_peak', 'missing')})"]
                 if not defaults.get("small_lesion_peak") else [])
        wrong += ([f"small_lesion_floor of 1 or more (in multiples of the brain's median intensity; here "
                   f"{defaults.get('small_lesion_floor', 'missing')})"]
                  if not defaults.get("small_lesion_floor", 0.0) >= 1 else [])
        if wrong:
            raise ModelFileError(f"{where}: metadata field 'defaults.small_lesion_ml' is {defaults['small_lesion_ml']}, "
                                 f"which needs {' and '.join(wrong)}; give it in the defaults JSON of 'cdmsegment "
                                 "set-defaults'")
    ood = metadata.get("ood")
    if ood is not None:
        levels = len(ood.get("noise_levels", ood["mean"]))
        if len(ood["mean"]) != levels or any(len(row) != levels for row in ood["covariance"]) or \
                len(ood["covariance"]) != levels:
            raise ModelFileError(f"{where}: metadata field 'ood' holds a mean and covariance that do not match its "
                                 f"{levels} noise levels; calibrate it again ('cdmsegment calibrate-ood')")

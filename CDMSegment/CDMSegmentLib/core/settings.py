"""The CDM settings a user chooses, as one object: from the panel's parameter node through the logic to the
command line of the child process, and from there to the runner; and the sampler's settings they resolve to.

Each field knows its command-line option, so the parser, the launcher and the runner read one
definition instead of spelling the settings out at every hop. None means "the model's measured
default" (or the paper's, with ``preset='paper'``). No torch here: the command line builds its parser from
these fields before importing it, and the Slicer panel fills its Advanced section from them (``CDMParams``
of a model described without torch).
"""

import argparse
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, List, Optional, Sequence, Union

from . import ranges
from .errors import CDMSegmentError
from .names import CDM_METHODS

if TYPE_CHECKING:
    from .model_description import ModelDescription

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
    def for_model(cls, model: "ModelDescription", preset: str = "model",
                  classifier: Optional["ModelDescription"] = None, method: str = "cdm",
                  **overrides) -> "CDMParams":
        """The model's own measured defaults ('model') or the paper's ('paper'); None overrides are ignored.
        With the 'model' preset, a classifier's measured guidance scale replaces the paper's s, and for
        ``method`` 'cg-cdm' the CDM settings it was measured at (its ``calibration.cdm_settings``: noise level,
        R, tau, noise draws) replace the model's, so that its guidance scale and threshold are used where they
        were measured; every other method keeps the model's own, where its threshold was measured. model and
        classifier: described (model_description.py) or loaded model files; only their metadata is read."""
        if preset not in ("model", "paper"):
            raise CDMSegmentError(f"unknown preset {preset!r}; use 'model' or 'paper'")
        names = {f.name for f in fields(cls)}
        base = {k: v for k, v in (model.defaults if preset == "model" else PAPER_DEFAULTS).items() if k in names}
        if preset == "model" and classifier is not None and "guidance_scale" in classifier.defaults:
            base["guidance_scale"] = float(classifier.defaults["guidance_scale"])
            if method == "cg-cdm":
                measured_at = (classifier.defaults.get("calibration") or {}).get("cdm_settings") or {}
                base.update({k: v for k, v in measured_at.items() if k in names})
        params = replace(cls(), **base)
        return replace(params, **{k: v for k, v in overrides.items() if v is not None})

    def used_by(self, method: str) -> dict:
        """The settings ``method`` runs with, as a result's header records them: every one for CG-CDM, all but the
        guidance scale for CDM, none for the other methods (the CAMs and CG-Diff do not sample this way)."""
        if method not in CDM_METHODS:
            return {}
        return {f.name: getattr(self, f.name) for f in fields(self) if method == "cg-cdm" or f.name != "guidance_scale"}


THRESHOLD_RULES = ("otsu", "model")


def threshold_rule(value: str) -> Union[str, float]:
    """'otsu', 'model' or a finite number >= 0 (the --threshold option)."""
    if value in THRESHOLD_RULES:
        return value
    try:
        return ranges.option("threshold")(value)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"must be otsu, model or {ranges.SETTINGS['threshold']}, "
                                         f"got {value!r}") from None


threshold_rule.range = ranges.SETTINGS["threshold"]


def check_threshold(value) -> Union[str, float, None]:
    """A threshold rule as the Python API or the panel gives it: None, 'otsu', 'model' or a number in range."""
    if value is None or value in THRESHOLD_RULES:
        return value
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise CDMSegmentError(f"threshold must be otsu, model or {ranges.SETTINGS['threshold']}, "
                                  f"got {value!r}") from None
    return ranges.check("threshold", value)


def _option(help_text: str, type_, default=None, choices=None):
    return field(default=default, metadata={"help": help_text, "type": type_, "choices": choices})


@dataclass(frozen=True)
class CDMSettings:
    """preset: 'model' (the defaults measured for the model) or 'paper'; noise_level: alpha_bar at the start
    (the paper's Q); steps: R; tau; noise_draws; guidance_scale: s (CG-CDM); threshold: 'model', 'otsu' or a
    number in heatmap units; min_component_ml: 3D components smaller than this (ml) are dropped; grow_above:
    the intensity growth threshold; lesion_intensity: the share of the lesion's intensity that delineates it
    (both core/refine.py)."""

    preset: str = _option("defaults measured for this model, or the paper's (Q~alpha_bar 0.90, R=10, tau=0.95)",
                          str, "model", ("model", "paper"))
    noise_level: Optional[float] = _option("alpha_bar at the start, in (0, 1) (paper: 0.896)",
                                                   ranges.option("noise_level"))
    steps: Optional[int] = _option("DDIM steps R (2R network evaluations per slice)",
                                             ranges.option("steps"))
    tau: Optional[float] = _option("condition interpolation tau in [0, 1)", ranges.option("tau"))
    noise_draws: Optional[int] = _option("average the heatmap over this many noise draws",
                                                   ranges.option("noise_draws"))
    guidance_scale: Optional[float] = _option(
        "classifier guidance scale s >= 0 (cg-cdm; default: the scale measured for the classifier)",
        ranges.option("guidance_scale"))
    threshold: Union[str, float, None] = _option(
        "'model' (calibrated, default when stored), 'otsu' over the volume, or a finite number >= 0 in heatmap units",
        threshold_rule)
    min_component_ml: Optional[float] = _option(
        "drop 3D components smaller than this many ml, 0 or more (default: the model's)",
        ranges.option("min_component_ml"))
    grow_above: Optional[float] = _option(
        "grow the mask through the bright regions it touches: voxels above this many times the brain's median "
        "intensity (default: the model's; 0: off)", ranges.option("grow_above"))
    lesion_intensity: Optional[float] = _option(
        "delineate the lesion by its own intensity: the bright components the mask covers, above this share "
        "(0-1) of the median intensity under the mask (default: the model's; 0: off, and with it the bright "
        "regions the heatmap supports, where the model adds them)",
        ranges.option("lesion_intensity"))

    def __post_init__(self):
        """The Python API and the panel's parameter node reach the core through here: each value is checked
        against its range (core/ranges.py), as the command line's parser checks it."""
        if self.preset not in ("model", "paper"):
            raise CDMSegmentError(f"preset must be model or paper, got {self.preset!r}")
        for f in fields(self):
            if f.name not in ("preset", "threshold"):
                object.__setattr__(self, f.name, ranges.check_optional(f.name, getattr(self, f.name)))
        object.__setattr__(self, "threshold", check_threshold(self.threshold))

    def params(self, model: "ModelDescription", classifier: Optional["ModelDescription"] = None,
               method: str = "cdm") -> CDMParams:
        """The sampler's settings for ``method``: these values, the model's (or the paper's, or for CG-CDM its
        classifier's) where None or not offered here (antithetic draws: only a model's measured default turns
        them on)."""
        overrides = {f.name: getattr(self, f.name, None) for f in fields(CDMParams)}
        return CDMParams.for_model(model, self.preset, classifier, method, **overrides)

    def min_component_voxels(self, model: "ModelDescription", spacing_mm: Sequence[float]) -> int:
        """The minimum component size in voxels of this spacing (the model's ``min_component_ml`` when None)."""
        from .threshold import voxels_for_ml

        ml = self.min_component_ml if self.min_component_ml is not None else model.defaults.get("min_component_ml", 0.0)
        return voxels_for_ml(ranges.check("min_component_ml", ml), spacing_mm)

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        """One option per field: --noise-level, --steps, ..."""
        for f in fields(CDMSettings):
            parser.add_argument(_flag(f.name), dest=f.name, type=f.metadata["type"], default=f.default,
                                choices=f.metadata["choices"], help=f.metadata["help"])

    @classmethod
    def from_arguments(cls, args: argparse.Namespace) -> "CDMSettings":
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})

    def command_line(self) -> List[str]:
        """The options that give these settings back through ``add_arguments`` (defaults left out)."""
        out = []
        for f in fields(self):
            value = getattr(self, f.name)
            if value != f.default:
                out += [_flag(f.name), repr(value) if isinstance(value, float) else str(value)]
        return out


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")

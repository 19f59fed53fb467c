"""The CDM settings a user chooses, as one object: from the panel's parameter node through the logic to the
command line of the child process, and from there to the runner.

Each field knows its command-line option, so the parser, the launcher and the runner read one
definition instead of spelling the settings out at every hop. None means "the model's measured
default" (or the paper's, with ``preset='paper'``).
"""

import argparse
from dataclasses import dataclass, field, fields
from typing import List, Optional, Sequence, Union

from .errors import CDMSegmentError
from .methods import CDMParams
from .modelfile import LoadedModel
from .threshold import voxels_for_ml


def threshold_rule(value: str) -> Union[str, float]:
    """'otsu', 'model' or a number (the --threshold option)."""
    if value in ("otsu", "model"):
        return value
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected otsu, model or a number, got {value!r}") from None


def _option(help_text: str, type_, default=None, choices=None):
    return field(default=default, metadata={"help": help_text, "type": type_, "choices": choices})


@dataclass(frozen=True)
class CDMSettings:
    """preset: 'model' (the defaults measured for the model) or 'paper'; noise_level: alpha_bar at the start
    (the paper's Q); steps: R; tau; noise_draws; guidance_scale: s (CG-CDM); threshold: 'model', 'otsu' or a
    number in heatmap units; min_component_ml: 3D components smaller than this (ml) are dropped; grow_above:
    the intensity growth threshold (core/refine.py)."""

    preset: str = _option("defaults measured for this model, or the paper's (Q~alpha_bar 0.90, R=10, tau=0.95)",
                          str, "model", ("model", "paper"))
    noise_level: Optional[float] = _option("alpha_bar at the start (paper: 0.896)", float)
    steps: Optional[int] = _option("DDIM steps R (2R network evaluations per slice)", int)
    tau: Optional[float] = _option("condition interpolation tau in [0, 1)", float)
    noise_draws: Optional[int] = _option("average the heatmap over this many noise draws", int)
    guidance_scale: Optional[float] = _option(
        "classifier guidance scale s (cg-cdm; default: the scale measured for the classifier)", float)
    threshold: Union[str, float, None] = _option(
        "'model' (calibrated, default when stored), 'otsu' over the volume, or a number", threshold_rule)
    min_component_ml: Optional[float] = _option(
        "drop 3D components smaller than this many ml (default: the model's)", float)
    grow_above: Optional[float] = _option(
        "grow the mask through the bright regions it touches: voxels above this many times the brain's median "
        "intensity (default: the model's; 0: off)", float)

    def params(self, model: LoadedModel, classifier: Optional[LoadedModel] = None) -> CDMParams:
        """The sampler's settings: these values, the model's (or the paper's) where None or not offered here
        (antithetic draws: only a model's measured default turns them on)."""
        overrides = {f.name: getattr(self, f.name, None) for f in fields(CDMParams)}
        return CDMParams.for_model(model, self.preset, classifier, **overrides)

    def min_component_voxels(self, model: LoadedModel, spacing_mm: Sequence[float]) -> int:
        """The minimum component size in voxels of this spacing (the model's ``min_component_ml`` when None)."""
        ml = self.min_component_ml if self.min_component_ml is not None else model.defaults.get("min_component_ml", 0.0)
        if ml < 0:
            raise CDMSegmentError(f"the minimum component size must be 0 ml or more, got {ml}")
        return voxels_for_ml(ml, spacing_mm)

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

"""Every numeric setting's range, checked in one place: the command line, the Python API, the panel's
parameter node and a model file's stored defaults all go through ``check``, so a value outside its meaning
(a negative threshold paints every voxel, a NaN empties a segment, zero noise draws divide by zero) is one
line naming the setting and its range, wherever it came from.

Imports nothing heavy: the command line parses with these before torch is imported.
"""

import argparse
import math
import numbers
from dataclasses import dataclass
from typing import Optional, Union

from .errors import CDMSegmentError

Number = Union[int, float]


@dataclass(frozen=True)
class Range:
    """The values a setting may take: whole numbers or any finite number, between optional bounds
    (``low_open``/``high_open``: the bound itself is excluded)."""

    integer: bool = False
    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    high_open: bool = False

    def __str__(self) -> str:
        """'a finite number > 0', 'a whole number >= 1', 'a number in [0, 1)'."""
        kind = "a whole number" if self.integer else "a number"
        if self.low is not None and self.high is not None:
            return (f"{kind} in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}"
                    f"{')' if self.high_open else ']'}")
        if not self.integer:  # "a number >= 0, got inf" would read as a contradiction
            kind = "a finite number"
        if self.low is not None:
            return f"{kind} {'>' if self.low_open else '>='} {self.low:g}"
        if self.high is not None:
            return f"{kind} {'<' if self.high_open else '<='} {self.high:g}"
        return kind

    def contains(self, value: Number) -> bool:
        if not math.isfinite(value):
            return False
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return self.high is None or not (value > self.high or (self.high_open and value == self.high))

    def check(self, name: str, value) -> Number:
        """``value`` as an int or a float when it is one and lies in range; else CDMSegmentError naming ``name``."""
        number = _as_number(value, self.integer)
        if number is None or not self.contains(number):
            raise CDMSegmentError(f"{name} must be {self}, got {value!r}")
        return number

    def parse(self, text: str) -> Number:
        """A command-line value: the same check, as argparse's one-line usage error."""
        try:
            return self.check("value", _from_text(text, self.integer))
        except (CDMSegmentError, ValueError):
            raise argparse.ArgumentTypeError(f"must be {self}, got {text!r}") from None


def _from_text(text: str, integer: bool) -> Number:
    if integer:
        try:
            return int(text)
        except ValueError:
            pass
    return float(text)  # ValueError for words; 'nan' and 'inf' parse, and the range refuses them


def _as_number(value, integer: bool) -> Optional[Number]:
    """int for whole numbers (an integral float too, as JSON may store one), float for others; None otherwise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    if integer:
        if isinstance(value, numbers.Integral):
            return int(value)
        return int(value) if math.isfinite(value) and float(value).is_integer() else None
    return float(value)


# The settings a user chooses for a run, and a model's stored defaults of the same names.
# threshold: the mask is heatmap > threshold and the heatmap is >= 0 (the runner clamps it), so 0 keeps every
# voxel with any evidence and anything below 0 every voxel there is (the panel's slider starts at 0); noise_level: alpha_bar, 1 is no noise at all and 0 pure noise; tau = 1 makes the two branches one.
SETTINGS = {
    "noise_level": Range(low=0.0, high=1.0, low_open=True, high_open=True),
    "steps": Range(integer=True, low=1, high=10_000),
    "tau": Range(low=0.0, high=1.0, high_open=True),
    "noise_draws": Range(integer=True, low=1, high=1_000),
    "guidance_scale": Range(low=0.0),
    "threshold": Range(low=0.0),
    "cg_cdm_threshold": Range(low=0.0),
    "min_component_ml": Range(low=0.0),
    "grow_above": Range(low=0.0),  # multiples of the brain's median intensity; 0: no growth (core/refine.py)
    # core/refine.lesion_intensity_components: a share of the median intensity under the CDM's mask (0: off), a
    # floor in multiples of the brain's median, and the share of a component the CDM must cover
    "lesion_intensity": Range(low=0.0, high=1.0),
    "lesion_intensity_floor": Range(low=0.0),
    "lesion_support": Range(low=0.0, high=1.0),
    # core/refine.heatmap_supported_components: the bright components' floor in multiples of the brain's median,
    # and their mean heatmap in multiples of the mask's threshold (0: off)
    "heatmap_floor": Range(low=0.0),
    "heatmap_support": Range(low=0.0),
    # core/refine.strong_findings: the smallest finding (ml; 0: off) whose own bright voxels are kept, and the
    # heatmap's peak it needs, in multiples of the mask's threshold
    "strong_finding_ml": Range(low=0.0),
    "strong_finding_peak": Range(low=0.0),
    # core/refine.small_lesion_components: the largest small bright component added (ml; 0: off), its floor in
    # multiples of the brain's median, and the heatmap's peak it needs, in multiples of the mask's threshold
    "small_lesion_ml": Range(low=0.0),
    "small_lesion_floor": Range(low=0.0),
    "small_lesion_peak": Range(low=0.0),
    # core/refine.refinement_parts: the refined segment's smallest component kept (ml; 0: all kept)
    "min_finding_ml": Range(low=0.0),
    "min_component_voxels": Range(integer=True, low=0),
    "batch_size": Range(integer=True, low=1, high=65_536),
    # the noise of slice s, draw d is seeded seed * 1_000_003 + ...: torch's seeds hold 64 bits
    "seed": Range(integer=True, low=0, high=2 ** 32 - 1),
    "target_class": Range(integer=True, low=1),
    "crop_margin_px": Range(integer=True),  # negative: the whole slice
}

# The other commands' numbers (training, evaluation, phantoms), by what they count or measure.
OPTIONS = {
    **SETTINGS,
    "count": Range(integer=True, low=1),  # cases, optimiser steps, channels, steps between checkpoints
    "level": Range(integer=True, low=0),  # a UNet level, 0 = full resolution
    "timesteps": Range(integer=True, low=2, high=100_000),
    "image_size": Range(integer=True, low=8, high=4096),
    "learning_rate": Range(low=0.0, high=1.0, low_open=True),
    "fraction": Range(low=0.0, high=1.0),
    "false_alarm": Range(low=0.0, high=0.5, low_open=True, high_open=True),
    "positive": Range(low=0.0, low_open=True),  # spacings in mm, intensity ratios
    "volume_ml": Range(low=0.0),
}


def check(name: str, value) -> Number:
    """``value`` checked against the range of the setting ``name`` (a key of SETTINGS)."""
    return SETTINGS[name].check(name, value)


def check_optional(name: str, value) -> Optional[Number]:
    """None (the model's default) passes; any other value is checked."""
    return None if value is None else check(name, value)


def option(name: str):
    """The argparse ``type`` of a numeric option: parses and checks against OPTIONS[name]; argparse names the
    option in its one-line error ("argument --steps: must be a whole number in [1, 10000], got '0'")."""
    rng = OPTIONS[name]

    def parse(text: str) -> Number:
        return rng.parse(text)

    parse.range = rng  # what a test walking the parsers reads
    parse.__name__ = name
    return parse

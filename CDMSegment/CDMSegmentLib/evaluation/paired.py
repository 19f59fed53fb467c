"""Each method against the calibrated intensity threshold on the same volumes, paired.

Means over a dozen volumes differ by chance; the question a user asks is whether a method beats the
threshold on *these* volumes. Per volume the difference is method - threshold (3D Dice on volumes with a
lesion, false-positive ml on lesion-free ones); reported are its mean, a 95 % bootstrap confidence interval
of that mean (BCa, ``scipy.stats.bootstrap``, 9999 resamples, seeded), how many volumes each side wins and how
many tie, and for Dice the Wilcoxon signed-rank p-value (``scipy.stats.wilcoxon``, two-sided), overall and per
lesion family.
"""

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np
from scipy import stats

from .intensity_baselines import THRESHOLD_BASELINE

if TYPE_CHECKING:
    from .volumes import VolumeScore


@dataclass
class PairedDifference:
    """method - baseline over paired volumes. low/high: 95 % bootstrap interval of the mean (equal to it where
    every difference is the same, NaN for one volume); p_value: Wilcoxon signed-rank, two-sided (1 where every
    difference is 0, NaN for one volume)."""
    volumes: int
    mean: float
    low: float
    high: float
    better: int  # volumes where the method's value is higher
    worse: int
    p_value: float


def paired_difference(values: Sequence[float], baseline: Sequence[float]) -> PairedDifference:
    """The paired difference values - baseline (equal lengths, one entry per volume, at least one).

    Raises ValueError for unequal lengths or no volume."""
    d = np.asarray(values, dtype=float) - np.asarray(baseline, dtype=float)
    if len(values) != len(baseline) or d.size == 0:
        raise ValueError(f"paired differences need equal, non-empty lists, got {len(values)} and {len(baseline)}")
    mean = float(d.mean())
    if d.size == 1:
        low = high = p = float("nan")
    elif np.ptp(d) == 0:  # the bootstrap and the test have no spread to work with
        low = high = mean
        p = 1.0 if mean == 0 else float(stats.wilcoxon(d).pvalue)
    else:
        interval = stats.bootstrap((d,), np.mean, n_resamples=9999, confidence_level=0.95, method="BCa",
                                   random_state=np.random.default_rng(0)).confidence_interval
        low, high = float(interval.low), float(interval.high)
        p = float(stats.wilcoxon(d).pvalue)
    return PairedDifference(int(d.size), mean, low, high, int((d > 0).sum()), int((d < 0).sum()), p)


def _pairs(scores: Sequence["VolumeScore"], method: str, baseline: str, lesion: bool):
    by_case = {s.case: s for s in scores if s.method == baseline and (s.lesion_ml > 0) == lesion}
    return [(s, by_case[s.case]) for s in scores if s.method == method and s.case in by_case]


def _cells(pairs, attribute: str, digits: int, test: bool) -> str:
    if not pairs:
        return "0 | - | - |" + (" - |" if test else "")
    r = paired_difference([getattr(m, attribute) for m, _ in pairs], [getattr(b, attribute) for _, b in pairs])
    interval = "" if np.isnan(r.low) else f" ({r.low:+.{digits}f} to {r.high:+.{digits}f})"
    p = "-" if np.isnan(r.p_value) else f"{r.p_value:.2g}"
    equal = r.volumes - r.better - r.worse
    counts = f"{r.better} / {r.worse} / {equal}"
    return f"{r.volumes} | {r.mean:+.{digits}f}{interval} | {counts} |" + (f" {p} |" if test else "")


def paired_table(scores: Sequence["VolumeScore"], baseline: str = THRESHOLD_BASELINE) -> str:
    """Markdown: per method (the baseline's rows excepted) and group (all volumes, then each lesion family), the
    paired 3D Dice difference on volumes with a lesion and the false-positive difference on lesion-free ones.
    "" when ``scores`` hold no row of ``baseline``."""
    if not any(s.method == baseline for s in scores):
        return ""
    lines = [f"Paired with the {baseline} on the same volumes (method - threshold; 95 % bootstrap interval of the "
             "mean; volumes where the method is higher / lower / equal; the Wilcoxon signed-rank p is two-sided, "
             "and with 5 volumes or fewer it cannot fall below 0.06):", "",
             "| group | method | volumes with lesion | 3D Dice difference | higher / lower / equal | Wilcoxon p | "
             "lesion-free volumes | false positives difference (ml) | more / fewer / equal |",
             "|---|---|---|---|---|---|---|---|---|"]
    families = sorted(f for f in dict.fromkeys(s.family for s in scores) if f)
    groups = [("all", list(scores))] + ([(f, [s for s in scores if s.family == f]) for f in families]
                                        if len(families) > 1 else [])
    for group, rows in groups:
        for method in dict.fromkeys(s.method for s in scores):
            if method == baseline:
                continue
            lesion, healthy = _pairs(rows, method, baseline, True), _pairs(rows, method, baseline, False)
            if lesion or healthy:
                lines.append(f"| {group} | {method} | {_cells(lesion, 'dice_3d', 3, True)} "
                             f"{_cells(healthy, 'false_positive_ml', 2, False)}")
    return "\n".join(lines) + "\n"

"""Is this the kind of image the model was made for? Checked before running, from the model's ``expects``.

A model's metadata may say what it takes::

    "expects": {"modality": "FLAIR", "skull_stripped": true, "description": "skull-stripped brain MRI (FLAIR)"}

A model without ``expects`` makes no claim and nothing is checked. Each check returns a Finding: a clear
mismatch (a head CT, a head with its skull, a T1 series given to a FLAIR model) is refused unless the user
insists (``force``: ``--force``, or the panel's Advanced checkbox); a borderline one becomes a warning shown
beside the result.
"""

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np

from .errors import CDMSegmentError
from .image import Volume

# Air is about -1000 HU; no MRI magnitude image has values this low.
CT_AIR_HU = -500.0
CT_CLEAR_FRACTION = 0.02
CT_BORDERLINE_FRACTION = 0.002
# Foreground volume of a skull-stripped brain: adult intracranial volumes stay under ~2000 ml (MNI152's
# brain mask: 1887 ml); a head with its skull and scalp is 3500-5000 ml.
STRIPPED_BRAIN_MAX_ML = 2300.0
SKULL_ON_MIN_ML = 3000.0
# Measured against the brain's bright end (_brightness): tissue is above FOREGROUND_FRACTION of it (BET's 10%,
# core/tissue.py); a skull-stripped background is dark, nearly all of it within NOISE_FLOOR_FRACTION (ringing and
# denoising residue stay there), where a raw MRI's noise background is not (at 2% of the brain, a quarter of
# Rayleigh noise of 2.7% is).
FOREGROUND_FRACTION = 0.1
NOISE_FLOOR_FRACTION = 0.02
DARK_BACKGROUND_SHARE = 0.9
# FLAIR is an inversion-recovery sequence with a long inversion time that nulls the CSF (1500-2800 ms);
# an MPRAGE T1 has about 900-1100 ms.
FLAIR_MIN_INVERSION_MS = 1500.0
FORCE_HINT = ("if you are sure, run again with --force (in Slicer: Advanced > Run on images the model "
              "was not made for)")


@dataclass
class Finding:
    clear: bool  # True: refused unless forced; False: a warning beside the result
    sentence: str


def _ct_intensities(expects: dict, volume: Volume, name: str) -> Optional[Finding]:
    if str(expects.get("modality", "")).upper() == "CT":
        return None
    if volume.tags.get("Modality", "MR") not in ("MR", ""):
        return Finding(True, f"{name} is a {volume.tags['Modality']} series (DICOM Modality), not an MRI")
    air = float(np.count_nonzero(volume.array <= CT_AIR_HU)) / volume.array.size
    if air < CT_BORDERLINE_FRACTION:
        return None
    return Finding(air >= CT_CLEAR_FRACTION, f"{name} looks like a CT, not an MRI: {100 * air:.1f}% of its voxels "
                                             f"are below {CT_AIR_HU:.0f} (air in Hounsfield units)")


def _brightness(array: np.ndarray) -> float:
    """The brain's bright end: the 98th percentile of the non-zero voxels' magnitudes (of about a million,
    evenly strided: a percentile needs no more, and a large volume stays fast)."""
    flat = np.asarray(array).ravel()
    flat = np.abs(flat[:: max(1, flat.size // 1_000_000)].astype(np.float64))
    flat = flat[flat > 0]
    return float(np.percentile(flat, 98)) if flat.size else 0.0


def _count_magnitudes(array: np.ndarray, above: float, at_most: float) -> Tuple[int, int]:
    """(voxels whose magnitude is above ``above``, voxels whose magnitude is at most ``at_most``), a few slices
    at a time so a large volume needs no full-size copy."""
    counts = [0, 0]
    for k in range(0, array.shape[0], 16):
        magnitude = np.abs(np.asarray(array[k:k + 16], dtype=np.float64))
        counts[0] += int(np.count_nonzero(magnitude > above))
        counts[1] += int(np.count_nonzero(magnitude <= at_most))
    return counts[0], counts[1]


def _skull_stripped(expects: dict, volume: Volume, name: str) -> Optional[Finding]:
    """Judged above the noise floor, not on "non-zero": a skull-stripped brain's background may hold small
    values (noise, ringing after a resample, a denoising filter) that are no tissue. Magnitudes, so that a
    z-scored brain (half of it negative, the background 0) is measured whole."""
    if not expects.get("skull_stripped"):
        return None
    bright = _brightness(volume.array)
    if bright <= 0:
        return None  # nothing but zeros: normalisation says so
    foreground, dark = _count_magnitudes(volume.array, FOREGROUND_FRACTION * bright, NOISE_FLOOR_FRACTION * bright)
    background = volume.array.size - foreground
    if background == 0 or dark < DARK_BACKGROUND_SHARE * background:
        return Finding(True, f"{name} is not skull-stripped: its background is not dark (only "
                             f"{100 * dark / max(background, 1):.0f}% of it is below {100 * NOISE_FLOOR_FRACTION:.0f}% "
                             "of the brain's intensity; a skull-stripped image's background is zero or nearly)")
    ml = foreground * float(np.prod(volume.spacing_mm)) / 1000.0
    if ml <= STRIPPED_BRAIN_MAX_ML:
        return None
    return Finding(ml >= SKULL_ON_MIN_ML, f"{name} does not look skull-stripped: its foreground (above "
                                          f"{100 * FOREGROUND_FRACTION:.0f}% of the brain's intensity) is {ml:.0f} ml, "
                                          f"more than a brain (under about {STRIPPED_BRAIN_MAX_ML:.0f} ml), so the "
                                          "skull and scalp seem to be still on")


def weighting(tags: dict) -> Optional[str]:
    """FLAIR, T1, T2 or PD from a DICOM series' TR, TE and TI (ms) and description; None when they are absent."""
    if "flair" in tags.get("SeriesDescription", "").lower():
        return "FLAIR"
    try:
        tr, te = float(tags["RepetitionTime"]), float(tags["EchoTime"])
    except (KeyError, ValueError):
        return None
    ti = float(tags.get("InversionTime") or 0)
    if ti >= FLAIR_MIN_INVERSION_MS:
        return "FLAIR"
    if ti > 0 or tr < 1000:
        return "T1"
    return "PD" if te < 40 else "T2"


def _acquisition(expects: dict, volume: Volume, name: str) -> Optional[Finding]:
    wanted = str(expects.get("modality", "")).upper()
    found = weighting(volume.tags)
    if wanted not in ("FLAIR", "T1", "T2", "PD") or found in (None, wanted):
        return None
    times = ", ".join(f"{k} {volume.tags[k]} ms" for k in ("RepetitionTime", "EchoTime", "InversionTime")
                      if volume.tags.get(k))
    return Finding(True, f"{name}'s DICOM header describes a {found}-weighted series ({times}), not {wanted}")


# The model's own out-of-distribution score (core/ood.py) above its threshold is a warning; above this many
# times the threshold, a refusal (bench/ood_real_scans.py). Measured with brain-flair-phantom (8 slices): held-out
# phantoms of every family score at most 1.02x its threshold and the bundled sample 0.91x; T1 (MNI152, Colin27 with
# and without skull) and a head CT 2.5-4.7x. With brain-flair-cpu (16 slices, a reference of 60 phantoms of every
# family): those phantoms at most 1.10x, 12 validation volumes at most 1.16x, the 72 held-out volumes of its recipe
# at most 0.95x, the sample 0.55x; the three T1 volumes 1.71-1.90x and the head CT 1.24x (the header and intensity
# checks refuse the CT before its score). 1.5 lies between the phantoms and the T1 volumes of both models
# (README, "What it takes").
OOD_REFUSAL_FACTOR = 1.5


def ood_levels(result) -> str:
    """'<score> (the model warns above <threshold> and refuses above <level>)' of a core.ood.OODResult."""
    # two decimals: at one, a score just past the refusal level read as equal to it ("5.3 ... refuses above 5.3")
    return (f"{result.score:.2f} (the model warns above {result.threshold:.2f} and refuses above "
            f"{OOD_REFUSAL_FACTOR * result.threshold:.2f})")


def ood_finding(result) -> Optional[Finding]:
    """A core.ood.OODResult (or None: the model has no reference) as a Finding, or None when not flagged."""
    if result is None or not result.flagged:
        return None
    clear = result.score > OOD_REFUSAL_FACTOR * result.threshold
    levels = ood_levels(result)
    if clear:
        return Finding(True, f"the image is unlike what the model learned: its out-of-distribution score is {levels}")
    # between the levels lie valid inputs too: a contrast at the edge of the training data, a large lesion
    return Finding(False, f"the image is unusual for the model: its out-of-distribution score is {levels}, as an "
                          "unusual contrast or a large or unusual lesion can give; check the result")


# Each check: (the model's expects, one input volume, its modality name) -> a Finding or None.
CHECKS: List[Callable[[dict, Volume, str], Optional[Finding]]] = [_ct_intensities, _skull_stripped, _acquisition]


def findings(metadata: dict, volumes: Sequence[Volume], names: Sequence[str]) -> List[Finding]:
    """Every finding for one case (one volume per modality name); none when the model declares no ``expects``."""
    expects = metadata.get("expects")
    if not expects:
        return []
    found = (check(expects, v, n) for v, n in zip(volumes, names) for check in CHECKS)
    return [f for f in found if f is not None]


def takes(metadata: dict) -> str:
    """What a model takes, in words: its ``expects`` description, else its modality names."""
    expects = metadata.get("expects") or {}
    return expects.get("description") or (f"{', '.join(metadata['modalities'])} images (the model file does not "
                                          "say more)")


def check_plausible(metadata: dict, volumes: Sequence[Volume], names: Sequence[str], force: bool = False,
                    model_findings: Callable[[], List[Optional[Finding]]] = list) -> List[str]:
    """Raise CDMSegmentError on a clear mismatch unless ``force``; return the warnings to show beside the result.

    model_findings: the checks that run the network (the OOD score), called only when the cheap checks on the
    image itself have not already refused it."""
    found = findings(metadata, volumes, names)
    if force or not any(f.clear for f in found):
        found += [f for f in model_findings() if f is not None]
    clear = [f for f in found if f.clear]
    if clear and not force:
        raise CDMSegmentError(f"{clear[0].sentence}; this model takes {takes(metadata)}; {FORCE_HINT}")
    return [f"{f.sentence}{' (run anyway, as asked)' if f.clear else ''}; this model takes {takes(metadata)}"
            for f in found]

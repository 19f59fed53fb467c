"""The model's out-of-distribution reference (``metadata["ood"]``), measured on held-out volumes.

The volumes should span everything the model is meant to take (every lesion family,
lesion-free cases, the whole contrast and acquisition range), none of them seen in
training: the threshold is then a bound on how unusual a valid input can look.
"""

from typing import Callable, List, Sequence, Tuple

import numpy as np

from ..core.reading import read_volume
from ..core.modelfile import LoadedModel
from ..core.ood import (NOISE_LEVELS, SLICES, check_reference_volumes, denoising_errors, ood_reference,
                        score_from_errors)
from ..data.cases import Case


def calibrate_ood(model: LoadedModel, cases: Sequence[Case], *, false_alarm: float = 0.05, seed: int = 0,
                  device="cpu", data: str = "", log: Callable[[str], None] = print) -> Tuple[dict, List[dict]]:
    """(metadata["ood"], per-case rows with errors and score) from the model's denoising errors on ``cases``."""
    check_reference_volumes(len(cases), NOISE_LEVELS)
    errors = []
    for n, case in enumerate(cases, start=1):
        volumes = [read_volume(case.images[m]) for m in model.modalities]
        errors.append(denoising_errors(model, volumes, noise_levels=NOISE_LEVELS, slices=SLICES, seed=seed,
                                       device=device))
        log(f"{n}/{len(cases)} {case.case_id}: log errors {np.round(errors[-1], 3).tolist()}")
    reference = ood_reference(np.array(errors), noise_levels=NOISE_LEVELS, slices=SLICES, seed=seed,
                              false_alarm=false_alarm)
    rows = [{"case": c.case_id, "errors": e.tolist(), "score": score_from_errors(e, reference)}
            for c, e in zip(cases, errors)]
    reference["calibration"] = {"data": data, "false_alarms": sum(r["score"] > reference["threshold"] for r in rows),
                                "volumes": len(rows)}
    return reference, rows

"""Percentiles on any device, equal to numpy's default (``np.percentile``, method 'linear').

The robust intensity range (intensity.py) and the tissue threshold (tissue.py) are percentiles of
a whole volume, taken where the volume already is: on a GPU, no copy of the volume to the host.
``torch.quantile`` refuses tensors of more than 2 ** 24 elements (a 256 x 256 x 256 volume has
that many), so the two order statistics around each percentile come from ``torch.topk``, which
takes any size; the interpolation between them is numpy's own arithmetic, in float64.
"""

import math
from typing import List, Sequence

import torch


def _order_statistics(values: torch.Tensor, first: int) -> List[float]:
    """The (first)th and (first + 1)th smallest of ``values`` (1-D, 0-based ranks, ``first + 1 < len``) and their
    float32 difference, from one top-k from whichever end is nearer (k <= len / 2 + 1)."""
    n = values.numel()
    if first < n // 2:
        pair = torch.topk(values, first + 2, largest=False).values[-2:]
    else:
        pair = torch.topk(values, n - first, largest=True).values[-2:].flip(0)
    return torch.cat([pair, pair[1:] - pair[:1]]).tolist()  # one copy to the host for the three numbers


def percentiles(values: torch.Tensor, q: Sequence[float]) -> List[float]:
    """values: a non-empty tensor of finite numbers (any shape, any device); q: percentiles in [0, 100] ->
    one float per q, as ``np.percentile(values, q)`` gives them (numpy 2: float64 interpolation between
    order statistics whose difference is taken in the values' float32)."""
    flat = values.reshape(-1).float()
    n = flat.numel()
    out = []
    for p in q:
        virtual = (n - 1) * (p / 100)  # numpy's 'linear': Hyndman & Fan's method 7
        first = math.floor(virtual)
        if virtual >= n - 1:
            out.append(float(flat.max()))
            continue
        below, above, difference = _order_statistics(flat, first)
        gamma = virtual - first
        # numpy's _lerp: from the nearer end, so gamma = 1 gives the upper value exactly
        out.append(below + difference * gamma if gamma < 0.5 else above - difference * (1 - gamma))
    return out

"""Run the network only on the tissue: a crop window per batch of model-sized slices.

The UNet is fully convolutional (its attention sees the whole input, so context matters
a little; see ``Testing/test_crop.py`` for the measured change), so a slice's heatmap can
be computed on the bounding box of its tissue plus a margin instead of on the whole
square. Sides are multiples of 8 px: the bundled UNet pads its input to a multiple of
2 ** (levels - 1) = 8, and a window of that size needs no padding. Outside the window
the heatmap is 0, as it is outside the tissue anyway.

Windows are computed for every slice before the batch loop and kept on the host, so the
loop itself never waits for the device to report a box.
"""

from typing import Tuple

import numpy as np
import torch

CROP_MULTIPLE_PX = 8
# The margin by Dice on held-out phantoms (bench/bench_crop_margin.py): 8 px kept Dice, 0 px lost 0.01.
DEFAULT_CROP_MARGIN_PX = 8

Window = Tuple[int, int, int, int]  # rows r0:r1, columns c0:c1, in model pixels


def tissue_boxes(tissue: torch.Tensor) -> np.ndarray:
    """tissue: (N, S, S) bool per-slice mask in model pixels (on any device) -> (N, 4) int64 on the host:
    the tight bounding box (r0, r1, c0, c1), end exclusive, of each slice; (0, 0, 0, 0) for an empty slice.
    One device-to-host copy for all slices."""
    n, s = tissue.shape[0], tissue.shape[-1]
    rows, cols = tissue.any(dim=2), tissue.any(dim=1)  # (N, S) each
    index = torch.arange(s, device=tissue.device)
    big = torch.full_like(index, s)

    def first_last(hit: torch.Tensor):
        first = torch.where(hit, index, big).amin(dim=1)
        last = torch.where(hit, index + 1, torch.zeros_like(index)).amax(dim=1)
        return first, last

    r0, r1 = first_last(rows)
    c0, c1 = first_last(cols)
    boxes = torch.stack([r0, r1, c0, c1], dim=1).cpu().numpy().astype(np.int64)
    boxes[boxes[:, 1] == 0] = 0
    return boxes.reshape(n, 4)


def _grow_axis(lo: int, hi: int, margin: int, size: int, multiple: int) -> Tuple[int, int]:
    """[lo, hi) grown by ``margin`` on both sides, its length rounded up to ``multiple``, kept in [0, size)."""
    if hi <= lo:
        return 0, size
    length = min(size, -(-(hi - lo + 2 * margin) // multiple) * multiple)
    start = (lo + hi - length) // 2
    start = max(0, min(start, size - length))
    return start, start + length


def crop_window(boxes: np.ndarray, size: int, margin_px: int, multiple: int = CROP_MULTIPLE_PX) -> Window:
    """The window for one batch: the union of its slices' boxes (``tissue_boxes`` rows), grown by
    ``margin_px`` on each side, sides rounded up to ``multiple`` px (or the whole ``size``)."""
    boxes = boxes[boxes[:, 1] > boxes[:, 0]]
    if len(boxes) == 0:
        return 0, size, 0, size
    r0, r1 = _grow_axis(int(boxes[:, 0].min()), int(boxes[:, 1].max()), margin_px, size, multiple)
    c0, c1 = _grow_axis(int(boxes[:, 2].min()), int(boxes[:, 3].max()), margin_px, size, multiple)
    return r0, r1, c0, c1


def window_fraction(windows, size: int) -> float:
    """Mean share of the square's pixels the network sees: the cost of a batch relative to no crop."""
    return float(np.mean([(w[1] - w[0]) * (w[3] - w[2]) for w in windows]) / size ** 2) if windows else 0.0

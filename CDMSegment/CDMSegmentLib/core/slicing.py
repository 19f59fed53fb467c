"""From a volume to model-sized 2D slices and back, exactly invertible in geometry.

The array is first permuted and flipped (never resampled) to the nearest canonical
orientation, with array axes (S, P, L) - the same in-plane orientation for every
input, whatever its direction matrix, so the model always sees the anatomy the way
it was trained. Slices are then padded to a square in millimetres (so pixels stay
isotropic) and resized to the model size. ``insert_slices`` undoes every step, so
the result lies voxel for voxel on the input grid.
"""

from dataclasses import dataclass
from typing import Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from .errors import CDMSegmentError
from .device import voxel_tensor
from .names import AXIS_NAMES


Array = Union[np.ndarray, torch.Tensor]


def _permuted(a: Array, axes: Tuple[int, ...]) -> Array:
    return a.permute(axes) if isinstance(a, torch.Tensor) else np.transpose(a, axes)


def _flipped(a: Array, axes) -> Array:
    if not axes:
        return a
    return a.flip(axes) if isinstance(a, torch.Tensor) else np.flip(a, axis=axes)


@dataclass
class Orientation:
    """How the input's array axes (K, J, I) map to canonical (S, P, L): ``canonical = flip(transpose(a, perm), flips)``."""

    perm: Tuple[int, int, int]
    flips: Tuple[bool, bool, bool]
    spacing_mm: Tuple[float, float, float]  # along canonical axes (S, P, L)

    @classmethod
    def from_direction(cls, direction: np.ndarray, spacing_ijk_mm) -> "Orientation":
        """direction: 3x3, columns are the LPS directions of the i, j, k axes."""
        d = np.asarray(direction, dtype=float)
        # array axis a (0=K, 1=J, 2=I) has direction column 2 - a
        lps_axis_of_array_axis = []
        for a in range(3):
            col = d[:, 2 - a]
            lps_axis_of_array_axis.append(int(np.argmax(np.abs(col))))
        if sorted(lps_axis_of_array_axis) != [0, 1, 2]:
            raise CDMSegmentError("the volume's direction matrix is degenerate (two axes point the same way); "
                                  "fix the image header first")
        # canonical axis c (0=S, 1=P, 2=L) is LPS axis 2 - c
        perm = tuple(lps_axis_of_array_axis.index(2 - c) for c in range(3))
        flips = tuple(bool(d[2 - c, 2 - perm[c]] < 0) for c in range(3))
        spacing = tuple(float(spacing_ijk_mm[2 - perm[c]]) for c in range(3))
        return cls(perm, flips, spacing)

    def to_canonical(self, a: Array) -> Array:
        """a: (..., K, J, I), numpy or torch -> (..., S, P, L); a view when possible (torch flips copy)."""
        lead = a.ndim - 3
        out = _permuted(a, tuple(range(lead)) + tuple(lead + p for p in self.perm))
        return _flipped(out, [lead + c for c in range(3) if self.flips[c]])

    def from_canonical(self, c: Array) -> Array:
        """c: (..., S, P, L), numpy or torch -> (..., K, J, I); undoes ``to_canonical``."""
        lead = c.ndim - 3
        a = _flipped(c, [lead + i for i in range(3) if self.flips[i]])
        inverse = np.argsort(self.perm)
        return _permuted(a, tuple(range(lead)) + tuple(lead + int(p) for p in inverse))

    def canonical_axis(self, axis: Union[str, int]) -> int:
        """'auto'/'axial'/'coronal'/'sagittal', or an input IJK axis (0=I, 1=J, 2=K) -> canonical axis."""
        if isinstance(axis, str) and axis.isdigit():
            axis = int(axis)
        if axis == "auto":
            return 0
        if isinstance(axis, str):
            if axis not in AXIS_NAMES:
                raise CDMSegmentError(f"unknown slice axis {axis!r}; use auto, axial, coronal, sagittal, 0, 1 or 2")
            return AXIS_NAMES[axis]
        if axis not in (0, 1, 2):
            raise CDMSegmentError(f"slice axis must be 0 (I), 1 (J) or 2 (K), got {axis}")
        return self.perm.index(2 - axis)


@dataclass
class SliceStack:
    """Where model-sized slices came from, to put results back. Canonical array shape (S, P, L)."""

    orientation: Orientation
    axis: int
    canonical_shape: Tuple[int, int, int]
    pad: Tuple[int, int, int, int]  # before/after rows, before/after columns, in voxels
    size: int


def pixel_size_mm(canonical_shape: Tuple[int, int, int], spacing_mm: Tuple[float, float, float], axis: int,
                  size: int) -> float:
    """Edge of one model pixel in mm: the slice's square field of view divided by the model size."""
    plane = [a for a in range(3) if a != axis]
    return max(canonical_shape[a] * spacing_mm[a] for a in plane) / size


def _square_padding(rows: int, cols: int, row_mm: float, col_mm: float) -> Tuple[int, int, int, int]:
    """Voxels to add so the slice covers a square field of view in millimetres."""
    height, width = rows * row_mm, cols * col_mm
    side = max(height, width)
    add_r = int(round((side - height) / row_mm))
    add_c = int(round((side - width) / col_mm))
    return add_r // 2, add_r - add_r // 2, add_c // 2, add_c - add_c // 2


def extract_slices(arrays: Array, orientation: Orientation, axis: int, size: int, background: float = -1.0,
                   device: Union[str, torch.device, None] = None) -> Tuple[torch.Tensor, SliceStack]:
    """arrays: (C, K, J, I) normalised modalities, numpy or torch -> slices (N, C, size, size) float32 on
    ``device`` (None: where the arrays are), N along ``axis``. The volume crosses to the device once and is
    reoriented, padded and resized there."""
    c = orientation.to_canonical(voxel_tensor(arrays, device))
    shape = tuple(c.shape[1:])
    plane = [a for a in range(3) if a != axis]
    pad = _square_padding(shape[plane[0]], shape[plane[1]], orientation.spacing_mm[plane[0]],
                          orientation.spacing_mm[plane[1]])
    c = c.movedim(1 + axis, 1).to(torch.float32, memory_format=torch.contiguous_format)  # (C, N, rows, cols)
    t = c.transpose(0, 1)  # (N, C, rows, cols)
    t = F.pad(t, (pad[2], pad[3], pad[0], pad[1]), value=background)
    t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False, antialias=t.shape[-1] > size)
    return t, SliceStack(orientation, axis, shape, pad, size)


def insert_slices(maps: torch.Tensor, stack: SliceStack) -> torch.Tensor:
    """maps: (N, size, size) per-slice results -> (K, J, I) float32 on the input's grid, on the maps' device:
    resized and reoriented there."""
    axis = stack.axis
    plane = [stack.canonical_shape[a] for a in range(3) if a != axis]
    padded = (plane[0] + stack.pad[0] + stack.pad[1], plane[1] + stack.pad[2] + stack.pad[3])
    t = maps.detach().float()[:, None]
    t = F.interpolate(t, size=padded, mode="bilinear", align_corners=False, antialias=padded[1] < t.shape[-1])[:, 0]
    t = t[:, stack.pad[0]:stack.pad[0] + plane[0], stack.pad[2]:stack.pad[2] + plane[1]]
    return stack.orientation.from_canonical(t.movedim(0, axis)).contiguous()

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

AXIS_NAMES = {"axial": 0, "coronal": 1, "sagittal": 2}  # canonical array axes (S, P, L)


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

    def to_canonical(self, a: np.ndarray) -> np.ndarray:
        """a: (..., K, J, I) -> (..., S, P, L); a view when possible."""
        lead = a.ndim - 3
        out = np.transpose(a, tuple(range(lead)) + tuple(lead + p for p in self.perm))
        axes = [lead + c for c in range(3) if self.flips[c]]
        return np.flip(out, axis=axes) if axes else out

    def from_canonical(self, c: np.ndarray) -> np.ndarray:
        lead = c.ndim - 3
        axes = [lead + i for i in range(3) if self.flips[i]]
        a = np.flip(c, axis=axes) if axes else c
        inverse = np.argsort(self.perm)
        return np.transpose(a, tuple(range(lead)) + tuple(lead + int(p) for p in inverse))

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


def extract_slices(arrays: np.ndarray, orientation: Orientation, axis: int, size: int,
                   background: float = -1.0, device: Union[str, torch.device] = "cpu") -> Tuple[torch.Tensor, SliceStack]:
    """arrays: (C, K, J, I) normalised modalities -> slices (N, C, size, size) float32 on ``device``, N along
    ``axis``. The volume is copied to the device once and padded and resized there."""
    c = orientation.to_canonical(arrays)
    c = np.moveaxis(c, 1 + axis, 1)  # (C, N, rows, cols)
    plane = [a for a in range(3) if a != axis]
    pad = _square_padding(c.shape[2], c.shape[3], orientation.spacing_mm[plane[0]], orientation.spacing_mm[plane[1]])
    t = torch.from_numpy(np.ascontiguousarray(c, dtype=np.float32)).to(device).transpose(0, 1)  # (N, C, rows, cols)
    t = F.pad(t, (pad[2], pad[3], pad[0], pad[1]), value=background)
    t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False, antialias=t.shape[-1] > size)
    shape = orientation.to_canonical(np.empty(arrays.shape[1:], dtype=np.uint8)).shape
    return t, SliceStack(orientation, axis, tuple(shape), pad, size)


def insert_slices(maps: torch.Tensor, stack: SliceStack) -> np.ndarray:
    """maps: (N, size, size) per-slice results -> (K, J, I) float32 on the input's grid. Resized on the
    maps' device; one copy to the host at the end."""
    axis = stack.axis
    plane = [stack.canonical_shape[a] for a in range(3) if a != axis]
    padded = (plane[0] + stack.pad[0] + stack.pad[1], plane[1] + stack.pad[2] + stack.pad[3])
    t = maps.detach().float()[:, None]
    t = F.interpolate(t, size=padded, mode="bilinear", align_corners=False, antialias=padded[1] < t.shape[-1])[:, 0]
    t = t[:, stack.pad[0]:stack.pad[0] + plane[0], stack.pad[2]:stack.pad[2] + plane[1]]
    c = np.moveaxis(t.cpu().numpy(), 0, axis)
    return np.ascontiguousarray(stack.orientation.from_canonical(c), dtype=np.float32)

"""A 3D image with its geometry: the unit the volume runner and the adapters exchange.

Physical space is LPS, as in SimpleITK and ITK; the Slicer adapter converts from RAS.
Arrays are indexed ``[k, j, i]`` (slowest axis first, like ``sitk.GetArrayFromImage``).
"""

from dataclasses import dataclass, field
from typing import Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from .errors import CDMSegmentError


@dataclass
class Volume:
    """array: (K, J, I); spacing_mm and origin_mm in (i, j, k) order; direction: 3x3, columns = i, j, k axes in LPS."""

    array: np.ndarray
    spacing_mm: Tuple[float, float, float] = (1.0, 1.0, 1.0)
    origin_mm: Tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: np.ndarray = field(default_factory=lambda: np.eye(3))
    tags: dict = field(default_factory=dict)  # DICOM acquisition tags by name, when read from a series (reading.py)

    def __post_init__(self):
        self.direction = np.asarray(self.direction, dtype=float).reshape(3, 3)
        self.spacing_mm = tuple(float(s) for s in self.spacing_mm)
        self.origin_mm = tuple(float(o) for o in self.origin_mm)

    def same_grid(self, other: "Volume", tol: float = 1e-4) -> bool:
        """True when both volumes sample the same voxel positions."""
        return (
            self.array.shape[:3] == other.array.shape[:3]
            and np.allclose(self.spacing_mm, other.spacing_mm, atol=tol)
            and np.allclose(self.origin_mm, other.origin_mm, atol=tol)
            and np.allclose(self.direction, other.direction, atol=tol)
        )

    def with_array(self, array: np.ndarray) -> "Volume":
        """A new volume on the same grid holding ``array``."""
        return Volume(array, self.spacing_mm, self.origin_mm, self.direction.copy())

    def ijk_to_lps(self) -> np.ndarray:
        """4x4 matrix mapping (i, j, k, 1) voxel indices to LPS millimetres."""
        m = np.eye(4)
        m[:3, :3] = self.direction @ np.diag(self.spacing_mm)
        m[:3, 3] = self.origin_mm
        return m

    @classmethod
    def from_sitk(cls, image: sitk.Image) -> "Volume":
        if image.GetDimension() != 3:
            raise CDMSegmentError(f"expected a 3D image, got {image.GetDimension()}D; give one 3D volume per modality")
        if image.GetNumberOfComponentsPerPixel() != 1:
            raise CDMSegmentError(
                f"expected a scalar (grey-level) image, got {image.GetNumberOfComponentsPerPixel()} components per voxel "
                "(RGB or vector); convert it to a scalar volume first")
        return cls(sitk.GetArrayFromImage(image), image.GetSpacing(), image.GetOrigin(),
                   np.array(image.GetDirection()).reshape(3, 3))

    def to_sitk(self) -> sitk.Image:
        image = sitk.GetImageFromArray(self.array)
        image.SetSpacing(self.spacing_mm)
        image.SetOrigin(self.origin_mm)
        image.SetDirection(tuple(self.direction.ravel()))
        return image


def check_geometry(volume: Volume, where: str) -> None:
    """Voxel sizes finite and positive, the direction matrix invertible: else one sentence for a radiologist."""
    spacing = np.asarray(volume.spacing_mm)
    if not (np.isfinite(spacing).all() and (spacing > 0).all()):
        raise CDMSegmentError(f"cannot use {where}: its voxel size is {' x '.join(f'{s:g}' for s in spacing)} mm; "
                              "a voxel size of zero, negative or undefined means distances and volumes cannot be "
                              "measured: fix the header or export the image again from the scanner's DICOM")
    if not np.isfinite(volume.direction).all() or abs(np.linalg.det(volume.direction)) < 1e-3:
        raise CDMSegmentError(f"cannot use {where}: its orientation matrix is degenerate (two image axes point the "
                              "same way), so the image cannot be placed in the patient; export it again from the "
                              "scanner's DICOM")


def check_voxel_type(array, where: str) -> None:
    """Real grey levels only: complex voxels (k-space, or magnitude and phase in one number), text or Python
    objects are refused saying what was found (numpy would take the real part with only a warning)."""
    dtype = getattr(array, "dtype", None)
    if dtype is None:
        raise CDMSegmentError(f"cannot use {where}: its voxels are a {type(array).__name__}, not an array; give a "
                              "numpy array (K, J, I)")
    kind = dtype.kind if isinstance(dtype, np.dtype) else ("c" if "complex" in str(dtype) else "f")
    if kind == "c":
        raise CDMSegmentError(f"cannot use {where}: its voxels are complex numbers ({dtype}), not grey levels; give "
                              "the magnitude image (for example np.abs of it, or the scanner's magnitude series)")
    if kind not in "biuf":
        raise CDMSegmentError(f"cannot use {where}: its voxels are of type {dtype}, not numbers; give an image of "
                              "integer or floating-point grey levels")


def check_same_grid(volumes: Sequence[Volume], names: Sequence[str]) -> None:
    """Modalities of one case must share one voxel grid (resample them in Slicer or with SimpleITK first)."""
    for v, n in zip(volumes[1:], names[1:]):
        if not v.same_grid(volumes[0]):
            raise CDMSegmentError(
                f"modality {n} is not on the same voxel grid as {names[0]}; resample it onto {names[0]} first")

"""Writing results next to the input: a float heatmap volume and a Slicer segmentation file.

Files are written under a temporary name and renamed only when complete, so an error
or an interruption never leaves a half-written output behind.
"""

import contextlib
import os
from pathlib import Path
from typing import Dict, Iterator, List

import numpy as np
import SimpleITK as sitk
import slicerio

from ..core.image import Volume
from ..core.terminology import segment_style


def file_stem(path) -> str:
    """case_0.nii.gz -> case_0; a DICOM folder -> its name."""
    name = Path(path).name
    for ext in (".seg.nrrd", ".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm", ".gz"):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return name


@contextlib.contextmanager
def atomic_outputs(paths: List[Path]) -> Iterator[List[Path]]:
    """Yield temporary paths; on success rename each onto its target, on failure delete them all."""
    tmps = [p.with_name(".partial-" + p.name) for p in paths]
    try:
        yield tmps
        for tmp, final in zip(tmps, paths):
            os.replace(tmp, final)
    finally:
        for tmp in tmps:
            if tmp.exists():
                tmp.unlink()


def write_heatmap(path: Path, heatmap: np.ndarray, reference: Volume) -> None:
    """float32 heatmap on the reference grid, compressed NRRD (or any format SimpleITK writes)."""
    sitk.WriteImage(reference.with_array(heatmap.astype(np.float32)).to_sitk(), str(path), True)


# Slicer's name for the conversion parameter holding the grid the Segment Editor edits on
# (vtkSegmentationConverter::GetReferenceImageGeometryParameterName).
REFERENCE_GEOMETRY = "Reference image geometry"
RAS_FROM_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def reference_geometry(reference: Volume) -> str:
    """The reference grid as Slicer serialises it (vtkSegmentationConverter::SerializeImageGeometry): the 16
    elements of IJK-to-RAS row by row, then the extent i0;i1;j0;j1;k0;k1, each followed by ';'."""
    k, j, i = reference.array.shape
    values = [repr(float(v)) for v in (RAS_FROM_LPS @ reference.ijk_to_lps()).ravel()] + \
        [str(n) for n in (0, i - 1, 0, j - 1, 0, k - 1)]
    return "".join(f"{v};" for v in values)


def segmentation_dict(masks: Dict[str, np.ndarray], reference: Volume) -> dict:
    """slicerio's segmentation description: one labelmap, label k for the k-th class, LPS geometry.

    The voxels go in (I, J, K) order, as NRRD stores them: slicerio writes each segment's extent
    (``Segment<n>_Extent``) from the array's shape, and Slicer's reader crops every segment to that
    extent, so a (K, J, I) array would lose every voxel beyond the slice count in I. The reference
    grid is stored too, so a result with no voxel still loads on the input's grid.
    """
    labels = np.zeros(reference.array.shape, dtype=np.uint8)
    segments = []
    for value, (class_name, mask) in enumerate(masks.items(), start=1):
        labels[mask.astype(bool)] = value
        style = segment_style(class_name)
        segments.append({"id": f"Segment_{value}", "labelValue": value, "layer": 0, "name": style.name,
                         "color": list(style.color), "terminology": style.terminology(), "status": "inprogress"})
    return {"voxels": np.ascontiguousarray(labels.transpose(2, 1, 0)), "ijkToLPS": reference.ijk_to_lps(),
            "segments": segments, "containedRepresentationNames": ["Binary labelmap"],
            "masterRepresentation": "Binary labelmap",
            # Written as Slicer writes it: its reader takes only the parameters that end with '&', which
            # slicerio's own "conversionParameters" leaves off the last one.
            "Segmentation_ConversionParameters": f"{REFERENCE_GEOMETRY}|{reference_geometry(reference)}|"
                                                 "the grid of the image the segmentation was made on&"}


def write_segmentation(path: Path, masks: Dict[str, np.ndarray], reference: Volume) -> None:
    """A .seg.nrrd that Slicer loads as a segmentation node, one named, coloured segment per class."""
    slicerio.write_segmentation(str(path), segmentation_dict(masks, reference))

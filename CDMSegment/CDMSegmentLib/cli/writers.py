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


def segmentation_fields(class_names: List[str], reference: Volume) -> Dict[str, str]:
    """The fields Slicer's segmentation reader reads from a .seg.nrrd (``key:=value`` lines), as its writer
    writes them: one segment per class in one labelmap layer, label k for the k-th class.

    Each segment's extent is given in I J K order (Slicer crops the segment to it), over the whole grid,
    and the reference grid is stored, so a result with no voxel still loads on the input's grid.
    """
    k, j, i = reference.array.shape
    fields = {"Segmentation_MasterRepresentation": "Binary labelmap",
              "Segmentation_ContainedRepresentationNames": "Binary labelmap|",
              "Segmentation_ReferenceImageExtentOffset": "0 0 0",
              # Slicer's reader takes only the parameters that end with '&'.
              "Segmentation_ConversionParameters": f"{REFERENCE_GEOMETRY}|{reference_geometry(reference)}|"
                                                   "the grid of the image the segmentation was made on&"}
    for n, class_name in enumerate(class_names):
        style = segment_style(class_name)
        fields.update({f"Segment{n}_ID": f"Segment_{n + 1}", f"Segment{n}_Name": style.name,
                       f"Segment{n}_Color": " ".join(str(c) for c in style.color),
                       f"Segment{n}_LabelValue": str(n + 1), f"Segment{n}_Layer": "0",
                       f"Segment{n}_Extent": f"0 {i - 1} 0 {j - 1} 0 {k - 1}",
                       f"Segment{n}_Tags": f"TerminologyEntry:{style.terminology_string()}|"
                                           "Segmentation.Status:inprogress|"})
    return fields


def write_segmentation(path: Path, masks: Dict[str, np.ndarray], reference: Volume) -> None:
    """A .seg.nrrd that Slicer loads as a segmentation node, one named, coloured segment per class
    (written with SimpleITK, which Slicer's Python has, so the child process writes it inside Slicer too)."""
    labels = np.zeros(reference.array.shape, dtype=np.uint8)
    for value, mask in enumerate(masks.values(), start=1):
        labels[mask.astype(bool)] = value
    image = reference.with_array(labels).to_sitk()
    for key, value in segmentation_fields(list(masks), reference).items():
        image.SetMetaData(key, value)
    sitk.WriteImage(image, str(path), True)

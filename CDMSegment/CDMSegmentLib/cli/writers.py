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


def segmentation_dict(masks: Dict[str, np.ndarray], reference: Volume) -> dict:
    """slicerio's segmentation description: one labelmap, label k for the k-th class, LPS geometry."""
    labels = np.zeros(reference.array.shape, dtype=np.uint8)
    segments = []
    for value, (class_name, mask) in enumerate(masks.items(), start=1):
        labels[mask.astype(bool)] = value
        style = segment_style(class_name)
        segments.append({"id": f"Segment_{value}", "labelValue": value, "layer": 0, "name": style.name,
                         "color": list(style.color), "terminology": style.terminology(), "status": "inprogress"})
    return {"voxels": labels, "ijkToLPS": reference.ijk_to_lps(), "segments": segments,
            "containedRepresentationNames": ["Binary labelmap"], "masterRepresentation": "Binary labelmap"}


def write_segmentation(path: Path, masks: Dict[str, np.ndarray], reference: Volume) -> None:
    """A .seg.nrrd that Slicer loads as a segmentation node, one named, coloured segment per class."""
    slicerio.write_segmentation(str(path), segmentation_dict(masks, reference), index_order="C")

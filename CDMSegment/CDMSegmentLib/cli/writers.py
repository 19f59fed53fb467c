"""Writing results next to the input: a float heatmap volume and a Slicer segmentation file.

Files are written under a temporary name unique to the run and given their name only when all are
complete, so an error or an interruption never leaves a half-written output behind, and a file that
appeared meanwhile is never replaced.
"""

import contextlib
import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import Dict, Iterator, List

import numpy as np
import SimpleITK as sitk
import slicerio

from ..core.errors import CDMSegmentError
from ..core.image import Volume
from ..core.terminology import segment_style


def file_stem(path) -> str:
    """case_0.nii.gz -> case_0; a DICOM folder -> its name."""
    name = Path(path).name
    for ext in (".seg.nrrd", ".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm", ".gz"):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return name


def check_output_folder(folder: Path, needed_bytes: int = 0) -> None:
    """Before any work: ``folder`` is a folder (or can be made in one) where a file can be created, with
    ``needed_bytes`` free. Nothing is left behind by the check."""
    existing = Path(folder).absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise CDMSegmentError(f"cannot write outputs to {folder}: {existing} is a file, not a folder; "
                              "choose another output folder")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise CDMSegmentError(f"cannot write outputs to {folder}: {_reason(e)}; {_advice(e)}") from None
    free = shutil.disk_usage(existing).free
    if free < needed_bytes:
        raise CDMSegmentError(f"not enough disk space for the outputs in {existing}: {free / 1e6:.0f} MB free, "
                              f"up to {needed_bytes / 1e6:.0f} MB needed; free some space or choose another folder")


def _reason(e: OSError) -> str:
    return e.strerror or str(e)


def _advice(e: OSError) -> str:
    if e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EIO):
        return "free some disk space or choose another output folder"
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "choose a folder you can write to"
    return "check the output folder or choose another one"


@contextlib.contextmanager
def atomic_outputs(paths: List[Path], overwrite: bool = False) -> Iterator[List[Path]]:
    """Yield temporary paths, unique to this run, beside the targets; on success move each onto its target,
    on any failure or interruption delete them all. Every OSError becomes one CDMSegmentError line.

    Without ``overwrite`` a target that appeared during the run is never replaced: the file is hard-linked to
    its name (which fails when the name exists) and the temporary name removed; all-or-nothing."""
    tmps: List[Path] = []
    try:
        for p in paths:
            p.parent.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(prefix=".partial-", suffix="-" + p.name, dir=p.parent)
            os.close(fd)
            tmps.append(Path(name))
        yield tmps
        _publish(tmps, paths, overwrite)
    except FileExistsError as e:
        raise CDMSegmentError(f"{e.filename2 or e.filename} appeared while this run was writing and was kept; "
                              "choose another output folder or pass --overwrite") from None
    except OSError as e:
        finals = {str(tmp): final for tmp, final in zip(tmps, paths)}
        where = finals.get(str(e.filename), e.filename or (paths[0].parent if paths else ""))
        raise CDMSegmentError(f"could not write {where}: {_reason(e)}; {_advice(e)}") from None
    finally:
        for tmp in tmps:
            if tmp.exists():
                tmp.unlink()


def _publish(tmps: List[Path], paths: List[Path], overwrite: bool) -> None:
    placed = []
    try:
        for tmp, final in zip(tmps, paths):
            if overwrite:
                os.replace(tmp, final)
                continue
            try:
                os.link(tmp, final)
            except FileExistsError:
                raise
            except OSError:  # no hard links (FAT, some network shares): check, then rename; a tiny race remains
                if final.exists():
                    raise FileExistsError(errno.EEXIST, "exists", str(final)) from None
                os.replace(tmp, final)
            placed.append(final)
    except BaseException:
        for final in placed:
            final.unlink()
        raise


def write_heatmap(path: Path, heatmap: np.ndarray, reference: Volume) -> None:
    """float32 heatmap on the reference grid, compressed NRRD (or any format SimpleITK writes)."""
    try:
        sitk.WriteImage(reference.with_array(heatmap.astype(np.float32)).to_sitk(), str(path), True)
    except RuntimeError as e:  # ITK says why only in words; a full disk is the usual cause
        full = shutil.disk_usage(path.parent).free < heatmap.size * 4
        raise OSError(errno.ENOSPC if full else errno.EIO, "the disk is full" if full else
                      "the image writer failed (a full disk or a file size limit?)", str(path)) from None


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

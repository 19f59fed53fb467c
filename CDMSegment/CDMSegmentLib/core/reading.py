"""Reading an image file or a DICOM series folder into a Volume, refusing what reads "successfully" but is wrong.

SimpleITK fills a short NIfTI with zeros, reads a DICOM folder's first series of several, puts a series
with a missing slice on a uniform grid and guesses the voxel size of a self-contradicting NIfTI header,
each time with at most a raw C++ warning on stderr. Here the file is checked to be complete, a folder with
several series must be told which one, slice positions must be evenly spaced, and ITK's messages are
captured and turned into one sentence a radiologist can act on.
"""

import contextlib
import gzip
import os
import re
import struct
import tempfile
import zlib
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Sequence

import numpy as np
import SimpleITK as sitk

from .errors import CDMSegmentError
from .image import Volume, check_geometry

# DICOM tags kept with a volume for the plausibility check (core/plausibility.py).
ACQUISITION_TAGS = {"0008|0060": "Modality", "0008|103e": "SeriesDescription", "0018|0080": "RepetitionTime",
                    "0018|0081": "EchoTime", "0018|0082": "InversionTime"}
# A gap between slice positions may differ from the usual one by this fraction before the series is refused.
SLICE_GAP_TOLERANCE = 0.01

# ITK's words -> what they mean for the user. The first that matches the captured text is used.
_ITK_MEANINGS = [
    (r"Zero-valued spacing", "its header gives a voxel size of zero along one axis, so distances and volumes "
     "cannot be measured; fix the header or export the image again from the scanner's DICOM"),
    (r"determinant is 0|orthonormal|singular", "its header's orientation matrix is degenerate (two image axes "
     "point the same way), so the image cannot be placed in the patient; export it again from the scanner's DICOM"),
    (r"unexpected scales in sform", "its NIfTI header contradicts itself (the voxel size in pixdim and the "
     "orientation matrix sform disagree), so the voxel size is uncertain; convert it again from the DICOM "
     "(for example with dcm2niix)"),
    (r"fread got only|expected \d+ bytes but received|not read completely|unexpected end|truncated",
     "the file is truncated or damaged (it holds less data than its header says); copy it again from its source"),
]


@contextlib.contextmanager
def itk_messages() -> Iterator[List[str]]:
    """Capture what ITK prints on stderr (file descriptor 2) meanwhile; the list holds the text afterwards."""
    captured: List[str] = []
    with tempfile.TemporaryFile(mode="w+b") as sink:
        saved = os.dup(2)
        os.dup2(sink.fileno(), 2)
        try:
            yield captured
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            captured.append(sink.read().decode(errors="replace"))


def itk_sentence(text: str) -> Optional[str]:
    """What an ITK error or warning means for the user, or None when it is not one of the known kinds."""
    return next((meaning for pattern, meaning in _ITK_MEANINGS if re.search(pattern, text)), None)


def _itk_reason(text: str) -> str:
    """The gist of an unknown ITK message: its 'ITK ERROR' description without pointers and source paths."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    for line in lines:
        if "ITK ERROR" in line:
            return re.sub(r"^ITK ERROR: \w+\(0x[0-9a-f]+\): ", "", line)
    return lines[-1] if lines else "unknown reason"


def _execute(read: Callable[[], sitk.Image], where: str) -> sitk.Image:
    """``read()`` with ITK's messages captured: a known error or warning becomes its sentence, an unknown error
    its gist; unknown warnings are dropped (the checks here and in plausibility.py judge the result)."""
    image = None
    with itk_messages() as messages:
        try:
            image = read()
        except RuntimeError as e:
            messages.append(str(e))
    text = "\n".join(messages)
    meaning = itk_sentence(text)
    if meaning:
        raise CDMSegmentError(f"cannot use {where}: {meaning}")
    if image is None:
        raise CDMSegmentError(f"cannot read {where}: not an image SimpleITK can read ({_itk_reason(text)})")
    return image


def read_volume(path, series: Sequence[str] = ()) -> Volume:
    """Read anything SimpleITK reads: a file (NIfTI, NRRD, MHA, ...) or a DICOM series folder.

    series: SeriesInstanceUIDs, one of which chooses the series in a folder holding several.
    Raises CDMSegmentError with one sentence for a missing, truncated, ambiguous or ill-defined input.
    """
    path = Path(path)
    if not path.exists():
        raise CDMSegmentError(f"input not found: {path}")
    if path.is_dir():
        volume = _read_dicom_folder(path, series)
    else:
        _check_complete(path)
        image = _execute(lambda: sitk.ReadImage(str(path)), str(path))
        if image.GetDimension() == 4 and image.GetSize()[3] == 1:
            image = image[:, :, :, 0]
        try:
            volume = Volume.from_sitk(image)
        except CDMSegmentError as e:
            raise CDMSegmentError(f"{path}: {e}") from None
    check_geometry(volume, str(path))
    return volume


def _check_complete(path: Path) -> None:
    """A gzip file must decompress to its end with a matching CRC; a NIfTI must hold all the voxels its header
    declares (SimpleITK fills the missing ones with zeros without a word)."""
    with open(path, "rb") as f:
        compressed = f.read(2) == b"\x1f\x8b"
    opener = gzip.open if compressed else open
    truncated = f"cannot use {path}: the file is truncated or damaged (it holds less data than its header says); " \
                "copy it again from its source"
    try:
        with opener(path, "rb") as f:
            header = f.read(540)
            size = len(header) if compressed else path.stat().st_size  # only a gzip stream must be read through
            for block in iter(lambda: f.read(1 << 22), b"") if compressed else ():
                size += len(block)
    except (EOFError, OSError, zlib.error):  # gzip.BadGzipFile is an OSError
        raise CDMSegmentError(truncated) from None
    needed = _nifti_bytes(header)
    if needed is not None and size < needed:
        raise CDMSegmentError(truncated)


def _nifti_bytes(header: bytes) -> Optional[int]:
    """Bytes a NIfTI-1 or NIfTI-2 single file needs (header, extensions and voxels), or None if not one."""
    for fmt, size_at, dim_at, bitpix_at, offset_at, magic_at, magics in (
            ("<i", 0, (40, "<8h"), (72, "<h"), (108, "<f"), 344, (b"n+1\0",)),
            ("<i", 0, (16, "<8q"), (14, "<h"), (168, "<q"), 4, (b"n+2\0",))):
        if len(header) < 348 or header[magic_at:magic_at + 4] not in magics:
            continue
        dims = struct.unpack_from(dim_at[1], header, dim_at[0])
        bitpix = struct.unpack_from(bitpix_at[1], header, bitpix_at[0])[0]
        vox_offset = struct.unpack_from(offset_at[1], header, offset_at[0])[0]
        if not 1 <= dims[0] <= 7 or struct.unpack_from(fmt, header, size_at)[0] not in (348, 540):
            return None  # big-endian or odd: let ITK judge it
        return int(vox_offset) + int(np.prod([max(d, 1) for d in dims[1:dims[0] + 1]])) * bitpix // 8
    return None


def _header(file_name: str) -> sitk.ImageFileReader:
    reader = sitk.ImageFileReader()
    reader.SetFileName(file_name)
    reader.ReadImageInformation()
    return reader


def _tag(reader: sitk.ImageFileReader, key: str) -> str:
    return reader.GetMetaData(key).strip() if reader.HasMetaDataKey(key) else ""


def _read_dicom_folder(folder: Path, series: Sequence[str]) -> Volume:
    """The one series of the folder, or the one ``series`` names; slices evenly spaced and of one orientation."""
    ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not ids:
        raise CDMSegmentError(f"no DICOM series in folder {folder}; give a file or a DICOM series folder")
    chosen = [uid for uid in ids if uid in series] if len(ids) > 1 else list(ids)
    if len(chosen) != 1:
        listed = "; ".join(f"{uid} '{_tag(_header(names[0]), '0008|103e')}' ({len(names)} slices)"
                           for uid, names in ((u, sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), u))
                                              for u in ids))
        raise CDMSegmentError(f"folder {folder} holds {len(ids)} DICOM series: {listed}; choose one with --series UID")
    names = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), chosen[0])
    headers = [_header(n) for n in names]
    where = f"DICOM series {chosen[0]} in {folder}"
    _check_slice_positions(headers, where)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(names)
    image = _execute(reader.Execute, where)
    try:
        volume = Volume.from_sitk(image)
    except CDMSegmentError as e:
        raise CDMSegmentError(f"{where}: {e}") from None
    volume.tags = {name: _tag(headers[0], key) for key, name in ACQUISITION_TAGS.items() if _tag(headers[0], key)}
    return volume


def _check_slice_positions(headers: Sequence[sitk.ImageFileReader], where: str) -> None:
    """Slices share one orientation and lie at evenly spaced positions along its normal (ITK would put them on
    a uniform grid anyway, misplacing every slice after a gap)."""
    orientations = {_tag(h, "0020|0037") for h in headers}
    if len(orientations) > 1:
        raise CDMSegmentError(f"cannot use {where}: its slices have {len(orientations)} different orientations "
                              "(a localizer or a mixed export); export the axial series alone")
    if len(headers) < 3 or not all(_tag(h, "0020|0032") for h in headers) or not orientations.pop():
        return
    cosines = np.array([float(c) for c in _tag(headers[0], "0020|0037").split("\\")])
    normal = np.cross(cosines[:3], cosines[3:6])
    positions = np.sort([np.dot(normal, [float(c) for c in _tag(h, "0020|0032").split("\\")]) for h in headers])
    gaps = np.diff(positions)
    usual = float(np.median(gaps))
    bad = np.flatnonzero(np.abs(gaps - usual) > SLICE_GAP_TOLERANCE * abs(usual) + 1e-3)
    if (np.abs(gaps) < 1e-3).any():
        raise CDMSegmentError(f"cannot use {where}: several slices share one position (two acquisitions or echoes "
                              "in one series); export the one you want alone")
    if bad.size:
        pairs = ", ".join(f"{positions[i]:.2f} -> {positions[i + 1]:.2f} mm" for i in bad[:3])
        more = f" and {bad.size - 3} more" if bad.size > 3 else ""
        raise CDMSegmentError(f"cannot use {where}: its slices are not evenly spaced (usually {abs(usual):.2f} mm "
                              f"apart, but {pairs}{more}): a slice is missing or the series mixes acquisitions; "
                              "export the complete series again")

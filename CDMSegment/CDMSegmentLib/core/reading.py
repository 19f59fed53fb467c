"""Reading an image file or a DICOM series folder into a Volume, refusing what reads "successfully" but is wrong.

SimpleITK fills a short NIfTI with zeros, reads a NIfTI's NaN and infinities as 0, reads a DICOM folder's
first series of several, puts a series with a missing slice on a uniform grid and guesses the voxel size of
a self-contradicting NIfTI header, each time with at most a raw C++ warning on stderr. Here the file is
checked to be complete and its stored floats finite, a folder with several series must be told which one,
slice positions must be evenly spaced (within the rounding of how they are stored), a segmentation or a
single DICOM slice is named as such, and ITK's messages are captured and turned into one sentence a
radiologist can act on.
"""

import contextlib
import gzip
import math
import os
import re
import struct
import tempfile
import zlib
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Callable, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from .errors import CDMSegmentError
from .image import Volume, check_geometry, check_voxel_type

# DICOM tags kept with a volume for the plausibility check (core/plausibility.py).
ACQUISITION_TAGS = {"0008|0060": "Modality", "0008|103e": "SeriesDescription", "0018|0080": "RepetitionTime",
                    "0018|0081": "EchoTime", "0018|0082": "InversionTime"}
# A gap between slice positions may differ from the usual one by this fraction, plus the rounding of the stored
# positions (_rounding_mm), before the series is refused.
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
    (r"hit end of header, but no \"data file\" given",
     "the file ends with its header: it holds no voxels (an NRRD header without its data); copy it again from its "
     "source"),
    (r"couldn't open .* \(data file \d+ of \d+\)",
     "its header (a detached .nhdr) names a data file that cannot be opened; keep the .nhdr in the same folder as "
     "its data file, under the name its 'data file:' line gives"),
]
# An unreadable file that no ITK reader recognises: not an image at all, whatever its extension says.
_NO_READER = (r"Unable to determine ImageIO reader", "its content is in no image format SimpleITK knows, whatever "
              "its extension says; give a NIfTI, NRRD or MHA file, or the folder of a DICOM series")


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


@contextlib.contextmanager
def itk_warnings_off() -> Iterator[None]:
    """ITK's WARNING lines (an empty folder's "No Series were found") kept off the user's terminal while a DICOM
    folder is searched and its headers read; the checks here say in words what is wrong. The global setting is
    restored after: Slicer's process shares it."""
    before = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(before)


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
    if image is None and re.search(_NO_READER[0], text):
        raise CDMSegmentError(f"cannot read {where}: {_NO_READER[1]}")
    if image is None:
        raise CDMSegmentError(f"cannot read {where}: not an image SimpleITK can read ({_itk_reason(text)})")
    return image


def read_volume(path, series: Sequence[str] = ()) -> Volume:
    """Read anything SimpleITK reads: a file (NIfTI, NRRD, MHA, ...) or a DICOM series folder.

    series: SeriesInstanceUIDs, one of which chooses the series in a folder holding several.
    Raises CDMSegmentError with one sentence for a missing, truncated, ambiguous or ill-defined input.
    """
    path = Path(path)
    try:
        found = path.exists()
    except OSError as e:  # a name too long for the file system, a loop of links: Path.exists raises
        raise CDMSegmentError(f"cannot use {path}: {e.strerror}; check the path") from None
    if not found:
        raise CDMSegmentError(f"input not found: {path}")
    if not os.access(path, os.R_OK | (os.X_OK if path.is_dir() else 0)):
        raise CDMSegmentError(f"cannot read {path}: permission denied; ask for read access, or copy it somewhere "
                              "you can read it")
    if path.is_dir():
        volume = _read_dicom_folder(path, series)
    else:
        _check_complete(path)
        image = _execute(lambda: sitk.ReadImage(str(path)), str(path))
        _check_kind(image, path)
        if image.GetDimension() == 4 and image.GetSize()[3] == 1:
            image = image[:, :, :, 0]
        try:
            volume = Volume.from_sitk(image)
        except CDMSegmentError as e:
            raise CDMSegmentError(f"{path}: {e}") from None
    check_voxel_type(volume.array, str(path))
    check_geometry(volume, str(path))
    return volume


def _check_kind(image: sitk.Image, path: Path) -> None:
    """A file that reads as an image but is not one to segment: a segmentation, or one slice of a DICOM series."""
    if image.HasMetaDataKey("Segmentation_MasterRepresentation") or image.HasMetaDataKey("Segment0_ID"):
        raise CDMSegmentError(f"cannot use {path}: it is a segmentation (a Slicer .seg.nrrd), not an image; give the "
                              "image it was made on")
    if image.HasMetaDataKey("0020|000e") and image.GetSize()[2:3] in ((), (1,)):  # 2D, or 3D of one slice
        raise CDMSegmentError(f"cannot use {path}: it is a single DICOM slice (one file of a series); give the "
                              f"folder holding the whole series ({path.parent})")


def _check_complete(path: Path) -> None:
    """A gzip file must decompress to its end with a matching CRC; a NIfTI (one file, or a .hdr/.img pair given by
    either name) must hold all the voxels its header declares (SimpleITK fills the missing ones with zeros without
    a word) and, when they are floating point, only finite ones (SimpleITK's NIfTI reader turns NaN and
    infinities into 0, so they are looked for in the stored bytes, on the same pass)."""
    truncated = f"cannot use {path}: the file is truncated or damaged (it holds less data than its header says); " \
                "copy it again from its source"
    try:
        header, voxels = _nifti_pair(path) or (path, path)
        with _opener(header)(header, "rb") as f:
            layout = _nifti_layout(f.read(540))
        if layout is not None and layout.paired != (header != voxels):
            layout, voxels = None, path  # not what its name says: let ITK judge it
        opener = _opener(voxels)
        scan = layout if layout is not None and layout.dtype is not None else None
        if opener is gzip.open or scan:  # only a gzip stream must be read through, and float voxels looked at
            size, non_finite = _read_through(voxels, opener, scan)
        else:
            size, non_finite = voxels.stat().st_size, 0
    except (EOFError, OSError, zlib.error):  # gzip.BadGzipFile is an OSError
        raise CDMSegmentError(truncated) from None
    if layout is not None and size < layout.end:
        raise CDMSegmentError(truncated)
    if non_finite:
        count = (layout.end - layout.offset) // layout.dtype.itemsize
        share = "all" if non_finite == count else f"{non_finite}"
        raise CDMSegmentError(f"cannot use {path}: {share} of its {count} voxels are NaN or infinite (not numbers; "
                              "the NIfTI reader would silently read them as 0); fix them or set them to 0 first")


def _opener(path: Path) -> Callable:
    """gzip.open for a gzip file (by its first bytes, not its name), else open."""
    with open(path, "rb") as f:
        return gzip.open if f.read(2) == b"\x1f\x8b" else open


def _nifti_pair(path: Path) -> Optional[Tuple[Path, Path]]:
    """(header, voxel file) of a NIfTI pair named by either file, when both are there; else None."""
    name = path.name.lower()
    for header, voxels in ((".hdr", ".img"), (".hdr.gz", ".img.gz")):
        for given, other in ((header, voxels), (voxels, header)):
            if name.endswith(given):
                sibling = path.with_name(path.name[:-len(given)] + other)
                pair = (path, sibling) if given == header else (sibling, path)
                return pair if sibling.exists() else None
    return None


class _Layout(NamedTuple):
    offset: int  # where the voxels start (vox_offset) in the voxel file
    end: int  # bytes the voxel file needs: (header, extensions and) voxels
    dtype: Optional[np.dtype]  # the stored floating-point type, None for integers and others
    paired: bool  # the voxels are in a separate .img file


# NIfTI datatype codes of the real floating-point types (nifti1.h: DT_FLOAT32, DT_FLOAT64)
_NIFTI_FLOATS = {16: np.dtype("<f4"), 64: np.dtype("<f8")}


def _nifti_layout(header: bytes) -> Optional[_Layout]:
    """Where a little-endian NIfTI-1 or NIfTI-2 keeps its voxels, or None if not one."""
    for fmt, size_at, dim_at, type_at, offset_at, magic_at, single, paired in (
            ("<i", 0, (40, "<8h"), 70, (108, "<f"), 344, b"n+1\0", b"ni1\0"),
            ("<i", 0, (16, "<8q"), 12, (168, "<q"), 4, b"n+2\0", b"ni2\0")):
        if len(header) < 348 or header[magic_at:magic_at + 4] not in (single, paired):
            continue
        dims = struct.unpack_from(dim_at[1], header, dim_at[0])
        datatype, bitpix = struct.unpack_from("<hh", header, type_at)
        vox_offset = int(struct.unpack_from(offset_at[1], header, offset_at[0])[0])
        if not 1 <= dims[0] <= 7 or struct.unpack_from(fmt, header, size_at)[0] not in (348, 540):
            return None  # big-endian or odd: let ITK judge it
        end = vox_offset + int(np.prod([max(d, 1) for d in dims[1:dims[0] + 1]])) * bitpix // 8
        return _Layout(vox_offset, end, _NIFTI_FLOATS.get(datatype), header[magic_at:magic_at + 4] == paired)
    return None


def _read_through(path: Path, opener, layout: Optional[_Layout]) -> Tuple[int, int]:
    """(bytes the (decompressed) file holds, stored voxels that are NaN or infinite), read in blocks; the voxels
    are looked at only when ``layout`` is given."""
    size, non_finite, pending = 0, 0, b""
    with opener(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            if layout is not None:
                pending += block[max(layout.offset - size, 0):max(layout.end - size, 0)]
                whole = len(pending) - len(pending) % layout.dtype.itemsize
                non_finite += int(np.count_nonzero(~np.isfinite(np.frombuffer(pending[:whole], layout.dtype))))
                pending = pending[whole:]
            size += len(block)
    return size, non_finite


def _header(file_name: str) -> sitk.ImageFileReader:
    reader = sitk.ImageFileReader()
    reader.SetFileName(file_name)
    reader.ReadImageInformation()
    return reader


def _tag(reader: sitk.ImageFileReader, key: str) -> str:
    return reader.GetMetaData(key).strip() if reader.HasMetaDataKey(key) else ""


def _read_dicom_folder(folder: Path, series: Sequence[str]) -> Volume:
    """The one series of the folder, or the one ``series`` names; slices evenly spaced and of one orientation."""
    with itk_warnings_off():
        names, where = _series_files(folder, series)
        headers = [_header(n) for n in names]
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


def _series_files(folder: Path, series: Sequence[str]) -> Tuple[List[str], str]:
    """(the files of the folder's one series, or of the one ``series`` names; its name for messages)."""
    ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not ids:
        below = [str(sub) for sub in sorted(folder.iterdir())[:100]
                 if sub.is_dir() and sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(sub))]
        where = f"; the series are one folder down: give one of {', '.join(below[:5])}" if below else \
            "; give a file or a DICOM series folder"
        raise CDMSegmentError(f"no DICOM series in folder {folder}{where}")
    chosen = [uid for uid in ids if uid in series] if len(ids) > 1 else list(ids)
    if len(chosen) != 1:
        listed = "; ".join(f"{uid} '{_tag(_header(names[0]), '0008|103e')}' ({len(names)} slices)"
                           for uid, names in ((u, sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), u))
                                              for u in ids))
        raise CDMSegmentError(f"folder {folder} holds {len(ids)} DICOM series: {listed}; choose one with --series UID")
    return list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), chosen[0])), \
        f"DICOM series {chosen[0]} in {folder}"


def _check_slice_positions(headers: Sequence[sitk.ImageFileReader], where: str) -> None:
    """Slices share one orientation and lie at evenly spaced positions along its normal (ITK would put them on
    a uniform grid anyway, misplacing every slice after a gap)."""
    orientations = {_tag(h, "0020|0037") for h in headers}
    if len(orientations) > 1:
        raise CDMSegmentError(f"cannot use {where}: its slices have {len(orientations)} different orientations "
                              "(a localizer or a mixed export); export the axial series alone")
    if len(headers) < 3 or not all(_tag(h, "0020|0032") for h in headers) or not orientations.pop():
        return
    try:
        cosines = np.array([float(c) for c in _tag(headers[0], "0020|0037").split("\\")])
        texts = [_tag(h, "0020|0032").split("\\") for h in headers]
        stored = np.array([[float(c) for c in t] for t in texts])
        printed = np.array([[10.0 ** min(int(Decimal(c.strip()).as_tuple().exponent), 0) for c in t]
                            for t in texts]).max(axis=0)
        normal = np.cross(cosines[:3], cosines[3:6])
        if stored.shape[1] != 3 or not np.isfinite(stored).all():
            raise ValueError
    except (ValueError, TypeError, InvalidOperation):
        raise CDMSegmentError(f"cannot use {where}: its slice positions or orientation (ImagePositionPatient, "
                              "ImageOrientationPatient) are not numbers; export the series again") from None
    order = np.argsort(stored @ normal)
    positions = stored[order] @ normal
    gaps = np.diff(positions)
    usual = float(np.median(gaps))
    rounding = np.abs(normal) @ _rounding_mm(printed, np.diff(stored[order], axis=0), usual)
    # a gap is two rounded positions apart, and so is the usual gap it is compared with
    bad = np.flatnonzero(np.abs(gaps - usual) > SLICE_GAP_TOLERANCE * abs(usual) + 4 * rounding + 1e-3)
    if (np.abs(gaps) < 1e-3).any():
        raise CDMSegmentError(f"cannot use {where}: several slices share one position (two acquisitions or echoes "
                              "in one series); export the one you want alone")
    if bad.size:
        pairs = ", ".join(f"{positions[i]:.2f} -> {positions[i + 1]:.2f} mm" for i in bad[:3])
        more = f" and {bad.size - 3} more" if bad.size > 3 else ""
        raise CDMSegmentError(f"cannot use {where}: its slices are not evenly spaced (usually {abs(usual):.2f} mm "
                              f"apart, but {pairs}{more}): a slice is missing or the series mixes acquisitions; "
                              "export the complete series again")


def _rounding_mm(printed: np.ndarray, steps_mm: np.ndarray, usual_mm: float) -> np.ndarray:
    """Per LPS coordinate, how far a stored slice position may lie from the slice's true one: half the step of
    its printed digits (a DICOM DS decimal string) plus half the coarser step some scanners round positions to
    before printing them (GE: 0.1 mm, printed as -78.3063), recognised when every step between slices is a
    multiple of it up to the printed digits. Both steps are taken at most a tenth of the slice gap, so a missing
    slice (a gap of twice the usual) always stands out.

    printed: (3,) the coarsest printed step of each coordinate; steps_mm: (N - 1, 3) differences in slice order."""
    coarsest = 10.0 ** math.floor(math.log10(abs(usual_mm) / 10)) if abs(usual_mm) > 1e-3 else 0.0
    printed = np.minimum(printed, coarsest)  # a writer may drop trailing zeros: "-80" where it means -80.0000
    stepped = printed.copy()
    for c in range(3):
        step = coarsest
        while step > printed[c]:
            if np.all(np.abs(steps_mm[:, c] - step * np.round(steps_mm[:, c] / step)) <= printed[c] * 1.001):
                stepped[c] = step
                break
            step /= 10
    return (printed + stepped) / 2

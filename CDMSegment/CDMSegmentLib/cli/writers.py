"""Writing results next to the input: a float heatmap volume and a Slicer segmentation file.

Files are written under a temporary name unique to the run and given their name only when all are
complete, so an error or an interruption never leaves a half-written output behind, and a file that
appeared meanwhile is never replaced.
"""

import contextlib
import errno
import hashlib
import os
import re
import secrets
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from ..core.errors import CDMSegmentError
from ..core.files import new_file_mode
from ..core.image import Volume
from ..core.terminology import segment_style


def file_stem(path) -> str:
    """case_0.nii.gz -> case_0; a DICOM folder -> its name, also when given as '.', '..' or 'folder/'
    (named after the folder they resolve to, never '.' or '..', which would make hidden outputs)."""
    name = Path(os.path.abspath(path)).name  # lexical: a symbolic link keeps the name the user gave it
    for ext in (".seg.nrrd", ".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm", ".gz"):
        if name.lower().endswith(ext):
            name = name[: -len(ext)]
            break
    return name or "image"  # '/' or a file named only '.nii.gz'


def _identity(path) -> Optional[Tuple[int, int]]:
    """(device, inode) of the file ``path`` names (through links), or None when there is none."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def input_files(inputs: Sequence) -> Dict[Tuple[int, int], Path]:
    """Every file the inputs consist of, by identity: an image file itself, a DICOM folder's files."""
    files = {}
    for given in inputs:
        path = Path(given)
        for f in (sorted(c for c in path.iterdir() if c.is_file()) if os.path.isdir(path) else [path]):
            identity = _identity(f)
            if identity is not None:
                files.setdefault(identity, f)
    return files


def check_not_inputs(outputs: Sequence[Path], inputs: Sequence) -> None:
    """No output may be written over an input, whatever --overwrite says: an output naming the same file as an
    input (the same path spelled otherwise, a hard or symbolic link to it) is refused with one line."""
    files = input_files(inputs)
    for out in outputs:
        found = files.get(_identity(out))
        if found is not None:
            raise CDMSegmentError(f"the output {out} is the input {found}: writing it would destroy the input, so "
                                  "it is never replaced (not even with --overwrite); choose another output")


def check_not_existing(outputs: Sequence[Path], overwrite: bool, what: str = "output folder") -> None:
    """Without --overwrite, outputs that already exist are refused with one line naming every one of them and
    saying to choose another ``what`` (an output folder, or the output file itself)."""
    existing = [str(p) for p in outputs if Path(p).exists()]
    if existing and not overwrite:
        names = existing[0] if len(existing) == 1 else ", ".join(existing[:-1]) + " and " + existing[-1]
        raise CDMSegmentError(f"{names} already exist{'s' if len(existing) == 1 else ''}; choose another {what} "
                              "or pass --overwrite")


def check_model_output(path: Path, overwrite: bool) -> None:
    """The model file a command writes (export, set-defaults, ensemble), before any work: not a folder, and an
    existing file only with --overwrite (a model file replaced silently may be the only copy of a trained network)."""
    from ..core.modelfile import check_not_folder  # here: modelfile imports torch, which writers itself does not need

    check_not_folder(path)
    check_not_existing([path], overwrite, what="output file")


# The arguments through which a command names what it writes (-o, a positional OUTDIR, train's run folder).
OUTPUT_ARGUMENTS = ("output", "run_dir")


def check_command_outputs(args) -> None:
    """Any command, before it runs: what it writes (``OUTPUT_ARGUMENTS``) is none of the existing files its
    other arguments name (set-defaults MODEL -o MODEL, calibrate MODEL DATA -o DATA)."""
    given = []
    for key, value in vars(args).items():
        if key in OUTPUT_ARGUMENTS:
            continue
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(item, (str, Path)) and str(item) and os.path.exists(item):
                given.append(item)
    outputs = [Path(getattr(args, k)) for k in OUTPUT_ARGUMENTS if getattr(args, k, None) is not None]
    check_not_inputs(outputs, given)
    for out in outputs:
        check_output_location(out)


def check_output_location(out: Path) -> None:
    """Before any work: the folder that will hold ``out`` exists or can be made, and can be written to, so that a
    long run does not end on a path it could never have written."""
    existing = _existing_ancestor(out.parent)
    if not existing.is_dir():
        raise CDMSegmentError(f"cannot write {out}: {existing} is a file, not a folder; choose another output path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise CDMSegmentError(f"cannot write {out}: {existing} is not writable; choose a folder you can write to")


def write_text_outputs(texts: Dict[Path, str]) -> None:
    """Each text to its path, all or nothing (atomic_outputs: missing folders made, a same-named file replaced,
    nothing half-written left on an error)."""
    paths = list(texts)
    with atomic_outputs(paths, overwrite=True) as tmps:
        for tmp, path in zip(tmps, paths):
            tmp.write_text(texts[path])


def _existing_ancestor(folder) -> Path:
    """``folder`` or the nearest of its parents that exists (os.path.exists: a name too long is not there, where
    Path.exists would raise)."""
    existing = Path(folder).absolute()
    while not os.path.exists(existing):
        existing = existing.parent
    return existing


def _limits(folder: Path) -> Tuple[int, int]:
    """(longest file name, longest path) in bytes that the file system holding ``folder`` takes."""
    existing = _existing_ancestor(folder)
    try:
        return os.pathconf(existing, "PC_NAME_MAX"), os.pathconf(existing, "PC_PATH_MAX")
    except (OSError, ValueError):  # no pathconf (Windows): the common limits
        return 255, 4096


def check_output_names(outputs: Sequence[Path]) -> None:
    """Before any work: each output's name, the names of the folders to make for it, and its path fit the file
    system (the names come from the input's, so a long input name can make an output name too long)."""
    for out in outputs:
        name_max, path_max = _limits(out.parent)
        name_bytes, path_bytes = len(os.fsencode(out.name)), len(os.fsencode(str(Path(out).absolute())))
        if name_bytes > name_max:
            raise CDMSegmentError(f"cannot write the output {out.name[:40]}...{out.name[-20:]}: its name is "
                                  f"{name_bytes} bytes long, and the file system of {out.parent} takes at most "
                                  f"{name_max}; give the input a shorter name (the outputs are named after it)")
        folder = next((part for part in Path(out.parent).absolute().parts if len(os.fsencode(part)) > name_max), None)
        if folder is not None:
            raise CDMSegmentError(f"cannot make the output folder {folder[:40]}...{folder[-20:]}: its name is "
                                  f"{len(os.fsencode(folder))} bytes long, and the file system takes at most "
                                  f"{name_max}; choose an output folder with a shorter name")
        if path_bytes > path_max:
            raise CDMSegmentError(f"cannot write the output {out.name}: its path is {path_bytes} bytes long, and "
                                  f"the file system takes at most {path_max}; choose a shorter output folder")


def _partial_suffix(final: Path, prefix: str) -> str:
    """'-' + the end of the final name that fits beside ``prefix`` and 8 random characters, so the
    temporary name is never longer than the file system takes, and keeps the extension its writer needs."""
    budget = _limits(final.parent)[0] - len(prefix) - 8 - 1
    tail = final.name
    while len(os.fsencode(tail)) > budget:
        tail = tail[1:]
    return "-" + tail


# A run's temporary outputs: .partial-<pid>-<host>-<random>-<final name>. The process id and a tag of the machine
# tell a later run whether the run that wrote them is gone (SIGKILL, a power cut), so that it can remove them.
PARTIAL_PREFIX = ".partial-"
HOST_TAG = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]
PARTIAL_NAME = re.compile(r"\.partial-(\d+)-([0-9a-f]{8})-")


def _process_gone(pid: int) -> bool:
    """Whether no process ``pid`` runs on this machine (False when it cannot be told: Windows)."""
    if os.name != "posix":
        return False
    try:
        os.kill(pid, 0)  # signal 0: nothing is sent, only whether the process exists
    except ProcessLookupError:
        return True
    except OSError:  # another user's process
        return False
    return False


def clean_stale_partials(folder: Path, log: Callable[[str], None]) -> None:
    """Remove the temporary outputs that runs killed before their clean-up (SIGKILL) left in ``folder``, when their
    process is gone; say where the ones that cannot be judged are (another machine's, or an older version's)."""
    removed, unknown = [], []
    for path in sorted(Path(folder).glob(PARTIAL_PREFIX + "*")):
        match = PARTIAL_NAME.match(path.name)
        if match and match[2] == HOST_TAG and _process_gone(int(match[1])):
            with contextlib.suppress(OSError):
                path.unlink()
                removed.append(path)
        elif not match or match[2] != HOST_TAG:
            unknown.append(path)
    if removed:
        log(f"removed {len(removed)} partial output file(s) that a run killed before its clean-up left in {folder}")
    if unknown:
        log(f"{len(unknown)} partial output file(s) of another run are in {folder} (first: {unknown[0].name}); "
            "delete them if no run is writing there")


def check_output_folder(folder: Path, needed_bytes: int = 0, log: Callable[[str], None] = lambda m: None) -> None:
    """Before any work: ``folder`` is a folder (or can be made in one) where a file can be created, with
    ``needed_bytes`` free, once the partial files of killed runs are removed from it. Nothing is left behind
    by the check."""
    existing = _existing_ancestor(folder)
    if existing == Path(folder).absolute() and existing.is_dir():
        clean_stale_partials(existing, log)
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
def atomic_outputs(paths: List[Path], overwrite: bool = False, inputs: Sequence = ()) -> Iterator[List[Path]]:
    """Yield temporary paths, unique to this run, beside the targets; on success move each onto its target,
    on any failure or interruption delete them all. Every OSError becomes one CDMSegmentError line. A target
    that is one of ``inputs`` (files or DICOM folders) is refused, checked again just before publishing.

    Without ``overwrite`` a target that appeared during the run is never replaced: the file is hard-linked to
    its name (which fails when the name exists) and the temporary name removed; all-or-nothing."""
    tmps: List[Path] = []
    try:
        for p in paths:
            p.parent.mkdir(parents=True, exist_ok=True)
            _create_partial(p, tmps)
        yield tmps
        check_not_inputs(paths, inputs)
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


def _create_partial(final: Path, tmps: List[Path]) -> None:
    """Create a new empty temporary file beside ``final`` (.partial-<pid>-<host>-<random>-<final name>, the mode
    of any new file) and append its name to ``tmps``. The name is appended before the file is created: a signal
    that stops the run in between, even inside the creation, cannot leave a file that the clean-up does not know
    (tempfile.mkstemp returns the name only after the file exists)."""
    prefix = f"{PARTIAL_PREFIX}{os.getpid()}-{HOST_TAG}-"
    suffix = _partial_suffix(final, prefix)
    while True:
        tmps.append(final.parent / f"{prefix}{secrets.token_hex(4)}{suffix}")
        try:
            os.close(os.open(tmps[-1], os.O_WRONLY | os.O_CREAT | os.O_EXCL, new_file_mode()))
            return
        except FileExistsError:  # another file has that name: not ours to delete
            tmps.pop()


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


def _write_image(image: sitk.Image, path: Path, size_bytes: int) -> None:
    """Compressed; ITK's failure (said only in words) becomes the OSError atomic_outputs turns into one line."""
    try:
        sitk.WriteImage(image, str(path), True)
    except RuntimeError:  # a full disk is the usual cause
        full = shutil.disk_usage(path.parent).free < size_bytes
        raise OSError(errno.ENOSPC if full else errno.EIO, "the disk is full" if full else
                      "the image writer failed (a full disk or a file size limit?)", str(path)) from None


# The prefix of the header fields that say how a result was made (segment_files.provenance).
PROVENANCE_PREFIX = "CDMSegment_"


def write_heatmap(path: Path, heatmap: np.ndarray, reference: Volume,
                  provenance: Optional[Dict[str, str]] = None) -> None:
    """float32 heatmap on the reference grid, compressed NRRD (or any format SimpleITK writes); ``provenance``
    goes into the header as ``CDMSegment_<key>:=<value>`` fields."""
    image = reference.with_array(heatmap.astype(np.float32)).to_sitk()
    _set_provenance(image, provenance)
    _write_image(image, path, heatmap.size * 4)


def _set_provenance(image, provenance: Optional[Dict[str, str]]) -> None:
    for key, value in (provenance or {}).items():
        image.SetMetaData(PROVENANCE_PREFIX + key, str(value))


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


def write_segmentation(path: Path, masks: Dict[str, np.ndarray], reference: Volume,
                       provenance: Optional[Dict[str, str]] = None) -> None:
    """A .seg.nrrd that Slicer loads as a segmentation node, one named, coloured segment per class
    (written with SimpleITK, which Slicer's Python has, so the child process writes it inside Slicer too);
    ``provenance`` as in ``write_heatmap`` (Slicer's reader leaves other fields alone)."""
    labels = np.zeros(reference.array.shape, dtype=np.uint8)
    for value, mask in enumerate(masks.values(), start=1):
        labels[mask.astype(bool)] = value
    image = reference.with_array(labels).to_sitk()
    for key, value in segmentation_fields(list(masks), reference).items():
        image.SetMetaData(key, value)
    _set_provenance(image, provenance)
    _write_image(image, path, labels.size)

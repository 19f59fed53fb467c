"""Training and evaluation data: cases on disk, image-level slice labels, patient-level splits, compact slice sets.

Two layouts are read. BraTS 2020/2021 (and the phantoms, which copy it): one folder per
case holding ``<case>_flair.nii.gz``, ``_t1``, ``_t1ce``, ``_t2`` and ``_seg``; a slice's
label is 1 when its mask has any whole-tumour voxel (label > 0), unless a
``slice_labels.csv`` beside the cases gives the labels. Generic: a folder of volumes
plus a CSV of labels per slice (``case`` or ``file``, ``slice``, ``label``) or per
volume (``case`` or ``file``, ``label``; only 0, "all slices normal", since a positive
volume does not say which slices hold the lesion).

Slice indices in label tables count along the volume's axial array axis, in array
order. Slices for training come from ``slicing.extract_slices``, exactly as at inference.
"""

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import SimpleITK as sitk
import torch

from ..core.errors import CDMSegmentError
from ..core.image import check_same_grid
from ..core.reading import read_volume
from ..core.intensity import normalise_volume
from ..core.slicing import Orientation, extract_slices, pixel_size_mm
from .slicesets import SliceDataset

BRATS_KINDS = ("flair", "t1", "t1ce", "t2", "seg")
BRATS_FILE = re.compile(r"^(?P<case>.+)_(?P<kind>flair|t1|t1ce|t2|seg)\.nii(\.gz)?$")
VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")
SLICE_LABELS_FILE = "slice_labels.csv"
SPLIT_NAMES = ("train", "val", "test")


@dataclass
class Case:
    """One patient: an image per modality, optionally a segmentation and per-slice labels.

    slice_labels maps an axial array index to its image-level label (0 normal, k >= 1 class k).
    """

    case_id: str
    images: Dict[str, Path]
    seg: Optional[Path] = None
    slice_labels: Optional[Dict[int, int]] = None


def _int(value: str, what: str, where: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise CDMSegmentError(f"{where}: {what} must be a whole number, got {value!r}")


def read_label_table(path) -> Tuple[Dict[str, Dict[int, int]], List[str]]:
    """CSV of labels -> (per-slice labels by case, cases labelled normal as a whole).

    Columns: ``case`` or ``file``, ``label``, and ``slice`` for per-slice rows (a row with an
    empty slice is per volume). An ``axis`` column, if present, must say axial.
    """
    path = Path(path)
    if not path.is_file():
        raise CDMSegmentError(f"label table not found: {path}")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        columns = set(reader.fieldnames or ())
        key = "case" if "case" in columns else "file" if "file" in columns else None
        if key is None or "label" not in columns:
            raise CDMSegmentError(f"{path}: needs columns case (or file) and label, plus slice for per-slice labels; "
                                  f"found {sorted(columns)}")
        per_slice: Dict[str, Dict[int, int]] = {}
        normal: List[str] = []
        for line, row in enumerate(reader, start=2):
            where = f"{path.name} line {line}"
            label = _int(row["label"], "label", where)
            if label < 0:
                raise CDMSegmentError(f"{where}: label must be 0 (normal) or a class number >= 1, got {label}")
            if row.get("axis") not in (None, "", "axial"):
                raise CDMSegmentError(f"{where}: only axial slice labels are supported, got axis {row['axis']!r}")
            if (row.get("slice") or "").strip() == "":
                if label != 0:
                    raise CDMSegmentError(
                        f"{where}: a per-volume label {label} for {row[key]} does not say which slices hold the "
                        "lesion; give per-slice labels (columns case, slice, label) for positive volumes")
                normal.append(row[key])
            else:
                per_slice.setdefault(row[key], {})[_int(row["slice"], "slice", where)] = label
    return per_slice, normal


def _header(path: Path) -> Tuple[Orientation, Tuple[int, int, int]]:
    """(orientation, canonical (S, P, L) shape) from the image header alone."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        raise CDMSegmentError(f"cannot read {path}: not an image SimpleITK can read")
    orientation = Orientation.from_direction(np.array(reader.GetDirection()).reshape(3, 3), reader.GetSpacing())
    size_kji = tuple(reversed(reader.GetSize()))
    return orientation, tuple(size_kji[p] for p in orientation.perm)


def _axial_slice_count(path: Path) -> int:
    """Number of axial slices, from the header alone."""
    return int(_header(path)[1][0])


def case_pixel_mm(case: Case, modality: str, image_size: int, axis: Union[str, int] = "axial") -> float:
    """Edge of a model pixel in mm for this case's slices (for distances such as HD95 on model slices)."""
    orientation, shape = _header(case.images[modality])
    return pixel_size_mm(shape, orientation.spacing_mm, orientation.canonical_axis(axis), image_size)


def find_brats_cases(root) -> List[Case]:
    """Cases under ``root`` in the BraTS layout (searched recursively), sorted by case id.

    Per-slice labels from ``root/slice_labels.csv`` are attached when that file exists.
    """
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise CDMSegmentError(f"{root} is a file, not a folder: give the folder that holds the cases (BraTS layout)")
    if not root.is_dir():
        raise CDMSegmentError(f"data folder not found: {root}")
    found: Dict[str, Case] = {}
    for path in sorted(root.rglob("*.nii*")):
        match = BRATS_FILE.match(path.name)
        if not match:
            continue
        case_id, kind = match["case"], match["kind"]
        case = found.setdefault(case_id, Case(case_id, {}))
        previous = case.seg if kind == "seg" else case.images.get(kind)
        if previous is not None and previous.parent != path.parent:
            raise CDMSegmentError(f"case {case_id} appears in two folders ({previous.parent} and {path.parent}); "
                                  "keep one copy")
        if kind == "seg":
            case.seg = path
        else:
            case.images[kind] = path
    if not found:
        raise CDMSegmentError(f"no BraTS cases under {root}: expected folders with <case>_flair.nii.gz "
                              "(optionally also _t1, _t1ce, _t2 and the mask _seg)")
    table = root / SLICE_LABELS_FILE
    if table.is_file():
        per_slice, normal = read_label_table(table)
        for case_id, labels in per_slice.items():
            if case_id in found:
                found[case_id].slice_labels = labels
        for case_id in normal:
            if case_id in found:
                case = found[case_id]
                case.slice_labels = dict.fromkeys(range(_axial_slice_count(next(iter(case.images.values())))), 0)
    return [found[k] for k in sorted(found)]


def find_brats_cases_in(roots: Sequence) -> List[Case]:
    """The cases of ``find_brats_cases`` for each folder in ``roots``, pooled and sorted by case id.

    Raises CDMSegmentError when two folders hold the same case id (one patient twice would sit on both
    sides of a split, and a slice set's case ids would no longer name one patient).
    """
    resolved = [Path(root).resolve() for root in roots]
    repeated = next((k for k, root in enumerate(roots) if resolved[k] in resolved[:k]), None)
    if repeated is not None:
        first = roots[resolved.index(resolved[repeated])]
        same = "" if str(first) == str(roots[repeated]) else f" (it is {first}, under another name)"
        raise CDMSegmentError(f"folder {roots[repeated]} is given twice{same}; give each folder once")
    pooled: Dict[str, Case] = {}
    where: Dict[str, Path] = {}
    for root in roots:
        for case in find_brats_cases(root):
            if case.case_id in pooled:
                raise CDMSegmentError(f"case {case.case_id} is in both {where[case.case_id]} and {root}: "
                                      "a case may be given once; remove one copy or leave one folder out")
            pooled[case.case_id], where[case.case_id] = case, Path(root)
    return [pooled[k] for k in sorted(pooled)]


def find_labelled_volumes(folder, labels_csv, modality: str = "image") -> List[Case]:
    """Cases for a folder of single-modality volumes and a label table (see ``read_label_table``).

    A ``case`` value names ``<case>.nii.gz`` (or .nii, .nrrd, .mha, .mhd) in ``folder``; a ``file``
    value is a path relative to ``folder``. Volumes labelled normal get label 0 on every slice.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CDMSegmentError(f"image folder not found: {folder}")
    per_slice, normal = read_label_table(labels_csv)
    cases = []
    for name in sorted(set(per_slice) | set(normal)):
        candidates = [folder / name] + [folder / f"{name}{s}" for s in VOLUME_SUFFIXES]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            raise CDMSegmentError(f"{labels_csv} names {name!r} but {folder} has no such volume "
                                  f"(tried {', '.join(p.name for p in candidates)})")
        suffix = next((x for x in VOLUME_SUFFIXES if name.endswith(x)), "")
        case_id = name[: len(name) - len(suffix)]
        labels = dict.fromkeys(range(_axial_slice_count(path)), 0) if name in normal else {}
        labels.update(per_slice.get(name, {}))
        cases.append(Case(case_id, {modality: path}, None, labels))
    return cases


def load_case_slices(case: Case, modalities: Sequence[str], image_size: int, axis: Union[str, int] = "axial", *,
                     with_masks: bool = False, normalisation: Optional[dict] = None) -> tuple:
    """One case as model-sized slices, with their image-level labels.

    Returns (slices float32 (N, C, S, S) in [-1, 1], labels int64 (N,), has_content bool (N,)),
    plus masks bool (N, S, S) (whole tumour, resized like the images) when ``with_masks``.
    N runs along the canonical slice axis, as at inference. Labels come from the case's
    label table when it has one (axial only), else from the mask: 1 when the slice holds
    any voxel with label > 0. A slice has content when any modality is non-zero in it.
    """
    missing = [m for m in modalities if m not in case.images]
    if missing:
        raise CDMSegmentError(f"case {case.case_id} has no {', '.join(missing)} image (looked for "
                              f"{case.case_id}_{missing[0]}.nii.gz); it has {', '.join(sorted(case.images)) or 'none'}")
    volumes = [read_volume(case.images[m]) for m in modalities]
    check_same_grid(volumes, list(modalities))
    orientation = Orientation.from_direction(volumes[0].direction, volumes[0].spacing_mm)
    ax = orientation.canonical_axis(axis)
    arrays = torch.stack([normalise_volume(v.array, normalisation) for v in volumes])
    slices, _ = extract_slices(arrays, orientation, ax, image_size)
    plane = tuple(a for a in range(3) if a != ax)
    present = orientation.to_canonical(np.stack([v.array != 0 for v in volumes]).any(axis=0))
    has_content = torch.from_numpy(np.ascontiguousarray(present.any(axis=plane)))

    mask = None
    if case.seg is not None and (with_masks or case.slice_labels is None or ax != 0):
        seg = read_volume(case.seg)
        check_same_grid([volumes[0], seg], [modalities[0], "seg"])
        mask = seg.array > 0
    if case.slice_labels is not None and ax == 0:
        labels = _table_labels(case, orientation, has_content)
    elif mask is not None:
        labels = torch.from_numpy(orientation.to_canonical(mask).any(axis=plane).astype(np.int64))
    else:
        raise CDMSegmentError(f"case {case.case_id} has no {'segmentation' if case.slice_labels is None else 'axial'} "
                              "labels to take slice labels from; give a _seg file, a label table, or use axial slices")
    if not with_masks:
        return slices, labels, has_content
    if mask is None:
        raise CDMSegmentError(f"case {case.case_id} has no segmentation (_seg file); masks are needed for evaluation")
    masks, _ = extract_slices(mask[None].astype(np.float32), orientation, ax, image_size, background=0.0)
    return slices, labels, has_content, masks[:, 0] >= 0.5


def _table_labels(case: Case, orientation: Orientation, has_content: torch.Tensor) -> torch.Tensor:
    """Labels from the table (axial array order) in canonical slice order; unlisted empty slices are normal."""
    n = len(has_content)
    array_index = [n - 1 - k if orientation.flips[0] else k for k in range(n)]
    labels = [case.slice_labels.get(i) for i in array_index]
    unlabelled = [i for i, label, content in zip(array_index, labels, has_content.tolist()) if label is None and content]
    if unlabelled:
        raise CDMSegmentError(f"case {case.case_id}: {len(unlabelled)} slices with image content have no label "
                              f"(first: slice {unlabelled[0]}); label every non-empty axial slice")
    return torch.tensor([label or 0 for label in labels], dtype=torch.int64)


def build_slice_dataset(cases: Sequence[Case], modalities: Sequence[str], image_size: int,
                        axis: Union[str, int] = "axial", *, drop_empty: bool = True, storage: str = "uint8",
                        normalisation: Optional[dict] = None, with_masks: bool = False,
                        progress: Optional[Callable[[int, int], None]] = None) -> SliceDataset:
    """All slices of ``cases`` (optionally only those with content); each case is compacted as soon as it is read.
    with_masks keeps the ground-truth masks too (for calibration and evaluation, never for training)."""
    parts, labels, case_ids, index, masks = [], [], [], [], []
    for done, case in enumerate(cases, start=1):
        x, y, content, *mask = load_case_slices(case, modalities, image_size, axis, normalisation=normalisation,
                                                with_masks=with_masks)
        keep = content if drop_empty else torch.ones_like(content)
        if with_masks:
            masks.append(mask[0][keep])
        parts.append(SliceDataset._store(x[keep], storage))
        labels.append(y[keep])
        index.append(torch.nonzero(keep)[:, 0])
        case_ids += [case.case_id] * int(keep.sum())
        if progress is not None:
            progress(done, len(cases))
    if not parts:
        raise CDMSegmentError("no cases given; nothing to build a slice set from")
    meta = {"modalities": list(modalities), "image_size": int(image_size), "axis": str(axis),
            "normalisation": normalisation, "drop_empty": drop_empty,
            "pixel_mm": {c.case_id: case_pixel_mm(c, modalities[0], image_size, axis) for c in cases}}
    return SliceDataset(torch.cat(parts), torch.cat(labels), case_ids, torch.cat(index), storage=storage, meta=meta,
                        masks=torch.cat(masks) if with_masks else None)


def split_cases(cases: Sequence[Union[Case, str]], fractions: Sequence[float] = (0.7, 0.15, 0.15),
                seed: int = 0) -> Dict[str, List[str]]:
    """Patient-level split into train/val/test case ids: all slices of a patient stay in one set.

    The same ids, fractions and seed give the same split whatever the order of ``cases``.
    Every set with a non-zero fraction gets at least one case.
    """
    ids = sorted(c.case_id if isinstance(c, Case) else str(c) for c in cases)
    if len(set(ids)) != len(ids):
        raise CDMSegmentError("case ids must be unique to split by patient; two cases share an id")
    fractions = [float(f) for f in fractions]
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1) > 1e-6:
        raise CDMSegmentError(f"split fractions must be three non-negative numbers (train, val, test) summing to 1, "
                              f"got {fractions}")
    wanted = sum(f > 0 for f in fractions)
    if len(ids) < wanted:
        raise CDMSegmentError(f"{len(ids)} cases cannot fill {wanted} sets; give more cases or zero fractions")
    order = [ids[i] for i in np.random.default_rng(seed).permutation(len(ids))]
    counts = [max(int(round(f * len(ids))), 1) if f > 0 else 0 for f in fractions[1:]]
    counts = [len(ids) - sum(counts)] + counts
    while counts[0] < (1 if fractions[0] > 0 else 0):  # rounding up small sets took all of train
        largest = 1 + int(np.argmax(counts[1:]))
        counts[largest] -= 1
        counts[0] += 1
    bounds = np.cumsum([0] + counts)
    return {name: sorted(order[bounds[i]:bounds[i + 1]]) for i, name in enumerate(SPLIT_NAMES)}


def write_split(split: Dict[str, List[str]], path) -> None:
    _check_split(split, str(path))
    Path(path).write_text(json.dumps({k: list(split[k]) for k in SPLIT_NAMES if k in split}, indent=1) + "\n")


def read_split(path) -> Dict[str, List[str]]:
    """A split written by ``write_split``, checked: known set names, no case in two sets."""
    path = Path(path)
    try:
        split = json.loads(path.read_text())
    except FileNotFoundError:
        raise CDMSegmentError(f"split file not found: {path}")
    except json.JSONDecodeError as e:
        raise CDMSegmentError(f"{path} is not valid JSON ({e}); write it with write_split")
    _check_split(split, str(path))
    return split


def _check_split(split, where: str) -> None:
    if not isinstance(split, dict) or not set(split) <= set(SPLIT_NAMES) or \
            not all(isinstance(v, list) and all(isinstance(c, str) for c in v) for v in split.values()):
        raise CDMSegmentError(f"{where}: a split maps train/val/test to lists of case ids")
    seen: Dict[str, str] = {}
    for name, ids in split.items():
        for case_id in ids:
            if case_id in seen:
                raise CDMSegmentError(f"{where}: case {case_id} is in both {seen[case_id]} and {name}; "
                                      "a patient's slices must stay in one set")
            seen[case_id] = name


def select_cases(cases: Sequence[Case], ids: Sequence[str]) -> List[Case]:
    """The cases named in ``ids`` (one set of a split), in that order."""
    by_id = {c.case_id: c for c in cases}
    unknown = [i for i in ids if i not in by_id]
    if unknown:
        raise CDMSegmentError(f"split names {len(unknown)} cases not in the data (first: {unknown[0]}); "
                              "was the split made for another folder?")
    return [by_id[i] for i in ids]

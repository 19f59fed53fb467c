"""Phantom brain-tumour MRI from real anatomy, written in the BraTS layout.

Each case warps the MNI152 2009 template's tissue maps (shipped inside the nilearn
wheel, so no download) with a small random affine and a smooth elastic field, adds
irregular lesions (a core inside oedema, mostly in white matter), synthesises one or
more MR contrasts from the tissue fractions, and applies a multiplicative bias field
and Rician noise. Volumes are resampled to a clinical grid (in-plane 1-2 mm, slices
up to 5 mm, partial volume averaged across each slice) and skull-stripped like BraTS:
exactly 0 outside the brain.

Output: ``OUTDIR/<case>/<case>_<modality>.nii.gz``, ``<case>_seg.nii.gz`` (0 background,
1 core, 2 oedema; whole tumour = label > 0) and ``OUTDIR/slice_labels.csv`` with one
image-level label per axial slice. Case ``n`` depends only on ``(seed, n)``.
"""

import csv
import functools
import importlib.util
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk
from scipy import ndimage as ndi

from ..core.errors import CDMSegmentError
from ..core.image import Volume
from ..core.slicing import Orientation

TEMPLATE_FILES = {name: f"mni_icbm152_{name}_tal_nlin_sym_09a_converted.nii.gz" for name in ("t1", "gm", "wm")}
TEMPLATE_MARGIN_MM = 12  # room around the brain for the affine and elastic warp

# Relative signal of csf, gm, wm, oedema, core per contrast (per-case jitter +-5 %, small enough to keep the order).
# FLAIR suppresses fluid and shows the whole tumour bright; T1 has WM > GM > CSF;
# T2 has fluid brightest; T1ce is T1 with an enhancing (bright) tumour core.
CONTRASTS = {
    "flair": (0.15, 0.55, 0.45, 1.00, 0.85),
    "t1": (0.20, 0.55, 0.80, 0.45, 0.30),
    "t1ce": (0.20, 0.55, 0.80, 0.45, 0.95),
    "t2": (1.00, 0.60, 0.40, 0.90, 0.80),
}
FULL_SCALE = 1000.0  # stored intensities are int16, BraTS-like


@functools.lru_cache(maxsize=1)
def load_template() -> Dict[str, np.ndarray]:
    """The 1 mm MNI152 brain, csf/gm/wm fractions: (S, P, L) float32 arrays in [0, 1], cropped round the brain.

    Read straight from the files inside the nilearn package (without importing nilearn,
    which is slow to import); cached for the process.
    """
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise CDMSegmentError("phantoms are built from the MNI152 template inside nilearn; pip install nilearn")
    folder = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"
    maps = {}
    for name, file in TEMPLATE_FILES.items():
        path = folder / file
        if not path.exists():
            raise CDMSegmentError(f"nilearn has no {file} in {folder}; install nilearn >= 0.10")
        image = sitk.ReadImage(str(path))
        orientation = Orientation.from_direction(np.array(image.GetDirection()).reshape(3, 3), image.GetSpacing())
        a = orientation.to_canonical(sitk.GetArrayFromImage(image)).astype(np.float32)
        maps[name] = a / 255.0
    brain = (maps.pop("t1") > 0.1).astype(np.float32)  # the template is skull-stripped; ventricles are ~0.26
    maps["brain"] = brain
    maps["csf"] = np.clip(brain - maps["gm"] - maps["wm"], 0.0, 1.0)
    lo = [int(np.flatnonzero(brain.any(axis=tuple(b for b in range(3) if b != a)))[0]) for a in range(3)]
    hi = [int(np.flatnonzero(brain.any(axis=tuple(b for b in range(3) if b != a)))[-1]) + 1 for a in range(3)]
    m = TEMPLATE_MARGIN_MM
    crop = tuple(slice(l, h) for l, h in zip(lo, hi))
    return {k: np.pad(v[crop], m) for k, v in maps.items()}


def smooth_random_field(rng: np.random.Generator, axes_mm: Sequence[np.ndarray], spacing_mm: float,
                         std: float) -> np.ndarray:
    """A smooth random field on the grid ``axes_mm`` (three 1D coordinate vectors): Gaussian bumps on a coarse lattice.

    The field is separable in its weights, so it costs three small matrix products
    instead of a 3D filter: sum_abc W0[k,a] W1[j,b] W2[i,c] C[a,b,c], C ~ N(0, 1).
    Scaled to have standard deviation ``std`` over the grid.
    """
    weights = []
    for x in axes_mm:
        centres = np.arange(x.min() - spacing_mm, x.max() + 2 * spacing_mm, spacing_mm)
        weights.append(np.exp(-0.5 * ((x[:, None] - centres[None, :]) / spacing_mm) ** 2).astype(np.float32))
    c = rng.standard_normal([w.shape[1] for w in weights]).astype(np.float32)
    field = np.einsum("ka,abc->kbc", weights[0], c)
    field = np.einsum("jb,kbc->kjc", weights[1], field)
    field = np.einsum("ic,kjc->kji", weights[2], field)
    return field * np.float32(std / max(float(field.std()), 1e-6))


def _rotation(angles_rad: Sequence[float]) -> np.ndarray:
    """3x3 rotation composed of rotations about the three array axes."""
    r = np.eye(3)
    for axis, angle in enumerate(angles_rad):
        a, b = [x for x in range(3) if x != axis]
        m = np.eye(3)
        m[a, a] = m[b, b] = np.cos(angle)
        m[a, b], m[b, a] = -np.sin(angle), np.sin(angle)
        r = r @ m
    return r


def warped_tissue(rng: np.random.Generator, axes_mm: Sequence[np.ndarray]) -> Dict[str, np.ndarray]:
    """Tissue fractions on the output grid: template sampled through a random affine plus elastic warp.

    Output point q (mm, centred) reads the template at centre + M (q - shift) + d(q):
    rotation up to 4 degrees per axis, scale +-8 % per axis, shift up to 5 mm, and an
    elastic displacement d of ~2 mm standard deviation varying over ~30 mm.
    """
    template = load_template()
    centre = (np.array(template["brain"].shape) - 1) / 2.0
    m = _rotation(np.deg2rad(rng.uniform(-4, 4, 3))) @ np.diag(1.0 / rng.uniform(0.92, 1.08, 3))
    shift = rng.uniform(-5, 5, 3)
    grids = np.meshgrid(*[x - s for x, s in zip(axes_mm, shift)], indexing="ij", sparse=True)
    coords = []
    for a in range(3):
        d = smooth_random_field(rng, axes_mm, 30.0, 2.0)
        coords.append(centre[a] + d + sum(np.float32(m[a, b]) * grids[b] for b in range(3)))
    return {k: ndi.map_coordinates(template[k], coords, order=1, mode="constant", cval=0.0, prefilter=False)
            for k in ("brain", "csf", "gm", "wm")}


def lesion_field(rng: np.random.Generator, axes_mm: Sequence[np.ndarray], centre_mm: np.ndarray, radius_mm: float,
                 roughness: float = 0.35, max_lobes: int = 3, reach: float = 2.2) -> Tuple[Tuple[slice, ...], np.ndarray]:
    """An irregular lesion's shape field: (box, level) with ``level`` the box's shape; the lesion is ``level < 1``.

    The shape is a union of 1-``max_lobes`` randomly oriented ellipsoids whose normalised
    distance is perturbed by smooth noise (amplitude ``roughness`` of the radius), so it is
    lobulated, not a sphere. Lower level sets are inner regions (a core); higher ones grow
    the lesion up to ``reach`` radii, the box's half-width.
    """
    box, local = [], []
    for x, c in zip(axes_mm, centre_mm):
        idx = np.flatnonzero(np.abs(x - c) <= reach * radius_mm + 2.0)
        box.append(slice(int(idx[0]), int(idx[-1]) + 1))  # never empty: the centre is a grid point
        local.append((x[box[-1]] - c).astype(np.float32))
    grid = np.meshgrid(*local, indexing="ij", sparse=True)
    distance = np.full([len(x) for x in local], np.inf, dtype=np.float32)
    for lobe in range(rng.integers(1, max_lobes + 1)):
        offset = rng.normal(0, 0.45 * radius_mm, 3) if lobe else np.zeros(3)
        axes = radius_mm * rng.uniform(0.55, 1.0, 3) * (1.0 if lobe == 0 else rng.uniform(0.5, 0.9))
        r = _rotation(rng.uniform(0, np.pi, 3))
        d2 = sum((sum(np.float32(r[b, a]) * (grid[b] - offset[b]) for b in range(3)) / axes[a]) ** 2 for a in range(3))
        distance = np.minimum(distance, np.sqrt(d2))
    noise = smooth_random_field(rng, local, max(radius_mm / 2.5, 1.0), roughness)
    return tuple(box), distance + noise


def _lesion(rng: np.random.Generator, axes_mm: Sequence[np.ndarray], centre_mm: np.ndarray,
            radius_mm: float) -> Tuple[Tuple[slice, ...], np.ndarray, np.ndarray]:
    """One core-in-oedema lesion: (box, whole-tumour mask, core mask); the core is a lower level set, inside."""
    box, level = lesion_field(rng, axes_mm, centre_mm, radius_mm)
    whole = level < 1.0
    core = level < rng.uniform(0.35, 0.7)
    return box, whole, core


def _lesions(rng: np.random.Generator, axes_mm: Sequence[np.ndarray], tissue: Dict[str, np.ndarray],
             count: int) -> Tuple[np.ndarray, np.ndarray]:
    """Whole-tumour and core masks on the output grid for ``count`` lesions centred in brain tissue.

    Centres fall in white matter 80 % of the time, else anywhere in GM or WM. The first
    lesion's radius is log-uniform 8-30 mm (a BraTS-like tumour of 1.5-6 cm), further
    ones 2-12 mm (satellites of a few mm to 2 cm). Lesions stay out of fluid
    (tumour does not fill the ventricles) and out of the brain's outside.
    """
    shape = tissue["brain"].shape
    whole = np.zeros(shape, bool)
    core = np.zeros(shape, bool)
    for n in range(count):
        seat = tissue["wm"] > 0.6 if rng.random() < 0.8 else (tissue["gm"] + tissue["wm"]) > 0.6
        candidates = np.flatnonzero(seat)
        index = np.unravel_index(candidates[rng.integers(candidates.size)], shape)
        centre = np.array([x[i] for x, i in zip(axes_mm, index)])
        box, w, c = _lesion(rng, axes_mm, centre, float(np.exp(rng.uniform(*np.log((8.0, 30.0) if n == 0 else (2.0, 12.0))))))
        whole[box] |= w
        core[box] |= c
    tissue_ok = (tissue["gm"] + tissue["wm"]) > 0.3
    return whole & tissue_ok, core & tissue_ok


def _contrast(rng: np.random.Generator, modality: str, tissue: Dict[str, np.ndarray], whole: np.ndarray,
              core: np.ndarray) -> np.ndarray:
    """Noise-free signal on the fine grid: tissue fractions times their jittered relative intensities."""
    csf, gm, wm, oedema, core_signal = np.array(CONTRASTS[modality]) * rng.uniform(0.95, 1.05, 5)
    normal = tissue["csf"] * csf + tissue["gm"] * gm + tissue["wm"] * wm
    lesion = np.where(core, core_signal, oedema).astype(np.float32)
    return np.where(whole, lesion * tissue["brain"], normal).astype(np.float32)


def output_axes(in_plane_mm: float, slice_mm: float, sub_slices: int,
                thick_axis: int = 0) -> Tuple[List[np.ndarray], Tuple[int, ...]]:
    """Fine sample positions (mm, centred) along canonical (S, P, L) and the output shape.

    Slices of thickness ``slice_mm`` are stacked along canonical ``thick_axis`` (0 axial,
    1 coronal, 2 sagittal acquisition). Each is sampled at ``sub_slices`` evenly spaced
    depths and averaged later, which models the partial volume of a thick slice.
    """
    extent_mm = np.array(load_template()["brain"].shape, dtype=float)
    spacing = [in_plane_mm] * 3
    spacing[thick_axis] = slice_mm
    shape = tuple(max(1, int(round(e / s))) for e, s in zip(extent_mm, spacing))
    axes = [(np.arange(n) - (n - 1) / 2.0) * s for n, s in zip(shape, spacing)]
    offsets = ((np.arange(sub_slices) + 0.5) / sub_slices - 0.5) * slice_mm
    axes[thick_axis] = (axes[thick_axis][:, None] + offsets[None, :]).ravel()
    return [a.astype(np.float32) for a in axes], shape


def slab_mean(a: np.ndarray, sub_slices: int, thick_axis: int = 0) -> np.ndarray:
    """Average the ``sub_slices`` fine samples of each thick slice along ``thick_axis``: (.. S * n ..) -> (.. S ..)."""
    shape = a.shape[:thick_axis] + (-1, sub_slices) + a.shape[thick_axis + 1:]
    return a.reshape(shape).mean(axis=thick_axis + 1, dtype=np.float32)


def rician(rng: np.random.Generator, signal: np.ndarray, sigma: float) -> np.ndarray:
    """Magnitude of a complex signal with Gaussian noise on both channels (MR magnitude images are Rician)."""
    real = signal + rng.normal(0.0, sigma, signal.shape).astype(np.float32)
    imaginary = rng.normal(0.0, sigma, signal.shape).astype(np.float32)
    return np.sqrt(real * real + imaginary * imaginary)


def check_direction(direction) -> np.ndarray:
    d = np.eye(3) if direction is None else np.asarray(direction, dtype=float).reshape(3, 3)
    if not (np.allclose(np.abs(d).sum(axis=0), 1) and np.allclose(np.abs(d).sum(axis=1), 1) and np.isin(d, (-1, 0, 1)).all()):
        raise CDMSegmentError("phantom direction must be axis-aligned (a 3x3 signed permutation matrix, e.g. "
                              "the identity); oblique phantoms are not supported")
    return d


def to_volume(canonical: np.ndarray, spacing_canonical_mm: Sequence[float], direction: np.ndarray) -> Volume:
    """Place a canonical (S, P, L) array on a grid with ``direction``; the anatomy stays where it is in space."""
    orientation = Orientation.from_direction(direction, (1.0, 1.0, 1.0))
    array = np.ascontiguousarray(orientation.from_canonical(canonical))
    spacing_ijk = [0.0, 0.0, 0.0]
    origin_lps = np.zeros(3)
    for c in range(3):
        n, s = canonical.shape[c], spacing_canonical_mm[c]
        spacing_ijk[2 - orientation.perm[c]] = s
        first = n - 1 if orientation.flips[c] else 0  # canonical index of array voxel 0
        origin_lps[2 - c] = (first - (n - 1) / 2.0) * s  # LPS axis 2 - c is canonical axis c; brain centred on 0
    return Volume(array, tuple(spacing_ijk), tuple(origin_lps), direction)


def generate_case(outdir, seed: int, index: int, *, modalities: Sequence[str] = ("flair",),
                  lesion_free_fraction: float = 0.25, in_plane_mm: Optional[float] = None,
                  slice_mm: Optional[float] = None, direction=None) -> dict:
    """Write case ``index`` of the phantom set ``seed``; depends only on (seed, index), not on other cases.

    in_plane_mm / slice_mm: fixed spacing, or None for random 1-2 mm in-plane and
    in-plane..5 mm slices. direction: 3x3 LPS direction of the written arrays (axis-aligned;
    default identity, so array axis 0 is axial). Case ``index`` is lesion-free when
    ``floor((index + 1) f) > floor(index f)``, which gives exactly the fraction f over any
    run of cases without coordinating them. Returns the case record (paths, spacing, lesion
    count and voxels, per-slice rows for slice_labels.csv, seconds).
    """
    start = time.perf_counter()
    direction = check_direction(direction)
    rng = np.random.default_rng([int(seed), int(index)])
    in_plane = float(in_plane_mm) if in_plane_mm is not None else float(rng.uniform(1.0, 2.0))
    thickness = float(slice_mm) if slice_mm is not None else float(rng.uniform(in_plane, 5.0))
    sub_slices = max(1, int(round(thickness / 1.5)))
    axes_mm, shape = output_axes(in_plane, thickness, sub_slices)

    tissue = warped_tissue(rng, axes_mm)
    lesion_free = np.floor((index + 1) * lesion_free_fraction) > np.floor(index * lesion_free_fraction)
    count = 0 if lesion_free else int(rng.choice([1, 2, 3], p=[0.6, 0.25, 0.15]))
    whole, core = _lesions(rng, axes_mm, tissue, count)

    brain = slab_mean(tissue["brain"], sub_slices) >= 0.5
    whole_fraction, core_fraction = slab_mean(whole, sub_slices), slab_mean(core, sub_slices)
    seg = np.where(core_fraction >= 0.5, 1, np.where(whole_fraction >= 0.5, 2, 0)).astype(np.uint8) * brain
    spacing = (thickness, in_plane, in_plane)
    bias_axes = [np.arange(n, dtype=np.float32) * s for n, s in zip(shape, spacing)]

    case_id = f"Phantom_s{seed}_{index:04d}"
    folder = Path(outdir) / case_id
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for modality in modalities:
        signal = slab_mean(_contrast(rng, modality, tissue, whole, core), sub_slices)
        bias = np.exp(smooth_random_field(rng, bias_axes, 80.0, rng.uniform(0.05, 0.15)))
        signal *= bias * np.float32(FULL_SCALE)
        sigma = rng.uniform(0.02, 0.05) * float(signal[brain].mean())
        image = np.where(brain, np.clip(np.rint(rician(rng, signal, sigma)), 1, 32767), 0).astype(np.int16)
        paths[modality] = folder / f"{case_id}_{modality}.nii.gz"
        sitk.WriteImage(to_volume(image, spacing, direction).to_sitk(), str(paths[modality]), True)
    seg_volume = to_volume(seg, spacing, direction)
    seg_path = folder / f"{case_id}_seg.nii.gz"
    sitk.WriteImage(seg_volume.to_sitk(), str(seg_path), True)

    rows = axial_slice_rows(case_id, seg_volume)
    return {"case": case_id, "images": paths, "seg": seg_path, "spacing_mm": seg_volume.spacing_mm,
            "lesions": count, "lesion_voxels": sum(r["lesion_voxels"] for r in rows), "slice_rows": rows,
            "seconds": time.perf_counter() - start}


def axial_slice_rows(case_id: str, seg_volume: Volume) -> List[dict]:
    """slice_labels.csv rows of one case: per axial slice (whatever the array order), label and lesion voxels."""
    axial = Orientation.from_direction(seg_volume.direction, (1.0, 1.0, 1.0)).perm[0]
    per_slice = (seg_volume.array > 0).sum(axis=tuple(a for a in range(3) if a != axial))
    return [{"case": case_id, "axis": "axial", "slice": k, "label": int(v > 0), "lesion_voxels": int(v)}
            for k, v in enumerate(per_slice)]


def write_slice_labels(outdir: Path, records: Sequence[dict]) -> None:
    """OUTDIR/slice_labels.csv from the case records' per-slice rows."""
    with open(Path(outdir) / "slice_labels.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["case", "axis", "slice", "label", "lesion_voxels"])
        writer.writeheader()
        for record in records:
            writer.writerows(record["slice_rows"])


def generate_phantoms(outdir, cases: int, seed: int, *, modalities: Sequence[str] = ("flair",),
                      lesion_free_fraction: float = 0.25, in_plane_mm: Optional[float] = None,
                      slice_mm: Optional[float] = None, direction=None,
                      progress: Optional[Callable[[int, int], None]] = None) -> List[dict]:
    """Write ``cases`` phantom cases and ``OUTDIR/slice_labels.csv``; returns the case records.

    Same seed and arguments -> identical files. progress(done, total) is called after each case.
    See ``generate_case`` for the arguments.
    """
    if int(cases) < 1:
        raise CDMSegmentError(f"number of phantom cases must be at least 1, got {cases}")
    unknown = [m for m in modalities if m not in CONTRASTS]
    if unknown or not modalities:
        raise CDMSegmentError(f"unknown phantom modality {unknown or modalities}; choose from {', '.join(CONTRASTS)}")
    if not 0.0 <= lesion_free_fraction <= 1.0:
        raise CDMSegmentError(f"lesion_free_fraction must be between 0 and 1, got {lesion_free_fraction}")
    for name, value, high in (("in_plane_mm", in_plane_mm, 4.0), ("slice_mm", slice_mm, 10.0)):
        if value is not None and not 0.5 <= value <= high:
            raise CDMSegmentError(f"{name} must be between 0.5 and {high} mm, got {value}")
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    records = []
    for index in range(int(cases)):
        records.append(generate_case(outdir, seed, index, modalities=modalities,
                                     lesion_free_fraction=lesion_free_fraction, in_plane_mm=in_plane_mm,
                                     slice_mm=slice_mm, direction=direction))
        if progress is not None:
            progress(index + 1, int(cases))
    write_slice_labels(outdir, records)
    return records

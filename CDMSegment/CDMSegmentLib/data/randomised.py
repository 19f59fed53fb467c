"""Domain-randomised FLAIR-like phantoms (in the spirit of SynthSeg, Billot et al. 2023) with lesion families.

Each case draws its contrast over the whole FLAIR-like range (grey/white ratio, CSF and
lesion brightness relative to grey matter, lesion heterogeneity, an optional darker
necrotic core), its artefacts (bias field, noise, blur) and its acquisition (slice
thickness 1-6 mm, axial, coronal or sagittal slices), so a network trained on them cannot
lean on any one of these. The anatomy is the warped MNI152 of ``phantom``. Lesions come in
families that can be held out of training whole:

- ``core-oedema``: one lobulated tumour (a core inside oedema), sometimes a satellite;
- ``infiltrative``: one irregular lesion spreading along white matter with a fading edge;
- ``multifocal``: 2-5 separate tumours;
- ``ms``: 3-12 small ovoids, periventricular or in deep white matter;
- ``cortical``: 1-3 lesions seated in grey matter;
- ``metastases``: 1-6 small round lesions centred at the grey-white junction, where blood-borne metastases lodge;
- ``healthy``: no lesion; normal bright structures (a periventricular rim, bright cortex) only.

A case's total lesion volume is drawn log-uniformly in its family's range (or the range
asked) and met exactly on the fine grid by choosing each lesion's level set, so sizes run
from 0.1 ml (one MS ovoid) to over 100 ml. Output as ``phantom``: the BraTS layout,
``slice_labels.csv``, plus ``cases.csv`` with every case's family and drawn parameters.
Case ``n`` depends only on (seed, n) and the arguments.
"""

import csv
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk
from scipy import ndimage as ndi

from ..core.errors import CDMSegmentError
from .phantom import (FULL_SCALE, axial_slice_rows, check_direction, lesion_field, output_axes, rician, slab_mean,
                      smooth_random_field, to_volume, warped_tissue, write_slice_labels)

# family: (lesion count range, total lesion volume range in ml, shape roughness, lobes, core fraction range or None)
FAMILIES = {
    "core-oedema": ((1, 2), (5.0, 150.0), 0.35, 3, (0.35, 0.7)),
    "infiltrative": ((1, 1), (10.0, 120.0), 0.8, 3, (0.2, 0.45)),
    "multifocal": ((2, 5), (2.0, 60.0), 0.35, 3, (0.35, 0.7)),
    "ms": ((3, 12), (0.4, 8.0), 0.1, 1, None),
    "cortical": ((1, 3), (0.3, 15.0), 0.35, 2, None),
    "metastases": ((1, 6), (0.2, 25.0), 0.15, 1, None),
    "healthy": ((0, 0), (0.0, 0.0), 0.0, 0, None),
}
ACQUISITIONS = {"axial": 0, "coronal": 1, "sagittal": 2}  # canonical axis (S, P, L) across which slices are thick
GREY = 0.55  # grey matter's signal; everything else is drawn relative to it


@dataclass(frozen=True)
class ContrastRanges:
    """Ranges the per-case contrast is drawn from, relative to grey matter (FLAIR: fluid dark, lesions bright)."""

    grey_white: Tuple[float, float] = (1.0, 1.4)  # grey / white matter
    csf: Tuple[float, float] = (0.05, 0.35)  # CSF / grey matter
    lesion: Tuple[float, float] = (1.1, 2.5)  # lesion / grey matter

    def __post_init__(self):
        for name, flag, (lo, hi), floor in (("grey/white", "--grey-white", self.grey_white, 0.5),
                                            ("CSF", "--csf", self.csf, 0.0),
                                            ("lesion", "--lesion-contrast", self.lesion, 0.5)):
            if not floor <= lo <= hi <= 5.0:
                raise CDMSegmentError(f"{name} contrast range ({flag}) must be LO,HI with {floor:g} <= LO <= HI <= 5, "
                                      f"got {lo:g},{hi:g}")


def _uniform(rng: np.random.Generator, lo_hi: Sequence[float]) -> float:
    return float(rng.uniform(lo_hi[0], lo_hi[1]))


def _log_uniform(rng: np.random.Generator, lo_hi: Sequence[float]) -> float:
    return float(np.exp(rng.uniform(np.log(lo_hi[0]), np.log(lo_hi[1]))))


def _direction_for(thick_axis: int) -> np.ndarray:
    """LPS direction matrix that stores the thick axis as array axis 0 (K), as a scanner writes its slices."""
    canonical_of_array_axis = [thick_axis] + [c for c in range(3) if c != thick_axis]  # array axes K, J, I
    d = np.zeros((3, 3))
    for a, c in enumerate(canonical_of_array_axis):
        d[2 - c, 2 - a] = 1.0  # canonical axis c is LPS axis 2 - c; array axis a is direction column 2 - a
    return check_direction(d)


def _ventricles(tissue: Dict[str, np.ndarray], fine_mm: Sequence[float]) -> np.ndarray:
    """Distance (mm) on the fine grid to the ventricles: CSF more than 12 mm inside the brain (not the sulci)."""
    depth = ndi.distance_transform_edt(tissue["brain"] > 0.5, sampling=fine_mm)
    ventricles = (tissue["csf"] > 0.5) & (depth > 12.0)
    if not ventricles.any():
        return np.full(depth.shape, np.inf, np.float32)
    return ndi.distance_transform_edt(~ventricles, sampling=fine_mm).astype(np.float32)


def _seat(rng: np.random.Generator, family: str, tissue: Dict[str, np.ndarray],
          to_ventricles: Optional[np.ndarray]) -> Tuple[np.ndarray, np.ndarray]:
    """(where a lesion centre may fall, where its voxels may lie) for one lesion of ``family``."""
    if family == "ms":
        near = to_ventricles < 8.0 if rng.random() < 0.5 else np.ones_like(tissue["wm"], bool)
        return (tissue["wm"] > 0.7) & near, tissue["wm"] > 0.3
    if family == "cortical":
        return tissue["gm"] > 0.6, (tissue["gm"] + tissue["wm"]) > 0.3
    if family == "metastases":
        return (tissue["gm"] > 0.25) & (tissue["wm"] > 0.25), (tissue["gm"] + tissue["wm"]) > 0.3
    centre = tissue["wm"] > 0.6 if rng.random() < 0.8 else (tissue["gm"] + tissue["wm"]) > 0.6
    return centre, tissue["wm"] > 0.3 if family == "infiltrative" else (tissue["gm"] + tissue["wm"]) > 0.3


def _place_lesions(rng: np.random.Generator, family: str, axes_mm: Sequence[np.ndarray],
                   tissue: Dict[str, np.ndarray], total_ml: float, fine_voxel_ml: float,
                   to_ventricles: Optional[np.ndarray]) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Whole-lesion mask, core mask and signal strength (1 = full lesion contrast) on the fine grid.

    The total volume is split among the family's lesions; each lesion's level set is chosen
    so it has exactly its share of voxels inside the tissue it may occupy (fewer only when
    that tissue runs out near its centre).
    """
    (low, high), _, roughness, lobes, core_range = FAMILIES[family]
    shape = tissue["brain"].shape
    whole, core = np.zeros(shape, bool), np.zeros(shape, bool)
    strength = np.zeros(shape, np.float32)
    count = int(rng.integers(low, high + 1))
    shares = rng.dirichlet(np.full(count, 2.0)) if count else []
    for share in shares:
        seat, allowed = _seat(rng, family, tissue, to_ventricles)
        candidates = np.flatnonzero(seat)
        if candidates.size == 0:
            raise CDMSegmentError(f"no room for a {family} lesion in this anatomy; use another seed")
        index = np.unravel_index(candidates[rng.integers(candidates.size)], shape)
        centre = np.array([x[i] for x, i in zip(axes_mm, index)])
        voxels = max(1, int(round(total_ml * share / fine_voxel_ml)))
        radius_mm = (3 * voxels * fine_voxel_ml * 1000 / (4 * np.pi)) ** (1 / 3)
        box, level = lesion_field(rng, axes_mm, centre, radius_mm, roughness=roughness, max_lobes=lobes, reach=3.0)
        free = allowed[box] & ~whole[box]
        values = level[free]
        cut = np.partition(values, voxels - 1)[voxels - 1] if voxels <= values.size else np.inf
        mask = free & (level <= cut)
        whole[box] |= mask
        if core_range is not None:
            core[box] |= mask & (level <= cut * _uniform(rng, core_range))
        fade = np.clip((cut - level) / (0.4 * abs(cut) + 1e-3), 0.3, 1.0) if family == "infiltrative" else 1.0
        strength[box] = np.where(mask, fade, strength[box])
    return whole, core, strength


def draw_parameters(rng: np.random.Generator, family: str, contrast: ContrastRanges,
                    size_ml: Optional[Tuple[float, float]], in_plane_mm: Optional[float], slice_mm: Optional[float],
                    acquisitions: Sequence[str]) -> dict:
    """Every random choice of a case but its anatomy and lesion shapes: contrast, artefacts, acquisition, size."""
    lesion_range = size_ml if size_ml is not None and family != "healthy" else FAMILIES[family][1]
    return {
        "family": family, "acquisition": str(rng.choice(list(acquisitions))),
        "in_plane_mm": float(in_plane_mm) if in_plane_mm is not None else _uniform(rng, (0.9, 1.6)),
        "slice_mm": float(slice_mm) if slice_mm is not None else _uniform(rng, (1.0, 6.0)),
        "grey_white": _uniform(rng, contrast.grey_white), "csf_ratio": _uniform(rng, contrast.csf),
        "lesion_ratio": _uniform(rng, contrast.lesion), "heterogeneity": _uniform(rng, (0.0, 0.25)),
        "necrosis_ratio": _uniform(rng, (0.25, 0.7)) if family in ("core-oedema", "multifocal") and rng.random() < 0.4
        else 1.0,
        "rim_ratio": _uniform(rng, (1.0, 1.25)) if rng.random() < 0.6 else 0.0,
        "bias_std": _uniform(rng, (0.0, 0.3)), "noise": _uniform(rng, (0.01, 0.08)), "blur_mm": _uniform(rng, (0.0, 1.0)),
        "scale": _log_uniform(rng, (0.5, 2.0)),
        "target_ml": _log_uniform(rng, lesion_range) if family != "healthy" else 0.0,
    }


def _signal(rng: np.random.Generator, p: dict, tissue: Dict[str, np.ndarray], whole: np.ndarray, core: np.ndarray,
            strength: np.ndarray, axes_mm: Sequence[np.ndarray], to_ventricles: Optional[np.ndarray]) -> np.ndarray:
    """Noise-free FLAIR-like signal on the fine grid from the drawn contrast."""
    white, csf = GREY / p["grey_white"], GREY * p["csf_ratio"]
    normal = tissue["csf"] * csf + tissue["gm"] * GREY + tissue["wm"] * white
    if p["rim_ratio"] and to_ventricles is not None:  # ependymal rim: bright in normal FLAIR, not a lesion
        rim = (to_ventricles > 0) & (to_ventricles < 2.0)
        normal = np.where(rim, np.maximum(normal, GREY * p["rim_ratio"] * tissue["brain"]), normal)
    texture = 1.0 + p["heterogeneity"] * smooth_random_field(rng, axes_mm, 4.0, 1.0)
    lesion = GREY * p["lesion_ratio"] * np.clip(texture, 0.5, 1.5) * np.where(core, p["necrosis_ratio"], 1.0)
    lesion = normal + (lesion * tissue["brain"] - normal) * strength
    return np.where(whole, lesion, normal).astype(np.float32)


def generate_randomised_case(outdir, seed: int, index: int, family: str, *, contrast: ContrastRanges = ContrastRanges(),
                             size_ml: Optional[Tuple[float, float]] = None, in_plane_mm: Optional[float] = None,
                             slice_mm: Optional[float] = None, acquisitions: Sequence[str] = tuple(ACQUISITIONS)) -> dict:
    """Write case ``index`` of the randomised set ``seed`` (family ``family``); returns its record.

    size_ml: (lo, hi) total lesion volume, default the family's range. The record holds the
    paths, the drawn parameters, ``lesion_ml`` (the written mask's volume),
    ``fine_lesion_ml`` (the volume drawn on the fine grid, in the range asked) and
    ``lesion_wm_fraction`` (mean white-matter fraction under the lesions).
    """
    rng = np.random.default_rng([int(seed), int(index), 7])
    p = draw_parameters(rng, family, contrast, size_ml, in_plane_mm, slice_mm, acquisitions)
    thick = ACQUISITIONS[p["acquisition"]]
    sub_slices = max(1, int(round(p["slice_mm"] / 1.5)))
    axes_mm, shape = output_axes(p["in_plane_mm"], p["slice_mm"], sub_slices, thick)
    fine_mm = [p["in_plane_mm"]] * 3
    fine_mm[thick] = p["slice_mm"] / sub_slices
    tissue = warped_tissue(rng, axes_mm)
    to_ventricles = _ventricles(tissue, fine_mm) if family == "ms" or p["rim_ratio"] else None
    whole, core, strength = _place_lesions(rng, family, axes_mm, tissue, p["target_ml"],
                                           float(np.prod(fine_mm)) / 1000, to_ventricles)
    signal = _signal(rng, p, tissue, whole, core, strength, axes_mm, to_ventricles)

    spacing = [p["in_plane_mm"]] * 3
    spacing[thick] = p["slice_mm"]
    brain = slab_mean(tissue["brain"], sub_slices, thick) >= 0.5
    seg = np.where(slab_mean(core, sub_slices, thick) >= 0.5, 1,
                   np.where(slab_mean(whole, sub_slices, thick) >= 0.5, 2, 0)).astype(np.uint8) * brain
    signal = slab_mean(signal, sub_slices, thick)
    blur = [0.0 if a == thick else p["blur_mm"] / spacing[a] for a in range(3)]
    signal = ndi.gaussian_filter(signal, blur) if p["blur_mm"] > 0 else signal
    bias_axes = [np.arange(n, dtype=np.float32) * s for n, s in zip(shape, spacing)]
    signal = signal * np.exp(smooth_random_field(rng, bias_axes, 90.0, p["bias_std"])) * np.float32(FULL_SCALE * p["scale"])
    sigma = p["noise"] * float(signal[brain].mean())
    image = np.where(brain, np.clip(np.rint(rician(rng, signal, sigma)), 1, 32767), 0).astype(np.int16)

    case_id = f"Random_s{seed}_{index:04d}"
    folder = Path(outdir) / case_id
    folder.mkdir(parents=True, exist_ok=True)
    direction = _direction_for(thick)
    image_path, seg_path = folder / f"{case_id}_flair.nii.gz", folder / f"{case_id}_seg.nii.gz"
    sitk.WriteImage(to_volume(image, spacing, direction).to_sitk(), str(image_path), True)
    seg_volume = to_volume(seg, spacing, direction)
    sitk.WriteImage(seg_volume.to_sitk(), str(seg_path), True)
    fine_voxel_ml = float(np.prod(fine_mm)) / 1000
    return {"case": case_id, "images": {"flair": image_path}, "seg": seg_path, "spacing_mm": seg_volume.spacing_mm,
            **p, "lesion_ml": float((seg > 0).sum() * np.prod(spacing) / 1000),
            "fine_lesion_ml": float(whole.sum() * fine_voxel_ml),
            "lesion_wm_fraction": float(tissue["wm"][whole].mean()) if whole.any() else float("nan"),
            "slice_rows": axial_slice_rows(case_id, seg_volume)}


CASE_COLUMNS = ("case", "family", "acquisition", "in_plane_mm", "slice_mm", "grey_white", "csf_ratio", "lesion_ratio",
                "heterogeneity", "necrosis_ratio", "rim_ratio", "bias_std", "noise", "blur_mm", "scale", "target_ml",
                "lesion_ml", "fine_lesion_ml", "lesion_wm_fraction")
CASES_FILE = "cases.csv"


def generate_randomised(outdir, cases: int, seed: int, *, families: Sequence[str] = tuple(FAMILIES),
                        contrast: ContrastRanges = ContrastRanges(), size_ml: Optional[Tuple[float, float]] = None,
                        in_plane_mm: Optional[float] = None, slice_mm: Optional[float] = None,
                        acquisitions: Sequence[str] = tuple(ACQUISITIONS),
                        progress: Optional[Callable[[int, int], None]] = None) -> List[dict]:
    """Write ``cases`` cases, the families taken in turn (case n is ``families[n % len]``), with
    ``slice_labels.csv`` and ``cases.csv``; returns the records. Same arguments -> identical files."""
    if int(cases) < 1:
        raise CDMSegmentError(f"number of phantom cases must be at least 1, got {cases}")
    unknown = [f for f in families if f not in FAMILIES]
    if unknown or not families:
        raise CDMSegmentError(f"unknown lesion family {unknown or families}; choose from {', '.join(FAMILIES)}")
    bad = [a for a in acquisitions if a not in ACQUISITIONS]
    if bad or not acquisitions:
        raise CDMSegmentError(f"unknown acquisition {bad or acquisitions}; choose from {', '.join(ACQUISITIONS)}")
    if size_ml is not None and not 0.05 <= size_ml[0] <= size_ml[1] <= 500:
        raise CDMSegmentError("lesion volume range (--lesion-ml) must be LO,HI ml with 0.05 <= LO <= HI <= 500, "
                              f"got {size_ml[0]:g},{size_ml[1]:g}")
    for name, value in (("in_plane_mm", in_plane_mm), ("slice_mm", slice_mm)):
        if value is not None and not 0.5 <= value <= 8.0:
            raise CDMSegmentError(f"{name} must be between 0.5 and 8 mm, got {value}")
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    records = []
    for index in range(int(cases)):
        records.append(generate_randomised_case(
            outdir, seed, index, families[index % len(families)], contrast=contrast, size_ml=size_ml,
            in_plane_mm=in_plane_mm, slice_mm=slice_mm, acquisitions=acquisitions))
        if progress is not None:
            progress(index + 1, int(cases))
    write_slice_labels(outdir, records)
    with open(outdir / CASES_FILE, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CASE_COLUMNS, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(records)
    return records


def read_case_table(folder) -> Dict[str, dict]:
    """case id -> its row of ``cases.csv`` (family, drawn parameters, lesion_ml as floats); {} when absent."""
    path = Path(folder) / CASES_FILE
    if not path.is_file():
        return {}
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    text = ("case", "family", "acquisition")
    return {r["case"]: {k: (v if k in text else float(v)) for k, v in r.items()} for r in rows}


def contrast_from(grey_white=None, csf=None, lesion=None) -> ContrastRanges:
    """ContrastRanges with the given (lo, hi) pairs and the full FLAIR-like range elsewhere."""
    given = {k: tuple(v) for k, v in dict(grey_white=grey_white, csf=csf, lesion=lesion).items() if v is not None}
    for k, v in given.items():
        if len(v) != 2:
            raise CDMSegmentError(f"{k} contrast range must be two numbers LO,HI, got {','.join(map(str, v))}")
    return ContrastRanges(**{**asdict(ContrastRanges()), **given})

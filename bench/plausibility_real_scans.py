"""The plausibility check and the tissue rule on real scans that tests cannot depend on (Debian packages).

    apt-get install mricron-data invesalius-examples
    python bench/plausibility_real_scans.py

Colin27 with and without its skull (mricron-data), a head CT (invesalius-examples' Cranium.inv3, ProMED CT 0051),
nilearn's MNI152 brain and the bundled sample, judged against the bundled model's ``expects``: findings, slices
with content under the tissue rule and under the old non-zero rule, tissue volume.
"""

import plistlib
import sys
import tarfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "CDMSegment"))

from CDMSegmentLib.core.image import Volume  # noqa: E402
from CDMSegmentLib.core.plausibility import findings  # noqa: E402
from CDMSegmentLib.core.reading import read_volume  # noqa: E402
from CDMSegmentLib.core.tissue import slices_with_content, tissue_mask  # noqa: E402

EXPECTS = {"modality": "FLAIR", "skull_stripped": True, "description": "skull-stripped brain MRI (FLAIR)"}
COLIN = Path("/usr/share/mricron/templates")
CRANIUM = Path("/usr/share/doc/invesalius-examples/examples/Cranium.inv3")
SAMPLE = Path(__file__).resolve().parent.parent / "CDMSegment" / "Resources" / "Sample" / "CDMSegmentSample_flair.nrrd"


def invesalius_ct(path: Path) -> Volume:
    """An InVesalius project: a tar.gz holding main.plist (shape, spacing) and matrix.dat (int16 HU)."""
    with tarfile.open(path) as project:
        members = {Path(m.name).name: m for m in project.getmembers()}
        main = plistlib.loads(project.extractfile(members["main.plist"]).read())
        data = project.extractfile(members[main["matrix"]["filename"]]).read()
    array = np.frombuffer(data, dtype=main["matrix"]["dtype"]).reshape(main["matrix"]["shape"])
    return Volume(array, tuple(main["spacing"]))


def report(name: str, volume: Volume) -> None:
    tissue = tissue_mask(volume.array).numpy()
    non_zero = int((volume.array != 0).reshape(volume.array.shape[0], -1).any(axis=1).sum())
    ml = tissue.sum() * np.prod(volume.spacing_mm) / 1000
    print(f"{name}: {volume.array.shape}, {volume.array.min():.0f}..{volume.array.max():.0f}; slices with content "
          f"{len(slices_with_content(tissue))} of {volume.array.shape[0]} (non-zero rule: {non_zero}); tissue {ml:.0f} ml")
    for f in findings({"modalities": ["FLAIR"], "expects": EXPECTS}, [volume], ["input"]) or [None]:
        print("    no finding" if f is None else f"    {'REFUSED' if f.clear else 'warning'}: {f.sentence}")


def main() -> None:
    import nilearn

    report("Colin27 T1 with its skull", read_volume(COLIN / "ch2.nii.gz"))
    report("Colin27 T1 skull-stripped", read_volume(COLIN / "ch2bet.nii.gz"))
    report("head CT (Cranium.inv3)", invesalius_ct(CRANIUM))
    report("MNI152 2009a brain (nilearn)", read_volume(Path(nilearn.__file__).parent / "datasets" / "data" /
                                                       "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"))
    report("bundled sample FLAIR (phantom)", read_volume(SAMPLE))


if __name__ == "__main__":
    main()

"""The models' own OOD score on real scans that tests cannot depend on (Debian packages), beside the sample.

    apt-get install mricron-data invesalius-examples
    python bench/ood_real_scans.py [MODEL ...]      (default: every registered diffusion model)

One row per input, one column per model: the score against the model's threshold, and what a run would do
(runs; warned, above the threshold; refused unless --force, above core/plausibility.OOD_REFUSAL_FACTOR times the threshold). These inputs are
what the header and intensity checks (bench/plausibility_real_scans.py) are measured on; the OOD score is
the check behind them, the one that must catch a skull-stripped T1 given as NIfTI.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "CDMSegment"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from plausibility_real_scans import COLIN, CRANIUM, SAMPLE, invesalius_ct  # noqa: E402

from CDMSegmentLib.core.modelfile import load_model  # noqa: E402
from CDMSegmentLib.core.ood import ood_score  # noqa: E402
from CDMSegmentLib.core.plausibility import ood_finding  # noqa: E402
from CDMSegmentLib.core.reading import read_volume  # noqa: E402
from CDMSegmentLib.core.registry import read_registry  # noqa: E402


def inputs() -> dict:
    import nilearn

    mni = Path(nilearn.__file__).parent / "datasets" / "data" / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
    return {"the bundled sample (FLAIR phantom)": lambda: read_volume(SAMPLE),
            "MNI152 T1 template (nilearn)": lambda: read_volume(mni),
            "Colin27 T1, skull-stripped (mricron-data ch2bet)": lambda: read_volume(COLIN / "ch2bet.nii.gz"),
            "Colin27 T1, whole head (ch2)": lambda: read_volume(COLIN / "ch2.nii.gz"),
            "head CT (invesalius-examples Cranium.inv3)": lambda: invesalius_ct(CRANIUM)}


def verdict(result) -> str:
    finding = ood_finding(result)
    return "runs" if finding is None else ("refused" if finding.clear else "warned")


def main() -> None:
    names = sys.argv[1:] or [e["name"] for e in read_registry() if e.get("kind", "diffusion") == "diffusion"]
    models = [load_model(n) for n in names]
    print("| input | " + " | ".join(f"{m.metadata['name']} {m.metadata['version']} (threshold "
                                     f"{m.metadata['ood']['threshold']:.2f})" for m in models) + " |")
    print("|---|" + "---|" * len(models))
    for name, read in inputs().items():
        volume = read()
        cells = []
        for model in models:
            result = ood_score(model, [volume])
            cells.append(f"{result.score:.2f}, {verdict(result)}")
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()

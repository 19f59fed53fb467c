"""The bundled model and sample: registered correctly, and as good as measured (README, 'Quality').

Floors and ceilings are set from the README's measurements with margin, so a regression in
the model, the runner or the thresholds cannot land.
"""

import json
from pathlib import Path

import numpy as np
import pytest

from CDMSegment import SAMPLE_DICE_FLOOR  # the Slicer self-test's floor too
from CDMSegmentLib.core.reading import read_volume
from CDMSegmentLib.evaluation.metrics import dice
from CDMSegmentLib.core.modelfile import MODELS_DIR, load_model, read_registry, sha256_of
from CDMSegmentLib.core.errors import Cancelled, CDMSegmentError
from CDMSegmentLib.core.ood import ood_score
from CDMSegmentLib.core.runner import segment_volume

SAMPLE = MODELS_DIR.parent / "Sample"
HEALTHY_FP_CEILING_ML = 9.0  # measured 0.9-5.8 ml (mean 2.3) on 6 lesion-free held-out phantoms
MAX_MODEL_BYTES = 15 * 2 ** 20


def test_registry_matches_the_files_and_stays_small():
    entries = read_registry()
    assert {e["kind"] for e in entries} == {"diffusion", "classifier"}
    assert sum(bool(e.get("default")) for e in entries) == 1
    for e in entries:
        path = MODELS_DIR / e["file"]
        assert sha256_of(path) == e["sha256"]
        assert path.stat().st_size == e["size_bytes"] < MAX_MODEL_BYTES


def test_metadata_says_what_it_was_trained_on_and_that_it_is_not_clinical():
    model = load_model()
    meta = model.metadata
    assert meta["name"] == "brain-flair-phantom" and model.modalities == ["flair"]
    assert "phantom" in meta["training"]["data"] and "not for clinical use" in meta["training"]["data"]
    assert "not a medical device" in meta["intended_use"]
    assert {"noise_level", "steps", "tau", "noise_draws", "threshold"} <= set(meta["defaults"])
    classifier = load_model("brain-flair-phantom-classifier", kind="classifier")
    assert (classifier.image_size, classifier.modalities) == (model.image_size, model.modalities)


def test_sample_files_match_their_description():
    description = json.loads((SAMPLE / "CDMSegmentSample.json").read_text(encoding="utf-8"))
    assert sha256_of(SAMPLE / description["file_name"]) == description["sha256"]
    assert sha256_of(SAMPLE / description["segmentation_file_name"]) == description["segmentation_sha256"]


def test_sample_segmentation_clears_the_dice_floor():
    flair = read_volume(SAMPLE / "CDMSegmentSample_flair.nrrd")
    truth = read_volume(SAMPLE / "CDMSegmentSample_seg.nrrd").array > 0
    result = segment_volume(load_model(), [flair], device="cpu", log=lambda m: None)
    assert result.mask.shape == truth.shape
    assert dice(result.mask > 0, truth) >= SAMPLE_DICE_FLOOR


def test_a_lesion_free_volume_stays_nearly_empty(tmp_path):
    pytest.importorskip("nilearn")
    from CDMSegmentLib.data.phantom import generate_case

    record = generate_case(tmp_path, seed=424242, index=0, lesion_free_fraction=1.0, in_plane_mm=1.5, slice_mm=3.0)
    assert record["lesion_voxels"] == 0
    flair = read_volume(Path(record["images"]["flair"]))
    result = segment_volume(load_model(), [flair], device="cpu", log=lambda m: None)
    false_positive_ml = result.mask.sum() * np.prod(flair.spacing_mm) / 1000
    assert false_positive_ml < HEALTHY_FP_CEILING_ML


def test_the_model_says_what_it_takes():
    assert load_model().metadata["expects"] == {"modality": "FLAIR", "skull_stripped": True,
                                                "description": "skull-stripped brain MRI (FLAIR)"}


def test_the_bundled_sample_is_not_flagged_out_of_distribution():
    result = ood_score(load_model(), [read_volume(SAMPLE / "CDMSegmentSample_flair.nrrd")])
    assert not result.flagged


def _mni_t1():
    import importlib.util

    spec = importlib.util.find_spec("nilearn")
    if spec is None:
        pytest.skip("nilearn holds the MNI152 T1 template")
    folder = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"
    return read_volume(folder / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")


def test_a_t1_volume_is_flagged_out_of_distribution():
    result = ood_score(load_model(), [_mni_t1()])
    assert result.flagged and result.score > 1.5 * result.threshold


def test_a_skull_stripped_t1_is_refused_by_the_runner_unless_forced():
    """No header says it is a T1 and it has a zero background: only the model's own score can tell, and it
    refuses before the run (the segmentation would be 'tumour' on white matter)."""
    t1 = _mni_t1()
    with pytest.raises(CDMSegmentError, match="out-of-distribution score .* refuses above .*--force"):
        segment_volume(load_model(), [t1], device="cpu", log=lambda m: None, cancel=lambda: True)
    with pytest.raises(Cancelled):  # forced: it passes the check and reaches the run, which is cancelled at once
        segment_volume(load_model(), [t1], device="cpu", log=lambda m: None, cancel=lambda: True, force=True)

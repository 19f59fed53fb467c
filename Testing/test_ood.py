"""The out-of-distribution score: its measure (shapes, determinism, noise mismatch), its reference, its commands."""

import json

import numpy as np
import pytest
import SimpleITK as sitk

from CDMSegmentLib.cli.main import main
from CDMSegmentLib.core.errors import CDMSegmentError
from CDMSegmentLib.core.image import Volume
from CDMSegmentLib.core.reading import read_volume
from CDMSegmentLib.core.modelfile import MODELS_DIR, load_model
from CDMSegmentLib.core.ood import OODResult, denoising_errors, ood_reference, ood_score, score_from_errors
from CDMSegmentLib.core.plausibility import OOD_REFUSAL_FACTOR

from conftest import make_tiny_model_file, phantom

SAMPLE = MODELS_DIR.parent / "Sample" / "CDMSegmentSample_flair.nrrd"


def volume(seed=0, noise_std=0.0):
    array = phantom((12, 24, 24), seed=seed).astype(np.float32)
    array = array + np.random.default_rng(seed + 1).normal(0, noise_std, array.shape) * (array != 0)
    return Volume(array, (1.0, 1.0, 2.0))


def write_volume(v: Volume, path) -> None:
    sitk.WriteImage(v.to_sitk(), str(path))


def test_one_error_per_noise_level_and_the_same_numbers_for_the_same_seed(tiny_model):
    a = denoising_errors(tiny_model, [volume()], noise_levels=(0.9, 0.5), slices=4, seed=3)
    b = denoising_errors(tiny_model, [volume()], noise_levels=(0.9, 0.5), slices=4, seed=3)
    c = denoising_errors(tiny_model, [volume()], noise_levels=(0.9, 0.5), slices=4, seed=4)
    assert a.shape == (2,) and np.isfinite(a).all()
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_the_bundled_model_errs_more_the_more_the_noise_departs_from_its_data():
    sample = read_volume(SAMPLE)
    brain = sample.array != 0
    scale = float(sample.array[brain].mean())
    model = load_model()
    errors = []
    for std in (0.0, 0.1, 0.3):
        noisy = np.where(brain, sample.array + np.random.default_rng(0).normal(0, std * scale, sample.array.shape), 0)
        errors.append(denoising_errors(model, [Volume(noisy.astype(np.float32), sample.spacing_mm, sample.origin_mm,
                                                      sample.direction)], slices=4)[0])  # the least noisy level
    assert errors[0] < errors[1] < errors[2]


def test_reference_learns_how_the_levels_move_together_and_bounds_false_alarms():
    rng = np.random.default_rng(0)
    noise = rng.normal(0, 0.3, (40, 1))  # the image's own noise moves every level together
    errors = np.array([-2.0, -3.0, -3.8]) + noise * [1.0, 0.8, 0.5] + rng.normal(0, 0.03, (40, 3))
    reference = ood_reference(errors, noise_levels=(0.95, 0.8, 0.5), slices=8, seed=0, false_alarm=0.05)
    assert reference["mean"] == pytest.approx([-2.0, -3.0, -3.8], abs=0.15)
    assert np.array(reference["covariance"]).shape == (3, 3)
    scores = np.array([score_from_errors(e, reference) for e in errors])
    assert (scores > reference["threshold"]).mean() <= 0.05
    along = [-2.0 + 0.6, -3.0 + 0.48, -3.8 + 0.3]  # twice the usual noise: unusual, but the way valid inputs vary
    across = [-2.0, -3.0 + 0.3, -3.8 + 0.3]  # the error falls less from level to level: another kind of image
    assert score_from_errors(along, reference) < reference["threshold"] < score_from_errors(across, reference)
    assert OODResult(3.0, 2.0, np.zeros(3)).flagged and not OODResult(1.0, 2.0, np.zeros(3)).flagged


@pytest.mark.parametrize("errors, kwargs, message", [
    (np.zeros((3, 3)), {}, "at least 9 held-out volumes \\(3 per noise level\\), got 3; give a folder with more"),
    (np.zeros((10, 2)), {}, "one error per volume and noise level \\(3 levels\\)"),
    (np.zeros((10, 3)), {"false_alarm": 0.7}, "false-alarm rate"),
])
def test_reference_refuses_what_it_cannot_calibrate(errors, kwargs, message):
    with pytest.raises(CDMSegmentError, match=message):
        ood_reference(errors, noise_levels=(0.95, 0.8, 0.5), slices=8, seed=0, **kwargs)


def test_calibrate_ood_refuses_too_few_volumes_before_running_the_network(tmp_path, capsys):
    tiny_model_path = tmp_path / "tiny_flair.pt"
    make_tiny_model_file(tiny_model_path, modalities=("flair",))
    data = tmp_path / "held_out"
    for n in range(2):
        (data / f"Case{n}").mkdir(parents=True)
        write_volume(volume(seed=n), data / f"Case{n}" / f"Case{n}_flair.nii.gz")
    assert main(["calibrate-ood", str(tiny_model_path), str(data), "-o", str(tmp_path / "ood.json")]) == 1
    err = capsys.readouterr().err
    assert "needs at least 9 held-out volumes (3 per noise level), got 2; give a folder with more" in err
    assert "1/2" not in err and not (tmp_path / "ood.json").exists()


def test_a_model_without_reference_gives_none_and_the_command_says_how_to_add_one(tiny_model, tiny_model_path,
                                                                                    tmp_path, capsys):
    assert ood_score(tiny_model, [volume()]) is None
    path = tmp_path / "v.nrrd"
    write_volume(volume(), path)
    assert main(["ood", str(path), "--model", str(tiny_model_path)]) == 1
    assert "calibrate-ood" in capsys.readouterr().err


def test_calibrate_then_set_defaults_writes_the_reference_and_the_score_uses_it(tmp_path, capsys):
    tiny_model_path = tmp_path / "tiny_flair.pt"
    make_tiny_model_file(tiny_model_path, modalities=("flair",))  # the BraTS layout's modality name
    data = tmp_path / "held_out"
    for n in range(9):
        case = data / f"Case{n}"
        case.mkdir(parents=True)
        write_volume(volume(seed=n), case / f"Case{n}_flair.nii.gz")
    assert main(["calibrate-ood", str(tiny_model_path), str(data), "-o", str(tmp_path / "ood.json")]) == 0
    reference = json.loads((tmp_path / "ood.json").read_text(encoding="utf-8"))
    assert reference["reference_volumes"] == 9 and len(reference["mean"]) == 3
    (tmp_path / "expects.json").write_text(json.dumps({"modality": "FLAIR", "skull_stripped": True}))
    assert main(["set-defaults", str(tiny_model_path), "--ood", str(tmp_path / "ood.json"), "--expects",
                 str(tmp_path / "expects.json"), "-o", str(tmp_path / "with_ood.pt")]) == 0
    model = load_model(tmp_path / "with_ood.pt")
    assert model.metadata["ood"]["threshold"] == reference["threshold"]
    assert model.metadata["expects"]["skull_stripped"] is True
    assert model.defaults == load_model(tiny_model_path).defaults
    same = ood_score(model, [volume(seed=0)])
    assert same.score == pytest.approx(score_from_errors(reference_errors(tmp_path)[0], reference))
    capsys.readouterr()
    assert main(["ood", str(data / "Case0" / "Case0_flair.nii.gz"), "--model", str(tmp_path / "with_ood.pt")]) == 0
    out = capsys.readouterr().out
    assert f"OOD score {same.score:.2f} (the model warns above {same.threshold:.2f} and refuses above " \
           f"{OOD_REFUSAL_FACTOR * same.threshold:.2f})" in out
    assert ("segment refuses it" in out) == (same.score > OOD_REFUSAL_FACTOR * same.threshold)
    assert ("segment runs" in out) == (same.score <= OOD_REFUSAL_FACTOR * same.threshold)


def reference_errors(folder):
    return [row["errors"] for row in json.loads((folder / "ood.cases.json").read_text(encoding="utf-8"))]


def test_set_defaults_needs_something_to_write(tiny_model_path, tmp_path, capsys):
    assert main(["set-defaults", str(tiny_model_path), "-o", str(tmp_path / "x.pt")]) == 1
    assert "nothing to write" in capsys.readouterr().err and not (tmp_path / "x.pt").exists()


@pytest.mark.parametrize("score, clear, says", [(2.0, None, None), (3.5, False, "unusual for the model"),
                                                (6.0, True, "unlike what the model learned")])
def test_a_score_between_the_levels_warns_that_the_lesion_or_contrast_may_be_the_cause(score, clear, says):
    from CDMSegmentLib.core.plausibility import ood_finding

    finding = ood_finding(OODResult(score, 3.0, np.zeros(3)))
    if clear is None:
        assert finding is None
        return
    assert finding.clear is clear and says in finding.sentence
    assert f"score is {score:.2f} (the model warns above 3.00 and refuses above {3.0 * OOD_REFUSAL_FACTOR:.2f})" \
        in finding.sentence
    assert ("large or unusual lesion" in finding.sentence) is (not clear)

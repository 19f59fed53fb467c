"""The volume runner: outputs on the input grid, skipped empty slices, cancel, thresholds, reproducible noise."""

import threading

import numpy as np
import pytest
import torch

from CDMSegmentLib.core import runner as volume_module
from CDMSegmentLib.core.device import is_out_of_memory
from CDMSegmentLib.core.errors import Cancelled, CDMSegmentError
from CDMSegmentLib.core.image import Volume
from CDMSegmentLib.core.modelfile import load_model
from CDMSegmentLib.core.threshold import otsu_threshold
from CDMSegmentLib.core.runner import after_out_of_memory, segment_volume
from conftest import make_tiny_model_file, phantom

SHAPE = (5, 14, 18)
EMPTY_SLICES = (0, 4)  # axial slices (K) without any non-zero voxel
WITH_CONTENT = SHAPE[0] - len(EMPTY_SLICES)


def head(shape=SHAPE) -> Volume:
    array = phantom(shape)
    array[list(EMPTY_SLICES)] = 0
    return Volume(array, spacing_mm=(1.0, 1.1, 2.0), origin_mm=(5.0, -3.0, 10.0))


def run(model, volume, **options):
    return segment_volume(model, [volume], device="cpu", log=lambda m: None, **options)


@pytest.fixture(scope="module")
def volume():
    return head()


@pytest.fixture(scope="module")
def baseline(tiny_model, volume):
    """(result, progress calls) of one run at batch size 2 with a fixed threshold."""
    calls = []
    result = run(tiny_model, volume, batch_size=2, threshold=0.0, progress=lambda d, t: calls.append((d, t)))
    return result, calls


@pytest.fixture(scope="module")
def median_threshold(baseline, volume):
    return float(np.median(baseline[0].heatmap[content(volume)]))


@pytest.fixture(scope="module")
def batch_one(tiny_model, volume, median_threshold):
    return run(tiny_model, volume, batch_size=1, threshold=median_threshold)


@pytest.fixture(scope="module")
def batch_seven(tiny_model, volume):
    return run(tiny_model, volume, batch_size=7, threshold="otsu")


def content(volume):
    return volume.array != 0


def test_heatmap_and_mask_lie_on_the_input_shape_and_the_input_is_untouched(baseline, volume):
    result = baseline[0]
    assert result.heatmap.shape == SHAPE and result.heatmap.dtype == np.float32
    assert result.mask.shape == SHAPE and result.mask.dtype == np.uint8
    assert np.array_equal(volume.array, head().array) and volume.array.dtype == np.int16
    assert result.heatmap.min() >= 0 and result.heatmap.max() > 0


def test_slices_without_content_are_skipped_and_their_heatmap_is_zero(baseline, volume):
    result, calls = baseline
    assert result.slices_total == SHAPE[0] and result.slices_run == WITH_CONTENT
    assert calls == [(0, WITH_CONTENT), (2, WITH_CONTENT), (WITH_CONTENT, WITH_CONTENT)]
    assert result.network_evaluations == WITH_CONTENT * 2 * 2  # 2 steps, 1 draw, 2 passes per step
    assert (result.heatmap[list(EMPTY_SLICES)] == 0).all()
    assert (result.heatmap[~content(volume)] == 0).all()
    assert all(result.heatmap[k].max() > 0 for k in range(1, 4))


def test_cancel_from_the_progress_callback_stops_before_the_next_batch(tiny_model, volume):
    cancel = threading.Event()
    calls = []

    def progress(done, total):
        calls.append(done)
        if done > 0:
            cancel.set()

    with pytest.raises(Cancelled):
        run(tiny_model, volume, batch_size=1, progress=progress, cancel=cancel)
    assert calls == [0, 1]


def test_a_numeric_threshold_is_applied_exactly_inside_the_content(batch_one, volume, median_threshold):
    assert batch_one.threshold == median_threshold
    expected = (batch_one.heatmap > median_threshold) & content(volume)
    assert np.array_equal(batch_one.mask, expected.astype(np.uint8))
    assert 0 < batch_one.mask.sum() < content(volume).sum()


def test_otsu_threshold_is_taken_over_the_content_voxels(batch_seven, volume):
    inside = batch_seven.heatmap[content(volume)]
    assert batch_seven.threshold == otsu_threshold(inside)
    assert inside.min() < batch_seven.threshold < inside.max()
    expected = (batch_seven.heatmap > batch_seven.threshold) & content(volume)
    assert np.array_equal(batch_seven.mask, expected.astype(np.uint8))


def test_the_heatmap_does_not_depend_on_the_batch_size(batch_one, batch_seven, baseline):
    # Noise is drawn per slice, so only the floating-point summation order of the CPU convolutions changes
    # with the batch (measured: < 2e-7), three orders below what another noise draw moves (> 1e-4).
    np.testing.assert_allclose(batch_one.heatmap, batch_seven.heatmap, rtol=0, atol=1e-6)
    np.testing.assert_allclose(batch_one.heatmap, baseline[0].heatmap, rtol=0, atol=1e-6)


def test_the_same_seed_reproduces_to_the_bit_and_another_seed_differs(tiny_model, volume, baseline):
    same = run(tiny_model, volume, batch_size=2, threshold=0.0, seed=0)
    other = run(tiny_model, volume, batch_size=2, threshold=0.0, seed=1)
    assert np.array_equal(same.heatmap, baseline[0].heatmap)
    assert not np.array_equal(other.heatmap, baseline[0].heatmap)
    assert np.abs(other.heatmap - same.heatmap).max() > 1e-4


@pytest.fixture(scope="module")
def two_modality_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "two.pt"
    make_tiny_model_file(path, modalities=("FLAIR", "T1"))
    return load_model(path)


def test_two_modalities_on_different_grids_are_refused(two_modality_model, volume):
    shifted = Volume(volume.array.copy(), volume.spacing_mm, (5.0, -3.0, 12.0), volume.direction)
    with pytest.raises(CDMSegmentError, match="T1 is not on the same voxel grid as FLAIR"):
        segment_volume(two_modality_model, [volume, shifted], device="cpu")


def test_a_two_modality_model_given_one_input_names_its_modalities(two_modality_model, volume):
    with pytest.raises(CDMSegmentError, match=r"expects 2 modalities \(FLAIR, T1\), got 1 input"):
        segment_volume(two_modality_model, [volume], device="cpu")



@pytest.mark.parametrize("axis, slices", [("coronal", 6), (0, 5)])
def test_an_axis_override_slices_along_it_and_keeps_the_input_grid(axis, slices, tiny_model):
    vol = Volume(phantom((3, 6, 5)), spacing_mm=(1.0, 1.1, 2.0))
    result = run(tiny_model, vol, axis=axis, batch_size=16, threshold=0.0)
    assert result.slices_total == slices  # identity direction: J is posterior (coronal), I is left (sagittal)
    assert result.heatmap.shape == (3, 6, 5) and result.mask.shape == (3, 6, 5)
    assert (result.heatmap[vol.array == 0] == 0).all() and result.heatmap.max() > 0


OUT_OF_MEMORY = "CUDA out of memory. Tried to allocate 528.00 MiB."


def memory_limited(monkeypatch, max_batch: int):
    """Make every heatmap batch larger than ``max_batch`` fail the way a full GPU fails."""
    real = volume_module.build_method

    def build(*args, **kwargs):
        fn = real(*args, **kwargs)

        def limited(x, ids, **options):
            if len(ids) > max_batch:
                raise torch.cuda.OutOfMemoryError(OUT_OF_MEMORY)
            return fn(x, ids, **options)
        return limited

    monkeypatch.setattr(volume_module, "build_method", build)


def test_out_of_memory_halves_the_batch_and_the_heatmap_is_the_same(tiny_model, volume, baseline, monkeypatch):
    memory_limited(monkeypatch, max_batch=2)
    messages = []
    result = segment_volume(tiny_model, [volume], device="cpu", batch_size=8, threshold=0.0, log=messages.append)
    assert [m for m in messages if "memory" in m] == ["out of GPU memory: retrying with batch size 4",
                                                      "out of GPU memory: retrying with batch size 2"]
    np.testing.assert_allclose(result.heatmap, baseline[0].heatmap, atol=1e-6)
    assert result.slices_run == baseline[0].slices_run


def test_out_of_memory_at_batch_one_moves_to_the_cpu_then_gives_up_with_one_line(tiny_model, volume, monkeypatch):
    moves = []
    assert after_out_of_memory(1, torch.device("cuda"), moves.append) == (1, torch.device("cpu"))
    assert moves == ["out of GPU memory even with batch size 1: continuing on the CPU"]
    memory_limited(monkeypatch, max_batch=0)
    with pytest.raises(CDMSegmentError, match="out of memory even on the CPU"):
        segment_volume(tiny_model, [volume], device="cpu", batch_size=2, log=lambda m: None)


def test_out_of_memory_is_recognised_as_eager_torch_and_as_torchscript_raise_it():
    @torch.jit.script
    def scripted_failure(x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB.")

    with pytest.raises(Exception) as scripted:
        scripted_failure(torch.zeros(1))
    assert not isinstance(scripted.value, torch.cuda.OutOfMemoryError)  # why the type alone is not enough
    assert is_out_of_memory(scripted.value)
    assert is_out_of_memory(torch.cuda.OutOfMemoryError(OUT_OF_MEMORY))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
    assert not is_out_of_memory(ValueError(OUT_OF_MEMORY))

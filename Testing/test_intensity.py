"""Intensity normalisation on the run's device: numpy's numbers, numpy's refusals, any input array."""

import numpy as np
import pytest
import torch

from CDMSegmentLib.core.errors import CDMSegmentError
from CDMSegmentLib.core.intensity import DEFAULT_NORMALISATION, normalise_volume
from CDMSegmentLib.core.modelfile import MODELS_DIR
from CDMSegmentLib.core.reading import read_volume

SAMPLE_FLAIR = MODELS_DIR.parent / "Sample" / "CDMSegmentSample_flair.nrrd"
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]
FLOAT32_ATOL = 2.5e-7  # two float32 steps below 1: float32 arithmetic against numpy's float64


def numpy_reference(array: np.ndarray, low: float = 0.5, high: float = 99.5) -> np.ndarray:
    """The host implementation the device one replaced (numpy 2 takes it in float64)."""
    a = np.asarray(array, dtype=np.float32)
    lo, hi = np.percentile(a[a != 0], [low, high])
    out = np.clip((a - lo) / (hi - lo), 0.0, 1.0) * 2.0 - 1.0
    out[a == 0] = -1.0
    return out.astype(np.float32)


def raw_mri(shape=(12, 40, 36), seed: int = 0) -> np.ndarray:
    """No zero background: Rician-like noise around a brighter head, as a scanner writes it (float64)."""
    rng = np.random.default_rng(seed)
    k, j, i = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    head = (j / 0.8) ** 2 + (i / 0.7) ** 2 + (k / 1.3) ** 2 < 1
    return np.where(head, 400 + 60 * np.sin(7 * i), 0) + rng.rayleigh(12.0, shape)


@pytest.mark.parametrize("device", DEVICES)
def test_the_sample_is_normalised_as_numpy_did_on_the_device(device):
    flair = read_volume(SAMPLE_FLAIR).array  # int16, 70 % background zeros
    before = flair.copy()
    out = normalise_volume(flair, DEFAULT_NORMALISATION, device)
    assert out.dtype == torch.float32 and out.device.type == device and out.shape == flair.shape
    np.testing.assert_allclose(out.cpu().numpy(), numpy_reference(flair), rtol=0, atol=FLOAT32_ATOL)
    assert (out.cpu().numpy()[flair == 0] == -1).all() and out.min() == -1 and out.max() == 1
    np.testing.assert_array_equal(flair, before)


@pytest.mark.parametrize("device", DEVICES)
def test_a_float64_volume_without_zero_background_matches_too(device):
    volume = raw_mri()
    spec = {"method": "percentile", "low": 2.0, "high": 98.0}
    np.testing.assert_allclose(normalise_volume(volume, spec, device).cpu().numpy(), numpy_reference(volume, 2, 98),
                               rtol=0, atol=FLOAT32_ATOL)


def test_byte_swapped_read_only_and_flipped_arrays_give_the_same_numbers():
    flair = read_volume(SAMPLE_FLAIR).array
    expected = normalise_volume(flair).numpy()
    swapped = flair.astype(flair.dtype.newbyteorder(">"))
    read_only = flair.copy()
    read_only.flags.writeable = False
    np.testing.assert_array_equal(normalise_volume(swapped).numpy(), expected)
    np.testing.assert_array_equal(normalise_volume(read_only).numpy(), expected)
    np.testing.assert_array_equal(normalise_volume(flair[::-1]).numpy(), expected[::-1])
    np.testing.assert_array_equal(normalise_volume(flair.astype(np.uint16)).numpy(), expected)  # DICOM's type
    tensor = torch.from_numpy(flair.astype(np.float32))
    np.testing.assert_array_equal(normalise_volume(tensor).numpy(), expected)
    assert torch.equal(tensor, torch.from_numpy(flair.astype(np.float32)))  # the input is untouched


@pytest.mark.parametrize("array, message", [
    (np.zeros((4, 5, 6), np.int16), "^the image is all zeros; nothing to segment$"),
    (np.zeros((0, 5, 6), np.float32), "^the image is all zeros; nothing to segment$"),
    (np.full((4, 5, 6), 12.5, np.float32), r"^the image has a constant intensity \(nearly all its non-zero voxels "
                                           r"are 12.5, as in a mask or a label map\); nothing to segment: give the "
                                           r"grey-level image$"),
    (np.where(np.arange(120).reshape(4, 5, 6) == 7, np.nan, 1.0), "^the image contains NaN or infinite voxels"),
    (np.where(np.arange(120).reshape(4, 5, 6) == 7, np.inf, 1.0), "^the image contains NaN or infinite voxels"),
    (np.where(np.arange(120).reshape(4, 5, 6) == 7, -np.inf, 1.0), "^the image contains NaN or infinite voxels"),
])
def test_images_with_nothing_to_segment_are_refused_in_one_line(array, message):
    with pytest.raises(CDMSegmentError, match=message):
        normalise_volume(array)


def test_an_unknown_normalisation_is_refused():
    with pytest.raises(CDMSegmentError, match="^unknown intensity normalisation 'zscore'; expected 'percentile'$"):
        normalise_volume(np.ones((2, 2, 2)), {"method": "zscore"})


@CUDA
def test_cuda_gives_the_cpus_numbers():
    volume = raw_mri(shape=(40, 120, 100), seed=3).astype(np.float32)
    cpu = normalise_volume(volume, DEFAULT_NORMALISATION, "cpu")
    np.testing.assert_allclose(normalise_volume(volume, DEFAULT_NORMALISATION, "cuda").cpu().numpy(), cpu.numpy(),
                               rtol=0, atol=FLOAT32_ATOL)

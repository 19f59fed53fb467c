"""Content is tissue, not non-zero; what the plausibility check reads from a DICOM header; a non-finite output."""

import numpy as np
import pytest
import torch

from CDMSegmentLib.core.device import check_finite
from CDMSegmentLib.core.errors import CDMSegmentError
from CDMSegmentLib.core.image import Volume
from CDMSegmentLib.core.plausibility import check_plausible, findings, weighting
from CDMSegmentLib.core.tissue import BET_FRACTION, BET_PERCENTILES, slices_with_content, tissue_mask
from conftest import phantom

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]


def numpy_reference(arrays: np.ndarray) -> np.ndarray:
    """The host implementation the device one replaced: BET's threshold compared in float64."""
    mask = np.zeros(arrays.shape[1:], dtype=bool)
    for a in arrays:
        if np.count_nonzero(a == 0) >= 0.05 * a.size:
            mask |= a != 0
        else:
            low, high = np.percentile(a, BET_PERCENTILES)
            mask |= a > low + BET_FRACTION * (high - low)
    return mask


def raw_head(seed: int = 0) -> np.ndarray:
    head = phantom((6, 20, 24)).astype(np.float32)
    return np.where(head == 0, np.random.default_rng(seed).rayleigh(8.0, head.shape), head)


def test_with_a_zero_background_tissue_is_every_non_zero_voxel():
    array = phantom((6, 20, 24))
    np.testing.assert_array_equal(tissue_mask(array), array != 0)


def test_the_noise_of_a_raw_mri_and_the_air_of_a_ct_are_not_tissue():
    head = phantom((6, 20, 24)).astype(np.float32)
    noisy = np.where(head == 0, np.random.default_rng(0).rayleigh(8.0, head.shape), head)
    np.testing.assert_array_equal(tissue_mask(noisy), head != 0)
    ct = np.where(head == 0, -1000.0, 35.0)
    np.testing.assert_array_equal(tissue_mask(ct), head != 0)
    assert tissue_mask(np.stack([noisy, ct])).sum() == (head != 0).sum()  # modalities: union


@pytest.mark.parametrize("device", DEVICES)
def test_the_device_mask_is_numpys_for_mri_ct_and_several_modalities(device):
    ct = np.where(phantom((6, 20, 24)) == 0, -1000, 35).astype(np.int16)
    for arrays in (raw_head()[None], raw_head().astype(np.uint16)[None], ct[None], phantom((6, 20, 24))[None],
                   np.stack([raw_head(1), ct])):
        mask = tissue_mask(torch.from_numpy(arrays).to(device))
        assert mask.dtype == torch.bool and mask.device.type == device
        np.testing.assert_array_equal(mask.cpu().numpy(), numpy_reference(arrays))
    modalities = [torch.from_numpy(raw_head(1)).to(device), torch.from_numpy(ct).to(device)]  # two dtypes
    np.testing.assert_array_equal(tissue_mask(modalities).cpu().numpy(), numpy_reference(np.stack([raw_head(1), ct])))


def test_a_voxel_just_above_bets_threshold_is_tissue_as_in_float64():
    """Half the voxels at 10, half at 1000.03: BET's threshold 109.0030029... rounds up to the float32 109.0030060;
    a voxel holding that float32 lies above the threshold, which a float32 comparison with the rounded value misses."""
    low, high = np.float32(10.0), np.float32(1000.03)
    threshold = float(low) + BET_FRACTION * (float(high) - float(low))
    assert float(np.float32(threshold)) > threshold
    array = np.where(np.arange(1000).reshape(10, 10, 10) % 2 == 0, low, high)
    array[5, 5, 5] = np.float32(threshold)
    assert tissue_mask(array)[5, 5, 5] and numpy_reference(array[None])[5, 5, 5]


def test_a_slice_runs_when_a_thousandth_of_it_is_tissue():
    tissue = np.zeros((3, 100, 100), bool)
    tissue[1, :1, :9] = True  # 9 voxels < 10
    tissue[2, :1, :10] = True
    assert slices_with_content(tissue).tolist() == [2]
    assert slices_with_content(torch.from_numpy(tissue)).tolist() == [2]


@CUDA
def test_cuda_finds_the_cpus_tissue_and_slices():
    arrays = np.stack([raw_head(2), raw_head(3)])
    cpu, gpu = tissue_mask(arrays), tissue_mask(arrays, "cuda")
    assert torch.equal(gpu.cpu(), cpu)
    assert slices_with_content(gpu).tolist() == slices_with_content(cpu).tolist()


@pytest.mark.parametrize("tags, expected", [
    ({"RepetitionTime": "9000", "EchoTime": "90", "InversionTime": "2500"}, "FLAIR"),
    ({"RepetitionTime": "500", "EchoTime": "12"}, "T1"),
    ({"RepetitionTime": "2300", "EchoTime": "3", "InversionTime": "900"}, "T1"),  # MPRAGE
    ({"RepetitionTime": "3000", "EchoTime": "15"}, "PD"),
    ({"RepetitionTime": "4000", "EchoTime": "100"}, "T2"),
    ({"SeriesDescription": "AX T2 FLAIR"}, "FLAIR"),
    ({}, None),
])
def test_the_weighting_of_a_dicom_series_comes_from_its_times(tags, expected):
    assert weighting(tags) == expected


def test_a_model_without_expects_claims_nothing_and_nothing_is_checked():
    ct = Volume(np.full((4, 8, 8), -1000, np.int16))
    assert findings({"modalities": ["FLAIR"]}, [ct], ["FLAIR"]) == []
    meta = {"modalities": ["FLAIR"], "expects": {"modality": "FLAIR", "description": "brain MRI (FLAIR)"}}
    with pytest.raises(CDMSegmentError, match="looks like a CT.*takes brain MRI \\(FLAIR\\).*--force"):
        check_plausible(meta, [ct], ["FLAIR"])
    assert "run anyway" in check_plausible(meta, [ct], ["FLAIR"], force=True)[0]


def test_a_non_finite_output_names_the_likely_cause():
    maps = torch.tensor([0.0, float("nan")])
    with pytest.raises(CDMSegmentError, match="half precision.*fp32"):
        check_finite(maps, torch.device("cpu"), "fp16")
    with pytest.raises(CDMSegmentError, match="model file is probably damaged"):
        check_finite(maps, torch.device("cpu"), "fp32")
    assert check_finite(maps[:1], torch.device("cpu"), "fp32") is not None

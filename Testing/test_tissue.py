"""Content is tissue, not non-zero; what the plausibility check reads from a DICOM header; a non-finite output."""

import numpy as np
import pytest
import torch

from CDMSegmentLib.core.device import check_finite
from CDMSegmentLib.core.errors import CDMSegmentError
from CDMSegmentLib.core.image import Volume
from CDMSegmentLib.core.plausibility import check_plausible, findings, weighting
from CDMSegmentLib.core.tissue import slices_with_content, tissue_mask
from conftest import phantom


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


def test_a_slice_runs_when_a_thousandth_of_it_is_tissue():
    tissue = np.zeros((3, 100, 100), bool)
    tissue[1, :1, :9] = True  # 9 voxels < 10
    tissue[2, :1, :10] = True
    assert slices_with_content(tissue).tolist() == [2]


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

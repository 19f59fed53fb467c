"""Growing the CDM's mask through the lesion's intensity (core/refine.py)."""

import numpy as np
import pytest

from conftest import phantom
from CDMSegmentLib.core.errors import CDMSegmentError
from CDMSegmentLib.core.image import Volume
from CDMSegmentLib.core.refine import grow_through_intensity, supported_components
from CDMSegmentLib.core.runner import segment_volume


def brain_with_two_bright_regions():
    """(10, 20, 20): brain at 100, a 'lesion' block at 200, a bright normal rim at 200, background 0."""
    image = np.zeros((10, 20, 20), np.float32)
    image[1:9, 2:18, 2:18] = 100
    image[3:6, 4:8, 4:8] = 200  # lesion: 48 voxels
    image[1:9, 15:17, 2:18] = 200  # bright rim, not touched by the CDM
    return image, image > 0


def test_only_the_bright_components_the_mask_touches_are_taken_and_the_mask_is_kept():
    image, content = brain_with_two_bright_regions()
    mask = np.zeros(image.shape, bool)
    mask[4, 5, 5] = True  # the CDM found the lesion's middle
    mask[7, 10, 10] = True  # and a faint spot the threshold does not see
    grown = grow_through_intensity(mask, image, content, 1.5)
    assert grown.dtype == np.uint8
    assert grown[3:6, 4:8, 4:8].all() and grown[7, 10, 10] == 1
    assert grown.sum() == 48 + 1  # the rim stays out
    assert not grown[:, 15:17].any()


def test_an_empty_mask_stays_empty_and_a_meaningless_threshold_is_refused():
    image, content = brain_with_two_bright_regions()
    assert grow_through_intensity(np.zeros(image.shape, bool), image, content, 1.5).sum() == 0
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(CDMSegmentError, match="growth threshold must be a number above 0"):
            grow_through_intensity(np.ones(image.shape, bool), image, content, bad)


def test_the_runner_grows_the_cdm_mask_when_asked_and_not_by_default(tiny_model):
    volume = Volume(phantom((6, 20, 24)))
    plain = segment_volume(tiny_model, [volume], device="cpu", threshold=0.0, force=True, log=lambda m: None)
    assert plain.mask.any()
    grown = segment_volume(tiny_model, [volume], device="cpu", threshold=0.0, force=True, grow_above=1.01,
                           log=lambda m: None)
    assert grown.mask.sum() >= plain.mask.sum()
    np.testing.assert_array_equal(grown.mask[plain.mask > 0], 1)


def test_the_supported_components_are_the_grown_mask_without_the_cdms_own_voxels():
    image, content = brain_with_two_bright_regions()
    mask = np.zeros(image.shape, bool)
    mask[4, 5, 5] = mask[7, 10, 10] = True
    supported = supported_components(mask, image, content, 1.5)
    assert supported.dtype == bool and supported.sum() == 48 and supported[3:6, 4:8, 4:8].all()

"""Metrics against hand-computed values, including how empty masks are counted."""

import math

import numpy as np
import pytest

from CDMSegmentLib.core.errors import CDMSegmentError
from CDMSegmentLib.evaluation.metrics import dice, false_positive_pixels, hd95, iou, nan_mean, pixel_auroc


def squares():
    a = np.zeros((10, 10), bool)
    b = a.copy()
    a[2:5, 2:5] = True  # 9 pixels
    b[2:5, 3:6] = True  # 9 pixels, 6 shared
    return a, b


def test_dice_and_iou_of_shifted_squares():
    a, b = squares()
    assert dice(a, b) == pytest.approx(2 * 6 / 18)
    assert iou(a, b) == pytest.approx(6 / 12)


def test_dice_and_iou_are_nan_when_both_masks_are_empty_and_zero_when_one_is():
    empty = np.zeros((4, 4), bool)
    one = empty.copy()
    one[1, 1] = True
    assert math.isnan(dice(empty, empty)) and math.isnan(iou(empty, empty))
    assert dice(empty, one) == 0.0 and iou(one, empty) == 0.0


def test_hd95_of_two_pixels_is_their_distance_in_mm():
    a = np.zeros((8, 8), bool)
    b = a.copy()
    a[1, 1] = True
    b[1, 4] = True
    assert hd95(a, b, (1.0, 1.0)) == 3.0
    assert hd95(a, b, (2.0, 0.5)) == 1.5  # columns are 0.5 mm apart
    b2 = np.zeros_like(a)
    b2[5, 1] = True
    assert hd95(a, b2, (2.0, 0.5)) == 8.0  # rows are 2 mm apart
    # with both pixels in one mask, its directed distances are {0, 8}: the 95th percentile interpolates to 7.6
    assert hd95(a, a | b2, (2.0, 0.5)) == pytest.approx(7.6)


def test_hd95_of_squares_shifted_by_one_column_is_one_pixel():
    a, b = squares()
    assert hd95(a, b, (1.0, 1.0)) == 1.0
    assert hd95(a, a, (1.0, 1.0)) == 0.0


def test_hd95_is_nan_not_zero_when_a_mask_is_empty():
    a, _ = squares()
    empty = np.zeros_like(a)
    assert math.isnan(hd95(empty, a, (1.0, 1.0)))
    assert math.isnan(hd95(a, empty, (1.0, 1.0)))


def test_hd95_rejects_a_spacing_of_the_wrong_length():
    a, b = squares()
    with pytest.raises(CDMSegmentError, match="spacing"):
        hd95(a, b, (1.0,))


def test_shape_mismatch_is_an_error():
    with pytest.raises(CDMSegmentError, match="differ in shape"):
        dice(np.zeros((2, 2)), np.zeros((3, 3)))


def test_pixel_auroc_matches_the_hand_count_and_is_nan_with_one_class():
    # positives 0.35, 0.8 against negatives 0.1, 0.4: 3 of 4 pairs ranked right
    assert pixel_auroc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == 0.75
    assert math.isnan(pixel_auroc(np.array([0.1, 0.2]), np.array([0, 0])))


def test_false_positives_and_nan_mean():
    a, b = squares()
    assert false_positive_pixels(a, b) == 3
    assert false_positive_pixels(a, np.zeros_like(a)) == 9
    assert nan_mean([1.0, math.nan, 3.0]) == (2.0, 1)
    mean, undefined = nan_mean([math.nan])
    assert math.isnan(mean) and undefined == 1

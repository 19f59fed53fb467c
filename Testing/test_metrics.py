"""Metrics against hand-computed values, including how empty masks are counted."""

import math

import numpy as np
import pytest

from CDMSegmentLib.core.errors import CDMSegmentError
from CDMSegmentLib.evaluation.metrics import (DiceParts, LesionCounts, dice, dice_parts, false_positive_pixels, hd95,
                                             iou, lesion_counts, nan_mean, pixel_auroc)


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


def test_lesion_counts_count_each_lesion_once_whatever_its_volume():
    truth = np.zeros((8, 20, 20), bool)
    truth[1:7, 2:12, 2:12] = True  # one large lesion, 600 voxels
    truth[2, 15, 15] = truth[5, 17, 3] = True  # two one-voxel lesions
    truth[6, 15:17, 15:17] = True  # a fourth, 4 voxels
    prediction = np.zeros(truth.shape, bool)
    prediction[1:7, 2:12, 3:12] = True  # nine tenths of the large lesion
    prediction[6, 16, 16] = True  # one voxel of the fourth
    prediction[0, 18:20, 0:2] = True  # a region far from every lesion
    prediction[2, 14, 14] = True  # next to the second lesion only diagonally: no overlap, a false region
    assert lesion_counts(prediction, truth) == LesionCounts(lesions=4, found=2, false_regions=2)
    assert dice(prediction, truth) > 0.9  # Dice, ruled by the large lesion, hides the two lesions missed
    # a region covering two lesions finds both and is one region; diagonal neighbours are separate lesions
    joined = np.zeros((3, 6, 6), bool)
    joined[1, 1, 1] = joined[1, 2, 2] = True
    cover = np.zeros(joined.shape, bool)
    cover[1, 1:3, 1:3] = True
    assert lesion_counts(cover, joined) == LesionCounts(2, 2, 0)
    assert lesion_counts(np.zeros(joined.shape, bool), joined) == LesionCounts(2, 0, 0)
    assert lesion_counts(cover, np.zeros(joined.shape, bool)) == LesionCounts(0, 0, 1)
    with pytest.raises(CDMSegmentError, match="differ in shape"):
        lesion_counts(cover, joined[:2])


def test_dice_parts_split_the_dice_into_lesions_missed_false_regions_and_the_delineation_of_the_rest():
    truth = np.zeros((8, 20, 20), bool)
    truth[1:7, 2:12, 2:12] = True  # 600 voxels, found
    truth[2, 15:18, 15:18] = True  # 9 voxels, missed
    prediction = np.zeros(truth.shape, bool)
    prediction[1:7, 2:12, 3:13] = True  # 600 voxels, 540 on the lesion
    prediction[0, 18:20, 0:2] = True  # 4 voxels touching no lesion
    parts = dice_parts(prediction, truth)
    assert parts == DiceParts(missed_voxels=9, false_region_voxels=4, found_dice=pytest.approx(2 * 540 / 1200))
    # the parts account for the whole Dice: 2 x overlap / (predicted + lesion voxels)
    overlap = parts.found_dice * (600 + 600) / 2
    assert dice(prediction, truth) == pytest.approx(2 * overlap / (604 + 609))
    # nothing found: no delineation to measure; no lesion: every region is false
    assert math.isnan(dice_parts(np.zeros(truth.shape, bool), truth).found_dice)
    assert dice_parts(np.zeros(truth.shape, bool), truth).missed_voxels == 609
    empty = dice_parts(prediction, np.zeros(truth.shape, bool))
    assert empty.false_region_voxels == 604 and empty.missed_voxels == 0 and math.isnan(empty.found_dice)
    with pytest.raises(CDMSegmentError, match="differ in shape"):
        dice_parts(prediction, truth[:2])

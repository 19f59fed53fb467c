"""Growing the CDM's mask through the lesion's intensity (core/refine.py)."""

import numpy as np
import pytest

from conftest import fragments_beside_a_lesion, phantom
from CDMSegmentLib.core.errors import CDMSegmentError
from CDMSegmentLib.core.image import Volume
from CDMSegmentLib.core.refine import (apply_refinement, grow_through_intensity, heatmap_supported_components,
                                       lesion_intensity_components, refinement_parts, small_lesion_components,
                                       strong_findings, supported_components)
from CDMSegmentLib.core.runner import refine_mask, segment_volume
from CDMSegmentLib.core.threshold import voxels_for_ml
from CDMSegmentLib.core.settings import CDMParams
from CDMSegmentLib.core.tissue import tissue_mask


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


def brain_with_a_lesion(contrast: float):
    """(10, 24, 24): brain at 100 with a bright normal rim at 250, and a 4x6x6 lesion at ``contrast`` x 100
    whose inner 2x4x4 is brighter still (a core): the level must come from the lesion, not a fixed number."""
    image = np.zeros((10, 24, 24), np.float32)
    image[1:9, 2:22, 2:22] = 100
    image[1:9, 19:21, 2:22] = 250  # bright normal rim, never touched by the CDM
    image[3:7, 4:10, 4:10] = 100 * contrast
    image[4:6, 5:9, 5:9] = 100 * contrast * 1.2
    return image, image > 0


@pytest.mark.parametrize("contrast", [1.3, 2.5])
def test_the_lesion_intensity_level_follows_the_lesion_found_faint_or_bright(contrast):
    image, content = brain_with_a_lesion(contrast)
    mask = np.zeros(image.shape, bool)
    mask[4:6, 5:9, 5:9] = True  # the CDM found the core only
    refined = lesion_intensity_components(mask, image, content, fraction=0.7, floor=1.1)
    assert refined.dtype == np.uint8
    lesion = np.zeros(image.shape, bool)
    lesion[3:7, 4:10, 4:10] = True
    np.testing.assert_array_equal(refined > 0, lesion)  # the whole lesion, not the rim, not the brain
    # a fixed level suits only one of the two contrasts
    fixed = supported_components(mask, image, content, 1.64)
    assert fixed.sum() == (lesion.sum() if contrast > 1.64 else 0)


def test_each_lesion_found_has_its_own_level_so_a_faint_one_beside_a_bright_one_is_kept_whole():
    """Two lesions of 4x6x6 in a brain at 100: a bright one at 300 (core 360) and a faint one at 150 (core 180),
    the CDM's mask on both cores. One level for the whole mask, 0.7 x its median (270), lies above the faint
    lesion's every voxel and would drop it; each lesion's own level (252 and 126) keeps both, and no brain."""
    image = np.zeros((10, 24, 40), np.float32)
    image[1:9, 2:22, 2:38] = 100
    bright, faint = np.zeros(image.shape, bool), np.zeros(image.shape, bool)
    bright[3:7, 4:10, 4:10] = True
    faint[3:7, 4:10, 24:30] = True
    image[bright], image[faint] = 300, 150
    mask = np.zeros(image.shape, bool)
    mask[4:6, 5:9, 5:9] = mask[4:6, 5:9, 25:29] = True
    image[mask & bright], image[mask & faint] = 360, 180
    refined = lesion_intensity_components(mask, image, image > 0, fraction=0.7, floor=1.1, min_support=0.2)
    np.testing.assert_array_equal(refined > 0, bright | faint)
    assert 0.7 * float(np.median(image[mask])) > image[faint].max()  # the one level the test rules out
    # the faint lesion alone, found alone, is delineated the same: its level does not depend on the other
    alone = lesion_intensity_components(mask & faint, image, image > 0, fraction=0.7, floor=1.1, min_support=0.2)
    np.testing.assert_array_equal(alone > 0, faint)


def test_the_floor_keeps_the_level_above_the_brain_and_support_drops_components_the_cdm_barely_touches():
    image, content = brain_with_a_lesion(2.5)
    mask = np.zeros(image.shape, bool)
    mask[2, 10, 10] = True  # one brain voxel at 1.0 x the median: without a floor the whole brain joins
    assert lesion_intensity_components(mask, image, content, 0.7, floor=0.0).sum() == content.sum()
    assert lesion_intensity_components(mask, image, content, 0.7, floor=1.1).sum() == 0
    mask = np.zeros(image.shape, bool)
    mask[4, 5, 5] = True  # 1 of the lesion's 144 voxels (its core's level sets the threshold)
    assert lesion_intensity_components(mask, image, content, 0.5, floor=1.1, min_support=0.0).sum() == 144
    assert lesion_intensity_components(mask, image, content, 0.5, floor=1.1, min_support=0.1).sum() == 0


def test_lesion_intensity_refuses_meaningless_numbers_and_keeps_an_empty_mask_empty():
    image, content = brain_with_a_lesion(2.0)
    assert lesion_intensity_components(np.zeros(image.shape, bool), image, content, 0.7).sum() == 0
    for fraction, floor, support in ((0.0, 1.0, 0.1), (1.5, 1.0, 0.1), (float("nan"), 1.0, 0.1),
                                     (0.7, -1.0, 0.1), (0.7, 1.0, 1.5)):
        with pytest.raises(CDMSegmentError, match="lesion intensity"):
            lesion_intensity_components(np.ones(image.shape, bool), image, content, fraction, floor, support)


def test_the_runner_applies_the_models_lesion_intensity_by_default_and_not_when_turned_off(tiny_model):
    volume = Volume(phantom((6, 20, 24)))
    options = dict(device="cpu", threshold=0.0, force=True, log=lambda m: None)
    plain = segment_volume(tiny_model, [volume], **options)
    tiny_model.metadata["defaults"] = {**tiny_model.defaults, "lesion_intensity": 0.9, "lesion_intensity_floor": 1.0}
    try:
        by_default = segment_volume(tiny_model, [volume], **options)
        off = segment_volume(tiny_model, [volume], lesion_intensity=0.0, **options)
    finally:
        tiny_model.metadata["defaults"].pop("lesion_intensity")
    expected = lesion_intensity_components(plain.mask, volume.array, tissue_mask(volume.array).cpu().numpy(), 0.9, 1.0)
    np.testing.assert_array_equal(by_default.mask, expected)
    np.testing.assert_array_equal(off.mask, plain.mask)
    assert not np.array_equal(by_default.mask, plain.mask)
    median = float(np.median(volume.array[tissue_mask(volume.array).cpu().numpy()]))
    assert by_default.refinement == {"lesion_intensity": 0.9, "lesion_intensity_floor": 1.0, "lesion_support": 0.0,
                                     "brain_median": median}
    assert plain.refinement is None and off.refinement is None
    with pytest.raises(CDMSegmentError, match="lesion_intensity"):
        segment_volume(tiny_model, [volume], lesion_intensity=1.5, **options)


@pytest.mark.parametrize("floor", [1.0, 1.4])
def test_a_mask_re_made_from_the_brains_median_alone_is_the_runs(floor):
    """What a new threshold in Slicer does: no tissue mask, the run's brain median; with a floor of 1 or more the
    voxels above the level all lie in the tissue, so the result is the run's."""
    image, _ = brain_with_a_lesion(1.6)
    image = image + 30.0  # a background that is not zero: the tissue is found by its level, not by exact zeros
    content = tissue_mask(image).cpu().numpy()
    mask = np.zeros(image.shape, bool)
    mask[4:6, 5:9, 5:9] = True
    mask[2, 20, 5] = True  # and a voxel of the bright rim
    run = lesion_intensity_components(mask, image, content, 0.7, floor)
    refinement = {"lesion_intensity": 0.7, "lesion_intensity_floor": floor, "lesion_support": 0.0,
                  "brain_median": float(np.median(image[content]))}
    assert run.sum() > 144
    np.testing.assert_array_equal(apply_refinement(mask, image, None, refinement), run)
    with pytest.raises(CDMSegmentError, match="needs the brain's median intensity or its tissue mask"):
        lesion_intensity_components(mask, image, None, 0.7, floor)


def empty_brain_and_heatmap():
    """(10, 24, 24) image, brain at 100 in [1:9, 2:22, 2:22] and background 0, and a heatmap of zeros."""
    image = np.zeros((10, 24, 24), np.float32)
    image[1:9, 2:22, 2:22] = 100
    return image, np.zeros(image.shape, np.float32)


def brain_with_a_faint_lesion_the_heatmap_supports():
    """(10, 24, 24): brain at 100; a faint lesion at 125 (4x6x6 = 144 voxels) where the heatmap is 0.4, under the
    threshold 1.0 everywhere; a bright normal rim at 160 (8x2x20 = 320 voxels) where the heatmap is 0 but for 4
    voxels at 2.0 (its mean 0.025); a 2-voxel faint speck at 125 with heatmap 0.9."""
    image, heatmap = empty_brain_and_heatmap()
    image[3:7, 4:10, 4:10] = 125
    heatmap[3:7, 4:10, 4:10] = 0.4
    image[1:9, 19:21, 2:22] = 160
    heatmap[4, 19:21, 10:12] = 2.0
    image[7, 14, 14:16] = 125
    heatmap[7, 14, 14:16] = 0.9
    return image, image > 0, heatmap


def test_the_heatmap_supports_a_faint_lesion_under_its_threshold_and_not_bright_normal_tissue():
    image, content, heatmap = brain_with_a_faint_lesion_the_heatmap_supports()
    supported = heatmap_supported_components(heatmap, 1.0, image, content, 1.2, 0.3, 3)
    assert supported.dtype == bool
    assert supported[3:7, 4:10, 4:10].all() and supported.sum() == 144  # the rim and the 2-voxel speck stay out
    assert heatmap_supported_components(heatmap, 1.0, image, content, 1.2, 0.3, 1).sum() == 146  # speck kept
    assert heatmap_supported_components(heatmap, 1.0, image, content, 1.2, 0.5, 1).sum() == 2  # lesion's mean 0.4
    assert not heatmap_supported_components(heatmap, 1.0, image, content, 1.3, 0.3, 1).any()  # under the floor
    assert not heatmap_supported_components(heatmap, 1.0, image, content, 1.2, 0.0, 1).any()  # 0: off
    # the support is a share of the threshold: at threshold 2 the lesion's mean 0.4 is 0.2 of it
    assert not heatmap_supported_components(heatmap, 2.0, image, content, 1.2, 0.3, 3).any()
    for floor, support in ((-1.0, 0.3), (1.2, -0.1), (float("nan"), 0.3), (1.2, float("inf"))):
        with pytest.raises(CDMSegmentError, match="heatmap support's floor and share"):
            heatmap_supported_components(heatmap, 1.0, image, content, floor, support)
    with pytest.raises(CDMSegmentError, match="needs the brain's median intensity or its tissue mask"):
        heatmap_supported_components(heatmap, 1.0, image, None, 1.2, 0.3)


def test_a_refinement_with_heatmap_support_adds_the_faint_lesion_also_from_the_brains_median_alone():
    """The CDM's mask found nothing (all under the threshold): the lesion-intensity step alone gives nothing, the
    heatmap support gives the faint lesion; a mask re-made in Slicer (no tissue mask, the run's median) is the
    same; without the heatmap such a refinement cannot be applied."""
    image, content, heatmap = brain_with_a_faint_lesion_the_heatmap_supports()
    empty = np.zeros(image.shape, bool)
    refinement = {"lesion_intensity": 0.7, "lesion_intensity_floor": 1.4, "lesion_support": 0.1,
                  "brain_median": float(np.median(image[content]))}
    assert apply_refinement(empty, image, content, refinement).sum() == 0
    refinement.update(heatmap_floor=1.2, heatmap_support=0.3, min_component_voxels=3)
    run = apply_refinement(empty, image, content, refinement, heatmap, 1.0)
    assert run.dtype == np.uint8 and run.sum() == 144 and run[3:7, 4:10, 4:10].all()
    np.testing.assert_array_equal(apply_refinement(empty, image, None, refinement, heatmap, 1.0), run)
    with pytest.raises(CDMSegmentError, match="needs the heatmap and its threshold"):
        apply_refinement(empty, image, content, refinement)


def test_the_runner_adds_the_heatmap_supported_components_where_the_model_has_heatmap_support(tiny_model):
    volume = Volume(phantom((6, 20, 24)))
    options = dict(device="cpu", force=True, log=lambda m: None)
    plain = segment_volume(tiny_model, [volume], lesion_intensity=0.0, **options)
    threshold = float(np.quantile(plain.heatmap[plain.heatmap > 0], 0.99))  # a mask of a few voxels
    defaults = {"lesion_intensity": 0.9, "lesion_intensity_floor": 1.0, "heatmap_floor": 1.0, "heatmap_support": 0.05}
    saved = dict(tiny_model.metadata["defaults"])
    tiny_model.metadata["defaults"] = {**saved, **defaults}
    try:
        supported = segment_volume(tiny_model, [volume], threshold=threshold, **options)
        off = segment_volume(tiny_model, [volume], threshold=threshold, lesion_intensity=0.0, **options)
        tiny_model.metadata["defaults"]["heatmap_support"] = 0.0
        without = segment_volume(tiny_model, [volume], threshold=threshold, **options)
    finally:
        tiny_model.metadata["defaults"] = saved
    content = tissue_mask(volume.array).cpu().numpy()
    expected = without.mask.astype(bool) | heatmap_supported_components(
        supported.heatmap, threshold, volume.array, content, 1.0, 0.05, supported.min_component_voxels)
    np.testing.assert_array_equal(supported.mask, expected.astype(np.uint8))
    assert supported.mask.sum() > without.mask.sum()
    assert supported.supported_voxels == int((supported.mask > without.mask).sum()) > 0
    assert without.supported_voxels == 0 and off.supported_voxels == 0
    assert supported.refinement["heatmap_floor"] == 1.0 and supported.refinement["heatmap_support"] == 0.05
    assert supported.refinement["min_component_voxels"] == supported.min_component_voxels
    assert "heatmap_support" not in without.refinement and off.refinement is None
    np.testing.assert_array_equal(off.mask, segment_volume(tiny_model, [volume], threshold=threshold,
                                                           lesion_intensity=0.0, **options).mask)


def brain_with_a_lesion_and_a_weak_finding():
    """(10, 24, 24): brain at 100; a lesion at 200 (6x8x8 = 384 voxels) whose heatmap is 3.0 at its core (2x2x2)
    and 1.5 over a 4x4x4 shell around it; a bright normal spot at 200 (2x2x2) where the heatmap is 1.2."""
    image, heatmap = empty_brain_and_heatmap()
    image[2:8, 4:12, 4:12] = 200
    heatmap[3:7, 6:10, 6:10] = 1.5
    heatmap[4:6, 7:9, 7:9] = 3.0
    image[6:8, 16:18, 16:18] = 200
    heatmap[6:8, 16:18, 16:18] = 1.2
    return image, image > 0, heatmap


def test_a_threshold_above_the_calibrated_one_drops_the_weakest_findings_not_the_lesions_edge():
    """The refinement's support (0.15) was chosen at threshold 1.0, where the CDM's mask covers 64 of the lesion's
    384 voxels. At 2.0 the mask is the 8-voxel core (2 %): measured on it, the whole lesion would drop out;
    measured on the mask at the calibrated threshold, the lesion stays as it was and the weak spot goes. Under
    the calibrated threshold nothing changes."""
    image, content, heatmap = brain_with_a_lesion_and_a_weak_finding()
    refinement = {"lesion_intensity": 0.7, "lesion_intensity_floor": 1.4, "lesion_support": 0.15,
                  "brain_median": 100.0, "min_component_voxels": 1}
    calibrated = dict(refinement, calibrated_threshold=1.0)
    lesion, spot = np.zeros(image.shape, bool), np.zeros(image.shape, bool)
    lesion[2:8, 4:12, 4:12] = spot[6:8, 16:18, 16:18] = True

    def remade(rule, threshold):
        return apply_refinement(heatmap > threshold, image, None, rule, heatmap, threshold) > 0

    np.testing.assert_array_equal(remade(calibrated, 1.0), lesion | spot)
    np.testing.assert_array_equal(remade(refinement, 1.0), lesion | spot)
    np.testing.assert_array_equal(remade(calibrated, 2.0), lesion)
    assert not remade(refinement, 2.0).any()  # the collapse the calibrated threshold prevents
    np.testing.assert_array_equal(remade(calibrated, 0.5), remade(refinement, 0.5))
    assert not remade(calibrated, 3.0).any()  # above the heatmap's maximum: nothing found


def test_the_runner_records_the_calibrated_threshold_only_at_the_settings_it_was_calibrated_at(tiny_model):
    volume = Volume(phantom((6, 20, 24)))
    options = dict(device="cpu", force=True, log=lambda m: None)
    saved = dict(tiny_model.metadata["defaults"])
    tiny_model.metadata["defaults"] = {**saved, "lesion_intensity": 0.9, "lesion_intensity_floor": 1.0,
                                       "threshold": 1e-4}
    try:
        at_defaults = segment_volume(tiny_model, [volume], **options)
        other = segment_volume(tiny_model, [volume], params=CDMParams.for_model(tiny_model, noise_level=0.5),
                               **options)
    finally:
        tiny_model.metadata["defaults"] = saved
    assert at_defaults.refinement["calibrated_threshold"] == 1e-4 == at_defaults.threshold
    assert at_defaults.refinement["min_component_voxels"] == at_defaults.min_component_voxels
    assert "calibrated_threshold" not in other.refinement  # a heatmap of another scale: 1e-4 means nothing there


def lesion_on_the_bright_cortex():
    """(10, 24, 24): brain at 100, a bright cortex at 170 (8x2x20 = 320 voxels), a lesion at 200 (4x6x6 = 144
    voxels) that reaches into it, so that above 1.4 x the brain both form one component of 416 voxels; the CDM's
    mask (2x5x4 = 40 voxels, 32 of them on the lesion, 8 on the brain beside it) covers 8 % of it. The heatmap is
    1.2 on the mask and 3.0 on its core (2x2x2)."""
    image, heatmap = empty_brain_and_heatmap()
    image[1:9, 19:21, 2:22] = 170
    image[3:7, 15:21, 8:14] = 200
    mask = np.zeros(image.shape, bool)
    mask[4:6, 14:19, 9:13] = True
    heatmap[mask] = 1.2
    heatmap[4:6, 16:18, 10:12] = 3.0
    return image, image > 0, mask, heatmap


def test_a_strong_finding_on_the_bright_cortex_keeps_its_own_bright_voxels_where_the_support_drops_it():
    image, content, mask, heatmap = lesion_on_the_bright_cortex()
    options = dict(fraction=0.7, floor=1.4, min_support=0.2)
    assert not lesion_intensity_components(mask, image, content, **options).any()  # 40 of 416 < 20 %
    strong = strong_findings(mask, heatmap, 2.5, 20)
    np.testing.assert_array_equal(strong, mask)
    kept = lesion_intensity_components(mask, image, content, strong=strong, **options)
    np.testing.assert_array_equal(kept > 0, mask & (image == 200))  # its own bright voxels: 32, not the brain's 8
    assert kept.sum() == 32
    # too weak a peak, too small a finding, or the rule off: nothing is strong
    for peak, voxels in ((3.5, 20), (2.5, 41), (2.5, 0), (float("nan"), 20)):
        assert not strong_findings(mask, heatmap, peak, voxels).any()
    # a finding the support keeps is kept whole, strong or not
    lesion = np.zeros(image.shape, bool)
    lesion[3:7, 4:10, 4:10] = True
    image[lesion] = 200
    found = np.zeros(image.shape, bool)
    found[4:6, 5:9, 5:9] = True
    both = lesion_intensity_components(found, image, content, strong=found, **options)
    np.testing.assert_array_equal(both > 0, lesion)


def test_a_refinement_with_strong_findings_measures_the_peak_at_the_threshold_the_findings_are_made_at():
    """The peak is a multiple of the threshold the findings are measured at: at the calibrated threshold 1.0 the
    finding (40 voxels, peak 3.0) is strong for a peak of 2.5; re-made at 1.5 with the calibrated threshold the
    same finding is measured, and stays; without it the finding is the 8-voxel core, whose peak 3.0 is under
    2.5 x 1.5, and it goes."""
    image, content, mask, heatmap = lesion_on_the_bright_cortex()
    refinement = {"lesion_intensity": 0.7, "lesion_intensity_floor": 1.4, "lesion_support": 0.2,
                  "brain_median": 100.0, "min_component_voxels": 1, "strong_finding_voxels": 5,
                  "strong_finding_peak": 2.5}
    own = mask & (image == 200)

    def remade(rule, threshold):
        return apply_refinement(heatmap > threshold, image, None, rule, heatmap, threshold) > 0

    np.testing.assert_array_equal(remade(refinement, 1.0), own)
    assert not remade({**refinement, "strong_finding_peak": 3.5}, 1.0).any()
    assert not remade({**refinement, "strong_finding_voxels": 0}, 1.0).any()
    np.testing.assert_array_equal(remade({**refinement, "calibrated_threshold": 1.0}, 1.5), own)
    assert not remade(refinement, 1.5).any()
    with pytest.raises(CDMSegmentError, match="keeps its strong findings, and needs the heatmap and its threshold"):
        apply_refinement(mask, image, content, refinement)


def test_refine_mask_records_the_strong_findings_smallest_size_in_voxels_at_the_volumes_spacing():
    image, content, mask, heatmap = lesion_on_the_bright_cortex()
    defaults = {"lesion_intensity": 0.7, "lesion_intensity_floor": 1.4, "lesion_support": 0.2,
                "strong_finding_ml": 0.1, "strong_finding_peak": 2.5}
    refined, refinement, _ = refine_mask(mask, image, content, defaults, "cdm", heatmap=heatmap, threshold=1.0,
                                         spacing_mm=(2.0, 2.0, 2.0))
    assert refinement["strong_finding_voxels"] == voxels_for_ml(0.1, (2.0, 2.0, 2.0)) == 12
    assert refinement["strong_finding_peak"] == 2.5
    np.testing.assert_array_equal(refined > 0, mask & (image == 200))
    # 0.4 ml at 2 mm is 50 voxels: the 40-voxel finding is not strong, and the support drops it
    assert not refine_mask(mask, image, content, {**defaults, "strong_finding_ml": 0.4}, "cdm", heatmap=heatmap,
                           threshold=1.0, spacing_mm=(2.0, 2.0, 2.0))[0].any()
    off, refinement, _ = refine_mask(mask, image, content, {**defaults, "strong_finding_ml": 0.0}, "cdm",
                                     heatmap=heatmap, threshold=1.0)
    assert not off.any() and "strong_finding_voxels" not in refinement
    with pytest.raises(CDMSegmentError, match="needs the voxel spacing"):
        refine_mask(mask, image, content, defaults, "cdm", heatmap=heatmap, threshold=1.0)
    for peak in ({}, {"strong_finding_peak": 0.0}):  # a peak of 0 would make every large finding strong
        without = {key: value for key, value in defaults.items() if key != "strong_finding_peak"}
        with pytest.raises(CDMSegmentError, match="strong_finding_ml needs a strong_finding_peak above 0"):
            refine_mask(mask, image, content, {**without, **peak}, "cdm", heatmap=heatmap, threshold=1.0,
                        spacing_mm=(2.0, 2.0, 2.0))


def small_lesion_volume():
    """(10, 24, 24), brain at 100: a small lesion at 250 (2x3x3 = 18 voxels) where the heatmap peaks at 0.3 and
    is 0.1 around it, under the threshold 1 (the CDM's mask is empty); a bright normal rim at 250 (8x2x20 = 320
    voxels) where the heatmap reaches 0.5 on a few voxels; a bright 2x2x2 spot (8 voxels) where it is 0."""
    image = np.zeros((10, 24, 24), np.float32)
    heatmap = np.zeros(image.shape, np.float32)
    image[1:9, 2:22, 2:22] = 100
    lesion = np.zeros(image.shape, bool)
    lesion[4:6, 6:9, 6:9] = True
    image[lesion] = 250
    heatmap[3:7, 5:10, 5:10] = 0.1
    heatmap[4, 7, 7] = 0.3
    image[1:9, 19:21, 2:22] = 250
    heatmap[4:6, 19:21, 10:12] = 0.5
    image[6:8, 12:14, 12:14] = 250
    return image, image > 0, heatmap, lesion


def test_small_bright_lesions_the_heatmap_reaches_under_its_threshold_are_added_and_normal_bright_tissue_is_not():
    image, content, heatmap, lesion = small_lesion_volume()
    options = dict(floor=2.0, peak=0.2, max_voxels=20)
    found = small_lesion_components(heatmap, 1.0, image, content, **options)
    np.testing.assert_array_equal(found, lesion)  # the rim is too large, the spot has no heatmap
    # the same from the brain's median alone (a mask re-made in Slicer has no content)
    np.testing.assert_array_equal(small_lesion_components(heatmap, 1.0, image, None, brain_median=100.0, **options),
                                  lesion)
    assert not small_lesion_components(heatmap, 1.0, image, content, **{**options, "max_voxels": 17}).any()
    assert not small_lesion_components(heatmap, 1.0, image, content, **{**options, "peak": 0.4}).any()
    assert not small_lesion_components(heatmap, 1.0, image, content, **{**options, "floor": 2.6}).any()
    assert not small_lesion_components(heatmap, 1.0, image, content, **{**options, "max_voxels": 0}).any()
    # a peak measured in multiples of the threshold: at threshold 2 the lesion's 0.3 is under 0.2 x 2
    assert not small_lesion_components(heatmap, 2.0, image, content, **options).any()
    # large enough to hold the rim: the rim joins (its heatmap reaches 0.5), the spot never does
    rim = np.zeros(image.shape, bool)
    rim[1:9, 19:21, 2:22] = True
    np.testing.assert_array_equal(
        small_lesion_components(heatmap, 1.0, image, content, **{**options, "max_voxels": 400}), lesion | rim)
    for floor, peak in ((0.9, 0.2), (2.0, 0.0), (float("nan"), 0.2), (2.0, float("inf"))):
        with pytest.raises(CDMSegmentError, match="small lesions' floor must be 1 or more"):
            small_lesion_components(heatmap, 1.0, image, content, floor, peak, 20)
    with pytest.raises(CDMSegmentError, match="median intensity or its tissue mask"):
        small_lesion_components(heatmap, 1.0, image, None, 2.0, 0.2, 20)


def test_refine_mask_adds_the_small_lesions_at_the_volumes_spacing_and_a_new_threshold_re_makes_them():
    image, content, heatmap, lesion = small_lesion_volume()
    mask = heatmap > 1.0
    defaults = {"lesion_intensity": 0.7, "lesion_intensity_floor": 1.4, "lesion_support": 0.2,
                "small_lesion_ml": 0.2, "small_lesion_floor": 2.0, "small_lesion_peak": 0.2}
    refined, refinement, added = refine_mask(mask, image, content, defaults, "cdm", heatmap=heatmap, threshold=1.0,
                                             spacing_mm=(2.0, 2.0, 2.0))
    assert refinement["small_lesion_voxels"] == voxels_for_ml(0.2, (2.0, 2.0, 2.0)) == 25
    assert (refinement["small_lesion_floor"], refinement["small_lesion_peak"]) == (2.0, 0.2)
    np.testing.assert_array_equal(refined > 0, lesion)
    assert added == 18
    # Slicer's new threshold re-makes the mask from the recorded refinement, without the content
    np.testing.assert_array_equal(apply_refinement(heatmap > 1.0, image, None, refinement, heatmap, 1.0) > 0, lesion)
    assert not apply_refinement(heatmap > 2.0, image, None, refinement, heatmap, 2.0).any()  # raised: it goes
    # 0.1 ml at 2 mm is 12 voxels: the 18-voxel lesion is not small; off: not recorded
    assert not refine_mask(mask, image, content, {**defaults, "small_lesion_ml": 0.1}, "cdm", heatmap=heatmap,
                           threshold=1.0, spacing_mm=(2.0, 2.0, 2.0))[0].any()
    off, refinement, added = refine_mask(mask, image, content, {**defaults, "small_lesion_ml": 0.0}, "cdm",
                                         heatmap=heatmap, threshold=1.0)
    assert not off.any() and added == 0 and "small_lesion_voxels" not in refinement
    with pytest.raises(CDMSegmentError, match="needs the voxel spacing"):
        refine_mask(mask, image, content, defaults, "cdm", heatmap=heatmap, threshold=1.0)
    with pytest.raises(CDMSegmentError, match="small lesions' floor must be 1 or more"):
        refine_mask(mask, image, content, {**defaults, "small_lesion_peak": 0.0}, "cdm", heatmap=heatmap,
                    threshold=1.0, spacing_mm=(2.0, 2.0, 2.0))
    with pytest.raises(CDMSegmentError, match="the small lesions it reaches"):
        apply_refinement(mask, image, content, {**refinement, "small_lesion_voxels": 25, "small_lesion_floor": 2.0,
                                                "small_lesion_peak": 0.2})


def test_the_smallest_finding_kept_removes_the_refinements_fragments_and_keeps_the_lesion():
    image, content, lesion, mask = fragments_beside_a_lesion()
    defaults = {"lesion_intensity": 0.7, "lesion_intensity_floor": 1.2, "lesion_support": 0.2}
    kept, _, _ = refine_mask(mask, image, content, defaults, "cdm", spacing_mm=(2.0, 2.0, 2.0))
    assert (kept > 0).sum() == lesion.sum() + 24 and (kept[lesion] > 0).all()
    refined, refinement, _ = refine_mask(mask, image, content, {**defaults, "min_finding_ml": 0.02}, "cdm",
                                         spacing_mm=(2.0, 2.0, 2.0))
    assert refinement["min_finding_voxels"] == voxels_for_ml(0.02, (2.0, 2.0, 2.0)) == 2
    np.testing.assert_array_equal(refined > 0, lesion)
    # a re-made mask (Slicer's threshold slider) applies the same rule from the run's refinement alone
    np.testing.assert_array_equal(apply_refinement(mask, image, None, refinement) > 0, lesion)
    # larger than the lesion (144 voxels, 1.15 ml): the lesion goes too
    assert not refine_mask(mask, image, content, {**defaults, "min_finding_ml": 1.2}, "cdm",
                           spacing_mm=(2.0, 2.0, 2.0))[0].any()
    off, refinement, _ = refine_mask(mask, image, content, {**defaults, "min_finding_ml": 0.0}, "cdm")
    assert (off > 0).sum() == lesion.sum() + 24 and "min_finding_voxels" not in refinement
    with pytest.raises(CDMSegmentError, match="min_finding_ml, which needs the voxel spacing"):
        refine_mask(mask, image, content, {**defaults, "min_finding_ml": 0.02}, "cdm")


def test_the_smallest_finding_kept_counts_the_heatmaps_additions_with_the_refined_mask():
    """A small lesion the heatmap support adds beside the refined mask is one finding with it where they touch,
    and is removed alone where it is small and apart."""
    image = np.zeros((8, 20, 20), np.float32)
    image[1:7, 1:19, 1:19] = 100
    image[3:5, 4:8, 4:8] = 200  # found by the mask: 32 voxels
    image[3:5, 8:9, 4:8] = 150  # touching it, not in the mask: 8 voxels the support adds
    image[3:4, 14:15, 14:16] = 150  # apart: 2 voxels the support adds
    mask = image == 200
    heatmap = np.where(image >= 150, 2.0, 0.0).astype(np.float32)
    refinement = {"lesion_intensity": 0.9, "lesion_intensity_floor": 1.2, "lesion_support": 0.0,
                  "brain_median": 100.0, "min_component_voxels": 1, "heatmap_floor": 1.2, "heatmap_support": 1.0}
    refined, added = refinement_parts(mask, image, image > 0, refinement, heatmap, 1.0)
    assert refined.sum() == 32 and added.sum() == 10
    refined, added = refinement_parts(mask, image, image > 0, {**refinement, "min_finding_voxels": 5}, heatmap, 1.0)
    assert refined.sum() == 32 and added.sum() == 8 and not added[3, 14, 14:16].any()

"""The CAM baselines through grad-cam: right shapes, and the map is high where the classifier looks."""

import pytest
import torch

from CDMSegmentLib.baselines.cam import CAM_METHODS, _define_missing_torchvision_ops, cam_classes, cam_heatmap
from CDMSegmentLib.core.errors import CDMSegmentError
from CDMSegmentLib.core.methods import build_method, CDMParams
from conftest import SIZE, SquareClassifier, blob_slices


def two_blobs() -> torch.Tensor:
    """A blob in the classifier's square and an equally bright one in the opposite quadrant."""
    x = blob_slices(2, [0, 1])
    x[:, 0, 10:14, 10:14] = 0.8
    return x


@pytest.mark.parametrize("method", CAM_METHODS)
def test_cam_is_high_on_the_blob_the_classifier_keys_on_and_low_on_the_other(method):
    cam = cam_heatmap(method, SquareClassifier(), two_blobs(), target_class=1)
    assert cam.shape == (2, SIZE, SIZE)
    assert float(cam.min()) >= 0 and float(cam.max()) <= 1 + 1e-6
    inside = cam[:, 2:6, 2:6].mean()
    other = cam[:, 10:14, 10:14].mean()
    assert inside > 0.9 and other < 0.01


def test_cams_run_on_a_torchscript_classifier_file(tiny_models):
    _, classifier = tiny_models
    x = blob_slices(3, [1])
    for method in CAM_METHODS:
        fn = build_method(method, None, CDMParams(), classifier=classifier)
        maps = fn(x, torch.arange(3))
        assert maps.shape == (3, SIZE, SIZE) and torch.isfinite(maps).all()


def test_the_torchvision_workaround_is_idempotent_and_grad_cam_imports():
    _define_missing_torchvision_ops()
    _define_missing_torchvision_ops()
    assert set(cam_classes()) == set(CAM_METHODS)
    assert hasattr(torch.ops.torchvision, "nms")


def test_cam_methods_need_a_classifier_and_unknown_cams_are_rejected():
    with pytest.raises(CDMSegmentError, match="needs a noise-aware classifier"):
        build_method("gradcam", None, CDMParams())
    with pytest.raises(CDMSegmentError, match="unknown CAM method"):
        cam_heatmap("eigencam", SquareClassifier(), two_blobs())

"""The held-out figures a training run logs at every checkpoint (training/monitor.py)."""

import numpy as np
import pytest
import torch
from torch import nn

from conftest import ZeroEps, blob_slices
from CDMSegmentLib.core.errors import CDMSegmentError
from CDMSegmentLib.core.schedule import NoiseSchedule
from CDMSegmentLib.data.slicesets import SliceDataset
from CDMSegmentLib.training.monitor import HeldOutMonitor, monitor_slices

BLOB = (slice(2, 8), slice(2, 8))  # 36 pixels: a monitored lesion slice needs 20


class LabelAwareEps(ZeroEps):
    """Predicts noise 0.5 where x_t is bright under the normal class, 0 under the lesion class: a network that
    'explains' a bright spot by the lesion label, so eps(y0) - eps(y1) is 0.5 on bright pixels only."""

    def forward(self, x: torch.Tensor, t: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return 0.5 * emb[:, :1, None, None] * (x > 0.4).float()


def held_out(n_lesion=6, n_healthy=4):
    x = blob_slices(n_lesion + n_healthy, blob_at=range(n_lesion), blob=BLOB)
    masks = torch.zeros(len(x), 16, 16, dtype=torch.bool)
    masks[:n_lesion, BLOB[0], BLOB[1]] = True
    labels = (torch.arange(len(x)) < n_lesion).long()
    return SliceDataset(x, labels, [f"case{i}" for i in range(len(x))], masks=masks)


def test_the_monitored_slices_are_lesion_slices_and_lesion_free_slices_with_brain():
    chosen = monitor_slices(held_out(6, 4), lesion_slices=3, healthy_slices=2)
    assert chosen.labels.tolist() == [1, 1, 1, 0, 0]
    assert chosen.masks.flatten(1).sum(1).tolist() == [36, 36, 36, 0, 0]
    assert monitor_slices(held_out(6, 4), lesion_slices=3, healthy_slices=2).case_ids == chosen.case_ids


def test_a_network_that_uses_the_label_shows_it_and_one_that_ignores_it_does_not():
    data = monitor_slices(held_out())
    monitor = HeldOutMonitor(data, NoiseSchedule("linear", 1000), levels=(0.99, 0.95))
    aware = monitor.measure(LabelAwareEps().eval())
    for level in (0.99, 0.95):
        assert aware[level]["auroc"] > 0.95
        assert aware[level]["inside"] > 0.45 and aware[level]["outside"] < 0.05
    blind = monitor.measure(ZeroEps())
    assert blind[0.95]["auroc"] == pytest.approx(0.5) and blind[0.95]["inside"] == blind[0.95]["outside"] == 0
    line, figures = monitor(7, LabelAwareEps(), 0.1)
    assert line.startswith("alpha_bar 0.99: AUROC ") and "class difference in/out 0.5" in line
    assert list(figures) == ["alpha_bar 0.99", "alpha_bar 0.95"]
    assert figures["alpha_bar 0.95"]["auroc"] == pytest.approx(aware[0.95]["auroc"], abs=1e-4)
    assert figures["alpha_bar 0.95"]["class_difference_inside"] == pytest.approx(aware[0.95]["inside"], abs=1e-5)
    assert f"AUROC {figures['alpha_bar 0.99']['auroc']:.3f}" in line
    assert monitor.history[0]["step"] == 7


def test_held_out_slices_without_masks_or_lesions_are_refused():
    data = held_out()
    with pytest.raises(CDMSegmentError, match="no masks"):
        monitor_slices(SliceDataset(data.as_float(), data.labels))
    with pytest.raises(CDMSegmentError, match="no lesion slices"):
        monitor_slices(held_out(0, 4))

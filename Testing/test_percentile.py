"""Percentiles on the device: numpy's default ('linear') to the bit, at any size and on any device."""

import numpy as np
import pytest
import torch

from CDMSegmentLib.core.percentile import percentiles

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                  reason="needs a CUDA GPU"))]
QS = [0.0, 0.5, 2.0, 25.0, 49.9, 50.0, 73.3, 98.0, 99.5, 100.0]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", [1, 2, 3, 10, 201, 4096, 100_003])
def test_percentiles_equal_numpys_to_the_bit(n, device):
    rng = np.random.default_rng(n)
    values = (rng.lognormal(5, 1.5, n)).astype(np.float32)
    assert percentiles(torch.from_numpy(values).to(device), QS) == np.percentile(values, QS).tolist()


@pytest.mark.parametrize("device", DEVICES)
def test_ties_integers_and_negative_values_keep_numpys_interpolation(device):
    rng = np.random.default_rng(0)
    ct = rng.choice(np.array([-1000, -1000, -1000, 0, 35, 40, 900], np.int16), size=(20, 30, 40))
    assert percentiles(torch.from_numpy(ct).to(device), QS) == np.percentile(ct, QS).tolist()
    constant = np.full(1000, 7.25, np.float32)
    assert percentiles(torch.from_numpy(constant).to(device), QS) == [7.25] * len(QS)


def test_more_than_the_16_million_elements_torch_quantile_takes():
    values = np.random.default_rng(1).normal(300.0, 80.0, 2 ** 24 + 5).astype(np.float32)
    tensor = torch.from_numpy(values)
    with pytest.raises(RuntimeError, match="too large"):
        torch.quantile(tensor, 0.5)
    assert percentiles(tensor, [0.5, 99.5]) == np.percentile(values, [0.5, 99.5]).tolist()

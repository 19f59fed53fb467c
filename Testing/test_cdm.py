"""The CDM heatmap against oracle networks whose dependence on the condition is known."""

import pytest
import torch
from torch import nn

from CDMSegmentLib.core.cdm import cdm_heatmap
from CDMSegmentLib.core.errors import CDMSegmentError
from CDMSegmentLib.core.schedule import NoiseSchedule


class RegionOracle(nn.Module):
    """eps = 0.1 x + region * <f(y), w>: the class changes the output only inside ``region``."""

    def __init__(self, region: torch.Tensor, emb_dim: int = 4):
        super().__init__()
        self.register_buffer("region", region.float())
        self.emb = nn.Embedding(2, emb_dim)
        with torch.no_grad():
            self.emb.weight.copy_(torch.tensor([[0.0] * emb_dim, [1.0] * emb_dim]))
        self.w = nn.Parameter(torch.full((emb_dim,), 0.25))
        self.calls = []

    def class_embedding(self, y):
        return self.emb(y)

    def forward(self, x, t, class_emb):
        self.calls.append(x.shape[0])
        return 0.1 * x + self.region * (class_emb @ self.w).view(-1, 1, 1, 1)


class SmoothOracle(nn.Module):
    """A non-linear network of x and f(y), for the derivative test."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(2, 3).double()
        self.a = nn.Parameter(torch.randn(3, dtype=torch.float64))

    def class_embedding(self, y):
        return self.emb(y)

    def forward(self, x, t, class_emb):
        return torch.tanh(x * (class_emb @ self.a).view(-1, 1, 1, 1) + 0.001 * t.view(-1, 1, 1, 1))


@pytest.fixture
def region():
    r = torch.zeros(1, 12, 12)
    r[:, 3:7, 4:9] = 1
    return r


def test_heatmap_is_nonzero_in_the_region_and_zero_elsewhere(region):
    net = RegionOracle(region)
    x0 = torch.rand(2, 1, 12, 12) * 2 - 1
    h = cdm_heatmap(net, NoiseSchedule("linear", 1000), x0, t_start=100, steps=10, tau=0.95,
                    generator=torch.Generator().manual_seed(0))
    assert h.shape == (2, 12, 12)
    inside = region[0].bool()
    assert h[:, inside].abs().min() > 1e-3
    assert h[:, ~inside].abs().max() < 1e-5


def test_sign_follows_the_direction_of_the_condition(region):
    """The target class raises eps inside the region, i.e. darkens the denoised image: a negative map."""
    net = RegionOracle(region)
    h = cdm_heatmap(net, NoiseSchedule(), torch.zeros(1, 1, 12, 12), t_start=50, steps=3, tau=0.5,
                    noise=torch.zeros(1, 1, 12, 12))
    assert (h[0][region[0].bool()] < 0).all()


def test_both_branches_in_one_batch_and_2r_evaluations(region):
    net = RegionOracle(region)
    cdm_heatmap(net, NoiseSchedule(), torch.zeros(3, 1, 12, 12), t_start=40, steps=4, tau=0.9,
                noise=torch.zeros(3, 1, 12, 12))
    assert net.calls == [6, 6, 6, 6]  # R calls of batch 2B: 2R evaluations per slice


def test_is_reproducible_to_the_bit_with_a_seed(region):
    net = RegionOracle(region)
    s = NoiseSchedule()
    x0 = torch.rand(2, 1, 12, 12)
    a = cdm_heatmap(net, s, x0, t_start=100, generator=torch.Generator().manual_seed(3))
    b = cdm_heatmap(net, s, x0, t_start=100, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_finite_difference_approaches_the_jvp_as_tau_goes_to_one():
    """(x_A - x_B) / (1 - tau) -> d(sum of iterates)/d emb along f(y1) - f(y0)."""
    net = SmoothOracle()
    s = NoiseSchedule("linear", 1000)
    x0 = torch.rand(1, 1, 6, 6, dtype=torch.float64)
    noise = torch.randn(1, 1, 6, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    q, r = 80, 5
    f1, f0 = net.class_embedding(torch.tensor([1])), net.class_embedding(torch.tensor([0]))

    def summed_iterates(emb):
        x = s.q_sample(x0, torch.tensor([q]), noise)
        total = torch.zeros_like(x)
        for t in range(q, q - r, -1):
            tt = torch.tensor([t])
            x = s.ddim_step(net(x, tt, emb), x, tt, tt - 1)
            total = total + x
        return total

    _, jvp = torch.func.jvp(summed_iterates, (f1.detach(),), ((f1 - f0).detach(),))
    errors = []
    for tau in (0.9, 0.99, 0.999):
        h = cdm_heatmap(net, s, x0, t_start=q, steps=r, tau=tau, noise=noise)
        errors.append(float((h - jvp.sum(1)).abs().max()))
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 1e-3 * float(jvp.abs().max())


def test_tau_zero_is_the_full_secant(region):
    """tau = 0: branch B is conditioned on f(y0) itself, and the map is x_A - x_B summed over steps."""
    net = RegionOracle(region)
    s = NoiseSchedule()
    x0, noise = torch.rand(1, 1, 12, 12), torch.randn(1, 1, 12, 12)
    h = cdm_heatmap(net, s, x0, t_start=30, steps=2, tau=0.0, noise=noise)
    xa = xb = s.q_sample(x0, torch.tensor([30]), noise)
    total = 0
    for t in (30, 29):
        tt = torch.tensor([t])
        xa = s.ddim_step(net(xa, tt, net.class_embedding(torch.tensor([1]))), xa, tt, tt - 1)
        xb = s.ddim_step(net(xb, tt, net.class_embedding(torch.tensor([0]))), xb, tt, tt - 1)
        total = total + xa - xb
    assert torch.allclose(h, total.sum(1), atol=1e-6)


@pytest.mark.parametrize("kwargs, message", [
    ({"tau": 1.0}, "tau must be in"),
    ({"tau": -0.1}, "tau must be in"),
    ({"steps": 0}, "at least 1"),
    ({"t_start": 0}, "noise level Q"),
    ({"t_start": 1000}, "noise level Q"),
    ({"t_start": 3, "steps": 5}, "at most Q"),
])
def test_invalid_parameters(region, kwargs, message):
    args = {"t_start": 100, "steps": 2, "tau": 0.5, **kwargs}
    with pytest.raises(CDMSegmentError, match=message):
        cdm_heatmap(RegionOracle(region), NoiseSchedule(), torch.zeros(1, 1, 12, 12), **args)


class BilinearOracle(nn.Module):
    """eps = region * x * <f(y), w>: the branches' difference is linear in x_t, hence in the noise."""

    def __init__(self, region: torch.Tensor):
        super().__init__()
        self.inner = RegionOracle(region)

    def class_embedding(self, y):
        return self.inner.class_embedding(y)

    def forward(self, x, t, class_emb):
        return self.inner.region * x * (class_emb @ self.inner.w).view(-1, 1, 1, 1)


def test_an_antithetic_pair_cancels_the_noise_term_exactly(region):
    """draw_noise's pairs (eps, -eps): for a map linear in the noise their mean is the noise-free map, which
    independent draws reach only as 1/sqrt(draws)."""
    from CDMSegmentLib.core.methods import CDMParams, draw_noise

    net, schedule = BilinearOracle(region), NoiseSchedule("linear", 1000)
    x_0 = torch.rand(2, 1, 12, 12, generator=torch.Generator().manual_seed(3)) * 2 - 1
    ids = torch.tensor([5, 9])
    pair = draw_noise(ids, (1, 12, 12), 0, CDMParams(noise_draws=2, antithetic=True))
    independent = draw_noise(ids, (1, 12, 12), 0, CDMParams(noise_draws=2))
    assert torch.equal(pair[1], -pair[0]) and torch.equal(pair[0], independent[0])
    assert not torch.equal(independent[1], -independent[0])

    def heatmap(noise):
        return cdm_heatmap(net, schedule, x_0, t_start=300, steps=2, tau=0.0, noise=noise)

    noise_free = heatmap(torch.zeros_like(x_0))
    antithetic = (heatmap(pair[0]) + heatmap(pair[1])) / 2
    independent_mean = (heatmap(independent[0]) + heatmap(independent[1])) / 2
    torch.testing.assert_close(antithetic, noise_free, rtol=0, atol=1e-6)
    assert (independent_mean - noise_free).abs().max() > 1e-3

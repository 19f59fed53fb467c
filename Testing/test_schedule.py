import pytest
import torch

from CDMSegmentLib.core.errors import CDMSegmentError
from CDMSegmentLib.core.schedule import NoiseSchedule


@pytest.mark.parametrize("kind", ["linear", "cosine"])
@pytest.mark.parametrize("T", [10, 1000, 4000])
def test_alpha_bar_is_monotone_in_0_1(kind, T):
    a = NoiseSchedule(kind, T).alphas_cumprod
    assert a.shape == (T,)
    assert torch.all(a[1:] < a[:-1])
    assert 0 < a[-1] and a[0] < 1


def test_paper_noise_level_matches_q400_of_t4000():
    """DESIGN: Q = 400 of T = 4000 linear is alpha_bar ~ 0.90, noise std ~ 0.32."""
    s = NoiseSchedule("linear", 4000)
    a = float(s.alpha_bar(400))
    assert a == pytest.approx(0.896, abs=0.003)
    assert (1 - a) ** 0.5 == pytest.approx(0.32, abs=0.01)
    # the same alpha_bar on T = 1000 is about step 100
    assert NoiseSchedule("linear", 1000).timestep_for_alpha_bar(a) == pytest.approx(100, abs=1)


def test_alpha_bar_minus_one_is_clean_image():
    s = NoiseSchedule("linear", 100)
    assert float(s.alpha_bar(-1)) == 1.0
    assert float(s.alpha_bar(0)) == pytest.approx(1 - 1e-3, rel=1e-6)  # beta_0 = 1e-4 * 1000 / 100


def test_q_sample_closed_form():
    s = NoiseSchedule("linear", 1000)
    x0, eps = torch.randn(3, 1, 5, 7), torch.randn(3, 1, 5, 7)
    t = torch.tensor([0, 500, 999])
    x_t = s.q_sample(x0, t, eps)
    for n in range(3):
        a = float(s.alphas_cumprod[t[n]])
        assert torch.allclose(x_t[n], a ** 0.5 * x0[n] + (1 - a) ** 0.5 * eps[n], atol=1e-5)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_ddim_with_true_noise_reconstructs_x0_exactly(kind):
    s = NoiseSchedule(kind, 1000)
    x0 = torch.randn(2, 2, 9, 11, dtype=torch.float64)
    eps = torch.randn_like(x0)
    t = torch.tensor([700, 300])
    x_t = s.q_sample(x0, t, eps)
    # one DDIM jump to t_prev = -1 with the true eps lands on x_0
    assert torch.allclose(s.ddim_step(eps, x_t, t, t * 0 - 1), x0, atol=1e-10)
    # and many small steps too, because the true eps is the same at every level
    x = x_t
    for k in range(int(t.min()), -1, -1):
        tt = torch.full((2,), k)
        x = s.ddim_step(eps, s.q_sample(x0, tt, eps), tt, tt - 1)
    assert torch.allclose(x, x0, atol=1e-10)


def test_ddim_inversion_is_the_reverse_step():
    s = NoiseSchedule("linear", 1000)
    x0, eps = torch.randn(1, 1, 4, 4, dtype=torch.float64), torch.randn(1, 1, 4, 4, dtype=torch.float64)
    x_100 = s.q_sample(x0, torch.tensor([100]), eps)
    x_200 = s.ddim_step(eps, x_100, torch.tensor([100]), torch.tensor([200]))
    assert torch.allclose(x_200, s.q_sample(x0, torch.tensor([200]), eps), atol=1e-10)


def test_ddim_step_golden_value():
    """alpha_bar(10), alpha_bar(9) of linear T=1000; x_t = 1, eps = 0.5 -> a closed-form number."""
    s = NoiseSchedule("linear", 1000)
    a_t, a_p = float(s.alpha_bar(10)), float(s.alpha_bar(9))
    pred_x0 = (1 - (1 - a_t) ** 0.5 * 0.5) / a_t ** 0.5
    expected = a_p ** 0.5 * pred_x0 + (1 - a_p) ** 0.5 * 0.5
    out = s.ddim_step(torch.tensor(0.5, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64),
                      torch.tensor(10), torch.tensor(9))
    assert float(out) == pytest.approx(expected, rel=1e-12)
    assert float(out) == pytest.approx(1.0, abs=0.01)


@pytest.mark.parametrize("kwargs, message", [
    ({"kind": "quadratic"}, "unknown noise schedule"),
    ({"num_timesteps": 1}, "at least 2"),
])
def test_invalid_schedule(kwargs, message):
    with pytest.raises(CDMSegmentError, match=message):
        NoiseSchedule(**kwargs)


@pytest.mark.parametrize("value", [0.0, 1.0, -0.1, 1.5])
def test_invalid_alpha_bar(value):
    with pytest.raises(CDMSegmentError, match="strictly between 0 and 1"):
        NoiseSchedule().timestep_for_alpha_bar(value)

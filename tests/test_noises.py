"""Noise families: samplers have the stated law, radii match DESIGN.md section 2 and
are never above the exact radius of an oracle."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from ucan_smoothing import ExpInf, Gaussian, Laplace, PowerLaw, Uniform, make_noise
from ucan_smoothing.core.noises import standard_gamma

from oracles import marginal_tail, one_axis_p_top

DIM = 6
ALL_NOISES = [Gaussian(0.5), Laplace(0.5), Uniform(0.5), ExpInf(0.5), PowerLaw(0.5, DIM + 3.5)]
NORMS = [1, 2, math.inf]


def draw(noise, count=20000, dim=DIM, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return noise.sample((count, dim), generator=generator, dtype=torch.float64).numpy()


# -- samplers ----------------------------------------------------------------


@pytest.mark.parametrize("noise", ALL_NOISES, ids=lambda n: n.name)
def test_first_coordinate_follows_the_stated_law(noise):
    """Empirical CDF of one coordinate within the DKW band of the exact marginal."""
    z0 = draw(noise)[:, 0]
    band = math.sqrt(math.log(2 / 1e-4) / (2 * len(z0)))  # fails by chance w.p. 1e-4
    for s in np.quantile(z0, np.linspace(0.02, 0.98, 25)):
        exact = 1 - marginal_tail(noise, s, DIM) if s >= 0 else marginal_tail(noise, -s, DIM)
        assert abs(np.mean(z0 <= s) - exact) < band


@pytest.mark.parametrize("noise", [ExpInf(0.5), PowerLaw(0.5, DIM + 3.5)], ids=lambda n: n.name)
def test_linf_norm_follows_the_radial_law(noise):
    norms = np.abs(draw(noise)).max(axis=1)
    if noise.name == "expinf":
        radial = stats.gamma(DIM, scale=noise.scale)
    else:
        radial = stats.betaprime(DIM, noise.a - DIM, scale=noise.scale)
    assert stats.kstest(norms, radial.cdf).pvalue > 1e-3


@pytest.mark.parametrize("shape", [0.3, 1.0, 7.5, 784.0])
def test_standard_gamma_matches_scipy(shape):
    values = standard_gamma(shape, 20000, generator=torch.Generator().manual_seed(1)).numpy()
    assert stats.kstest(values, stats.gamma(shape).cdf).pvalue > 1e-3


@pytest.mark.parametrize("noise", ALL_NOISES, ids=lambda n: n.name)
def test_sampling_is_reproducible_and_shaped(noise):
    a = noise.sample((5, 2, 3), generator=torch.Generator().manual_seed(3))
    b = noise.sample((5, 2, 3), generator=torch.Generator().manual_seed(3))
    assert a.shape == (5, 2, 3) and a.dtype == torch.get_default_dtype()
    assert torch.equal(a, b)


# -- radius formulas -----------------------------------------------------------


def test_radii_match_the_design_table():
    p, lam, d = 0.9, 0.5, DIM
    phi = stats.norm.ppf(p)
    assert Gaussian(lam).radius(p, 2, d) == pytest.approx(lam * phi)
    assert Gaussian(lam).radius(p, math.inf, d) == pytest.approx(lam * phi / math.sqrt(d))
    assert Gaussian(lam).radius(p, 1, d) == pytest.approx(lam * phi)
    assert Laplace(lam).radius(p, 1, d) == pytest.approx(-lam * math.log(2 * (1 - p)))
    assert Laplace(lam).radius(p, math.inf, d) == pytest.approx(-lam * math.log(2 * (1 - p)) / d)
    assert Uniform(lam).radius(p, 1, d) == pytest.approx(max(2 * lam * (p - 0.5), 2 * lam * (1 - (1.5 - p) ** (1 / d))))
    assert Uniform(lam).radius(p, math.inf, d) == pytest.approx(2 * lam * (1 - (1.5 - p) ** (1 / d)))
    assert ExpInf(lam).radius(p, 1, d) == pytest.approx(2 * d * lam * (p - 0.5))
    assert ExpInf(lam).radius(p, math.inf, d) == pytest.approx(lam * math.log(1 / (2 * (1 - p))))
    assert PowerLaw(lam, d + 3).radius(p, 1, d) == pytest.approx(2 * d * lam * (p - 0.5) / 3)
    assert Laplace(lam).radius(p, 1, d, p_runner_up=0.05) == pytest.approx(
        max(lam / 2 * math.log(p / 0.05), -lam * math.log(1 - p + 0.05))
    )
    assert Gaussian(lam).radius(p, 2, d, p_runner_up=0.05) == pytest.approx(
        lam / 2 * (phi - stats.norm.ppf(0.05))
    )


@settings(max_examples=60, deadline=None)
@given(
    index=st.integers(0, len(ALL_NOISES) - 1),
    p1=st.floats(0.0, 0.9999),
    p2=st.floats(0.0, 0.9999),
    norm=st.sampled_from(NORMS),
)
def test_radius_is_monotone_in_p_and_zero_up_to_one_half(index, p1, p2, norm):
    noise = ALL_NOISES[index]
    low, high = sorted((p1, p2))
    r_low, r_high = noise.radius(low, norm, DIM), noise.radius(high, norm, DIM)
    assert 0.0 <= r_low <= r_high
    if high <= 0.5:
        assert r_high == 0.0
    else:
        assert r_high > 0.0
    assert noise.radius(0.5, norm, DIM) == 0.0


@settings(max_examples=60, deadline=None)
@given(
    index=st.integers(0, len(ALL_NOISES) - 1),
    p=st.floats(0.5001, 0.9999),
    share=st.floats(0.0, 1.0),
    norm=st.sampled_from(NORMS),
)
def test_multiclass_radius_never_below_binary_and_equal_at_q_one_minus_p(index, p, share, norm):
    noise = ALL_NOISES[index]
    binary = noise.radius(p, norm, DIM)
    q = max(share * (1 - p), 1e-9)
    assert noise.radius(p, norm, DIM, p_runner_up=q) >= binary
    assert noise.radius(p, norm, DIM, p_runner_up=1 - p) == pytest.approx(binary, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("noise", ALL_NOISES, ids=lambda n: n.name)
@pytest.mark.parametrize("gap", [0.01, 0.1, 0.3, 0.8])
@pytest.mark.parametrize("norm", NORMS)
def test_radius_at_the_exact_probability_never_exceeds_the_exact_radius(noise, gap, norm):
    """One-axis threshold classifier: exact robust radius ``gap`` in every norm."""
    p = one_axis_p_top(noise, gap, 1.0, DIM)
    if p >= 1.0:
        pytest.skip("noise cannot reach the boundary")
    assert noise.radius(p, norm, DIM) <= gap * (1 + 1e-9)


@pytest.mark.parametrize("noise", [Laplace(0.5), Uniform(0.5)], ids=lambda n: n.name)
@pytest.mark.parametrize("gap", [0.05, 0.2, 0.4])
def test_l1_radius_is_tight_on_one_axis(noise, gap):
    """Laplace and uniform l1 certificates are exact for a one-axis classifier."""
    p = one_axis_p_top(noise, gap, 1.0, DIM)
    assert noise.radius(p, 1, DIM) == pytest.approx(gap, rel=1e-9)


# -- bad arguments --------------------------------------------------------------


@pytest.mark.parametrize("scale", [0, -1, float("nan"), float("inf"), "x"])
def test_scale_must_be_positive_and_finite(scale):
    with pytest.raises(ValueError, match="scale"):
        Gaussian(scale)


@pytest.mark.parametrize("family", [Gaussian, Laplace, Uniform, ExpInf, lambda scale: PowerLaw(scale, 20)])
@pytest.mark.parametrize("scale, match", [(1e39, "too large"), (1e33, "too large"), (1e-39, "too small")])
def test_scale_that_overflows_or_underflows_float32_is_refused(family, scale, match):
    # noise is drawn in float32 or wider: scale * a standard sample must stay finite there
    with pytest.raises(ValueError, match=f"scale=.* {match} for noise drawn in torch.float32"):
        family(scale)


def test_a_scale_fits_a_dtype_with_headroom_for_the_standard_sample():
    noise = Gaussian(1e30)
    noise.check_dtype(torch.float64)
    with pytest.raises(ValueError, match="torch.float16"):
        noise.check_dtype(torch.float16)


def test_power_law_needs_a_above_dim():
    noise = PowerLaw(0.5, 5)
    with pytest.raises(ValueError, match="a > dim"):
        noise.radius(0.9, 1, 10)
    with pytest.raises(ValueError, match="a > dim"):
        noise.sample((3, 10))


@pytest.mark.parametrize("p", [-0.1, 1.1, float("nan")])
def test_probability_must_lie_in_unit_interval(p):
    with pytest.raises(ValueError, match="p_lower"):
        Gaussian(1.0).radius(p, 2, 3)


def test_unbounded_certificate_is_refused():
    with pytest.raises(ValueError, match="unbounded"):
        Gaussian(1.0).radius(1.0, 2, 3)


def test_unknown_family_and_norm():
    with pytest.raises(ValueError, match="known"):
        make_noise("cauchy", 1.0)
    with pytest.raises(ValueError, match="norm"):
        Gaussian(1.0).radius(0.9, 3, 3)
    assert make_noise("powerlaw", 1.0, a=20).describe() == {"family": "powerlaw", "scale": 1.0, "a": 20.0}

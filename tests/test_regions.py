"""Anisotropic regions: the reported lq balls lie inside ``||delta / sigma||_p <= R``
and are the largest such balls; ALM is a volume figure; anisotropic noise is
``base * sigma + mu`` with validated parameters."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ucan_smoothing import Anisotropic, CertifiedRegion, Gaussian, Laplace, Scaling, Uniform

NORMS = [1, 2, math.inf]


def random_direction(dim, q, generator):
    v = torch.randn(dim, generator=generator, dtype=torch.float64)
    return v / torch.linalg.vector_norm(v, ord=q)


def extremal_direction(sigma, p, q):
    """A unit-lq vector maximising ``||v / sigma||_p`` (the tight direction)."""
    if q <= p:
        v = torch.zeros_like(sigma)
        v[sigma.argmin()] = 1.0
        return v
    t = 1 / (1 / p - (0 if math.isinf(q) else 1 / q))
    # Hoelder equality: v_i ~ (1/sigma_i)^(t/q) with the right exponent.
    weights = (1 / sigma) ** (t / q) if not math.isinf(q) else torch.ones_like(sigma)
    return weights / torch.linalg.vector_norm(weights, ord=q)


sigmas = st.lists(st.floats(0.05, 20.0), min_size=1, max_size=12).map(
    lambda xs: torch.tensor(xs, dtype=torch.float64)
)


@settings(max_examples=80, deadline=None)
@given(sigma=sigmas, radius=st.floats(0.01, 10.0), p=st.sampled_from(NORMS), q=st.sampled_from(NORMS), seed=st.integers(0, 2**31))
def test_boundary_of_the_reported_ball_is_inside_the_region(sigma, radius, p, q, seed):
    region = CertifiedRegion(p, radius, Scaling.from_sigma(sigma))
    r = region.radius(q)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(20):
        delta = random_direction(len(sigma), q, generator) * r * (1 - 1e-9)
        assert region.contains(delta)
    # the extremal direction is the one that touches the region's boundary
    touching = extremal_direction(sigma, p, q)
    assert region.contains(touching * r * (1 - 1e-9))
    assert not region.contains(touching * r * (1 + 1e-6))


def test_isotropic_region_uses_the_inscribed_ball_rule():
    d = 16
    region = CertifiedRegion(2, 1.5, Scaling.isotropic(d))
    assert region.radius(1) == pytest.approx(1.5)
    assert region.radius(2) == pytest.approx(1.5)
    assert region.radius(math.inf) == pytest.approx(1.5 / math.sqrt(d))
    l1 = CertifiedRegion(1, 2.0, Scaling.isotropic(d))
    assert l1.radius(2) == pytest.approx(2.0 / math.sqrt(d))
    assert l1.radius(math.inf) == pytest.approx(2.0 / d)
    assert region.alm == 1.5


def test_alm_is_the_volume_equivalent_radius_not_a_certificate():
    sigma = torch.tensor([4.0, 0.25], dtype=torch.float64)
    region = CertifiedRegion(2, 2.0, Scaling.from_sigma(sigma))
    assert region.alm == pytest.approx(2.0)  # geometric mean of sigma is 1
    assert region.radius(2) == pytest.approx(0.5)
    # a point at distance ALM along the narrow axis is outside the region
    assert not region.contains(torch.tensor([0.0, region.alm * 0.99]))
    # ALM of a constant sigma is the native radius
    assert CertifiedRegion(2, 2.0, Scaling.from_sigma(torch.full((5,), 3.0))).alm == pytest.approx(6.0)


def test_alm_survives_large_dimensions():
    sigma = torch.full((150528,), 0.5, dtype=torch.float64)  # ImageNet size: prod underflows
    region = CertifiedRegion(2, 1.0, Scaling.from_sigma(sigma))
    assert region.alm == pytest.approx(0.5)


def test_contains_checks_dimension():
    region = CertifiedRegion(2, 1.0, Scaling.isotropic(4))
    with pytest.raises(ValueError, match="dimension"):
        region.contains(torch.zeros(5))


# -- Anisotropic noise ------------------------------------------------------------


def test_anisotropic_sample_is_base_times_sigma_plus_mu():
    sigma = torch.rand(1, 4, 4) + 0.5
    mu = torch.randn(1, 4, 4)
    noise = Anisotropic(Laplace(0.3), sigma, mu)
    drawn = noise.sample((7, 1, 4, 4), generator=torch.Generator().manual_seed(5))
    base = Laplace(0.3).sample((7, 1, 4, 4), generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(drawn, base * sigma + mu)


def test_anisotropic_regions_scale_the_base_certificate():
    sigma = torch.tensor([[0.5, 2.0], [1.0, 4.0]])
    noise = Anisotropic(Uniform(0.4), sigma)
    base = Uniform(0.4).native_radii(0.8, 4)
    regions = noise.regions(0.8, (2, 2))
    assert [r.norm for r in regions] == [1, math.inf]
    assert regions[0].radius_scaled == pytest.approx(base[1])
    assert noise.radius(0.8, 1) == pytest.approx(max(base[1], base[math.inf]) * 0.5)
    inv = 1 / sigma.double().reshape(-1)
    assert noise.radius(0.8, math.inf) == pytest.approx(max(base[math.inf] * 0.5, base[1] / float(inv.sum())))


def test_broadcast_sigma_is_expanded_to_the_input():
    noise = Anisotropic(Gaussian(1.0), torch.full((1, 1, 1), 2.0))
    region = noise.regions(0.9, (1, 3, 3))[0]
    assert region.dim == 9
    assert region.radius(math.inf) == pytest.approx(Gaussian(1.0).radius(0.9, 2, 9) * 2 / 3)


@pytest.mark.parametrize(
    "sigma, match",
    [
        (torch.tensor([1.0, 0.0]), "sigma_min"),
        (torch.tensor([1.0, -1.0]), "sigma_min"),
        (torch.tensor([1.0, float("nan")]), "NaN"),
        (torch.tensor([1.0, float("inf")]), "NaN or inf"),
        (torch.tensor([]), "empty"),
    ],
)
def test_bad_sigma_is_rejected(sigma, match):
    with pytest.raises(ValueError, match=match):
        Anisotropic(Gaussian(1.0), sigma)


@pytest.mark.parametrize(
    "scale, sigma, mu, match",
    [
        (0.5, [1.0, 1e39], None, r"sigma=1e\+39 is too large for noise drawn in torch.float32"),
        (1e-10, [1.0, 1e39], None, r"sigma=1e\+39 is too large"),  # scale * sigma fits, but sigma cast to float32 is inf
        (1e30, [1.0, 1e5], None, r"scale \* sigma=1e\+35 is too large"),
        (0.5, [1.0, 1.0], [0.0, -1e39], r"\|mu\|=1e\+39 is too large for noise drawn in torch.float32"),
        (0.5, [1.0, 1e-40], None, r"sigma=1e-40 is too small for noise drawn in torch.float32"),
        (1e-20, [1.0, 1e-20], None, r"scale \* sigma=1e-40 is too small"),
    ],
)
def test_sigma_or_mu_that_does_not_fit_float32_is_refused(scale, sigma, mu, match):
    as_float64 = lambda values: None if values is None else torch.tensor(values, dtype=torch.float64)
    with pytest.raises(ValueError, match=match):
        Anisotropic(Gaussian(scale), as_float64(sigma), as_float64(mu), sigma_min=1e-45)


def test_sigma_below_custom_minimum_and_bad_mu():
    with pytest.raises(ValueError, match="sigma_min=0.1"):
        Anisotropic(Gaussian(1.0), torch.tensor([0.05, 1.0]), sigma_min=0.1)
    with pytest.raises(ValueError, match="mu"):
        Anisotropic(Gaussian(1.0), torch.ones(2), mu=torch.tensor([0.0, float("nan")]))
    noise = Anisotropic(Gaussian(1.0), torch.ones(3, 3))
    with pytest.raises(ValueError, match="sigma of shape"):
        noise.regions(0.9, (4, 4))

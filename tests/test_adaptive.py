"""Input-dependent noise (ucan_smoothing.adaptive).

* paper mode: claims the large radius on the DESIGN.md section 4
  counterexamples, where the exact smoothed classifier flips deep inside it;
  never labelled a certificate;
* the sound modes (noisy-input shift, Lipschitz shift, semi-elastic sigma):
  no over-claim on the counterexamples, never beyond exact oracles, and the
  statistical validity test of test_smooth.py (over-claim rate <= alpha).
"""

import math

import numpy as np
import pytest
import torch
from scipy import optimize, stats

from ucan_smoothing import Anisotropic, Gaussian, Laplace, Smooth
from ucan_smoothing.npg import (
    ElasticSigmaSmooth,
    Interval1D,
    SHIFTS,
    LipschitzMLP,
    LipschitzShiftNet,
    LipschitzShiftSmooth,
    NoisyInputShift,
    NoisyShiftNet,
    PaperModeSmooth,
    Threshold1D,
    elastic_sigma_lower_bound,
    elastic_sigma_radius,
    lipschitz_bounds,
    make_shift,
    scale_counterexample,
    shift_counterexample,
    shift_from_config,
    shift_smoothed,
)
from ucan_smoothing.npg.generators import InputDependentGenerator
from ucan_smoothing.npg.lipschitz_shift import operator_norm

from oracles import LinearBinary, OneAxisThreshold

W = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0, -1.0, 0.25, 1.5], dtype=torch.float64)
SIGMA = torch.tensor([0.5, 2.0, 1.0, 0.3, 0.8, 1.7, 1.2, 0.6], dtype=torch.float64)
X = torch.tensor([0.4, 0.1, -0.3, 0.7, 0.2, 0.0, 0.5, -0.1])
B = 0.2
SPREAD = float(torch.linalg.vector_norm(SIGMA * W))  # ||sigma * w||_2


def assert_rate_at_most_alpha(wrong, trials, alpha):
    # binomial tolerance: a valid procedure exceeds this with probability < 1e-4
    assert wrong <= stats.binom.ppf(1 - 1e-4, trials, alpha), f"{wrong} over-claims in {trials} trials"


def count_overclaims(certificates, exact_radius, true_label, norm=None):
    wrong = 0
    for cert in certificates:
        if cert.abstained:
            continue
        claimed = cert.regions[0].radius_scaled if norm is None else cert.radius(norm)
        wrong += cert.prediction != true_label or claimed > exact_radius
    return wrong


# --------------------------------------------------------------------------- paper mode


def test_paper_mode_claims_3_81_on_the_mu_counterexample_but_the_prediction_flips_at_0_06():
    ce = shift_counterexample()
    cert = ce.paper_mode().certify(ce.x, 100, 100_000, 0.001, batch_size=100_000, generator=0)
    assert cert.is_certificate is False and cert.prediction == 1
    assert 3.80 < cert.radius(2) < 3.82  # PhiInv(0.001 ** (1 / 100000)) = 3.81
    assert 0.0597 < ce.flip_distance < 0.0599
    inside = torch.tensor([-0.061])  # 16x closer than the claimed radius
    assert cert.contains(inside)
    assert ce.exact_class(inside) == 0
    assert ce.paper_mode().predict(inside, 10_000, 0.001, generator=1) == 0


def test_paper_mode_claims_0_76_on_the_sigma_counterexample_but_the_prediction_flips_at_0_50():
    ce = scale_counterexample()
    cert = ce.paper_mode().certify(ce.x, 100, 100_000, 0.001, batch_size=100_000, generator=0)
    assert cert.is_certificate is False and cert.prediction == 1
    assert 0.761 < cert.radius(2) < 0.763
    assert ce.flip_distance == 0.5
    # no flip before 0.5 (the level grows with |x'|), a flip just after it
    assert all(ce.exact_class(torch.tensor([t])) == 1 for t in np.linspace(-0.4999, 0.4999, 201))
    for point in (0.5001, 0.6, -0.7):
        assert cert.contains(torch.tensor([point])) and ce.exact_class(torch.tensor([point])) != 1
    assert ce.paper_mode().predict(torch.tensor([0.7]), 10_000, 0.001, generator=1) == 2


def test_paper_mode_labels_every_certificate_and_uses_the_generator_at_each_input():
    npg = InputDependentGenerator((1, 8, 8), channels=(2, 2, 2, 2), pool=2)
    with torch.no_grad():
        npg.mu_net.head.bias.fill_(0.3)
        npg.sigma_net.head.bias.fill_(-0.5)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 3))
    paper = PaperModeSmooth(model, 3, Gaussian(0.5), npg, input_shape=(1, 8, 8))
    xs = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    noise = paper.noise_at(xs[0])
    assert torch.allclose(noise.sigma, torch.full((1, 8, 8), math.exp(math.tanh(-0.5)), dtype=torch.float64))
    assert torch.allclose(noise.mu, torch.full((1, 8, 8), math.tanh(0.3), dtype=torch.float64))
    for cert in paper.certify_batch(xs, 20, 200, 0.01, generator=0):
        assert cert.is_certificate is False and "NOT a certificate" in cert.extra["note"]
    logits = paper.noisy_logits(xs[0].requires_grad_(True), 5, torch.Generator().manual_seed(0))
    assert logits.shape == (5, 3) and logits.requires_grad


# --------------------------------------------------------------------------- sound modes on the counterexamples


def test_sound_modes_do_not_overclaim_on_the_mu_counterexample():
    ce = shift_counterexample()
    # mu from the noisy sample: f(z + mu(z)) is the threshold [z > z*], z* = -0.0598
    shifted = Smooth(NoisyInputShift(ce.model, ce.npg.mu), 2, Gaussian(1.0))
    cert = shifted.certify(ce.x, 100, 100_000, 0.001, batch_size=100_000, generator=0)
    assert cert.is_certificate and cert.prediction == 1
    assert 0 < cert.radius(2) <= ce.flip_distance  # its own exact radius is |0 - z*| = 0.0598
    # mu from the clean input, 300-Lipschitz: 3.81 / 301
    lipschitz = LipschitzShiftSmooth(ce.model, 2, Gaussian(1.0), ce.npg.mu, ce.lipschitz)
    cert = lipschitz.certify(ce.x, 100, 100_000, 0.001, batch_size=100_000, generator=0)
    assert cert.is_certificate and cert.prediction == 1
    assert cert.radius(2) == pytest.approx(3.8114 / 301, rel=1e-3)
    assert cert.radius(2) <= ce.flip_distance


def test_the_elastic_sigma_mode_does_not_overclaim_on_the_sigma_counterexample():
    ce = scale_counterexample()
    elastic = ElasticSigmaSmooth(ce.model, 3, 1.0, ce.npg.sigma, ce.lipschitz)
    cert = elastic.certify(ce.x, 100, 100_000, 0.001, batch_size=100_000, generator=0)
    assert cert.is_certificate and cert.prediction == 1
    assert 0.1 < cert.radius(2) <= ce.flip_distance


# --------------------------------------------------------------------------- mu from the noisy sample


def _phi(t):
    return 0.6 * torch.tanh(3 * (t - 0.2)) + 0.3


class DirectionalShift(torch.nn.Module):
    """``mu(z) = phi(w . z + b) w / ||w||^2``: moves ``w . z + b`` to ``t + phi(t)``."""

    def forward(self, z):
        t = z.reshape(len(z), -1).to(torch.float64) @ W + B
        return (_phi(t)[:, None] * W / (W @ W)).to(z.dtype).view_as(z)


def noisy_shift_setup(scale):
    # t + phi(t) is increasing, so f(z + mu(z)) = [w . z + b > t*]: a linear oracle.
    t_star = optimize.brentq(lambda t: t + float(_phi(torch.tensor(t))), -5, 5, xtol=1e-14)
    model = LinearBinary(W, B)
    smooth = Smooth(NoisyInputShift(model, DirectionalShift()), 2, Anisotropic(Gaussian(scale), SIGMA),
                    input_shape=(8,))
    margin = model.margin(X) - t_star
    return smooth, int(margin > 0), abs(margin) / SPREAD


def test_noisy_input_shift_against_the_exact_linear_oracle():
    smooth, label, exact_scaled = noisy_shift_setup(0.5)
    cert = smooth.certify(X, 100, 200_000, 0.001, batch_size=100_000, generator=3)
    assert cert.is_certificate and cert.prediction == label
    assert 0.9 * exact_scaled < cert.regions[0].radius_scaled <= exact_scaled


def test_noisy_input_shift_statistical_validity():
    smooth, label, exact_scaled = noisy_shift_setup(1.0)
    trials, alpha = 2000, 0.01
    certs = smooth.certify_batch(X.expand(trials, 8), 32, 400, alpha, batch_size=200_000, generator=11)
    assert_rate_at_most_alpha(count_overclaims(certs, exact_scaled, label), trials, alpha)


# --------------------------------------------------------------------------- Lipschitz mu (tight oracles)


class LinearShift(torch.nn.Module):
    """``mu(x) = L (w . x) sigma^2 w / ||sigma w||^2``: ``u -> mu(sigma u) / sigma`` is ``L`` times
    the projection on ``sigma w``, exactly ``L``-Lipschitz in l2, and the smoothed margin
    becomes ``(1 + L) w . x + b``: the radius ``R / (1 + L)`` is tight."""

    def __init__(self, lipschitz):
        super().__init__()
        self.lipschitz = lipschitz

    def forward(self, x):
        t = x.reshape(len(x), -1).to(torch.float64) @ W
        return (self.lipschitz * t[:, None] * SIGMA**2 * W / SPREAD**2).to(x.dtype).view_as(x)


def lipschitz_setup(scale, lipschitz=0.5):
    model = LinearBinary(W, B)
    smoothed = LipschitzShiftSmooth(model, 2, Anisotropic(Gaussian(scale), SIGMA), LinearShift(lipschitz),
                                    lipschitz, input_shape=(8,))
    margin = (1 + lipschitz) * float(W @ X.double()) + B
    return smoothed, int(margin > 0), abs(margin) / ((1 + lipschitz) * SPREAD)


def test_linear_shift_is_exactly_l_lipschitz_in_scaled_coordinates():
    matrix = torch.stack([LinearShift(0.5)((SIGMA * e)[None].float()).double()[0] / SIGMA for e in torch.eye(8,
                                                                                    dtype=torch.float64)], dim=1)
    assert float(torch.linalg.matrix_norm(matrix, ord=2)) == pytest.approx(0.5, rel=1e-5)


def test_lipschitz_shift_against_the_tight_linear_oracle():
    smoothed, label, exact_scaled = lipschitz_setup(0.5)
    cert = smoothed.certify(X, 100, 200_000, 0.001, batch_size=100_000, generator=5)
    assert cert.is_certificate and cert.prediction == label
    assert 0.9 * exact_scaled < cert.regions[0].radius_scaled <= exact_scaled
    # just beyond the certified region in the worst direction the exact classifier flips
    direction = -(1 if label else -1) * SIGMA**2 * W / SPREAD
    beyond = direction * exact_scaled * 1.001
    assert LinearBinary(W, B).label(X.double() + beyond + LinearShift(0.5)(beyond[None])[0] +
                                    LinearShift(0.5)(X[None].double())[0]) != label


def test_lipschitz_shift_statistical_validity():
    smoothed, label, exact_scaled = lipschitz_setup(1.0)
    trials, alpha = 2000, 0.01
    certs = smoothed.certify_batch(X.expand(trials, 8), 32, 400, alpha, batch_size=200_000, generator=13)
    assert_rate_at_most_alpha(count_overclaims(certs, exact_scaled, label), trials, alpha)


class AxisShift(torch.nn.Module):
    """``mu(x) = L x_0 e_0``: L-Lipschitz in l1 (and every norm)."""

    def __init__(self, lipschitz):
        super().__init__()
        self.lipschitz = lipschitz

    def forward(self, x):
        mu = torch.zeros_like(x)
        mu[:, 0] = self.lipschitz * x[:, 0]
        return mu


def test_lipschitz_shift_in_l1_with_laplace_noise_statistical_validity():
    """One-axis oracle: g(x') = [(1 + L) x'_0 > 0], exact radius |x_0| in every norm; Laplace l1 is
    tight on it, so looseness in the R / (1 + L) argument would show."""
    lipschitz, gap = 0.5, 0.3
    x = torch.tensor([gap, 0.2, -0.1])
    smoothed = LipschitzShiftSmooth(OneAxisThreshold(0.0), 2, Laplace(0.5), AxisShift(lipschitz), {1: lipschitz})
    trials, alpha = 2000, 0.01
    certs = smoothed.certify_batch(x.expand(trials, 3), 32, 400, alpha, batch_size=200_000, generator=17)
    assert_rate_at_most_alpha(count_overclaims(certs, gap, 1, norm=1), trials, alpha)
    cert = smoothed.certify(x, 100, 200_000, 0.001, batch_size=200_000, generator=1)
    assert 0.85 * gap < cert.radius(1) <= gap


def test_a_lipschitz_bound_that_is_too_small_would_fail_the_validity_check():
    """Negative control: claiming L = 0 for the 1-Lipschitz shift over-claims."""
    model = LinearBinary(W, B)
    wrong_l = LipschitzShiftSmooth(model, 2, Anisotropic(Gaussian(1.0), SIGMA), LinearShift(1.0), 0.0)
    margin = 2 * float(W @ X.double()) + B
    certs = wrong_l.certify_batch(X.expand(500, 8), 32, 400, 0.01, batch_size=200_000, generator=1)
    with pytest.raises(AssertionError):
        assert_rate_at_most_alpha(count_overclaims(certs, abs(margin) / (2 * SPREAD), int(margin > 0)), 500, 0.01)


# --------------------------------------------------------------------------- LipschitzMLP


@pytest.mark.parametrize("norm", [1, 2, math.inf])
def test_lipschitz_mlp_bound_holds_and_is_tight_for_one_layer(norm):
    torch.manual_seed(0)
    shape = (1, 4, 4)
    sigma = torch.rand(shape) + 0.5
    net = LipschitzMLP(shape, hidden=32, depth=3, gamma=0.7, norm=norm, cap=2.0)
    bound = net.lipschitz_bound(norm, sigma)
    assert bound <= 0.7 * 2.0**3 * (1 + 1e-4) * max(1.0, float(sigma.max() / sigma.min()))
    # empirical slopes of u -> mu(sigma u) / sigma never exceed the bound
    u = torch.randn(400, *shape, dtype=torch.float64)
    v = u + 1e-3 * torch.randn(400, *shape, dtype=torch.float64)
    net = net.double().requires_grad_(False)
    slopes = (torch.linalg.vector_norm(((net(sigma * u) - net(sigma * v)) / sigma).flatten(1), ord=norm, dim=1)
              / torch.linalg.vector_norm((u - v).flatten(1), ord=norm, dim=1))
    assert float(slopes.max()) <= bound
    # one layer with zero bias: near 0 the slope along the worst direction reaches gamma * ||W||
    single = LipschitzMLP((6,), depth=1, gamma=0.5, norm=2, cap=10.0).double().requires_grad_(False)
    with torch.no_grad():
        single.layers[0].bias.zero_()
    top = torch.linalg.svd(single.layers[0].weight.detach()).Vh[0]
    slope = float(torch.linalg.vector_norm(single(1e-6 * top[None])[0])) / 1e-6
    assert slope == pytest.approx(single.lipschitz_bound(2), rel=1e-3)


@pytest.mark.parametrize("shape", [(8, 5), (5, 8), (256, 784)])
def test_operator_norm_l2_is_the_largest_singular_value_with_a_finite_gradient(shape):
    generator = torch.Generator().manual_seed(0)
    for dtype, rel in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        weight = torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype).requires_grad_()
        size = operator_norm(weight, 2)
        assert float(size.detach()) == pytest.approx(float(torch.linalg.svdvals(weight.detach().double())[0]), rel=rel)
        size.backward()
        # d sigma_max / dW = u v^T: unit Frobenius norm
        assert float(weight.grad.norm()) == pytest.approx(1.0, rel=1e-3)
    zero = torch.zeros(shape, requires_grad=True)
    size = operator_norm(zero, 2)
    (size / 0.5).clamp(min=1.0).backward()  # as LipschitzMLP.weights caps a fresh zero layer
    assert float(size) <= 1e-18 and torch.isfinite(zero.grad).all()
    assert float(operator_norm(torch.tensor([[1.0, -2.0], [3.0, 4.0]]), 1)) == 6.0  # largest column sum
    assert float(operator_norm(torch.tensor([[1.0, -2.0], [3.0, 4.0]]), "inf")) == 7.0  # largest row sum


def test_lipschitz_mlp_caps_the_operator_norms_it_uses():
    net = LipschitzMLP((5,), hidden=8, depth=2, gamma=1.0, norm=2, cap=0.5)
    with torch.no_grad():
        for layer in net.layers:
            layer.weight.mul_(100)
    for weight in net.weights():
        assert float(torch.linalg.matrix_norm(weight.detach(), ord=2)) <= 0.5 + 1e-6
    assert net.lipschitz_bound() <= 0.25 * (1 + 2e-4)
    # LipschitzShiftSmooth asks the network for its bound when none is given
    smoothed = LipschitzShiftSmooth(LinearBinary(torch.ones(5), 0.0), 2, Gaussian(0.5), net)
    assert smoothed.lipschitz == {2: net.lipschitz_bound(2, None)}


# --------------------------------------------------------------------------- trainable shift networks


def _perturb(net, seed=0, size=3.0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in net.parameters():
            parameter.add_(size * torch.randn(parameter.shape, generator=generator))


@pytest.mark.parametrize("kind", sorted(SHIFTS))
def test_shift_networks_start_at_zero_and_rebuild_exactly(kind):
    shape = (1, 8, 8)
    net = make_shift(kind, shape, gamma=0.5)
    x = torch.rand(3, *shape)
    assert torch.equal(net(x), torch.zeros_like(x))  # a fresh network leaves the classifier unchanged
    _perturb(net)
    copy = shift_from_config(net.describe(), net.state_dict())
    assert type(copy) is type(net) and copy.describe() == net.describe()
    with torch.no_grad():
        out = net(x)
        assert torch.equal(copy(x), out) and float(out.abs().max()) <= 0.5  # |mu| <= gamma
    with pytest.raises(ValueError, match="do not fit"):
        shift_from_config({**net.describe(), "input_shape": [1, 4, 4]}, net.state_dict())


def test_lipschitz_shift_net_enforces_its_bound_and_certifies_with_it():
    shape = (1, 4, 4)
    net = LipschitzShiftNet(shape, lipschitz=0.3, gamma=2.0, hidden=16, depth=3)
    _perturb(net, size=10.0)
    assert net.lipschitz_bound(2) <= 0.3 * (1 + 2e-4)
    # empirical slopes stay below the proven bound
    u = torch.randn(300, *shape, dtype=torch.float64)
    v = u + 1e-3 * torch.randn(300, *shape, dtype=torch.float64)
    double = net.double().requires_grad_(False)
    slopes = (torch.linalg.vector_norm((double(u) - double(v)).flatten(1), dim=1)
              / torch.linalg.vector_norm((u - v).flatten(1), dim=1))
    assert float(slopes.max()) <= net.lipschitz_bound(2)
    net = net.float()
    # under anisotropic noise the bound is that of u -> mu(sigma u) / sigma (sigma folded in)
    sigma = torch.rand(shape, dtype=torch.float64) + 0.5
    noise = Anisotropic(Gaussian(0.25), sigma)
    assert lipschitz_bounds(net, noise) == {2: net.lipschitz_bound(2, sigma)}
    model = LinearBinary(torch.ones(16), 0.0)
    smoothed = shift_smoothed(model, 2, noise, net)
    assert isinstance(smoothed, LipschitzShiftSmooth)
    assert smoothed.factors == {2: 1 / (1 + net.lipschitz_bound(2, sigma))}
    noisy = shift_smoothed(model, 2, Gaussian(0.25), NoisyShiftNet(shape))
    assert isinstance(noisy, Smooth) and isinstance(noisy.model, NoisyInputShift)
    with pytest.raises(ValueError, match="not a trained shift"):
        shift_smoothed(model, 2, noise, LipschitzMLP(shape))


def test_bad_shift_options_are_refused():
    with pytest.raises(ValueError, match="unknown shift kind"):
        make_shift("universal", (1, 4, 4))
    with pytest.raises(ValueError, match="lipschitz must be"):
        make_shift("lipschitz_shift", (1, 4, 4), lipschitz=0)
    with pytest.raises(ValueError, match="bad parameters"):
        make_shift("noisy_shift", (1, 4, 4), lipschitz=0.5)
    with pytest.raises(ValueError, match="gamma"):
        make_shift("noisy_shift", (1, 4, 4), gamma=-1)


# --------------------------------------------------------------------------- semi-elastic sigma


def _joint_worst_case(p, s0, s1, delta, dim):
    """Exact Neyman-Pearson infimum of P(A) under N(delta e1, s1^2) given P(A) >= p under N(0, s0^2)."""
    if s1 == s0:
        return stats.norm.cdf(stats.norm.ppf(p) - delta / s0)
    gap = abs(s1**2 - s0**2)
    lam0 = (delta * s0 / gap) ** 2  # ||x - c||^2 / s0^2 for the centre c of the Neyman-Pearson sphere
    lam1 = (delta * s1 / gap) ** 2
    if s1 > s0:  # the worst set is a ball
        return stats.ncx2.cdf(stats.ncx2.ppf(p, dim, lam0) * s0**2 / s1**2, dim, lam1)
    return stats.ncx2.sf(stats.ncx2.isf(p, dim, lam0) * s0**2 / s1**2, dim, lam1)


@pytest.mark.parametrize("dim", [1, 3, 50])
def test_chained_elastic_bound_is_below_the_exact_worst_case(dim):
    rng = np.random.default_rng(dim)
    for _ in range(15):
        p, s0, r, delta = rng.uniform(0.6, 0.999), rng.uniform(0.2, 2.0), rng.uniform(0.0, 3.0), rng.uniform(0, 1)
        r = r / dim  # keep the bound non-trivial in higher dimension
        bound = elastic_sigma_lower_bound(p, s0, r, dim, delta)
        for s1 in s0 * np.exp(r * delta * np.linspace(-1, 1, 41)):
            for d in (delta, delta / 2):
                assert bound <= _joint_worst_case(p, s0, s1, d, dim) + 1e-9


def test_elastic_bound_with_equal_levels_is_cohens():
    # the Neyman-Pearson formula of the test tends to Cohen's as the levels meet
    assert _joint_worst_case(0.9, 0.5, 0.5 * (1 + 1e-3), 0.3, 4) == pytest.approx(
        stats.norm.cdf(stats.norm.ppf(0.9) - 0.3 / 0.5), abs=5e-3)
    assert elastic_sigma_radius(0.9, 0.5, 0.0, 10) == 0.5 * stats.norm.ppf(0.9)
    assert elastic_sigma_radius(0.4, 0.5, 1.0, 10) == 0.0
    radii = [elastic_sigma_radius(0.99, 0.5, r, 10) for r in (0.0, 0.01, 0.1, 1.0)]
    assert radii == sorted(radii, reverse=True) and radii[-1] > 0


def test_elastic_sigma_with_zero_elasticity_equals_smooth():
    model = LinearBinary(torch.tensor([1.0, -1.0]), 0.1)
    x = torch.tensor([0.3, -0.2])
    elastic = ElasticSigmaSmooth(model, 2, 0.5, lambda xs: torch.ones(len(xs)), 0.0)
    plain = Smooth(model, 2, Gaussian(0.5))
    a = elastic.certify(x, 100, 5000, 0.001, generator=4)
    b = plain.certify(x, 100, 5000, 0.001, generator=4)
    assert a.prediction == b.prediction and a.radius(2) == pytest.approx(b.radius(2), rel=1e-12)
    assert elastic.predict(x, 1000, 0.001, generator=1) == plain.predict(x, 1000, 0.001, generator=1)


def _elastic_sigma(r):
    """A level with |d log sigma / dx| <= r: sigma(x) = 0.3 exp(r tanh(x - 0.3))."""
    return lambda xs: 0.3 * torch.exp(r * torch.tanh(xs.reshape(len(xs)) - 0.3))


def _exact_interval_flip(x0, r, reach):
    """Distance from x0 to the nearest point where the exact smoothed interval classifier
    (with its own level there) leaves the class it has at x0."""
    def level(t):
        return 0.3 * math.exp(r * math.tanh(t - 0.3))

    def exact_class(t):
        below = stats.norm.cdf((-1 - t) / level(t))
        above = stats.norm.sf((1 - t) / level(t))
        return int(np.argmax([below, 1 - below - above, above]))

    start = exact_class(x0)
    for t in np.linspace(0, reach, 4001)[1:]:
        if exact_class(x0 + t) != start or exact_class(x0 - t) != start:
            return t, start
    return math.inf, start


@pytest.mark.parametrize("r", [0.5, 2.0, 5.0])
def test_elastic_sigma_never_exceeds_the_exact_interval_oracle(r):
    elastic = ElasticSigmaSmooth(Interval1D(), 3, 1.0, _elastic_sigma(r), r)
    for x0 in (0.0, 0.4, -0.5):
        x = torch.tensor([x0])
        cert = elastic.certify(x, 100, 100_000, 0.001, batch_size=100_000, generator=7)
        flip, label = _exact_interval_flip(x0, r, 2.0)
        assert cert.prediction == label
        assert 0 < cert.radius(2) <= flip


def test_elastic_sigma_statistical_validity():
    r, x0 = 2.0, 0.4
    elastic = ElasticSigmaSmooth(Interval1D(), 3, 1.0, _elastic_sigma(r), r)
    flip, label = _exact_interval_flip(x0, r, 2.0)
    trials, alpha = 1000, 0.01
    certs = elastic.certify_batch(torch.tensor([[x0]]).expand(trials, 1), 32, 200, alpha, generator=21)
    assert_rate_at_most_alpha(count_overclaims(certs, flip, label, norm=2), trials, alpha)


def test_elastic_sigma_statistical_validity_where_it_is_tight():
    """With r = 0 on a half-space the bound is Cohen's, which is exact: looseness would show."""
    gap = 0.3
    elastic = ElasticSigmaSmooth(Threshold1D(), 2, 1.0, lambda xs: torch.full((len(xs),), 0.5), 0.0)
    trials, alpha = 2000, 0.01
    certs = elastic.certify_batch(torch.tensor([[gap]]).expand(trials, 1), 32, 400, alpha, generator=23)
    assert_rate_at_most_alpha(count_overclaims(certs, gap, 1, norm=2), trials, alpha)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="elasticity"):
        ElasticSigmaSmooth(Threshold1D(), 2, 1.0, lambda xs: torch.ones(len(xs)), -1.0)
    with pytest.raises(ValueError, match="Lipschitz"):
        LipschitzShiftSmooth(Threshold1D(), 2, Gaussian(1.0), lambda xs: xs, math.inf)
    with pytest.raises(ValueError, match="lipschitz"):
        LipschitzShiftSmooth(Threshold1D(), 2, Gaussian(1.0), lambda xs: xs)
    with pytest.raises(TypeError, match="isotropic"):
        PaperModeSmooth(Threshold1D(), 2, Anisotropic(Gaussian(1.0), torch.ones(1)), lambda xs: (xs, None))
    elastic = ElasticSigmaSmooth(Threshold1D(), 2, 1.0, lambda xs: -torch.ones(len(xs)), 0.0)
    with pytest.raises(ValueError, match="positive"):
        elastic.certify(torch.zeros(1), 10, 100, 0.01)

"""Smooth.certify and Smooth.predict against the exact oracles of DESIGN.md section 6,
statistical validity, the ALM must-fail test and bad input."""

import math

import pytest
import torch
from scipy import stats

from ucan_smoothing import ABSTAIN, Anisotropic, ExpInf, Gaussian, Laplace, PowerLaw, Smooth, Uniform

from oracles import (
    BallClassifier,
    LinearBinary,
    OneAxisThreshold,
    ball_exact_radius,
    ball_p_inside,
    one_axis_p_top,
)

NORMS = [1, 2, math.inf]
W = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0, -1.0, 0.25, 1.5])
SIGMA = torch.tensor([0.5, 2.0, 1.0, 0.3, 0.8, 1.7, 1.2, 0.6])
MU = torch.tensor([0.1, 0.0, -0.2, 0.0, 0.05, 0.0, 0.0, 0.1])
X = torch.tensor([0.4, 0.1, -0.3, 0.7, 0.2, 0.0, 0.5, -0.1])
B = 0.2


def exact_scaled_radius(model):
    """Exact radius of the linear oracle at X in the scaled norm ``||delta / sigma||_2``."""
    return abs(model.margin(X, MU)) / float(torch.linalg.vector_norm(SIGMA.double() * W.double()))


def linear_setup(scale=0.5, mu=MU):
    model = LinearBinary(W, B)
    return model, Smooth(model, 2, Anisotropic(Gaussian(scale), SIGMA, mu), input_shape=(8,))


def test_linear_oracle_certificate_is_sound_and_approaches_the_exact_radius():
    model, smooth = linear_setup()
    margin = model.margin(X, MU)
    exact_scaled = abs(margin) / float(torch.linalg.vector_norm(SIGMA.double() * W.double()))
    gaps = []
    for n in (1_000, 10_000, 100_000, 1_000_000):
        cert = smooth.certify(X, n0=100, n=n, alpha=0.001, batch_size=50_000, generator=n)
        assert cert.prediction == model.label(X, MU)
        region = cert.regions[0]
        assert region.radius_scaled <= exact_scaled
        for q in NORMS:  # the reported lq balls never cross the true boundary
            assert cert.radius(q) <= model.exact_radius(X, q, MU)
        gaps.append(exact_scaled - region.radius_scaled)
    assert gaps == sorted(gaps, reverse=True)
    assert gaps[-1] < 0.02 * exact_scaled


def test_linear_oracle_region_membership_matches_the_true_boundary():
    """Every point the certificate contains keeps the exact smoothed label; just past
    the certified boundary in the worst direction lies outside the region."""
    model, smooth = linear_setup()
    cert = smooth.certify(X, 100, 100_000, 0.001, batch_size=50_000, generator=1)
    label, radius = cert.prediction, cert.regions[0].radius_scaled
    sign = 1 if label == 1 else -1
    # worst direction in the scaled l2 ball: delta = -sign * R * sigma^2 w / ||sigma w||
    worst = -sign * SIGMA.double() ** 2 * W.double() / torch.linalg.vector_norm(SIGMA.double() * W.double())
    inside = worst * radius * (1 - 1e-9)
    assert cert.contains(inside) and model.label(X + inside, MU) == label
    assert not cert.contains(worst * radius * 1.001)
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        delta = torch.randn(8, generator=generator, dtype=torch.float64) * SIGMA.double()
        delta *= radius / float(torch.linalg.vector_norm(delta / SIGMA.double())) * float(torch.rand(1, generator=generator))
        assert cert.contains(delta) and model.label(X + delta, MU) == label


@pytest.mark.parametrize("noise", [Laplace(0.4), Uniform(0.4)], ids=lambda n: n.name)
def test_one_axis_certificate_is_sound_and_nearly_tight(noise):
    dim, gap, sigma0 = 5, 0.15, 0.8
    sigma = torch.tensor([sigma0, 1.0, 2.0, 1.5, 1.1])
    x = torch.tensor([gap, 0.3, -0.2, 0.9, 0.0])
    smooth = Smooth(OneAxisThreshold(0.0), 2, Anisotropic(noise, sigma))
    cert = smooth.certify(x, 100, 200_000, 0.001, batch_size=100_000, generator=7)
    assert cert.prediction == 1
    # along axis 0 the region reaches sigma0 * R1; the exact radius is `gap`
    reach = cert.regions[0].radius_scaled * sigma0
    assert reach <= gap
    assert reach > 0.9 * gap
    p_true = one_axis_p_top(noise, gap, sigma0, dim)
    assert cert.p_lower <= p_true


def test_expinf_certificate_never_exceeds_the_one_axis_radius():
    dim, gap = 4, 0.6
    x = torch.tensor([gap, 0.0, 0.0, 0.0])
    smooth = Smooth(OneAxisThreshold(0.0), 2, ExpInf(0.5))
    cert = smooth.certify(x, 100, 100_000, 0.001, batch_size=100_000, generator=3)
    assert cert.prediction == 1
    for q in NORMS:
        assert 0 < cert.radius(q) <= gap


def test_ball_classifier_certificate_is_below_the_noncentral_chi_square_radius():
    dim, ball, scale = 10, 3.0, 0.5
    x = torch.zeros(dim)
    x[0] = 1.0
    smooth = Smooth(BallClassifier(ball), 2, Gaussian(scale))
    cert = smooth.certify(x, 100, 100_000, 0.001, batch_size=100_000, generator=11)
    exact = ball_exact_radius(1.0, ball, scale, dim)
    assert cert.prediction == 1
    p_true = ball_p_inside(1.0, ball, scale, dim)
    assert cert.p_lower <= p_true
    # the Gaussian bound is tight only for half-spaces: below the exact radius,
    # and close to what the exact probability would certify
    at_p_true = Gaussian(scale).radius(p_true, 2, dim)
    assert at_p_true <= exact
    assert 0.95 * at_p_true < cert.radius(2) <= at_p_true


def overclaims(smooth, x, exact_radius, true_label, trials, n, alpha, generator):
    certificates = smooth.certify_batch(x.expand(trials, *x.shape), 32, n, alpha, batch_size=200_000, generator=generator)
    wrong = 0
    for cert in certificates:
        if cert.abstained:
            continue
        if cert.prediction != true_label or cert.regions[0].radius_scaled > exact_radius:
            wrong += 1
    return wrong


def assert_rate_at_most_alpha(wrong, trials, alpha):
    # binomial tolerance: a valid procedure exceeds this with probability < 1e-4
    assert wrong <= stats.binom.ppf(1 - 1e-4, trials, alpha), f"{wrong} over-claims in {trials} trials"


def test_statistical_validity_linear_gaussian():
    """Over many independent runs the certificate over-claims in at most alpha of them."""
    model, smooth = linear_setup(scale=1.0)
    exact_scaled = exact_scaled_radius(model)
    trials, alpha = 3000, 0.01
    wrong = overclaims(smooth, X, exact_scaled, model.label(X, MU), trials, 400, alpha, 2024)
    assert_rate_at_most_alpha(wrong, trials, alpha)


def test_statistical_validity_one_axis_laplace():
    """Laplace l1 is tight on this oracle, so any looseness in the bound shows."""
    gap, scale = 0.3, 0.5
    x = torch.tensor([gap, 0.0, 0.0])
    smooth = Smooth(OneAxisThreshold(0.0), 2, Laplace(scale))
    trials, alpha = 3000, 0.01
    wrong = overclaims(smooth, x, gap, 1, trials, 400, alpha, 99)
    assert_rate_at_most_alpha(wrong, trials, alpha)


def test_statistical_validity_at_the_paper_alpha():
    model, smooth = linear_setup(scale=1.0)
    exact_scaled = exact_scaled_radius(model)
    trials, alpha = 30_000, 0.001
    wrong = overclaims(smooth, X, exact_scaled, model.label(X, MU), trials, 1000, alpha, 5)
    assert_rate_at_most_alpha(wrong, trials, alpha)


def test_a_point_estimate_would_fail_the_validity_check():
    """Negative control: the validity check is able to fail."""
    gap, scale, n, trials = 0.3, 0.5, 400, 1000
    p_true = one_axis_p_top(Laplace(scale), gap, 1.0, 3)
    estimates = stats.binom.rvs(n, p_true, size=trials, random_state=0) / n
    wrong = sum(Laplace(scale).radius(min(p, 0.999), 1, 3) > gap for p in estimates)
    with pytest.raises(AssertionError):
        assert_rate_at_most_alpha(wrong, trials, 0.01)


def test_alm_is_not_a_radius_a_perturbation_of_size_alm_flips_the_smoothed_classifier():
    """Must-fail: the ALM ball is not certified."""
    sigma = torch.tensor([4.0, 0.25])  # geometric mean 1
    model = LinearBinary(torch.tensor([0.0, 1.0]), 0.0)
    smooth = Smooth(model, 2, Anisotropic(Gaussian(1.0), sigma))
    x = torch.tensor([0.0, 0.5])
    cert = smooth.certify(x, 100, 100_000, 0.001, batch_size=100_000, generator=0)
    assert cert.prediction == 1
    assert cert.alm > 3 * cert.radius(2)
    delta = torch.tensor([0.0, -cert.alm])  # l2 norm exactly ALM
    assert not cert.contains(delta)
    # the exact smoothed classifier flips, and so does PREDICT at x + delta
    assert model.label(x + delta) == 0
    assert smooth.predict(x + delta, 10_000, 0.001, generator=1) == 0


def test_predict_returns_the_smoothed_class_or_abstains():
    model, smooth = linear_setup()
    assert smooth.predict(X, 2000, 0.001, generator=0) == model.label(X, MU)
    # on the decision boundary the two classes tie: PREDICT abstains
    boundary = X.clone()
    boundary[0] -= model.margin(X, MU) / float(W[0])
    assert smooth.predict(boundary, 2000, 0.001, generator=0) == ABSTAIN
    assert smooth.certify(boundary, 100, 2000, 0.001, generator=0).abstained


def test_same_seed_same_certificate_and_packing_does_not_change_the_law():
    model, smooth = linear_setup()
    a = smooth.certify(X, 100, 5000, 0.001, batch_size=700, generator=42)
    b = smooth.certify(X, 100, 5000, 0.001, batch_size=700, generator=42)
    assert a == b
    batch = smooth.certify_batch(torch.stack([X, -X, X]), 50, 3000, 0.001, batch_size=4096, generator=1)
    assert [c.prediction for c in batch] == [model.label(X, MU), model.label(-X, MU), model.label(X, MU)]
    assert batch[0].p_lower != batch[2].p_lower  # independent noise per image


def test_abstention_certifies_nothing():
    model, smooth = linear_setup()
    boundary = X.clone()
    boundary[0] -= model.margin(X, MU) / float(W[0])
    cert = smooth.certify(boundary, 100, 1000, 0.001, generator=0)
    assert cert.prediction == ABSTAIN
    assert cert.radii() == {"l1": 0.0, "l2": 0.0, "linf": 0.0} and cert.alm == 0.0
    assert not cert.contains(torch.zeros(8))


# -- bad input ------------------------------------------------------------------------


class WrongClasses(torch.nn.Module):
    def forward(self, x):
        return torch.zeros(len(x), 7)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda s: s.certify(torch.zeros(9), 10, 100, 0.001), r"shape \(9,\)"),
        (lambda s: s.certify(torch.zeros(1, 8), 10, 100, 0.001), "without a batch dimension"),
        (lambda s: s.certify(torch.full((8,), float("nan")), 10, 100, 0.001), "NaN"),
        (lambda s: s.certify(X, 10, 100, 0.0), "alpha"),
        (lambda s: s.certify(X, 10, 100, 1.0), "alpha"),
        (lambda s: s.predict(X, 100, -0.5), "alpha"),
        (lambda s: s.certify(X, 0, 100, 0.001), "n0"),
        (lambda s: s.certify(X, 10, 0, 0.001), "n must be"),
        (lambda s: s.certify(X, 10, 5, 0.001), "too small to certify anything"),
        (lambda s: s.certify(X, 10, 100, 0.001, batch_size=0), "batch_size"),
        (lambda s: s.certify_batch(X, 10, 100, 0.001), "batch"),
    ],
)
def test_bad_input_gets_a_clear_error(call, match):
    _, smooth = linear_setup()
    with pytest.raises(ValueError, match=match):
        call(smooth)


def test_model_with_wrong_number_of_classes():
    smooth = Smooth(WrongClasses(), 10, Gaussian(0.5))
    with pytest.raises(ValueError, match="num_classes=10"):
        smooth.predict(torch.zeros(3), 10, 0.01)


def test_sigma_of_the_wrong_shape_for_the_input():
    smooth = Smooth(LinearBinary(torch.ones(4), 0.0), 2, Anisotropic(Gaussian(0.5), torch.ones(3)))
    with pytest.raises(ValueError, match="sigma of shape"):
        smooth.certify(torch.zeros(4), 10, 100, 0.001)


def test_generator_on_another_device_or_of_wrong_type():
    _, smooth = linear_setup()
    with pytest.raises(TypeError, match="generator"):
        smooth.predict(X, 100, 0.01, generator="seed")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_model_gets_float32_noise(dtype):
    drawn = []

    class SpyGaussian(Gaussian):
        def sample(self, shape, **kwargs):
            noise = super().sample(shape, **kwargs)
            drawn.append(noise.dtype)
            return noise

    model = torch.nn.Linear(8, 3).to(dtype)
    smooth = Smooth(model, 3, SpyGaussian(0.5), input_shape=(8,))
    certificate = smooth.certify(X, 10, 200, 0.01, batch_size=64, generator=0)
    assert drawn and set(drawn) == {torch.float32}  # a coarse half-precision grid is not Gaussian noise
    assert smooth.model(X[None]).dtype == torch.float32
    with torch.no_grad():  # the model itself still runs in its own precision
        expected = model(X[None].to(dtype)).float()
    torch.testing.assert_close(smooth.model(X[None]), expected)
    assert certificate.prediction in (ABSTAIN, 0, 1, 2)


# -- noise that overflows, NaN logits (the certificate would be about a noise never drawn) --------


class Recording(torch.nn.Module):
    """``inner`` that counts its forward passes."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, x):
        self.calls += 1
        return self.inner(x)


@pytest.mark.parametrize(
    "make_noise, match",
    [
        (lambda: Gaussian(1e39), r"scale=1e\+39 is too large for noise drawn in torch.float32"),
        (lambda: Anisotropic(Gaussian(0.5), SIGMA.double() * 1e39), r"sigma=.* too large .* torch.float32"),
        (lambda: Anisotropic(Gaussian(0.5), SIGMA, MU.double() * 1e40), r"\|mu\|=.* too large .* torch.float32"),
        (lambda: Anisotropic(Gaussian(1e30), SIGMA * 1e5), r"scale \* sigma=.* too large"),
    ],
)
def test_noise_beyond_float32_is_refused_before_any_forward_pass(make_noise, match):
    model = Recording(LinearBinary(W, B))
    with pytest.raises(ValueError, match=match):
        Smooth(model, 2, make_noise(), input_shape=(8,)).certify(X, 10, 100, 0.001, generator=0)
    assert model.calls == 0


def test_noisy_inputs_that_overflow_are_refused():
    # a - dim = 0.01: the radial law is so heavy-tailed that about 40% of float32 draws are inf
    smooth = Smooth(LinearBinary(W, B), 2, PowerLaw(1.0, 8.01), input_shape=(8,))
    with pytest.raises(ValueError, match="noisy inputs overflow torch.float32"):
        smooth.certify(X, 10, 100, 0.001, generator=0)


class NaNLogits(torch.nn.Module):
    def forward(self, x):
        return torch.full((len(x), 3), float("nan"))


@pytest.mark.parametrize(
    "call",
    [
        lambda s: s.certify(X, 10, 100, 0.001, generator=0),
        lambda s: s.predict(X, 100, 0.001, generator=0),
        lambda s: s.certify_radius(X, 0.1, 2, 0.001, generator=0),
    ],
)
def test_nan_logits_are_an_error_not_class_0(call):
    smooth = Smooth(NaNLogits(), 3, Gaussian(0.5), input_shape=(8,))
    with pytest.raises(ValueError, match=r"NaN logits .*noise Gaussian\(scale=0.5\), inputs in \[-0.3, 0.7\]"):
        call(smooth)


def test_minus_infinite_log_probabilities_still_certify():
    class LogOneHot(torch.nn.Module):  # log-probabilities of a hard classifier: 0 and -inf
        def forward(self, x):
            return torch.log(torch.nn.functional.one_hot(LinearBinary(W, B)(x).argmax(1), 2).to(x.dtype))

    smooth = Smooth(LogOneHot(), 2, Gaussian(0.5), input_shape=(8,))
    reference = Smooth(LinearBinary(W, B), 2, Gaussian(0.5), input_shape=(8,))
    assert smooth.certify(X, 10, 200, 0.01, generator=0) == reference.certify(X, 10, 200, 0.01, generator=0)


def test_a_model_without_parameters_gets_at_least_float32_noise():
    drawn = []

    class SpyGaussian(Gaussian):
        def sample(self, shape, **kwargs):
            drawn.append(kwargs["dtype"])
            return super().sample(shape, **kwargs)

    smooth = Smooth(LinearBinary(W, B), 2, SpyGaussian(0.5), input_shape=(8,))
    smooth.certify(X.half(), 10, 100, 0.01, generator=0)
    assert drawn and set(drawn) == {torch.float32}

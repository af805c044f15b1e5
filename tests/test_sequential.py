"""Sequential certification at a radius and sequential PREDICT (sequential.py)
against the exact oracles of DESIGN.md section 6: validity under early
stopping (with a must-fail naive control), agreement with the fixed-n
certificate, sample savings, the p_needed threshold and bad input."""

import math

import numpy as np
import pytest
import torch
from scipy import stats

from ucan_smoothing import (
    ABSTAIN,
    Anisotropic,
    Certificate,
    ExpInf,
    Gaussian,
    Laplace,
    PowerLaw,
    Smooth,
    Uniform,
)
from ucan_smoothing.core.sequential import (
    StagedClopperPearson,
    certify_radius,
    certify_radius_batch,
    geometric_schedule,
    p_needed,
    predict_sequential,
    predict_sequential_batch,
    radius_at,
    run_stages,
)
from ucan_smoothing.core.statistics import clopper_pearson_upper

from oracles import LinearBinary, OneAxisThreshold, one_axis_p_top

NORMS = [1, 2, math.inf]
W = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0, -1.0, 0.25, 1.5])
SIGMA = torch.tensor([0.5, 2.0, 1.0, 0.3, 0.8, 1.7, 1.2, 0.6])
MU = torch.tensor([0.1, 0.0, -0.2, 0.0, 0.05, 0.0, 0.0, 0.1])
X = torch.tensor([0.4, 0.1, -0.3, 0.7, 0.2, 0.0, 0.5, -0.1])


def assert_rate_at_most_alpha(wrong, trials, alpha):
    # binomial tolerance: a valid procedure exceeds this with probability < 1e-4
    assert wrong <= stats.binom.ppf(1 - 1e-4, trials, alpha), f"{wrong} over-claims in {trials} trials"


# -- p_needed ---------------------------------------------------------------------------

NOISES = [
    Gaussian(0.5),
    Laplace(0.4),
    Uniform(0.7),
    ExpInf(0.3),
    PowerLaw(0.3, a=12.0),
    Anisotropic(Gaussian(0.5), SIGMA),
    Anisotropic(Laplace(0.4), SIGMA, MU),
    Anisotropic(Uniform(0.7), SIGMA),
]


@pytest.mark.parametrize("noise", NOISES, ids=repr)
@pytest.mark.parametrize("norm", NORMS)
def test_p_needed_round_trip(noise, norm):
    """radius(p_needed(r)) >= r, and just below p_needed the radius is short of r."""
    shape = (8,)
    reachable = radius_at(noise, 0.9999, norm, shape)
    for fraction in (0.01, 0.3, 0.8, 1.0):
        r = fraction * reachable
        p = p_needed(noise, r, norm, shape)
        assert 0.5 < p < 1
        assert radius_at(noise, p, norm, shape) >= r
        assert radius_at(noise, p - 1e-6, norm, shape) < r
        # the same radius as a Certificate built from p reports
        cert = Certificate(prediction=1, p_lower=p, norm=noise.primary_norm, regions=tuple(noise.regions(p, shape)))
        assert cert.radius(norm) >= r


def test_p_needed_matches_the_gaussian_closed_form():
    # l2 radius lambda * PhiInv(p), so p_needed = Phi(r / lambda)
    for r in (0.01, 0.5, 1.7):
        assert p_needed(Gaussian(0.5), r, "l2", 10) == pytest.approx(stats.norm.cdf(r / 0.5), abs=1e-12)


# -- validity under early stopping --------------------------------------------------------
#
# One-axis threshold oracle with anisotropic Gaussian noise whose smallest sigma
# is on the decisive axis: the l2 certificate lambda * PhiInv(p) * min(sigma) is
# then tight, so the smoothed classifier is robust at r exactly when p >= p_needed(r).
# Radius chosen so that the true p is JUST below p_needed: any "certified" is wrong.

GAP, SCALE, ONE_AXIS_SIGMA = 0.5, 0.5, torch.tensor([0.8, 1.0, 2.0])
TRIALS, ALPHA = 1200, 0.05
SMALL = dict(n0=10, max_n=1000, first=20, stages=8, batch_size=200_000)


def near_threshold_setup():
    smooth = Smooth(OneAxisThreshold(0.0), 2, Anisotropic(Gaussian(SCALE), ONE_AXIS_SIGMA))
    p_true = one_axis_p_top(Gaussian(SCALE), GAP, float(ONE_AXIS_SIGMA[0]), 3)
    radius = SCALE * float(ONE_AXIS_SIGMA[0]) * stats.norm.ppf(p_true + 0.002)
    assert radius > GAP  # truly not robust at this radius
    threshold = p_needed(smooth.noise, radius, 2, (3,))
    assert p_true < threshold < p_true + 0.003
    return smooth, torch.tensor([GAP, 0.0, 0.0]), radius


@pytest.mark.parametrize("method", ["cp", "betting"])
def test_over_claim_rate_under_early_stopping_is_at_most_alpha(method):
    smooth, x, radius = near_threshold_setup()
    decisions = certify_radius_batch(
        smooth, x.expand(TRIALS, 3), radius, 2, ALPHA, method=method, generator=2024, **SMALL
    )
    wrong = sum(d.decision for d in decisions)
    assert_rate_at_most_alpha(wrong, TRIALS, ALPHA)
    assert all(d.samples_used <= SMALL["n0"] + SMALL["max_n"] for d in decisions)
    assert any(d.n < SMALL["max_n"] for d in decisions)  # early stopping did happen


def test_naive_unsplit_alpha_over_claims_so_the_validity_test_can_fail():
    """Negative control: the same stages, each checked at the full alpha (no
    union bound), claim 'certified' far more often than alpha on the same setup."""
    smooth, x, radius = near_threshold_setup()
    threshold = p_needed(smooth.noise, radius, 2, (3,))
    schedule = geometric_schedule(SMALL["max_n"], SMALL["stages"], SMALL["first"])
    xs = x.expand(TRIALS, 3)
    generator = torch.Generator().manual_seed(7)
    tests = [StagedClopperPearson(1, threshold, schedule, [ALPHA] * len(schedule)) for _ in range(TRIALS)]
    run_stages(lambda rows, m: smooth.count_votes(xs[rows], m, 200_000, generator), tests, schedule)
    wrong = sum(test.certified for test in tests)
    with pytest.raises(AssertionError):
        assert_rate_at_most_alpha(wrong, TRIALS, ALPHA)


class UpperBoundOnly(StagedClopperPearson):
    """The futility rule of earlier versions: stop when the upper bound at the stage level is
    below the threshold (kept here to measure what the budget rule changes)."""

    def futile(self):
        return clopper_pearson_upper(self.hits, self.n, self.stage_alphas[self.stages_run - 1]) < self.threshold


def staged_on_binomial_votes(test_class, p, schedule, stage_alphas, seed, threshold=0.8):
    """One test fed exact binomial votes for class 1, stage by stage, from its own generator."""
    rng = np.random.default_rng(seed)
    test, drawn = test_class(1, threshold, schedule, stage_alphas), 0
    for size in schedule:
        if test.done:
            break
        hits = int(rng.binomial(size - drawn, p))
        test.update(torch.tensor([size - drawn - hits, hits]))
        drawn = size
    return test


def test_futility_stops_inputs_the_budget_cannot_certify_and_keeps_the_others():
    """Paired with the upper-bound rule on the same draws (so the budget rule, never stopping
    later, never certifies more): just below the threshold and just above it, closer than the final
    stage's margin (about 0.0047 here), the upper-bound rule ran to the full budget; the budget rule
    stops far earlier, and where the budget can reach the threshold it certifies about as often."""
    alpha, max_n, threshold = 0.001, 100_000, 0.8
    schedule = geometric_schedule(max_n, 10, 100)
    stage_alphas = [alpha / len(schedule)] * len(schedule)
    trials = 200
    calls, certified = {}, {}
    for gap in (-0.003, 0.001, 0.006, 0.012):
        for rule in (StagedClopperPearson, UpperBoundOnly):
            tests = [staged_on_binomial_votes(rule, threshold + gap, schedule, stage_alphas, [33, trial])
                     for trial in range(trials)]
            calls[gap, rule] = sum(t.n for t in tests) / trials
            certified[gap, rule] = sum(t.certified for t in tests) / trials
    named = {f"{gap:+g} {rule.__name__}": (round(calls[gap, rule]), certified[gap, rule]) for gap, rule in calls}
    print(f"\n(mean samples, share certified) by p - threshold and rule: {named}")
    assert calls[-0.003, UpperBoundOnly] > 0.9 * max_n and calls[0.001, UpperBoundOnly] > 0.99 * max_n
    assert calls[-0.003, StagedClopperPearson] < 0.5 * calls[-0.003, UpperBoundOnly]
    assert calls[0.001, StagedClopperPearson] < 0.9 * calls[0.001, UpperBoundOnly]
    for gap in (-0.003, 0.001, 0.006, 0.012):
        assert certified[gap, StagedClopperPearson] <= certified[gap, UpperBoundOnly]
    for gap in (0.006, 0.012):  # within reach of the budget: hardly any certification lost
        assert certified[gap, StagedClopperPearson] >= certified[gap, UpperBoundOnly] - 0.05
    assert certified[0.012, StagedClopperPearson] >= 0.95


def test_sequential_predict_returns_a_class_at_most_alpha_often_on_a_tie():
    """At the exact smoothed decision boundary (p = 1/2 for both classes) any
    returned class is a false claim; early stopping must not inflate the rate."""
    smooth = Smooth(OneAxisThreshold(0.0), 2, Laplace(0.5))
    trials = 1000
    predictions = predict_sequential_batch(
        smooth, torch.zeros(trials, 3), ALPHA, max_n=400, first=20, stages=8, batch_size=200_000, generator=3
    )
    wrong = sum(not p.abstained for p in predictions)
    assert_rate_at_most_alpha(wrong, trials, ALPHA)
    assert all(p.samples_used == 400 for p in predictions if p.abstained)


# -- agreement with the fixed-n certificate, and savings ------------------------------------


def linear_setup():
    model = LinearBinary(W, 0.2)
    smooth = Smooth(model, 2, Anisotropic(Gaussian(0.5), SIGMA, MU), input_shape=(8,))
    p_true = model.p_top_gaussian(X, 0.5, SIGMA, MU)
    return model, smooth, p_true


def test_clear_cases_agree_with_fixed_n_and_use_far_fewer_samples():
    model, smooth, p_true = linear_setup()
    fixed = smooth.certify(X, 100, 100_000, 0.001, batch_size=100_000, generator=0)
    for norm in NORMS:
        at_p_true = radius_at(smooth.noise, p_true, norm, (8,))
        for radius, expected in ((0.5 * at_p_true, True), (1.5 * at_p_true, False)):
            decision = certify_radius(smooth, X, radius, norm, 0.001, generator=1)
            assert decision.decision is expected
            assert (fixed.radius(norm) >= radius) is expected
            assert decision.samples_used < 10_000
            if expected:
                assert decision.prediction == fixed.prediction == model.label(X, MU)
                assert decision.p_lower >= decision.p_needed
                assert radius_at(smooth.noise, decision.p_lower, norm, (8,)) >= radius
            else:
                assert decision.prediction == ABSTAIN and decision.selected == model.label(X, MU)


@pytest.mark.parametrize("method", ["cp", "betting"])
def test_average_saving_at_least_10x_well_above_the_threshold(method):
    """p_true well above p_needed: the decision comes after a few hundred samples
    instead of n0 + 100,000."""
    _, smooth, p_true = linear_setup()
    radius = radius_at(smooth.noise, p_true, 2, (8,)) / 2
    runs = 40
    decisions = certify_radius_batch(
        smooth, X.expand(runs, 8), radius, 2, 0.001, max_n=100_000, method=method, batch_size=100_000, generator=5
    )
    assert all(d.decision for d in decisions)
    average = sum(d.samples_used for d in decisions) / runs
    saving = 100_100 / average
    print(f"\n{method}: p_true={p_true:.4f}, p_needed={decisions[0].p_needed:.4f}, "
          f"average samples {average:.0f}, saving {saving:.0f}x vs n0 + 100,000")
    assert saving >= 10


def test_near_one_threshold_still_saves_samples():
    """A demanding radius (p_needed = 0.99) on an easy input (p_true = 0.999)."""
    smooth = Smooth(OneAxisThreshold(0.0), 2, Gaussian(0.5))
    gap = 0.5 * stats.norm.ppf(0.999)
    radius = 0.5 * stats.norm.ppf(0.99)
    decisions = certify_radius_batch(smooth, torch.tensor([[gap, 0.0]] * 20), radius, 2, 0.001,
                                     batch_size=100_000, generator=9)
    assert all(d.decision for d in decisions)
    assert sum(d.samples_used for d in decisions) / 20 < 10_000


def test_sequential_predict_stops_early_when_clear():
    model, smooth, _ = linear_setup()
    result = predict_sequential(smooth, X, 0.001, generator=0)
    assert result.prediction == model.label(X, MU)
    assert result.samples_used <= 1000 and result.stages_run <= 3


def test_same_seed_same_decision():
    _, smooth, p_true = linear_setup()
    radius = radius_at(smooth.noise, p_true, 2, (8,))  # borderline: runs several stages
    a = certify_radius(smooth, X, radius, 2, 0.001, max_n=5000, generator=42)
    b = certify_radius(smooth, X, radius, 2, 0.001, max_n=5000, generator=42)
    assert a == b and a.stages_run > 1


def test_schedule_is_geometric_and_ends_at_max_n():
    schedule = geometric_schedule(100_000, 10, 100)
    assert schedule[0] == 100 and schedule[-1] == 100_000 and len(schedule) == 10
    assert all(a < b for a, b in zip(schedule, schedule[1:]))
    assert geometric_schedule(50, 10, 100) == (50,)


# -- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda s: certify_radius(s, X, 0.0, 2, 0.001), "radius must be finite and > 0"),
        (lambda s: certify_radius(s, X, -0.1, 2, 0.001), "radius must be finite and > 0"),
        (lambda s: certify_radius(s, X, float("nan"), 2, 0.001), "radius must be finite and > 0"),
        (lambda s: certify_radius(s, X, 0.1, 2, 0.0), "alpha"),
        (lambda s: certify_radius(s, X, 0.1, 2, 1.0), "alpha"),
        (lambda s: certify_radius(s, X, 0.1, 3, 0.001), "unknown norm"),
        (lambda s: certify_radius(s, X, 0.1, 2, 0.001, method="hoeffding"), "unknown method"),
        (lambda s: certify_radius(s, X, 0.1, 2, 0.001, max_n=12), r"max_n=12 is too small.*split over"),
        (lambda s: certify_radius(s, X, 0.1, 2, 0.001, max_n=12, method="betting"), "max_n=12 is too small"),
        (lambda s: certify_radius(s, X, 0.1, 2, 0.001, n0=0), "n0"),
        (lambda s: predict_sequential(s, X, 0.001, max_n=10), "max_n=10 is too small to predict"),
        (lambda s: predict_sequential(s, X, 1.5), "alpha"),
    ],
)
def test_bad_input_gets_a_clear_error(call, match):
    _, smooth, _ = linear_setup()
    with pytest.raises(ValueError, match=match):
        call(smooth)


def test_unreachable_radius():
    # uniform noise certifies at most lambda in l1, whatever p
    with pytest.raises(ValueError, match="cannot be certified with this noise for any p_lower < 1"):
        p_needed(Uniform(0.7), 0.8, 1, 8)
    smooth = Smooth(OneAxisThreshold(0.0), 2, Uniform(0.7))
    with pytest.raises(ValueError, match="cannot be certified"):
        certify_radius(smooth, torch.tensor([0.5, 0.0]), 0.8, 1, 0.001)


def test_smooth_methods_delegate_to_the_module():
    model, smooth, p_true = linear_setup()
    radius = radius_at(smooth.noise, p_true, 2, (8,)) / 2
    assert smooth.certify_radius(X, radius, "l2", 0.001, generator=1) == certify_radius(
        smooth, X, radius, 2, 0.001, generator=1
    )
    assert smooth.predict_sequential(X, 0.001, generator=0).prediction == model.label(X, MU)

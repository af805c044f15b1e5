"""Whole-table certification (core/grid.py) against exact oracles: over-claim rate at most
alpha at every grid radius under early stopping (several alphas, Gaussian, Laplace and an
anisotropic case; a must-fail unsplit control), agreement with fixed-n CERTIFY away from the
thresholds, how often the two differ next to one, savings, and bad grids."""

import math

import numpy as np
import pytest
import torch
from scipy import stats

from ucan_smoothing import ABSTAIN, Anisotropic, Gaussian, Laplace, Smooth, Uniform
from ucan_smoothing.core.grid import (
    ZERO_RADIUS_THRESHOLD,
    GridPlan,
    GridTest,
    aligned_schedule,
    all_votes_size,
    certify_grid,
    certify_grid_batch,
    plan_grid,
)
from ucan_smoothing.core.sequential import geometric_schedule, p_needed, radius_at
from ucan_smoothing.core.statistics import clopper_pearson_lower, clopper_pearson_upper

from oracles import LinearBinary, OneAxisThreshold, one_axis_p_top

SHAPE = (3,)


def assert_rate_at_most_alpha(wrong, trials, alpha):
    # one-sided binomial test: a valid procedure fails it with probability below 1e-3
    assert stats.binomtest(wrong, trials, alpha, alternative="greater").pvalue > 1e-3, (
        f"{wrong} over-claims in {trials} trials at alpha={alpha}"
    )


def simulate(plan, p_true, trials, seed, stage_alphas=None, test_class=GridTest):
    """GridTests fed exact binomial votes for class 1 (the true class), stage by stage."""
    rng = np.random.default_rng(seed)
    stage_alphas = plan.stage_alphas if stage_alphas is None else stage_alphas
    tests = []
    for _ in range(trials):
        test = test_class(1, plan.thresholds, plan.schedule, stage_alphas)
        drawn = 0
        for size in plan.schedule:
            if test.done:
                break
            hits = rng.binomial(size - drawn, p_true)
            test.update(np.array([size - drawn - hits, hits]))
            drawn = size
        tests.append(test)
    return tests


def certified_radius(plan, test):
    return plan.radii[test.certified_index] if test.certified_index >= 0 else -math.inf


# -- oracles with a known exact radius, near a grid point --------------------------------------------
#
# OneAxisThreshold f(x) = [x_0 > 0] at x = (gap, 0, 0): the smoothed classifier flips exactly at
# distance gap (every norm). With the noise's scale smallest on axis 0, the certificate of each
# setup below is tight: radius_at(p_true) = gap, so a grid point just above gap has a threshold
# just above p_true, the hardest case for validity.

AXIS_SIGMA = torch.tensor([0.8, 1.0, 2.0])
SETUPS = {
    "gaussian": (Gaussian(0.5), 2, 1.0),
    "laplace": (Laplace(0.4), 1, 1.0),
    "anisotropic-gaussian": (Anisotropic(Gaussian(0.5), AXIS_SIGMA), 2, float(AXIS_SIGMA[0])),
}
GRID_STAGES = dict(max_n=2000, stages=4, first=50)


def setup_near(name, alpha, position):
    """(plan, p_true, true radius): the grid point r = 0.5 has p_needed(r) = p_true + 0.002 ("below":
    the true radius is just below r, certifying r over-claims) or p_true - 0.002 ("above")."""
    noise, norm, sigma0 = SETUPS[name]
    grid_point = 0.5
    target = p_needed(noise, grid_point, norm, SHAPE) + (-0.002 if position == "below" else 0.002)
    gap = radius_at(noise, target, norm, SHAPE)  # tight: the exact radius at p = target
    p_true = one_axis_p_top(noise.base if name.startswith("aniso") else noise, gap, sigma0, 3)
    assert p_true == pytest.approx(target, abs=1e-9)
    plan = plan_grid(noise, [0.0, 0.2, grid_point, 1.0], norm, SHAPE, alpha, **GRID_STAGES)
    return plan, p_true, gap


@pytest.mark.parametrize(
    "seed, name, alpha, position",
    [
        (1, "gaussian", 0.01, "below"),
        (2, "gaussian", 0.05, "below"),
        (3, "gaussian", 0.05, "above"),
        (4, "laplace", 0.01, "below"),
        (5, "laplace", 0.05, "below"),
        (6, "anisotropic-gaussian", 0.05, "below"),
    ],
)
def test_over_claim_rate_is_at_most_alpha_at_every_grid_radius(seed, name, alpha, position):
    plan, p_true, gap = setup_near(name, alpha, position)
    trials = 500
    tests = simulate(plan, p_true, trials, seed=seed)
    wrong = sum(certified_radius(plan, t) > gap for t in tests)
    assert_rate_at_most_alpha(wrong, trials, alpha)
    assert all(t.n <= plan.schedule[-1] for t in tests)
    # the radii below the true one are certified in most runs, and p_lower stays below p_true there
    assert sum(t.certified_index >= 1 for t in tests) > 0.9 * trials
    assert sum(t.p_lower >= p_true for t in tests) <= stats.binom.ppf(1 - 1e-3, trials, alpha)
    if position == "above":  # the true radius is above 0.5: certifying it is right, and happens
        assert sum(t.certified_index >= 2 for t in tests) > 0.01 * trials


def test_unsplit_alpha_over_claims_so_the_validity_test_can_fail():
    """Negative control: every stage checked at the full alpha (no union bound) over-claims
    far more often than alpha on the same setup."""
    plan, p_true, gap = setup_near("gaussian", 0.05, "below")
    trials = 1000
    tests = simulate(plan, p_true, trials, seed=11, stage_alphas=(0.05,) * len(plan.schedule))
    wrong = sum(certified_radius(plan, t) > gap for t in tests)
    with pytest.raises(AssertionError):
        assert_rate_at_most_alpha(wrong, trials, 0.05)


# -- the stages ------------------------------------------------------------------------------------------

TABLE = [0.25 * k for k in range(8)]  # the paper's l2 grid, as far as noise 0.25 certifies


@pytest.mark.parametrize("scale", [0.25, 0.5, 1.0])
def test_aligned_stages_fit_their_level_and_reach_each_threshold_at_its_fewest_samples(scale):
    plan = plan_grid(Gaussian(scale), TABLE, 2, (1, 28, 28), 0.001)
    geometric = geometric_schedule(100_000, 10, 100)
    assert set(geometric) <= set(plan.schedule) and plan.schedule == tuple(sorted(set(plan.schedule)))
    assert sum(plan.stage_alphas) <= 0.001 * (1 + 1e-12) and len(set(plan.stage_alphas)) == 1  # alpha / S, rounded
    stage_alpha = plan.stage_alphas[0]
    for threshold in plan.thresholds[: plan.reachable]:
        size = all_votes_size(threshold, stage_alpha)
        # the fewest: one sample less cannot reach the threshold even with every vote
        assert clopper_pearson_lower(size, size, stage_alpha) >= threshold
        assert size == 1 or clopper_pearson_lower(size - 1, size - 1, stage_alpha) < threshold
        first_reaching = min(n for n in plan.schedule if clopper_pearson_lower(n, n, stage_alpha) >= threshold)
        assert first_reaching == max(size, plan.schedule[0])


def test_aligned_schedule_level_counts_every_stage():
    thresholds = [p_needed(Gaussian(0.5), r, 2, (8,)) for r in (0.25, 0.5, 1.0, 1.5)]
    schedule, stage_alpha = aligned_schedule(thresholds, 100_000, 0.01, 10, 100)
    assert len(schedule) * stage_alpha <= 0.01 + 1e-15
    assert len(schedule) > 10  # the thresholds' own stages were added
    assert aligned_schedule(thresholds, 100_000, 0.01, 10, 100) == (schedule, stage_alpha)  # fixed in advance


@pytest.mark.parametrize("scale, gain", [(0.25, 1.4), (1.0, 1.25)])
def test_all_votes_for_the_class_stop_at_the_top_thresholds_own_stage(scale, gain):
    """An image whose every vote goes to its class (most MNIST images at noise 0.25) stops where
    the largest reachable grid radius first becomes provable, not at the next geometric stage."""
    plans = {aligned: plan_grid(Gaussian(scale), TABLE + ([2.0, 2.25] if scale == 1.0 else []), 2, (1, 28, 28),
                                0.001, aligned=aligned) for aligned in (True, False)}
    used = {}
    for aligned, plan in plans.items():
        (test,) = simulate(plan, 1.0, 1, seed=0)
        assert test.certified_index == plan.reachable - 1
        used[aligned] = test.n
    top = plans[True].thresholds[plans[True].reachable - 1]
    assert used[True] == all_votes_size(top, plans[True].stage_alphas[0])
    assert used[False] >= gain * used[True]


# -- the test object ------------------------------------------------------------------------------------


def test_certified_index_and_stopping_rules():
    schedule, stage_alphas = (100, 1000), (0.005, 0.005)
    thresholds = (ZERO_RADIUS_THRESHOLD, 0.6, 0.9, 0.999999)  # the last is out of reach of 1000 samples
    test = GridTest(0, thresholds, schedule, stage_alphas)
    assert test.reachable == 3 and not test.done
    test.update(torch.tensor([100, 0]))  # all votes for class 0: L = 0.005^(1/100) = 0.948
    assert test.p_lower == pytest.approx(0.005 ** (1 / 100))
    assert test.certified_index == 2 and test.done  # (a): every reachable threshold is certified

    test = GridTest(1, thresholds, schedule, stage_alphas)
    test.update(np.array([30, 70]))  # p_hat 0.7: 0.6 not yet shown, 0.9 clearly out of reach
    assert test.certified_index == 0 and not test.done  # U > 0.6: the next radius may still come
    test = GridTest(1, thresholds, schedule, stage_alphas)
    test.update(np.array([45, 55]))
    assert test.certified_index == -1 and test.p_lower < 0.5 and not test.done
    test.update(np.array([500, 400]))  # p_hat 0.455 over 1000: (c) the budget is spent
    assert test.done and test.stages_run == 2 and test.n == 1000 and test.hits == 455

    test = GridTest(1, thresholds, schedule, stage_alphas)
    test.update(np.array([65, 35]))  # U < 1/2: (b) futile, stop before the second stage
    assert test.done and test.certified_index == -1 and test.stages_run == 1


def test_p_lower_is_the_largest_stage_bound():
    test = GridTest(1, (0.6, 0.95), (100, 200), (0.01, 0.01))
    test.update(np.array([10, 90]))
    first = test.p_lower
    test.update(np.array([60, 40]))  # the cumulative estimate drops: the earlier bound is kept
    assert test.p_lower == first == clopper_pearson_lower(90, 100, 0.01)
    assert test.p_lower > clopper_pearson_lower(130, 200, 0.01)
    assert test.certified_index == 0


def test_bad_test_arguments():
    with pytest.raises(ValueError, match="non-decreasing"):
        GridTest(0, (0.7, 0.6), (10,), (0.01,))
    with pytest.raises(ValueError, match="same"):
        GridTest(0, (0.6,), (10, 20), (0.01,))


# -- through Smooth: agreement with fixed-n CERTIFY, savings ------------------------------------------

W = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0, -1.0, 0.25, 1.5])
SIGMA = torch.tensor([0.5, 2.0, 1.0, 0.3, 0.8, 1.7, 1.2, 0.6])
MU = torch.tensor([0.1, 0.0, -0.2, 0.0, 0.05, 0.0, 0.0, 0.1])
X = torch.tensor([0.4, 0.1, -0.3, 0.7, 0.2, 0.0, 0.5, -0.1])


def linear_setup():
    model = LinearBinary(W, 0.2)
    smooth = Smooth(model, 2, Anisotropic(Gaussian(0.5), SIGMA, MU), input_shape=(8,))
    return model, smooth, model.p_top_gaussian(X, 0.5, SIGMA, MU)


@pytest.mark.parametrize("norm", [2, math.inf])
def test_easy_cases_agree_with_fixed_n_certify_and_save_samples(norm):
    """p_true far from every threshold: the grid's answer is the fixed-n CERTIFY table's."""
    model, smooth, p_true = linear_setup()
    at_p_true = radius_at(smooth.noise, p_true, norm, (8,))
    radii = [0.0, 0.3 * at_p_true, 0.6 * at_p_true, 1.5 * at_p_true, 3 * at_p_true]
    fixed = smooth.certify(X, 100, 100_000, 0.001, batch_size=100_000, generator=0)
    expected = tuple(fixed.radius(norm) >= r if r > 0 else not fixed.abstained for r in radii)
    assert expected == (True, True, True, False, False)
    decisions = certify_grid_batch(smooth, X.expand(20, 8), radii, norm, 0.001, batch_size=100_000, generator=1)
    for d in decisions:
        assert d.certified == expected
        assert d.prediction == fixed.prediction == model.label(X, MU)
        assert d.certified_radius == radii[2] and d.certified_at(radii[2]) and not d.certified_at(radii[3])
        assert radius_at(smooth.noise, d.p_lower, norm, (8,)) >= d.certified_radius
    average = sum(d.samples_used for d in decisions) / len(decisions)
    print(f"\ngrid l{norm}: average samples {average:.0f} vs 100,100 for fixed-n")
    assert average < 5_000


def test_how_often_grid_and_fixed_n_differ_next_to_a_threshold():
    """Exact binomial draws: fixed-n CERTIFY (n = max_n at alpha) against the grid test, for p at
    several distances from a threshold. Far from it they agree; next to it they may differ (the
    looks cost alpha, and futility may stop early): the rate is printed and bounded loosely."""
    alpha, max_n, threshold = 0.001, 100_000, 0.8
    schedule = geometric_schedule(max_n, 10, 100)
    plan = GridPlan((0.0, 1.0), 2, (ZERO_RADIUS_THRESHOLD, threshold), schedule, (alpha / 10,) * 10, alpha)
    rng = np.random.default_rng(5)
    rates = {}
    for seed, gap in enumerate((-0.02, -0.003, 0.003, 0.02)):
        p = threshold + gap
        tests = simulate(plan, p, 100, seed=seed)
        fixed = [clopper_pearson_lower(int(rng.binomial(max_n, p)), max_n, alpha) >= threshold for _ in tests]
        rates[gap] = sum((t.certified_index == 1) != f for t, f in zip(tests, fixed)) / len(tests)
    print(f"\ndisagreement with fixed-n at threshold {threshold} by p - threshold: {rates}")
    assert rates[-0.02] == 0 and rates[0.02] == 0
    assert max(rates.values()) < 0.6


class UpperBoundOnly(GridTest):
    """The futility rule before (b): stop when the upper bound at the stage level is below the next
    threshold (kept here to measure what rule (b) changes)."""

    def futile(self, threshold):
        return clopper_pearson_upper(self.hits, self.n, self.stage_alphas[self.stages_run - 1]) < threshold


def test_futility_stops_images_the_budget_cannot_certify_and_keeps_the_others():
    """Next to a threshold the upper bound alone ran images to the full budget: just below it (its
    upper bound at the tiny stage level falls below only near max_n) and just above it, closer than
    the final stage's margin (about 0.0047 here: not even all max_n samples certify it). Rule (b)
    stops both early; where the budget can reach the threshold it certifies about as often.
    Paired: both rules see the same draws, so (b), stopping no later, never certifies more."""
    alpha, max_n, threshold = 0.001, 100_000, 0.8
    schedule = geometric_schedule(max_n, 10, 100)
    plan = GridPlan((0.0, 1.0), 2, (ZERO_RADIUS_THRESHOLD, threshold), schedule, (alpha / 10,) * 10, alpha)
    trials = 200
    calls, certified = {}, {}
    for gap in (-0.003, 0.001, 0.006, 0.012):
        for rule in (GridTest, UpperBoundOnly):
            # one generator per trial: the two rules see the same draws until (b) stops
            tests = [simulate(plan, threshold + gap, 1, seed=[21, trial], test_class=rule)[0] for trial in range(trials)]
            calls[gap, rule] = sum(t.n for t in tests) / trials
            certified[gap, rule] = sum(t.certified_index == 1 for t in tests) / trials
    named = {f"{gap:+g} {rule.__name__}": (round(calls[gap, rule]), certified[gap, rule]) for gap, rule in calls}
    print(f"\n(mean samples, share certified at the threshold) by p - threshold and rule: {named}")
    assert calls[-0.003, UpperBoundOnly] > 0.9 * max_n and calls[0.001, UpperBoundOnly] > 0.99 * max_n
    assert calls[-0.003, GridTest] < 0.5 * calls[-0.003, UpperBoundOnly]
    assert calls[0.001, GridTest] < 0.9 * calls[0.001, UpperBoundOnly]
    for gap in (-0.003, 0.001, 0.006, 0.012):
        assert certified[gap, GridTest] <= certified[gap, UpperBoundOnly]
    for gap in (0.006, 0.012):  # within reach of the budget: hardly any certification lost
        assert certified[gap, GridTest] >= certified[gap, UpperBoundOnly] - 0.05
    assert certified[0.012, GridTest] >= 0.95


def test_same_seed_same_decision_and_invariants():
    _, smooth, p_true = linear_setup()
    at_p_true = radius_at(smooth.noise, p_true, 2, (8,))
    radii = [0.5 * at_p_true, at_p_true, 2 * at_p_true]  # borderline middle point: several stages
    a = certify_grid(smooth, X, radii, 2, 0.001, max_n=5000, generator=42)
    b = certify_grid(smooth, X, radii, 2, 0.001, max_n=5000, generator=42)
    assert a == b and a.stages_run > 1
    assert a.samples_used == a.n0 + a.n and a.radii == tuple(radii) and a.norm == 2
    assert list(a.certified) == sorted(a.certified, reverse=True)  # a prefix of the grid
    assert a.thresholds == tuple(p_needed(smooth.noise, r, 2, (8,)) for r in radii)


def test_abstain_when_not_even_the_prediction_is_certified():
    """At the smoothed decision boundary (p = 1/2) the answer is ABSTAIN, certified radius 0.0."""
    smooth = Smooth(OneAxisThreshold(0.0), 2, Gaussian(0.5))
    d = certify_grid(smooth, torch.zeros(3), [0.0, 0.1], 2, 0.01, max_n=500, first=50, stages=4, generator=0)
    assert d.prediction == ABSTAIN and d.abstained and d.certified == (False, False)
    assert d.certified_radius == 0.0 and d.p_lower <= 0.5


def test_grid_without_zero_still_reports_the_certified_prediction():
    """Radius 0 off the grid: the prediction is the class whenever p_lower > 1/2."""
    smooth = Smooth(OneAxisThreshold(0.0), 2, Gaussian(0.5))
    d = certify_grid(smooth, torch.tensor([0.4, 0.0, 0.0]), [1.2], 2, 0.001, generator=0)
    assert d.certified == (False,) and d.certified_radius == 0.0
    assert d.prediction == 1 and d.p_lower > 0.5


# -- bad grids --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "radii, options, match",
    [
        ([], {}, "empty"),
        ([0.5, 0.2], {}, "strictly increasing"),
        ([0.2, 0.2], {}, "strictly increasing"),
        ([-0.1, 0.2], {}, "finite and >= 0"),
        ([0.1, float("nan")], {}, "finite and >= 0"),
        ([0.1, float("inf")], {}, "finite and >= 0"),
        ("abc", {}, "sequence of numbers"),
        ([0.1], {"max_n": 12}, r"max_n=12 is too small to certify any grid radius.*use max_n >= \d+"),
        ([0.1], {"alpha": 0.0}, "alpha"),
        ([0.1], {"norm": 3}, "unknown norm"),
    ],
)
def test_bad_grid_gets_a_clear_error(radii, options, match):
    options = {"norm": 2, "alpha": 0.001, **options}
    with pytest.raises(ValueError, match=match):
        plan_grid(Gaussian(0.5), radii, options.pop("norm"), (8,), options.pop("alpha"), **options)


def test_a_radius_the_noise_cannot_certify_is_refused_naming_the_largest():
    # uniform noise certifies at most lambda = 0.7 in l1, whatever p
    smooth = Smooth(OneAxisThreshold(0.0), 2, Uniform(0.7))
    with pytest.raises(ValueError, match=r"grid radius 0.8 in l1 cannot be certified with this noise .*the largest "
                                         r"certifiable radius is 0.7; drop it from the grid"):
        certify_grid(smooth, torch.tensor([0.5, 0.0]), [0.1, 0.8], 1, 0.001)


def test_radii_beyond_max_n_are_kept_and_never_certified():
    plan = plan_grid(Gaussian(0.5), [0.0, 0.5, 1.9], 2, (3,), 0.001, max_n=1000)
    assert plan.reachable == 2  # p_needed(1.9) = Phi(3.8) is beyond (0.001/10)^(1/1000)
    smooth = Smooth(OneAxisThreshold(0.0), 2, Gaussian(0.5))
    d = certify_grid(smooth, torch.tensor([5.0, 0.0, 0.0]), [0.0, 0.5, 1.9], 2, 0.001, max_n=1000, generator=0)
    assert d.certified == (True, True, False) and d.n < 1000  # stops once 0.5 is shown

"""Whole-table certification: the largest certified radius of a grid, in few samples.

A results table asks, for a grid of radii ``r_1 < ... < r_K`` in one norm,
"is ``x`` certified at ``r_k``?" for every ``k`` (DESIGN.md section 10).
The certified radius grows with ``p_lower`` for every noise family and for
fixed anisotropic noise, so "certified at ``r_k``" is "``p_lower >= t_k``"
with the increasing thresholds ``t_k = p_needed(r_k)``
(:func:`~ucan_smoothing.core.sequential.p_needed`); radius 0 means "the
prediction itself is certified", ``p_lower > 1/2``, written as the threshold
``t = ZERO_RADIUS_THRESHOLD``, the float just above 1/2. Deciding every grid
radius is deciding which interval ``[t_k, t_k+1)`` holds ``p``, and the test
below stops as soon as more samples could no longer change the answer.

The test (:class:`GridTest`). The class ``cA`` is chosen on ``n0`` selection
samples, as in CERTIFY. Fresh estimation samples then come in stages of
cumulative sizes ``N_1 < ... < N_S = max_n``, fixed before any sample is
drawn (:func:`aligned_schedule`: geometric sizes, plus for each threshold
the fewest samples that can reach it, so an image whose votes all go to its
class stops exactly where its largest certifiable radius first becomes
provable). After stage ``s``, with ``h_s`` votes for ``cA`` among the
``N_s`` samples so far:

* ``L_s`` = one-sided Clopper-Pearson lower bound at level ``alpha_s``
  (``alpha_1 + ... + alpha_S <= alpha``; the default splits ``alpha`` evenly);
* ``p_lower`` = ``max(L_1, ..., L_s)``; grid radius ``r_k`` is certified
  when ``p_lower >= t_k``; ``certified_radius`` is the largest such ``r_k``;
* stop when (a) every threshold that any stage could still reach is
  certified (a threshold is reachable when some stage's best case, all
  ``N_j`` votes for ``cA``, gives a bound ``alpha_j^(1/N_j) >= t_k``), or
  (b) the next radius is out of reach of the budget left (futility): even
  if ``p`` were as large as its one-sided Clopper-Pearson UPPER bound
  ``U_s`` at level ``beta`` (:data:`FUTILITY_LEVEL`, 0.01), the chance that
  the samples still to come lift the final stage's bound to the next
  threshold above the certified ones would be below ``beta`` (a binomial
  tail: the final stage needs ``k*`` votes of ``max_n``, ``h_s`` are in), or
  (c) after stage ``S``.

The guarantee. With probability at least ``1 - alpha``, EVERY grid radius
reported certified for ``x`` is a true certificate of the smoothed
classifier at ``x`` with class ``cA``, whatever the stopping rule. Proof:
let ``p = P(f(x + noise) = cA)``. Picture all ``S`` stages run to the end on
the same sample stream: each ``L_s`` is a Clopper-Pearson bound on ``N_s``
i.i.d. samples, so ``P(L_s >= p) <= alpha_s`` (for ``p = 1`` every claim
below is true anyway), and the event ``E = {some L_s >= p}`` has
``P(E) <= sum alpha_s <= alpha`` (union bound). ``E`` is defined by the
full run, not by the procedure, so it covers every stopping rule: the
stopped procedure looks at a prefix of the same ``L_s``. Outside ``E``,
``p_lower = max`` of the ``L_s`` looked at ``< p``; so a certified ``r_k``
has ``p > p_lower >= t_k``. For ``r_k = 0`` that is ``p > 1/2``: ``cA`` is the
smoothed class. For ``r_k > 0``, ``t_k = p_needed(r_k) > 1/2`` and the
certificate of the noise computed at ``t_k`` (a valid lower bound of ``p``)
has radius ``>= r_k`` by the definition of ``p_needed``: the smoothed
classifier predicts ``cA`` on the whole ball of radius ``r_k``. All claims
hold together outside the one event ``E``, hence the family-wise statement.
``cA`` comes from the selection samples, which are independent of the
estimation samples, so the argument holds conditionally on ``cA``. The
reported ``p_lower`` is valid outside ``E`` too, so the region the noise
certifies at ``p_lower`` (which contains the ball of ``certified_radius``)
is certified as well.

The upper bounds ``U_s`` and the chance in (b) only decide when to stop; no
claim is made from them, so ``beta`` does not enter the guarantee. Why not
``U_s < t`` alone (the rule of earlier versions): an image whose ``p`` lies
just above a threshold, closer than the final stage's margin (about
``PhiInv(1 - alpha_S) * sqrt(p (1 - p) / max_n)``), is almost never
certified at that radius even with all ``max_n`` samples, yet its ``U_s``
never falls below the threshold; and one just below a threshold needs
nearly ``max_n`` samples before ``U_s`` at the tiny stage level does. Both
ran to the full budget: on the paper's MNIST protocol at noise 0.5 they took
most of the calls. What (b) costs: an image it stops would still have been
certified at the next radius by the final stage only if ``p`` were above ``U_s`` (probability
at most ``beta`` at each look) or a chance below ``beta`` came true
(``tests/test_grid.py`` measures the loss next to a threshold, paired with
the upper-bound rule on the same draws).

Against fixed-n CERTIFY (``n = max_n`` at level ``alpha``). Both are valid;
they can disagree at a grid radius only when ``p`` lies near its threshold:
within the gap between the final-stage bound at level ``alpha / S`` and the
fixed-n bound at ``alpha`` (the price of the looks), or, through the
futility rule (b), where an early stage misjudges what the final one can reach.
``tests/test_grid.py`` measures how often this happens next to a
threshold and checks that far from the thresholds the answers agree.

Many inputs: :func:`certify_grid_batch` runs the undecided inputs stage by
stage in shared forward batches (:func:`~ucan_smoothing.core.sequential.run_stages`);
:func:`ucan_smoothing.core.pool.certify_grid_pool` keeps a pool of inputs in
flight with a noise stream per image.
"""

from __future__ import annotations

import bisect
import functools
import math
from dataclasses import dataclass

from .certificate import ABSTAIN
from .norms import norm_name, parse_norm
from .sequential import (
    DEFAULT_STAGES,
    FUTILITY_LEVEL,
    _smooth_draw,
    geometric_schedule,
    out_of_reach,
    p_needed,
    radius_at,
    run_stages,
)
from .statistics import check_alpha, check_count, clopper_pearson_lower
from .streams import resolve_generator

#: the threshold of radius 0: ``p_lower >= this`` is ``p_lower > 1/2`` (the prediction is certified)
ZERO_RADIUS_THRESHOLD = math.nextafter(0.5, 1.0)
#: the largest float below 1, where the noise's largest certificate is read
_P_MAX = math.nextafter(1.0, 0.0)


@functools.lru_cache(maxsize=64)
def best_case_bound(schedule: tuple, stage_alphas: tuple) -> float:
    """The largest ``p_lower`` any stage can give: all ``N_s`` votes for the class, the
    bound ``alpha_s^(1/N_s)`` (computed as the test computes it)."""
    return max(clopper_pearson_lower(size, size, a) for size, a in zip(schedule, stage_alphas))


class GridTest:
    """Staged test of which ``thresholds`` ``p(cls)`` exceeds (module docstring).

    ``thresholds`` non-decreasing, each in ``(1/2, 1)``; ``schedule`` the cumulative stage sizes and
    ``stage_alphas`` their levels (valid at level ``sum(stage_alphas)``). ``update(votes)`` takes
    the vote counts (indexable by class, with ``.sum()``) of the next stage's FRESH samples.
    ``certified_index`` is the largest ``k`` with ``p_lower >= thresholds[k]`` (-1 for none).
    ``futility_level`` is ``beta`` of the futility rule (b) (stopping only, no claim).
    """

    def __init__(self, cls: int, thresholds, schedule, stage_alphas, futility_level: float = FUTILITY_LEVEL):
        self.cls = int(cls)
        self.futility_level = check_alpha(futility_level)
        self.thresholds, self.schedule = tuple(thresholds), tuple(schedule)
        self.stage_alphas = tuple(stage_alphas)
        if len(self.schedule) != len(self.stage_alphas) or not self.schedule:
            raise ValueError("schedule and stage_alphas need the same (non-zero) length")
        if any(b < a for a, b in zip(self.thresholds, self.thresholds[1:])):
            raise ValueError("thresholds must be non-decreasing")
        # thresholds[:reachable] are the ones some stage can reach at all
        self.reachable = bisect.bisect_right(self.thresholds, best_case_bound(self.schedule, self.stage_alphas))
        self.hits = self.n = self.stages_run = 0
        self.p_lower = 0.0
        self.certified_index = -1
        self.done = self.reachable == 0

    def update(self, votes) -> None:
        self.hits += int(votes[self.cls])  # cumulative over all stages so far
        self.n += int(votes.sum())
        stage_alpha = self.stage_alphas[self.stages_run]
        self.stages_run += 1
        self.p_lower = max(self.p_lower, clopper_pearson_lower(self.hits, self.n, stage_alpha))
        self.certified_index = bisect.bisect_right(self.thresholds, self.p_lower) - 1
        following = self.certified_index + 1  # the next radius still to be shown
        if following >= self.reachable or self.stages_run == len(self.schedule):
            self.done = True  # (a) nothing reachable is left, or (c) the budget is spent
        elif self.futile(self.thresholds[following]):
            self.done = True  # (b) the budget left would almost surely not certify the next radius

    def futile(self, threshold: float) -> bool:
        """Rule (b): with ``p`` at its upper bound (level ``futility_level``), the samples still to
        come would lift the final stage's bound to ``threshold`` with a chance below ``futility_level``."""
        return out_of_reach(self.hits, self.n, threshold, self.schedule[-1], self.stage_alphas[-1],
                            self.futility_level)


# -- the plan: thresholds and stages of one grid ------------------------------------------------

def all_votes_size(threshold: float, stage_alpha: float) -> int:
    """The fewest samples ``N`` whose bound with every vote for the class, ``stage_alpha^(1/N)``
    (computed as the test computes it), reaches ``threshold``."""
    size = max(1, math.ceil(math.log(stage_alpha) / math.log(threshold)))
    while clopper_pearson_lower(size, size, stage_alpha) < threshold:  # float rounding of the estimate
        size += 1
    while size > 1 and clopper_pearson_lower(size - 1, size - 1, stage_alpha) >= threshold:
        size -= 1
    return size


def aligned_schedule(thresholds, max_n: int, alpha: float, stages: int, first: int) -> tuple:
    """``(schedule, stage_alpha)``: cumulative stage sizes and the level of each stage, with
    ``len(schedule) * stage_alpha <= alpha``.

    The sizes are the geometric ones of ``stages`` stages from ``first`` to ``max_n`` (kept: images
    with ``p`` away from 1 stop on them), plus, for each threshold in reach, :func:`all_votes_size`
    at the stage level (an image whose votes all go to its class stops there, not at the next
    geometric size: up to 1.5 times fewer samples at noise 0.25). The sizes depend only on
    the thresholds and the options, never on samples, so the union-bound proof of the module
    docstring holds as for any fixed schedule. The level depends on the number of stages and the
    sizes on the level: starting from the largest possible count, the count is lowered while the
    schedule it gives is no longer than it; the last schedule that fits its level is returned.
    """
    geometric = geometric_schedule(max_n, stages, first)
    count = len(geometric) + len(thresholds)
    best = None
    while True:
        stage_alpha = alpha / count
        best_bound = clopper_pearson_lower(max_n, max_n, stage_alpha)  # all max_n votes for the class
        sizes = (all_votes_size(t, stage_alpha) for t in thresholds if t <= best_bound)
        own = {size for size in sizes if geometric[0] < size < max_n}
        schedule = tuple(sorted(set(geometric) | own))
        if len(schedule) > count:
            break  # a larger level moved the sizes apart: the previous schedule stands
        best = (schedule, stage_alpha)
        if len(schedule) == count:
            break
        count = len(schedule)
    return best


def largest_certifiable_radius(noise, norm, input_shape) -> float:
    """The largest radius in ``norm`` this noise certifies for any ``p_lower < 1``: a grid radius
    above it is refused by :func:`plan_grid`."""
    return radius_at(noise, _P_MAX, parse_norm(norm), input_shape)


def check_radii(radii) -> tuple:
    """``radii`` as a tuple of floats, strictly increasing, finite and >= 0."""
    try:
        values = tuple(float(r) for r in radii)
    except (TypeError, ValueError):
        raise ValueError(f"radii must be a sequence of numbers, got {radii!r}") from None
    if not values:
        raise ValueError("the grid of radii is empty")
    for r in values:
        if not (math.isfinite(r) and r >= 0):
            raise ValueError(f"every grid radius must be finite and >= 0, got {r}")
    if any(b <= a for a, b in zip(values, values[1:])):
        raise ValueError(f"grid radii must be strictly increasing (sorted, no repeats), got {list(values)}")
    return values


@dataclass(frozen=True)
class GridPlan:
    """Everything one grid run fixes in advance: the radii, their thresholds, the stages."""

    radii: tuple
    norm: float
    thresholds: tuple
    schedule: tuple
    stage_alphas: tuple
    alpha: float

    @property
    def reachable(self) -> int:
        """How many grid radii (the smallest ones) any stage can certify at all; the others are
        reported not certified whatever ``p`` is (more ``max_n`` or fewer stages would reach them)."""
        return bisect.bisect_right(self.thresholds, best_case_bound(self.schedule, self.stage_alphas))

    def new_test(self, cls: int) -> GridTest:
        return GridTest(cls, self.thresholds, self.schedule, self.stage_alphas)

    def decision(self, test: GridTest, n0: int, is_certificate: bool) -> GridDecision:
        certified = tuple(k <= test.certified_index for k in range(len(self.radii)))
        predicted = test.p_lower > 0.5
        return GridDecision(
            prediction=test.cls if predicted else ABSTAIN,
            selected=test.cls,
            p_lower=test.p_lower,
            certified_radius=self.radii[test.certified_index] if test.certified_index >= 0 else 0.0,
            certified=certified,
            radii=self.radii,
            thresholds=self.thresholds,
            norm=self.norm,
            alpha=self.alpha,
            n0=n0,
            n=test.n,
            samples_used=n0 + test.n,
            top_count=test.hits,
            stages_run=test.stages_run,
            is_certificate=is_certificate,
        )


def plan_grid(noise, radii, norm, input_shape, alpha, *, max_n=100_000, stages=None, first=100,
              n_name: str = "max_n", aligned: bool = True) -> GridPlan:
    """Check a grid and fix its thresholds and stages (``alpha`` split evenly over the stages):
    :func:`aligned_schedule`, or with ``aligned=False`` the geometric stages alone.
    ``n_name`` names the sample budget in messages (``--n`` for the command).

    Raises ``ValueError`` for a grid radius this noise cannot certify for any ``p_lower < 1``
    (naming the largest one it can), and when ``max_n`` cannot reach even the smallest threshold.
    Radii beyond the reach of ``max_n`` but not of the noise are kept: never certified.
    """
    alpha = check_alpha(alpha)
    norm = parse_norm(norm)
    radii = check_radii(radii)
    stages = DEFAULT_STAGES["cp"] if stages is None else stages
    largest = largest_certifiable_radius(noise, norm, input_shape)
    for r in radii:
        if r > largest:
            raise ValueError(
                f"grid radius {r:g} in {norm_name(norm)} cannot be certified with this noise ({noise!r}) for any "
                f"p_lower < 1: the largest certifiable radius is {largest:.6g}; drop it from the grid"
            )
    thresholds = [ZERO_RADIUS_THRESHOLD if r == 0 else p_needed(noise, r, norm, input_shape) for r in radii]
    if aligned:
        schedule, stage_alpha = aligned_schedule(thresholds, max_n, alpha, stages, first)
    else:
        schedule = geometric_schedule(max_n, stages, first)
        stage_alpha = alpha / len(schedule)
    plan = GridPlan(radii, norm, tuple(thresholds), schedule, (stage_alpha,) * len(schedule), alpha)
    if plan.reachable == 0:
        # all N votes for cA give stage_alpha^(1/N): it must reach the smallest threshold
        needed = math.ceil(math.log(stage_alpha) / math.log(thresholds[0]))
        raise ValueError(
            f"{n_name}={schedule[-1]} is too small to certify any grid radius: the smallest, {radii[0]:g} in "
            f"{norm_name(norm)}, needs p_lower >= {thresholds[0]:.6g}, out of reach with alpha={alpha} split "
            f"over {len(schedule)} stages ({stage_alpha:.3g} each) even if every sample votes for the top "
            f"class; use {n_name} >= {needed}" + (" or fewer stages" if n_name == "max_n" else "")
        )
    return plan


# -- the answer --------------------------------------------------------------------------------


@dataclass(frozen=True)
class GridDecision:
    """The answer of :func:`certify_grid` for one input.

    With probability at least ``1 - alpha`` every grid radius with ``certified[k]`` True is a
    true certificate: the smoothed classifier predicts ``prediction`` on the whole ball of radius
    ``radii[k]`` in ``norm`` (a proven certificate when ``is_certificate``).

    ``certified_radius``: the largest certified grid radius; 0.0 when no grid radius is, and then
    ``prediction`` tells whether the prediction itself is certified. ``prediction`` is the selected
    class when ``p_lower > 1/2`` (radius 0 certified, in the grid or not), else ``ABSTAIN``; so for
    ``r > 0`` on the grid, "certified at r" is ``certified_radius >= r``, and for ``r = 0`` it is
    ``prediction != ABSTAIN``. ``p_lower``: the largest stage bound, valid jointly with all of them,
    so the region the noise certifies at ``p_lower`` is certified too.
    """

    prediction: int
    selected: int
    p_lower: float
    certified_radius: float
    certified: tuple  # one bool per grid radius
    radii: tuple
    thresholds: tuple  # p_needed of each grid radius
    norm: float
    alpha: float
    n0: int
    n: int  # estimation samples drawn
    samples_used: int  # n0 + n: every forward pass made for this input
    top_count: int  # votes for `selected` among the n estimation samples
    stages_run: int
    is_certificate: bool = True

    @property
    def abstained(self) -> bool:
        return self.prediction == ABSTAIN

    def certified_at(self, radius: float) -> bool:
        """Is the grid radius ``radius`` certified? (``ValueError`` if it is not on the grid.)"""
        radius = float(radius)
        if radius not in self.radii:
            raise ValueError(f"radius {radius:g} is not on the grid {list(self.radii)}")
        return self.certified[self.radii.index(radius)]


# -- through Smooth ------------------------------------------------------------------------------


def certify_grid(
    smooth,
    x,
    radii,
    norm,
    alpha: float,
    *,
    n0: int = 100,
    max_n: int = 100_000,
    stages: int | None = None,
    first: int = 100,
    batch_size: int = 1000,
    generator=None,
) -> GridDecision:
    """The largest radius of the grid ``radii`` (strictly increasing, >= 0) in ``norm`` at which
    ``x`` (one input) is certified, stopping as soon as that answer is settled.

    ``smooth`` is a :class:`~ucan_smoothing.Smooth`. ``n0`` selection samples choose the class,
    then at most ``max_n`` fresh estimation samples are drawn in ``stages`` (default 10) geometric
    stages from ``first``. ``P(some grid radius reported certified is not a true certificate) <= alpha``.
    """
    xs = smooth.prepare(x, single=True)
    return _certify_grid(smooth, xs, radii, norm, alpha, n0, max_n, stages, first, batch_size, generator)[0]


def certify_grid_batch(
    smooth,
    xs,
    radii,
    norm,
    alpha: float,
    *,
    n0: int = 100,
    max_n: int = 100_000,
    stages: int | None = None,
    first: int = 100,
    batch_size: int = 1000,
    generator=None,
) -> list:
    """:func:`certify_grid` for each input of the batch ``xs``; the inputs still undecided share
    the forward batches of each stage."""
    xs = smooth.prepare(xs, single=False)
    return _certify_grid(smooth, xs, radii, norm, alpha, n0, max_n, stages, first, batch_size, generator)


def _certify_grid(smooth, xs, radii, norm, alpha, n0, max_n, stages, first, batch_size, generator):
    n0 = check_count("n0", n0)
    plan = plan_grid(smooth.noise, radii, norm, tuple(xs.shape[1:]), alpha, max_n=max_n, stages=stages, first=first)
    generator = resolve_generator(generator, xs.device)
    # Selection on its own samples, as CERTIFY: the estimation must not reuse them.
    selected = smooth.count_votes(xs, n0, batch_size, generator).argmax(dim=1).tolist()
    tests = [plan.new_test(c) for c in selected]
    run_stages(_smooth_draw(smooth, xs, batch_size, generator), tests, plan.schedule)
    return [plan.decision(test, n0, smooth.noise.is_certificate) for test in tests]

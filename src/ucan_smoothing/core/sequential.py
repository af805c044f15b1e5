"""Sequential certification: "is ``x`` certified at radius ``r``?" in few samples.

Cohen et al.'s CERTIFY spends a fixed ``n`` (100,000) samples on every input.
When the question is fixed in advance (is ``x`` certified at radius ``r`` in
norm ``q``?) the answer is often clear after a few hundred samples. This
module stops as soon as it is, with the same kind of guarantee
(DESIGN.md section 5; Horvath et al. 2022 for the staged test).

The threshold. For every noise family, and for fixed anisotropic noise, the
certified radius grows with ``p_lower``, so "radius >= r" is the same as
"``p_lower >= p_needed(r)``"; :func:`p_needed` finds that threshold once by
bisection, with the same regions and radii as :class:`~ucan_smoothing.Certificate`.

Staged Clopper-Pearson (``method="cp"``, the default). After choosing the
class ``cA`` on ``n0`` separate samples (as CERTIFY does), estimation samples
are drawn fresh in ``K`` stages of growing size, with cumulative sizes
``N_1 < ... < N_K = max_n``. After stage ``k`` the cumulative count of votes
for ``cA`` gives one-sided Clopper-Pearson bounds at level ``alpha / K``:

* certified when the lower bound ``L_k >= p_needed``;
* not certified when the budget left is out of reach (futility,
  :func:`out_of_reach`): even if ``p`` were as large as its one-sided
  Clopper-Pearson upper bound at level ``beta`` (:data:`FUTILITY_LEVEL`, 0.01),
  the samples still to come would lift the final stage's bound to
  ``p_needed`` with a chance below ``beta``; or after stage ``K``.

Why this futility rule and not "the upper bound at the stage level is below
``p_needed``" (earlier versions): an input whose ``p`` lies just below the
threshold, or just above it but closer than the final stage's margin, ran
to the full budget under that rule while almost never being certified.
The rule is the grid's rule (b) (``core/grid.py``) for one radius.

Why the guarantee survives early stopping. Let ``p = P(f(x + noise) = cA)``.
Picture all ``K`` stages run to the end: each ``L_k`` is a Clopper-Pearson
bound on ``N_k`` i.i.d. samples, so ``P(L_k >= p) <= alpha / K`` when
``p < 1``, and by the union bound ``P(some L_k >= p) <= alpha``. The
procedure says "certified" only when some ``L_k >= p_needed``, so if
``p < p_needed`` it errs only inside that event, whenever and why ever it
stops; stopping for futility only removes chances to say "certified". If
instead ``p >= p_needed > 1/2``, then ``cA`` is the smoothed class and its
radius at ``p`` is ``>= r``: the claim is true. Hence

    P(certified, and g is not robust at radius r with class cA) <= alpha.

``cA`` comes from samples independent of the estimation samples, so the
argument holds conditionally on ``cA``. Any ``L_k`` (in particular the one
reported at stopping) is a valid lower bound on ``p`` with the same
probability, so a region computed from it is certified too.

Betting (``method="betting"``). A test supermartingale for ``p <= p_needed``
(Waudby-Smith and Ramdas 2023, "Estimating means of bounded random variables
by betting"; Voracek 2024 applies it to smoothing): the wealth
``W = prod_i (1 + lambda_i (X_i - p_needed))`` with ``X_i = [vote is cA]`` and
bets ``0 <= lambda_i < 1/p_needed`` fixed before ``X_i`` is seen. Under
``p <= p_needed`` each factor has mean ``<= 1``, so by Ville's inequality
``P(W ever reaches 1/alpha) <= alpha``: it may be checked after every
sample, so looks cost nothing and no union bound is needed. We bet per chunk
(one ``lambda`` for a whole chunk, chosen from the samples drawn before it),
which is a special case.

Sequential PREDICT (:func:`predict_sequential`). Cohen's PREDICT test at
level ``alpha / K`` on the cumulative counts after each stage; a class is
returned at the first significant stage, else ``ABSTAIN`` after stage ``K``.
It returns a wrong class only if the fixed-``N_k`` PREDICT of some stage
would (probability ``<= alpha / K`` each), so at most ``alpha`` in all.

Batches. The ``*_batch`` functions run many inputs together: at each stage
the inputs still undecided draw their fresh samples in shared forward
batches. Each input's samples are still i.i.d. and independent of the
other inputs, so the guarantee holds per input.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from scipy.stats import binom

from .norms import norm_name, parse_norm
from .certificate import ABSTAIN
from .streams import resolve_generator
from .statistics import (
    check_alpha,
    check_count,
    clopper_pearson_lower,
    clopper_pearson_upper,
    predict_is_significant,
)

METHODS = ("cp", "betting")
#: default number of stages per method: each staged-CP look costs alpha share,
#: betting looks are free, so betting checks more often
DEFAULT_STAGES = {"cp": 10, "betting": 40}
#: betting never stakes more than this fraction of the wealth on one sample
#: (all-in betting would lose everything on a single vote for another class)
MAX_BET_FRACTION = 0.5
#: ``beta`` of the futility rule: the level of its upper bound and the chance below which it
#: stops; no claim rests on it
FUTILITY_LEVEL = 0.01
#: the largest float below 1: the end of the bisection interval of p_needed
_P_MAX = math.nextafter(1.0, 0.0)


# -- the threshold p_needed --------------------------------------------------------


def _as_shape(input_shape) -> tuple:
    return (int(input_shape),) if isinstance(input_shape, int) else tuple(input_shape)


def _check_radius(radius) -> float:
    try:
        radius = float(radius)
    except (TypeError, ValueError):
        raise ValueError(f"radius must be a number, got {radius!r}") from None
    if not (math.isfinite(radius) and radius > 0):
        raise ValueError(f"radius must be finite and > 0, got {radius}")
    return radius


def radius_at(noise, p_lower: float, norm, input_shape) -> float:
    """Certified radius in ``norm`` for ``p_lower``, exactly as ``Certificate.radius``."""
    regions = noise.regions(p_lower, _as_shape(input_shape))
    return max((region.radius(norm) for region in regions), default=0.0)


def p_needed(noise, radius, norm, input_shape, tol: float = 1e-13) -> float:
    """The smallest ``p_lower`` whose certificate reaches ``radius`` in ``norm``.

    Bisection on ``(1/2, 1)``, valid because the radius grows with ``p``; the
    returned value always satisfies ``radius_at(noise, p, ...) >= radius``, so
    certifying with any ``p_lower >= p_needed`` gives a radius ``>= radius``.
    """
    radius = _check_radius(radius)
    norm = parse_norm(norm)
    input_shape = _as_shape(input_shape)
    noise.check_input_shape(input_shape)
    largest = radius_at(noise, _P_MAX, norm, input_shape)
    if largest < radius:
        raise ValueError(
            f"radius {radius} in {norm_name(norm)} cannot be certified with this noise for any p_lower < 1 "
            f"(the largest certifiable radius is {largest:.6g})"
        )
    low, high = 0.5, _P_MAX  # invariant: radius_at(low) < radius <= radius_at(high)
    while high - low > tol:
        mid = (low + high) / 2
        if radius_at(noise, mid, norm, input_shape) >= radius:
            high = mid
        else:
            low = mid
    return high


def geometric_schedule(max_n: int, stages: int, first: int = 100) -> tuple:
    """Cumulative stage sizes ``N_1 < ... < N_K = max_n``, geometric from ``first``.

    Sizes that round to the same integer are merged, so there may be fewer
    than ``stages`` stages.
    """
    max_n = check_count("max_n", max_n)
    stages = check_count("stages", stages)
    first = min(check_count("first", first), max_n)
    if stages == 1 or first == max_n:
        return (max_n,)
    ratio = (max_n / first) ** (1 / (stages - 1))
    sizes = {min(max_n, round(first * ratio**i)) for i in range(stages - 1)}
    return tuple(sorted(sizes | {max_n}))


# -- the futility rule ------------------------------------------------------------------


@functools.lru_cache(maxsize=256)
def final_votes_needed(threshold: float, max_n: int, stage_alpha: float) -> int:
    """The fewest votes ``k`` of ``max_n`` whose bound at ``stage_alpha`` reaches ``threshold``
    (``max_n + 1`` when none does): the Clopper-Pearson bound grows with ``k``, so a bisection."""
    low, high = 0, max_n + 1
    while low < high:
        middle = (low + high) // 2
        if clopper_pearson_lower(middle, max_n, stage_alpha) >= threshold:
            high = middle
        else:
            low = middle + 1
    return low


def out_of_reach(hits: int, n: int, threshold: float, max_n: int, final_alpha: float,
                 beta: float = FUTILITY_LEVEL) -> bool:
    """Futility: even if ``p`` were as large as its one-sided Clopper-Pearson upper bound at level
    ``beta`` (from ``hits`` of ``n``), the ``max_n - n`` samples still to come would lift the final
    stage's bound (level ``final_alpha``) to ``threshold`` with a chance below ``beta``. Decides
    only when to stop: no claim rests on it."""
    needed = final_votes_needed(threshold, max_n, final_alpha) - hits
    left = max_n - n
    if needed <= 0:
        return False  # the votes so far already give the final stage its bound
    if needed > left:
        return True  # not even every sample left voting for the class would do
    upper = clopper_pearson_upper(hits, n, beta)
    return binom.sf(needed - 1, left, upper) < beta


# -- the sequential tests -----------------------------------------------------------
#
# One object per input holds that input's test; ``update(votes)`` takes the
# vote counts of the input's next stage of fresh samples and sets ``done``
# when the answer is known. Keeping the tests apart from the model lets them
# run on exact binomial draws as well as through ``Smooth``, and lets many
# inputs advance stage by stage in shared forward batches (``run_stages``).


class StagedClopperPearson:
    """Staged test of ``p(cls) >= threshold``: certified at the first stage whose
    Clopper-Pearson lower bound at that stage's level reaches ``threshold``;
    stops for futility when the budget left is out of reach (:func:`out_of_reach`).
    ``schedule`` the cumulative stage sizes, ``stage_alphas`` their levels: valid at
    level ``sum(stage_alphas)`` (union bound)."""

    def __init__(self, cls: int, threshold: float, schedule, stage_alphas, futility_level: float = FUTILITY_LEVEL):
        self.cls, self.threshold = cls, threshold
        self.schedule, self.stage_alphas = tuple(schedule), tuple(stage_alphas)
        if len(self.schedule) != len(self.stage_alphas) or not self.schedule:
            raise ValueError("schedule and stage_alphas need the same (non-zero) length")
        self.futility_level = check_alpha(futility_level)
        self.hits = self.n = self.stages_run = 0
        self.p_lower = 0.0
        self.certified = self.done = False

    def update(self, votes) -> None:
        self.hits += int(votes[self.cls])  # cumulative over all stages so far
        self.n += int(votes.sum())
        stage_alpha = self.stage_alphas[self.stages_run]
        self.stages_run += 1
        self.p_lower = clopper_pearson_lower(self.hits, self.n, stage_alpha)
        if self.p_lower >= self.threshold:
            self.certified = self.done = True
        elif self.futile():
            self.done = True

    def futile(self) -> bool:
        return out_of_reach(self.hits, self.n, self.threshold, self.schedule[-1], self.stage_alphas[-1],
                            self.futility_level)


class Betting:
    """Anytime-valid test of ``p(cls) > threshold`` by betting (module docstring).

    ``prior`` = (hits, trials) from samples independent of the ones tested
    (the selection samples); it only steers the first bet.
    """

    def __init__(self, cls: int, threshold: float, alpha: float, prior=(0, 0)):
        self.cls, self.threshold, self.target = cls, threshold, math.log(1 / alpha)
        self.prior = prior
        self.hits = self.n = self.stages_run = 0
        self.log_wealth = self.log_wealth_against = 0.0
        self.certified = self.done = False

    @property
    def p_lower(self) -> float:
        # the test shows p > threshold, nothing finer
        return self.threshold if self.certified else 0.0

    def _bets(self):
        # Kelly bet for the running estimate, capped. It uses only samples seen
        # before the chunk it is staked on, which keeps the wealth a
        # supermartingale under the null whatever the estimate is.
        p0 = self.threshold
        estimate = (self.prior[0] + self.hits + 0.5) / (self.prior[1] + self.n + 1)
        kelly = (estimate - p0) / (p0 * (1 - p0))
        bet_for = min(max(kelly, 0.0), MAX_BET_FRACTION / p0)
        bet_against = min(max(-kelly, 0.0), MAX_BET_FRACTION / (1 - p0))
        return bet_for, bet_against

    def update(self, votes) -> None:
        p0 = self.threshold
        bet_for, bet_against = self._bets()
        hits, chunk = int(votes[self.cls]), int(votes.sum())
        misses = chunk - hits
        # each vote X multiplies the wealth by 1 + bet * (X - p0)
        self.log_wealth += hits * math.log1p(bet_for * (1 - p0)) + misses * math.log1p(-bet_for * p0)
        against = hits * math.log1p(-bet_against * (1 - p0)) + misses * math.log1p(bet_against * p0)
        self.log_wealth_against += against
        self.hits += hits
        self.n += chunk
        self.stages_run += 1
        if self.log_wealth >= self.target:
            self.certified = self.done = True
        elif self.log_wealth_against >= self.target:
            self.done = True  # futility, by the mirrored bet on p < threshold


class SequentialPredictTest:
    """Cohen's PREDICT test at each stage's level on the cumulative counts."""

    def __init__(self, stage_alphas):
        self.stage_alphas = tuple(stage_alphas)
        self.votes = None
        self.n = self.stages_run = 0
        self.prediction = ABSTAIN
        self.done = False

    def update(self, votes) -> None:
        self.votes = votes.clone() if self.votes is None else self.votes + votes
        self.n += int(votes.sum())
        stage_alpha = self.stage_alphas[self.stages_run]
        self.stages_run += 1
        top2 = self.votes.topk(2)
        if predict_is_significant(int(top2.values[0]), int(top2.values[1]), stage_alpha):
            self.prediction = int(top2.indices[0])
            self.done = True


def run_stages(draw, tests, schedule) -> list:
    """Advance every test through the cumulative ``schedule`` until it is done.

    ``draw(rows, m)`` returns the votes ``(len(rows), classes)`` of ``m`` FRESH
    samples for each input in ``rows``; only undecided inputs are drawn.
    """
    active, drawn = list(range(len(tests))), 0
    for size in schedule:
        if not active:
            break
        votes = draw(active, size - drawn)
        drawn = size
        for row, row_votes in zip(active, votes):
            tests[row].update(row_votes)
        active = [row for row in active if not tests[row].done]
    return tests


def _smooth_draw(smooth, xs, batch_size, generator):
    def draw(rows, m):
        batch = xs if len(rows) == len(xs) else xs[rows]
        return smooth.count_votes(batch, m, batch_size, generator)

    return draw


# -- certify at a radius -----------------------------------------------------------


@dataclass(frozen=True)
class RadiusDecision:
    """The answer of :func:`certify_radius` for one input.

    ``decision`` True means: with probability at least ``1 - alpha`` the
    smoothed classifier predicts ``prediction`` on the whole ball of
    ``radius`` in ``norm`` around ``x`` (a proven certificate when
    ``is_certificate``). False means "not shown at this radius"; then
    ``prediction`` is ``ABSTAIN`` and ``selected`` keeps the chosen class.

    ``p_lower``: for ``"cp"`` the Clopper-Pearson bound of the stopping stage
    (valid jointly with all other stages); for ``"betting"`` ``p_needed`` when
    certified and 0 otherwise (the test bounds ``p`` only at its threshold).
    """

    decision: bool
    prediction: int
    radius: float
    norm: float
    alpha: float
    p_needed: float
    p_lower: float
    samples_used: int  # n0 + n: every forward pass made for this input
    n0: int
    n: int  # estimation samples drawn
    top_count: int  # votes for `selected` among the n estimation samples
    selected: int
    stages_run: int
    method: str
    is_certificate: bool = True

    @property
    def certified(self) -> bool:
        return self.decision


def _check_method(method: str) -> str:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; use one of {', '.join(METHODS)}")
    return method


def check_budget(method, schedule, threshold, alpha, radius, *, n_name="max_n", stages_hint=True):
    """Raise when even the best case (every sample votes for cA) cannot reach ``threshold``.

    ``n_name`` names the sample budget in the message (``--n`` for the command,
    which has no option for the stages: then ``stages_hint=False``).
    """
    n = schedule[-1]
    if method == "cp":
        stage_alpha = alpha / len(schedule)
        # all n votes for cA give the Clopper-Pearson bound stage_alpha^(1/n)
        reachable = clopper_pearson_lower(n, n, stage_alpha) >= threshold
        needed = math.ceil(math.log(stage_alpha) / math.log(threshold))
        detail = f"with alpha={alpha} split over {len(schedule)} stages ({stage_alpha:.3g} each)"
        hint = " or fewer stages" if stages_hint else ""
    else:
        # best case: the largest bet on every sample, all of them winning
        per_sample = math.log1p(MAX_BET_FRACTION * (1 - threshold) / threshold)
        reachable = n * per_sample >= math.log(1 / alpha)
        needed = math.ceil(math.log(1 / alpha) / per_sample)
        detail, hint = f"by betting at alpha={alpha}", ""
    if not reachable:
        raise ValueError(
            f"{n_name}={n} is too small to certify radius {radius}: it needs p_lower >= {threshold:.6g}, "
            f"which {detail} is out of reach even if every sample votes for the top class; "
            f"use {n_name} >= {needed}{hint}"
        )


def certify_radius_batch(
    smooth,
    xs,
    radius: float,
    norm,
    alpha: float,
    *,
    n0: int = 100,
    max_n: int = 100_000,
    stages: int | None = None,
    first: int = 100,
    method: str = "cp",
    batch_size: int = 1000,
    generator=None,
) -> list:
    """:func:`certify_radius` for each input of the batch ``xs``; the inputs still
    undecided share the forward batches of each stage."""
    xs = smooth.prepare(xs, single=False)
    options = (n0, max_n, stages, first, method, batch_size, generator)
    return _certify_radius(smooth, xs, radius, norm, alpha, *options)


def certify_radius(
    smooth,
    x,
    radius: float,
    norm,
    alpha: float,
    *,
    n0: int = 100,
    max_n: int = 100_000,
    stages: int | None = None,
    first: int = 100,
    method: str = "cp",
    batch_size: int = 1000,
    generator=None,
) -> RadiusDecision:
    """Decide whether ``x`` (one input) is certified at ``radius`` in ``norm``,
    stopping as soon as the answer is known.

    ``smooth`` is a :class:`~ucan_smoothing.Smooth`. ``n0`` selection samples
    choose the class, then at most ``max_n`` fresh estimation samples are drawn
    in ``stages`` geometric stages starting at ``first`` (default 10 stages for
    ``"cp"``, 40 chunks for ``"betting"``).
    ``P(decision is True but the smoothed classifier is not robust at radius
    with that class) <= alpha``.
    """
    xs = smooth.prepare(x, single=True)
    options = (n0, max_n, stages, first, method, batch_size, generator)
    return _certify_radius(smooth, xs, radius, norm, alpha, *options)[0]


def _certify_radius(smooth, xs, radius, norm, alpha, n0, max_n, stages, first, method, batch_size, generator):
    alpha = check_alpha(alpha)
    n0 = check_count("n0", n0)
    method = _check_method(method)
    norm = parse_norm(norm)
    threshold = p_needed(smooth.noise, radius, norm, tuple(xs.shape[1:]))
    schedule = geometric_schedule(max_n, DEFAULT_STAGES[method] if stages is None else stages, first)
    check_budget(method, schedule, threshold, alpha, float(radius))

    generator = resolve_generator(generator, xs.device)
    # Selection on its own samples, as CERTIFY: the estimation must not reuse them.
    selection = smooth.count_votes(xs, n0, batch_size, generator)
    selected = selection.argmax(dim=1).tolist()
    if method == "cp":
        stage_alphas = [alpha / len(schedule)] * len(schedule)
        tests = [StagedClopperPearson(c, threshold, schedule, stage_alphas) for c in selected]
    else:
        tests = [Betting(c, threshold, alpha, prior=(int(row[c]), n0)) for c, row in zip(selected, selection)]
    run_stages(_smooth_draw(smooth, xs, batch_size, generator), tests, schedule)
    return [
        RadiusDecision(
            decision=test.certified,
            prediction=test.cls if test.certified else ABSTAIN,
            radius=float(radius),
            norm=norm,
            alpha=alpha,
            p_needed=threshold,
            p_lower=test.p_lower,
            samples_used=n0 + test.n,
            n0=n0,
            n=test.n,
            top_count=test.hits,
            selected=test.cls,
            stages_run=test.stages_run,
            method=method,
            is_certificate=smooth.noise.is_certificate,
        )
        for test in tests
    ]


# -- sequential PREDICT ------------------------------------------------------------


@dataclass(frozen=True)
class SequentialPrediction:
    """The answer of :func:`predict_sequential`: a class (wrong with probability
    at most ``alpha``) or ``ABSTAIN``, and the samples it took."""

    prediction: int
    samples_used: int
    stages_run: int
    alpha: float

    @property
    def abstained(self) -> bool:
        return self.prediction == ABSTAIN


def predict_sequential_batch(
    smooth,
    xs,
    alpha: float,
    *,
    max_n: int = 100_000,
    stages: int = DEFAULT_STAGES["cp"],
    first: int = 100,
    batch_size: int = 1000,
    generator=None,
) -> list:
    """:func:`predict_sequential` for each input of the batch ``xs``."""
    xs = smooth.prepare(xs, single=False)
    return _predict_sequential(smooth, xs, alpha, max_n, stages, first, batch_size, generator)


def predict_sequential(
    smooth,
    x,
    alpha: float,
    *,
    max_n: int = 100_000,
    stages: int = DEFAULT_STAGES["cp"],
    first: int = 100,
    batch_size: int = 1000,
    generator=None,
) -> SequentialPrediction:
    """Cohen's PREDICT with early stopping: after each of ``stages`` geometric
    stages (at most ``max_n`` samples), the two-sided binomial test of the top
    two classes at level ``alpha / stages``. Returns at the first significant
    stage; a tie is never decided, so it abstains only after ``max_n``."""
    xs = smooth.prepare(x, single=True)
    return _predict_sequential(smooth, xs, alpha, max_n, stages, first, batch_size, generator)[0]


def _predict_sequential(smooth, xs, alpha, max_n, stages, first, batch_size, generator):
    alpha = check_alpha(alpha)
    schedule = geometric_schedule(max_n, stages, first)
    stage_alpha = alpha / len(schedule)
    # best case: all N votes for one class, two-sided p-value 2 * 2^-N
    needed = math.ceil(math.log2(2 / stage_alpha))
    if schedule[-1] < needed:
        raise ValueError(
            f"max_n={schedule[-1]} is too small to predict anything at alpha={alpha} split over "
            f"{len(schedule)} stages ({stage_alpha:.3g} each): use max_n >= {needed} or fewer stages"
        )
    generator = resolve_generator(generator, xs.device)
    tests = [SequentialPredictTest([stage_alpha] * len(schedule)) for _ in range(len(xs))]
    run_stages(_smooth_draw(smooth, xs, batch_size, generator), tests, schedule)
    return [SequentialPrediction(test.prediction, test.n, test.stages_run, alpha) for test in tests]

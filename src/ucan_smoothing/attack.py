"""Search certified regions for counterexamples (the command: ``ucan attack RESULTS.tsv``).

A certificate says the smoothed classifier keeps its prediction ``c`` on the
lq ball of radius ``r`` around ``x``. This module tries to break that claim:

1. PGD on the smoothed classifier: maximise the cross-entropy of the *soft*
   smoothed classifier, ``-log mean_j softmax(f(x + delta + noise_j))[c]``,
   with fresh noise every step (the noise at ``x + delta`` is the
   classifier's own, so input-dependent ``sigma, mu`` are attacked through
   their generator too), projected on the lq ball of radius ``r``;
2. exact search, for oracle models whose smoothed class probabilities are
   known in closed form: scan rays inside the ball for a point where the
   exact smoothed class differs from ``c``.

A counterexample counts as a violation only when PREDICT at the attacked
point, with its own fresh samples and level ``alpha``, returns a class other
than ``c`` (it abstains when unsure). For a proven certificate a violation
happens with probability at most ``alpha_certify + alpha_check`` per row
(the certificate failed, or PREDICT erred), so the per-file violation count
is tested against that rate with a one-sided binomial test.

Perturbations are not clipped to the data range: the certificate is a claim
about every point of the ball.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from typing import Callable

import torch
from scipy import stats

from .core.certificate import ABSTAIN
from .core.norms import norm_name, parse_norm
from .core.smooth import Smooth
from .core.statistics import clopper_pearson_upper, predict_is_significant
from .core.streams import resolve_generator
from .results import COHEN_COLUMNS, Column, Schema

__all__ = [
    "ATTACK_SCHEMA",
    "AttackResult",
    "SmoothTarget",
    "attack_certificate",
    "exact_search",
    "pgd_attack",
    "project",
    "smoothed_votes",
    "summarize",
]

ATTACK_COLUMNS = (
    Column("norm", "str"),
    Column("attacked", "bool"),
    Column("method", "str"),
    Column("delta_norm", "float"),
    Column("attacked_predict", "int"),
    Column("p_upper", "float"),
    Column("violation", "bool"),
    Column("exact_flip", "float"),
    Column("is_certificate", "bool"),
)
#: Cohen's six columns (``predict``, ``radius`` of the attacked certificate), then ours
ATTACK_SCHEMA = Schema(COHEN_COLUMNS + ATTACK_COLUMNS)


# --------------------------------------------------------------------------- targets


class SmoothTarget:
    """Gives a plain :class:`~ucan_smoothing.Smooth` (fixed noise) the ``noisy_logits`` method."""

    def __init__(self, smooth: Smooth):
        self.smooth = smooth
        self.is_certificate = smooth.noise.is_certificate
        self.primary_norm = smooth.noise.primary_norm

    def noisy_logits(self, x: torch.Tensor, num: int, generator=None) -> torch.Tensor:
        noise = self.smooth.noise.sample((num, *x.shape), generator=generator, device=x.device, dtype=x.dtype)
        return self.smooth.model(x + noise)


def as_target(smoothed):
    """Anything with ``noisy_logits`` (the classes of :mod:`ucan_smoothing.npg`), or a ``Smooth``."""
    if isinstance(smoothed, Smooth):
        return SmoothTarget(smoothed)
    if not hasattr(smoothed, "noisy_logits"):
        raise TypeError(f"cannot attack {type(smoothed).__name__}: it needs a noisy_logits(x, num, generator) method")
    return smoothed


def _device_of(target, fallback):
    model = getattr(getattr(target, "smooth", None), "model", None)
    if model is None:
        model = getattr(target, "model", None)
    parameter = next(model.parameters(), None) if isinstance(model, torch.nn.Module) else None
    return parameter.device if parameter is not None else fallback


# --------------------------------------------------------------------------- geometry


def _flat_norm(v: torch.Tensor, norm) -> float:
    return float(torch.linalg.vector_norm(v.reshape(-1).double(), ord=norm))


def project(delta: torch.Tensor, radius: float, norm) -> torch.Tensor:
    """The closest point to ``delta`` in the ``norm`` ball of ``radius`` (Euclidean projection;
    for l1 the sort-based algorithm of Duchi et al. 2008)."""
    norm = parse_norm(norm)
    flat = delta.reshape(-1)
    if norm == math.inf:
        return flat.clamp(-radius, radius).view_as(delta)
    size = float(torch.linalg.vector_norm(flat, ord=norm))
    if size <= radius:
        return delta
    if norm == 2:
        return delta * (radius / size)
    magnitude = flat.abs()
    ordered = torch.sort(magnitude, descending=True).values
    cumulative = ordered.cumsum(0)
    ranks = torch.arange(1, len(ordered) + 1, device=flat.device, dtype=flat.dtype)
    keep = ordered > (cumulative - radius) / ranks
    last = int(keep.nonzero().max())
    threshold = (cumulative[last] - radius) / (last + 1)
    return (flat.sign() * (magnitude - threshold).clamp_min(0)).view_as(delta)


def _ascent_step(grad: torch.Tensor, norm) -> torch.Tensor:
    """The steepest-ascent direction of unit ``norm`` for gradient ``grad``."""
    if norm == math.inf:
        return grad.sign()
    flat = grad.reshape(-1)
    if norm == 2:
        return grad / flat.norm().clamp_min(1e-30)
    step = torch.zeros_like(flat)  # l1: all the budget on the largest coordinate
    top = int(flat.abs().argmax())
    step[top] = flat[top].sign()
    return step.view_as(grad)


def _random_in_ball(like: torch.Tensor, radius: float, norm, generator) -> torch.Tensor:
    if norm == math.inf:
        u = torch.rand(like.shape, generator=generator, device=like.device, dtype=like.dtype)
        return (2 * u - 1) * radius
    direction = torch.randn(like.shape, generator=generator, device=like.device, dtype=like.dtype)
    if norm == 1:
        direction = direction.sign() * torch.empty_like(direction).exponential_(generator=generator)
    direction = direction / torch.linalg.vector_norm(direction.reshape(-1), ord=norm).clamp_min(1e-30)
    scale = torch.rand((), generator=generator, device=like.device, dtype=like.dtype)
    return direction * scale * radius


# --------------------------------------------------------------------------- the attacks


def pgd_attack(target, x: torch.Tensor, label: int, radius: float, norm, *, steps: int = 20, samples: int = 32,
               step_size: float | None = None, random_start: bool = True, generator=None) -> torch.Tensor:
    """PGD on the soft smoothed classifier: a ``delta`` in the ``norm`` ball of ``radius``
    that tries to push the smoothed prediction away from ``label``.

    Each step draws ``samples`` fresh noise samples at ``x + delta`` and
    ascends ``-log mean softmax(logits)[label]``. Default step size
    ``2.5 * radius / steps`` (Madry et al.).
    """
    target, norm = as_target(target), parse_norm(norm)
    device = _device_of(target, x.device)
    rng = resolve_generator(generator, device)
    x = x.to(device)
    inside = radius * (1 - 1e-6)  # stay strictly inside despite rounding
    step_size = 2.5 * radius / steps if step_size is None else step_size
    delta = _random_in_ball(x, inside, norm, rng) if random_start else torch.zeros_like(x)
    for _ in range(steps):
        delta = delta.detach().requires_grad_(True)
        logits = target.noisy_logits(x + delta, samples, rng)
        soft = torch.softmax(logits.double(), dim=1).mean(dim=0)
        loss = -torch.log(soft[label].clamp_min(1e-300))
        (grad,) = torch.autograd.grad(loss, delta)
        with torch.no_grad():
            delta = project(delta + step_size * _ascent_step(grad, norm), inside, norm)
    return delta.detach()


def exact_search(exact_probabilities: Callable, x: torch.Tensor, label: int, radius: float, norm, *,
                 directions=None, points: int = 401, random_directions: int = 16, seed: int = 0):
    """Scan rays ``x + t u`` (``||u|| = 1`` in ``norm``, ``0 < t <= radius``) with the EXACT
    smoothed class probabilities ``exact_probabilities(x') -> sequence``.

    Returns ``(delta, flip)``: ``delta`` is the flipped point with the least
    probability of ``label`` (the clearest counterexample), ``flip`` the
    smallest distance found at which the exact class differs from ``label``
    (refined by bisection); ``(None, None)`` when no ray flips. Default rays:
    both signs of every axis (up to 64 dimensions) and ``random_directions``
    random ones. A found flip is exact; not finding one proves nothing.
    """
    norm = parse_norm(norm)
    x = x.detach().double().cpu()
    if directions is None:
        directions = []
        if x.numel() <= 64:
            for i in range(x.numel()):
                axis = torch.zeros(x.numel(), dtype=torch.float64)
                axis[i] = 1.0
                directions += [axis, -axis]
        if x.numel() > 1:  # in 1-D the axes are all the directions there are
            generator = torch.Generator().manual_seed(seed)
            directions += list(torch.randn(random_directions, x.numel(), generator=generator, dtype=torch.float64))
    inside = radius * (1 - 1e-6)
    steps = torch.linspace(0.0, inside, points, dtype=torch.float64)[1:]

    def flipped(point):
        probs = exact_probabilities(point)
        return max(range(len(probs)), key=lambda c: probs[c]) != label, float(probs[label])

    best_delta, best_p, best_flip = None, math.inf, None
    for direction in directions:
        u = torch.as_tensor(direction, dtype=torch.float64).reshape(x.shape)
        u = u / torch.linalg.vector_norm(u.reshape(-1), ord=norm)
        previous = 0.0
        first = None
        for t in steps.tolist():
            changed, p_label = flipped(x + t * u)
            if changed:
                if first is None:
                    first = _bisect_flip(flipped, x, u, previous, t)
                if p_label < best_p:
                    best_delta, best_p = t * u, p_label
            previous = t
        if first is not None and (best_flip is None or first < best_flip):
            best_flip = first
    return best_delta, best_flip


def _bisect_flip(flipped, x, u, lo: float, hi: float, iterations: int = 50) -> float:
    for _ in range(iterations):
        mid = (lo + hi) / 2
        if flipped(x + mid * u)[0]:
            hi = mid
        else:
            lo = mid
    return hi


def smoothed_votes(target, x: torch.Tensor, n: int, batch_size: int = 1000, generator=None) -> torch.Tensor:
    """Votes of the smoothed classifier at ``x`` over ``n`` fresh noise draws (CPU int64)."""
    target = as_target(target)
    votes = None
    with torch.no_grad():
        for start in range(0, n, batch_size):
            logits = target.noisy_logits(x, min(batch_size, n - start), generator)
            counts = torch.bincount(logits.argmax(dim=1), minlength=logits.shape[1]).cpu()
            votes = counts if votes is None else votes + counts
    return votes


@dataclass
class AttackResult:
    """The attack on one certificate. ``violation`` is True only when PREDICT at
    ``x + delta`` returned a class other than the certified one."""

    prediction: int
    radius: float
    norm: str
    attacked: bool
    method: str = ""
    delta_norm: float = 0.0
    attacked_predict: int = ABSTAIN
    p_upper: float = math.nan  # Clopper-Pearson upper bound of P(certified class) at x + delta
    violation: bool = False
    exact_flip: float = math.nan  # exact search: smallest flip distance found
    delta: torch.Tensor | None = None

    def row(self) -> dict:
        return {key: value for key, value in asdict(self).items() if key not in ("delta", "prediction", "radius")}


def attack_certificate(target, x: torch.Tensor, prediction: int, radius: float, norm, *, steps: int = 20,
                       samples: int = 32, n: int = 10_000, alpha: float = 0.001, batch_size: int = 1000,
                       exact_probabilities: Callable | None = None, exact_points: int = 401,
                       generator=None) -> AttackResult:
    """Attack the claim "the smoothed class is ``prediction`` on the ``norm`` ball of ``radius``".

    With ``exact_probabilities`` the exact search runs first and its
    counterexample (if any) is checked; otherwise PGD. The check is PREDICT
    with ``n`` fresh samples at level ``alpha``. ``exact_points``: grid points per ray.
    """
    norm = parse_norm(norm)
    result = AttackResult(int(prediction), float(radius), norm_name(norm), attacked=False)
    if prediction == ABSTAIN or not radius > 0:
        return result
    target = as_target(target)
    device = _device_of(target, x.device)
    rng = resolve_generator(generator, device)
    x = x.to(device)
    delta, method = None, "pgd"
    if exact_probabilities is not None:
        found, flip = exact_search(exact_probabilities, x, prediction, radius, norm, points=exact_points)
        if found is not None:
            delta, method = found.to(device, x.dtype), "exact"
            result.exact_flip = flip
    if delta is None:
        delta = pgd_attack(target, x, prediction, radius, norm, steps=steps, samples=samples, generator=rng)
    votes = smoothed_votes(target, x + delta, n, batch_size, rng)
    top2 = votes.topk(2)
    n_a, n_b = int(top2.values[0]), int(top2.values[1])
    predicted = int(top2.indices[0]) if predict_is_significant(n_a, n_b, alpha) else ABSTAIN
    result.attacked, result.method = True, method
    result.delta = delta.cpu()
    result.delta_norm = _flat_norm(delta, norm)
    result.attacked_predict = predicted
    result.p_upper = clopper_pearson_upper(int(votes[prediction]), n, alpha)
    result.violation = predicted not in (prediction, ABSTAIN)
    return result


def summarize(violations: list, alpha_certify: float, alpha_check: float) -> dict:
    """Violation rate of the attacked rows against the rate proven certificates allow.

    ``violations``: one bool per attacked row. Under sound certificates each
    row is a violation with probability at most ``alpha_certify +
    alpha_check``; ``p_value`` is the chance of at least the observed count
    at that rate (independent rows).
    """
    attacked, found = len(violations), int(sum(bool(v) for v in violations))
    allowed = min(1.0, alpha_certify + alpha_check)
    p_value = float(stats.binom.sf(found - 1, attacked, allowed)) if attacked else 1.0
    return {
        "attacked": attacked,
        "violations": found,
        "violation_rate": found / attacked if attacked else 0.0,
        "allowed_rate": allowed,
        "p_value": p_value,
        "consistent_with_certificates": p_value >= 0.001,
    }


# --------------------------------------------------------------------------- command line


def load_target(run, device, channels_last: bool = False, amp: str | None = None):
    """The smoothed classifier a model was certified with (:meth:`TrainedRun.smoothed`): fixed noise,
    a sound shift mode, or paper mode for an input-dependent generator (the only way `ucan certify`
    certifies such a run). ``run`` is a run folder or checkpoint of ``ucan train``, or a model
    already opened by :func:`ucan_smoothing.runs.load_model`."""
    from .runs import load_trained  # the model layer, only for the command

    trained = load_trained(run) if isinstance(run, (str, os.PathLike)) else run
    return as_target(trained.smoothed(device, paper_mode=trained.input_dependent,
                                      channels_last=channels_last, amp=amp)), trained

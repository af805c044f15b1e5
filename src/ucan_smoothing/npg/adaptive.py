"""Input-dependent noise, made honest (DESIGN.md section 4; proofs in docs/adaptive.md).

Certifying with ``sigma(x), mu(x)`` computed from the clean input as if they
were fixed is NOT sound: at ``x + delta`` the smoothed classifier uses another
noise distribution, so Theorem 3.2 says nothing about it. This module keeps
that mode only as a labelled reproduction of the paper, and offers sound ways
to adapt the noise to the input:

* :class:`PaperModeSmooth`: the paper's procedure. Every certificate it
  returns has ``is_certificate=False``. Never a default.
* :class:`NoisyInputShift`: ``mu`` computed from the NOISY sample,
  ``f(z + mu(z))``. That is just another base classifier, so certifying it
  with fixed noise (plain :class:`~ucan_smoothing.Smooth`) is Theorem 3.2
  unchanged.
* :class:`LipschitzShiftSmooth`: ``mu(x)`` from the clean input with a PROVEN
  Lipschitz bound ``L`` (of ``u -> mu(sigma * u) / sigma`` in the certified
  norm); the certified radius shrinks to ``R / (1 + L)``.
  :class:`LipschitzMLP` is a ``mu`` network whose bound is computed from
  exact operator norms.
* :class:`ElasticSigmaSmooth`: an input-dependent scalar Gaussian level
  ``sigma(x)`` whose logarithm is ``r``-Lipschitz in l2 ("r-semi-elastic",
  Sukenik et al., ICML 2022); the radius comes from a chained Neyman-Pearson
  bound (:func:`elastic_sigma_radius`), sound and a little looser than theirs.

Trainable ``mu`` networks for the two shift modes (what ``ucan train npg
--kind noisy_shift`` / ``--kind lipschitz_shift`` trains and saves):
:class:`NoisyShiftNet` (a small conv net, ``gamma * tanh``) and
:class:`LipschitzShiftNet` (a :class:`LipschitzMLP` whose cap enforces a
chosen Lipschitz bound). :func:`make_shift` / :func:`shift_from_config`
build and rebuild them; :func:`shift_smoothed` turns one into the smoothed
classifier to certify.

The two 1-D counterexamples of DESIGN.md section 4 are built by
:func:`shift_counterexample` and :func:`scale_counterexample`, with their
exact smoothed class probabilities, so anyone can check the claims.

Every class here has ``certify``, ``certify_batch``, ``predict`` and
``noisy_logits(x, num, generator)`` (differentiable logits of ``num`` noisy
copies of ``x`` under the classifier's own noise at ``x``), which is what
:mod:`ucan_smoothing.attack` needs.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from scipy import optimize, stats
from torch import nn

from .anisotropic import Anisotropic
from .generators import ConvGenerator, build_by_kind, load_saved_weights
from .noises import Gaussian, Noise
from .norms import parse_norm
from .regions import CertifiedRegion, Scaling
from .smooth import Certificate, Smooth, _resolve_generator

__all__ = [
    "NOT_A_CERTIFICATE",
    "Counterexample",
    "ElasticSigmaSmooth",
    "LipschitzMLP",
    "LipschitzShiftNet",
    "LipschitzShiftSmooth",
    "NoisyInputShift",
    "NoisyShiftNet",
    "PaperModeSmooth",
    "SHIFTS",
    "elastic_sigma_lower_bound",
    "elastic_sigma_radius",
    "lipschitz_bounds",
    "make_shift",
    "scale_counterexample",
    "shift_counterexample",
    "shift_from_config",
    "shift_smoothed",
]

NOT_A_CERTIFICATE = (
    "paper mode: sigma(x), mu(x) are computed from the clean input and treated as fixed; this reproduces "
    "the paper's numbers but is NOT a certificate (DESIGN.md section 4)"
)


def _model_device(module, fallback):
    parameter = next(iter(module.parameters()), None) if isinstance(module, nn.Module) else None
    return parameter.device if parameter is not None else fallback


def _shrink(certificate: Certificate, factors: dict) -> Certificate:
    """``certificate`` with each region's radius multiplied by ``factors[norm]``
    (regions of norms without a factor are dropped: nothing is proven for them)."""
    regions = tuple(
        CertifiedRegion(region.norm, region.radius_scaled * factors[region.norm], region.scaling)
        for region in certificate.regions
        if region.norm in factors
    )
    return dataclasses.replace(certificate, regions=regions)


# --------------------------------------------------------------------------- paper mode


class PaperModeSmooth:
    """The paper's input-dependent certification: NOT A CERTIFICATE.

    For each input ``x`` it evaluates the NPG on ``x``, freezes
    ``sigma(x), mu(x)`` into :class:`~ucan_smoothing.Anisotropic` noise and runs
    CERTIFY. The regions it reports are what the paper would claim; they are
    not proven (DESIGN.md section 4 shows flips deep inside them), so every
    certificate carries ``is_certificate=False``. Its smoothed classifier,
    used by ``predict`` and ``noisy_logits``, is the paper's:
    ``g(x) = argmax_c P(f(x + eps * sigma(x) + mu(x)) = c)``.

    ``npg`` maps a batch ``(B, *input_shape)`` to ``(sigma, mu)`` of the same
    shape (``mu`` may be None), e.g. an
    :class:`~ucan_smoothing.generators.InputDependentGenerator`.
    """

    is_certificate = False

    def __init__(self, model: nn.Module, num_classes: int, base_noise: Noise, npg: Callable, *,
                 sigma_min: float = 1e-6, input_shape=None):
        if not isinstance(base_noise, Noise):
            raise TypeError(f"base_noise must be an isotropic noise family, got {type(base_noise).__name__}")
        self.model = model.eval()
        self.num_classes = num_classes
        self.base_noise = base_noise
        self.npg = npg.eval() if isinstance(npg, nn.Module) else npg
        self.sigma_min = sigma_min
        self.input_shape = None if input_shape is None else tuple(input_shape)

    @property
    def primary_norm(self) -> float:
        return self.base_noise.primary_norm

    def _parameters_at(self, x: torch.Tensor):
        x = x.to(_model_device(self.npg, x.device))
        sigma, mu = self.npg(x[None])
        return sigma[0], (None if mu is None else mu[0])

    def noise_at(self, x: torch.Tensor) -> Anisotropic:
        """The noise the paper uses at ``x``: ``sigma(x), mu(x)`` frozen."""
        with torch.no_grad():
            sigma, mu = self._parameters_at(x)
        return Anisotropic(self.base_noise, sigma, mu, sigma_min=self.sigma_min)

    def smooth_at(self, x: torch.Tensor) -> Smooth:
        return Smooth(self.model, self.num_classes, self.noise_at(x), input_shape=self.input_shape)

    def certify(self, x, n0: int, n: int, alpha: float, batch_size: int = 1000, generator=None,
                progress: bool = False) -> Certificate:
        """CERTIFY with the noise frozen at ``x``; the result is labelled NOT a certificate."""
        certificate = self.smooth_at(x).certify(x, n0, n, alpha, batch_size, generator, progress)
        return dataclasses.replace(certificate, is_certificate=False,
                                   extra={**certificate.extra, "mode": "paper", "note": NOT_A_CERTIFICATE})

    def certify_batch(self, xs, n0: int, n: int, alpha: float, batch_size: int = 1000, generator=None) -> list:
        rng = _resolve_generator(generator, _model_device(self.model, xs.device))
        return [self.certify(x, n0, n, alpha, batch_size, rng) for x in xs]

    def predict(self, x, n: int, alpha: float, batch_size: int = 1000, generator=None) -> int:
        """PREDICT for the paper's smoothed classifier at ``x`` (its own ``sigma(x), mu(x)``)."""
        return self.smooth_at(x).predict(x, n, alpha, batch_size, generator)

    def noisy_logits(self, x: torch.Tensor, num: int, generator=None) -> torch.Tensor:
        """Logits of ``num`` draws of ``f(x + eps * sigma(x) + mu(x))``, differentiable in ``x``
        (through the generator too)."""
        sigma, mu = self._parameters_at(x)
        eps = self.base_noise.sample((num, *x.shape), generator=generator, device=x.device, dtype=x.dtype)
        noisy = x + eps * sigma
        return self.model(noisy if mu is None else noisy + mu)


# --------------------------------------------------------------------------- mu from the noisy sample


class NoisyInputShift(nn.Module):
    """The base classifier ``z -> model(z + mu_net(z))``, for ``mu`` computed from the NOISY sample.

    Smoothing it with FIXED noise is ordinary randomized smoothing of another
    base classifier, so ``Smooth(NoisyInputShift(model, mu_net), num_classes,
    noise)`` gives proven certificates (Theorem 3.2 needs nothing of the base
    classifier). ``mu_net`` maps a batch to a batch of the same shape.
    """

    def __init__(self, model: nn.Module, mu_net: nn.Module):
        super().__init__()
        self.model = model
        self.mu_net = mu_net

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.model(z + self.mu_net(z))


# --------------------------------------------------------------------------- Lipschitz mu


_OPERATOR_ORD = {1: 1, 2: 2, math.inf: math.inf}


def operator_norm(weight: torch.Tensor, norm) -> torch.Tensor:
    """The induced ``norm -> norm`` operator norm of a matrix, computed exactly:
    l1: largest column sum, l_inf: largest row sum, l2: largest singular value (SVD)."""
    return torch.linalg.matrix_norm(weight, ord=_OPERATOR_ORD[parse_norm(norm)])


class LipschitzMLP(nn.Module):
    """A ``mu`` network with a PROVEN Lipschitz bound: ``gamma * tanh(MLP(flatten(x)))``.

    The MLP has ``depth`` linear layers with leaky-ReLU between them. In the
    forward pass each weight is divided by ``max(1, ||W||_op / cap)``
    (operator norm in ``norm``, computed exactly, not by power iteration), which
    enforces ``Lip <= gamma * cap^depth`` during training. The bound used for
    certification, :meth:`lipschitz_bound`, is recomputed from the effective
    weights. ``output_shape`` defaults to ``input_shape`` (a shift ``mu``).
    """

    def __init__(self, input_shape, output_shape=None, hidden: int = 64, depth: int = 2, gamma: float = 1.0,
                 norm=2, cap: float = 1.0):
        super().__init__()
        self.input_shape = tuple(int(s) for s in input_shape)
        self.output_shape = self.input_shape if output_shape is None else tuple(int(s) for s in output_shape)
        if depth < 1 or hidden < 1 or not gamma > 0 or not cap > 0:
            raise ValueError("need depth >= 1, hidden >= 1, gamma > 0 and cap > 0")
        self.gamma, self.norm, self.cap = float(gamma), parse_norm(norm), float(cap)
        widths = [math.prod(self.input_shape)] + [int(hidden)] * (depth - 1) + [math.prod(self.output_shape)]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.activation = nn.LeakyReLU(0.2)  # slope <= 1: 1-Lipschitz per coordinate

    def weights(self) -> list:
        """The effective (capped) weights used by the forward pass."""
        capped = []
        for layer in self.layers:
            size = operator_norm(layer.weight, self.norm)
            capped.append(layer.weight / torch.clamp(size / self.cap, min=1.0))
        return capped

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.flatten(1)
        weights = self.weights()
        for i, (layer, weight) in enumerate(zip(self.layers, weights)):
            h = nn.functional.linear(h, weight.to(h.dtype), layer.bias.to(h.dtype))
            if i < len(self.layers) - 1:
                h = self.activation(h)
        return (self.gamma * torch.tanh(h)).view(len(x), *self.output_shape)

    def lipschitz_bound(self, norm=None, sigma=None, margin: float = 1e-4) -> float:
        """Proven bound on the Lipschitz constant of ``u -> mu(sigma * u) / sigma`` in ``norm``
        (``sigma=None``: of ``x -> mu(x)``).

        Product of exact operator norms (float64) of the effective weights,
        with ``diag(sigma)`` folded into the first layer and ``diag(1/sigma)``
        into the last (coordinate-wise 1-Lipschitz maps such as tanh and
        leaky-ReLU commute with that bound in every lp norm), times ``gamma``.
        ``margin`` (relative) covers rounding of the float32 forward pass.
        """
        norm = self.norm if norm is None else parse_norm(norm)
        with torch.no_grad():
            weights = [w.detach().to("cpu", torch.float64) for w in self.weights()]
            if sigma is not None:
                sigma_in = torch.as_tensor(sigma, dtype=torch.float64).expand(self.input_shape).reshape(-1)
                sigma_out = torch.as_tensor(sigma, dtype=torch.float64).expand(self.output_shape).reshape(-1)
                weights[0] = weights[0] * sigma_in[None, :]
                weights[-1] = weights[-1] / sigma_out[:, None]
            bound = self.gamma
            for weight in weights:
                bound *= float(operator_norm(weight, norm))
        return bound * (1 + margin)


class LipschitzShiftSmooth:
    """``g(x) = argmax_c P(f(x + mu(x) + noise) = c)`` with ``mu`` from the CLEAN input and fixed noise.

    Sound when ``lipschitz`` bounds the Lipschitz constant of
    ``u -> mu(sigma * u) / sigma`` in the certified norm (``sigma`` = the
    noise's fixed scale, 1 for isotropic noise): the region
    ``||delta / sigma||_p <= R`` of the fixed-noise smoothed classifier at
    ``x + mu(x)`` becomes ``||delta / sigma||_p <= R / (1 + L)`` around ``x``
    (docs/adaptive.md). ``lipschitz`` is a number (for the noise's primary
    norm) or ``{norm: L}``; regions of norms without a bound are dropped.
    ``None`` asks ``mu_fn.lipschitz_bound(norm, sigma)`` (see
    :class:`LipschitzMLP`). The bound must be PROVEN (exact norms, analysis),
    not estimated.
    """

    is_certificate = True

    def __init__(self, model: nn.Module, num_classes: int, noise, mu_fn: Callable, lipschitz=None, *,
                 input_shape=None):
        self.smooth = Smooth(model, num_classes, noise, input_shape=input_shape)
        self.noise, self.mu_fn = noise, mu_fn
        if isinstance(mu_fn, nn.Module):
            mu_fn.eval()
        if lipschitz is None:
            lipschitz = lipschitz_bounds(mu_fn, noise)
        elif not isinstance(lipschitz, dict):
            lipschitz = {noise.primary_norm: lipschitz}
        self.lipschitz = {}
        for norm, value in lipschitz.items():
            value = float(value)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"a Lipschitz bound must be finite and >= 0, got {value}")
            self.lipschitz[parse_norm(norm)] = value
        self.factors = {norm: 1.0 / (1.0 + value) for norm, value in self.lipschitz.items()}

    @property
    def primary_norm(self) -> float:
        return self.noise.primary_norm

    def shift(self, xs: torch.Tensor) -> torch.Tensor:
        """``x + mu(x)`` for a batch."""
        with torch.no_grad():
            xs = xs.to(_model_device(self.mu_fn, xs.device))
            return xs + self.mu_fn(xs)

    def certify_batch(self, xs, n0: int, n: int, alpha: float, batch_size: int = 1000, generator=None) -> list:
        certificates = self.smooth.certify_batch(self.shift(xs), n0, n, alpha, batch_size, generator)
        return [_shrink(certificate, self.factors) for certificate in certificates]

    def certify(self, x, n0: int, n: int, alpha: float, batch_size: int = 1000, generator=None,
                progress: bool = False) -> Certificate:
        certificate = self.smooth.certify(self.shift(x[None])[0], n0, n, alpha, batch_size, generator, progress)
        return _shrink(certificate, self.factors)

    def predict(self, x, n: int, alpha: float, batch_size: int = 1000, generator=None) -> int:
        return self.smooth.predict(self.shift(x[None])[0], n, alpha, batch_size, generator)

    def noisy_logits(self, x: torch.Tensor, num: int, generator=None) -> torch.Tensor:
        mu = self.mu_fn(x[None])[0]
        eps = self.noise.sample((num, *x.shape), generator=generator, device=x.device, dtype=x.dtype)
        return self.smooth.model(x + mu + eps)


def lipschitz_bounds(mu_fn, noise) -> dict:
    """``{norm: L}`` for every native norm of ``noise``: the proven bound of ``u -> mu(sigma * u) / sigma``
    (``sigma`` = the fixed noise's shape, none for isotropic noise) from ``mu_fn.lipschitz_bound``."""
    if not hasattr(mu_fn, "lipschitz_bound"):
        raise ValueError("give `lipschitz` (a proven bound), or a mu_fn with a lipschitz_bound method")
    sigma = getattr(noise, "sigma", None)
    return {parse_norm(norm): float(mu_fn.lipschitz_bound(norm, sigma)) for norm in noise.native_norms}


# --------------------------------------------------------------------------- trainable shift networks


def _json_norm(norm):
    norm = parse_norm(norm)
    return "inf" if math.isinf(norm) else int(norm)


class NoisyShiftNet(nn.Module):
    """A ``mu`` network for :class:`NoisyInputShift`: ``z -> gamma * tanh(G(z))`` on the NOISY sample.

    ``G`` is the conv generator of :mod:`ucan_smoothing.generators` (conv +
    leaky-ReLU blocks, a dense head that starts at zero, so a fresh network is
    ``mu = 0`` and ``NoisyInputShift(model, net)`` starts as ``model``).
    ``gamma`` bounds every coordinate of the shift. Nothing about it needs to be
    bounded for soundness: it is part of the base classifier.
    """

    kind = "noisy_shift"
    #: mu is computed from the noisy sample ``z`` (part of the base classifier)
    clean_input = False

    def __init__(self, input_shape, gamma: float = 1.0, channels=(16, 32, 32, 32), pool: int = 4,
                 head_size: int | None = None):
        super().__init__()
        self.input_shape = tuple(int(s) for s in input_shape)
        self.gamma = float(gamma)
        if not (math.isfinite(self.gamma) and self.gamma > 0):
            raise ValueError(f"gamma must be finite and > 0, got {gamma}")
        self.channels = tuple(int(c) for c in channels)
        self.pool = int(pool)
        self.head_size = None if head_size is None else int(head_size)
        self.net = ConvGenerator(self.input_shape, self.channels, self.pool, self.head_size)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.gamma * torch.tanh(self.net(z))

    def describe(self) -> dict:
        return {"kind": self.kind, "input_shape": list(self.input_shape), "gamma": self.gamma,
                "channels": list(self.channels), "pool": self.pool, "head_size": self.head_size}


class LipschitzShiftNet(LipschitzMLP):
    """A :class:`LipschitzMLP` ``mu`` from the CLEAN input whose cap enforces ``Lip <= lipschitz``.

    Each of the ``depth`` layers is capped at ``cap = (lipschitz / gamma)^(1/depth)``
    in ``norm``, so ``gamma * cap^depth = lipschitz`` (in unscaled
    coordinates; the certificate recomputes the bound, with the noise's
    ``sigma`` folded in, by :meth:`LipschitzMLP.lipschitz_bound`). The last
    layer starts at zero: a fresh network is ``mu = 0``.
    """

    kind = "lipschitz_shift"
    clean_input = True

    def __init__(self, input_shape, lipschitz: float = 0.5, gamma: float = 1.0, hidden: int = 256, depth: int = 2,
                 norm=2):
        lipschitz = float(lipschitz)
        if not (math.isfinite(lipschitz) and lipschitz > 0):
            raise ValueError(f"lipschitz must be finite and > 0, got {lipschitz}")
        if not (math.isfinite(float(gamma)) and float(gamma) > 0) or int(depth) < 1:
            raise ValueError(f"need gamma > 0 and depth >= 1, got gamma={gamma}, depth={depth}")
        cap = (lipschitz / float(gamma)) ** (1.0 / int(depth))
        super().__init__(input_shape, hidden=hidden, depth=depth, gamma=gamma, norm=norm, cap=cap)
        self.lipschitz, self.hidden, self.depth = lipschitz, int(hidden), int(depth)
        nn.init.zeros_(self.layers[-1].weight)
        nn.init.zeros_(self.layers[-1].bias)

    def describe(self) -> dict:
        return {"kind": self.kind, "input_shape": list(self.input_shape), "lipschitz": self.lipschitz,
                "gamma": self.gamma, "hidden": self.hidden, "depth": self.depth, "norm": _json_norm(self.norm)}


#: the trainable shift kinds of ``ucan train npg --kind ...`` (sound input-adaptive modes)
SHIFTS = {cls.kind: cls for cls in (NoisyShiftNet, LipschitzShiftNet)}


def make_shift(kind: str, input_shape, **params) -> nn.Module:
    """Build a fresh shift network by kind: ``make_shift('lipschitz_shift', (1, 28, 28), lipschitz=0.5)``."""
    return build_by_kind(SHIFTS, "shift", kind, input_shape, **params)


def shift_from_config(config: dict, state_dict: dict | None = None) -> nn.Module:
    """Rebuild a shift network from its ``describe()`` (and ``state_dict()``)."""
    if not isinstance(config, dict) or "kind" not in config or "input_shape" not in config:
        raise ValueError(f"a shift config is a dict with 'kind' and 'input_shape', got {config!r}")
    params = {k: v for k, v in config.items() if k not in ("kind", "input_shape")}
    shift = make_shift(config["kind"], config["input_shape"], **params)
    return load_saved_weights(shift, state_dict, config["kind"], "shift").eval()


def shift_smoothed(model: nn.Module, num_classes: int, noise, shift: nn.Module, *, input_shape=None):
    """The smoothed classifier of a trained shift under FIXED ``noise``, ready to certify (both sound):

    * ``noisy_shift``: ``Smooth(NoisyInputShift(model, shift), num_classes, noise)``;
    * ``lipschitz_shift``: ``LipschitzShiftSmooth(model, num_classes, noise, shift)``, radius ``R / (1 + L)``
      with ``L`` recomputed from the weights (:func:`lipschitz_bounds`).
    """
    kind = getattr(shift, "kind", None)
    if kind == NoisyShiftNet.kind:
        return Smooth(NoisyInputShift(model, shift).eval(), num_classes, noise, input_shape=input_shape)
    if kind == LipschitzShiftNet.kind:
        return LipschitzShiftSmooth(model, num_classes, noise, shift, input_shape=input_shape)
    raise ValueError(f"not a trained shift network: {type(shift).__name__} (kinds: {', '.join(SHIFTS)})")


# --------------------------------------------------------------------------- semi-elastic sigma


class _ElasticBound:
    """The chained Neyman-Pearson bound of :func:`elastic_sigma_lower_bound` for one
    ``(p_lower, sigma0, r, dim)``; the quantiles that depend only on ``p`` are computed once."""

    def __init__(self, p_lower: float, sigma0: float, elasticity: float, dim: int, pieces: int):
        self.p, self.sigma0, self.r, self.pieces = float(p_lower), float(sigma0), float(elasticity), int(pieces)
        self.chi2 = stats.chi2(int(dim))
        self.ball = self.chi2.ppf(self.p)  # P(||eps||^2 <= ball) = p
        self.outside = self.chi2.isf(self.p)  # P(||eps||^2 >= outside) = p

    def variance_change(self, ratio_sq):
        """Least ``P(A)`` under ``N(x, s1^2 I)`` over sets with ``P(A) >= p`` under
        ``N(x, sigma0^2 I)``, for ``ratio_sq = (sigma0 / s1)^2`` (Neyman-Pearson: the worst
        set is a ball around ``x`` when ``s1 > sigma0``, the outside of one when ``s1 < sigma0``)."""
        ratio_sq = np.asarray(ratio_sq, dtype=float)
        wider = self.chi2.cdf(self.ball * ratio_sq)
        narrower = self.chi2.sf(self.outside * ratio_sq)
        return np.where(ratio_sq == 1.0, self.p, np.where(ratio_sq < 1.0, wider, narrower))

    def __call__(self, delta: float) -> float:
        if delta == 0:
            return self.p
        sigma0, r = self.sigma0, self.r
        low = sigma0 * math.exp(-r * delta)
        bound = float(_mean_shift(self.variance_change((sigma0 / low) ** 2), delta / low))
        if r > 0:
            ends = sigma0 * np.exp(r * delta * np.arange(self.pieces + 1) / self.pieces)
            worst = _mean_shift(self.variance_change((sigma0 / ends[1:]) ** 2), delta / ends[:-1])
            bound = min(bound, float(worst.min()))
        return bound


def _mean_shift(p, shift):
    """Cohen et al.'s bound: least ``P(A)`` after moving an isotropic Gaussian by ``shift`` std devs."""
    return stats.norm.cdf(stats.norm.ppf(p) - shift)


def elastic_sigma_lower_bound(p_lower: float, sigma0: float, elasticity: float, dim: int, delta: float,
                              pieces: int = 64) -> float:
    """A lower bound on ``P(f(x' + sigma(x') eps) = c)`` valid for EVERY ``x'`` with
    ``||x' - x||_2 <= delta``, given ``P(f(x + sigma0 eps) = c) >= p_lower`` and
    ``|log sigma(x') - log sigma(x)| <= elasticity * ||x' - x||_2`` (Gaussian ``eps`` in ``dim``
    dimensions).

    Two Neyman-Pearson steps: change the variance at ``x`` (to ``s1``), then
    move the mean by ``delta' <= delta``. For ``s1 < sigma0`` both steps are
    worst at ``s1 = sigma0 exp(-r delta)``; ``[sigma0, sigma0 exp(r delta)]``
    is cut into ``pieces`` geometric pieces, on each of which the variance step
    is bounded at the upper end and the shift at the lower end.
    """
    return _ElasticBound(p_lower, sigma0, elasticity, dim, pieces)(delta)


@functools.lru_cache(maxsize=4096)
def elastic_sigma_radius(p_lower: float, sigma0: float, elasticity: float, dim: int, pieces: int = 64,
                         iterations: int = 50) -> float:
    """The l2 radius certified for an ``elasticity``-semi-elastic Gaussian level ``sigma(x)``.

    Returns ``R`` with :func:`elastic_sigma_lower_bound` ``> 1/2`` at ``R``
    (checked, not assumed: bisection keeps that invariant), so the top class
    keeps more than half the mass everywhere in the ball. With
    ``elasticity = 0`` it is Cohen's ``sigma0 * PhiInv(p_lower)``. Cached:
    images with the same vote count share the computation.
    """
    if not p_lower > 0.5:
        return 0.0
    cohen = sigma0 * float(stats.norm.ppf(p_lower))
    if elasticity == 0:
        return cohen
    if elasticity < 0 or not math.isfinite(elasticity):
        raise ValueError(f"elasticity must be finite and >= 0, got {elasticity}")
    bound = _ElasticBound(p_lower, sigma0, elasticity, dim, pieces)
    # The s1 = sigma0 piece alone gives Cohen's bound, so the radius is below `cohen`.
    lo, hi = 0.0, cohen
    for _ in range(iterations):
        mid = (lo + hi) / 2
        if bound(mid) > 0.5:
            lo = mid
        else:
            hi = mid
    return lo


class ElasticSigmaSmooth:
    """Gaussian smoothing with an input-dependent level: ``g(x) = argmax_c P(f(x + scale * sigma(x) * eps) = c)``.

    ``sigma_fn`` maps a batch to one positive number per input; ``elasticity``
    is a PROVEN bound ``r`` with ``|log sigma(x) - log sigma(x')| <= r ||x - x'||_2``.
    The certified set is the l2 ball of :func:`elastic_sigma_radius`
    (isotropic; the l1 / l_inf radii follow by the inscribed-ball rule).
    In high dimension it needs a very small ``r`` (the curse of dimensionality
    that Sukenik et al. describe): that is the price of soundness.
    """

    is_certificate = True
    primary_norm = 2

    def __init__(self, model: nn.Module, num_classes: int, scale: float, sigma_fn: Callable, elasticity: float, *,
                 input_shape=None, pieces: int = 64):
        self.model = model.eval()
        self.num_classes = num_classes
        self.base = Gaussian(scale)
        self.sigma_fn = sigma_fn.eval() if isinstance(sigma_fn, nn.Module) else sigma_fn
        self.elasticity = float(elasticity)
        if not (math.isfinite(self.elasticity) and self.elasticity >= 0):
            raise ValueError(f"elasticity must be finite and >= 0, got {elasticity}")
        self.input_shape = None if input_shape is None else tuple(input_shape)
        self.pieces = pieces

    def level(self, xs: torch.Tensor) -> torch.Tensor:
        """``scale * sigma(x)`` for a batch, shape ``(B,)``."""
        sigma = self.sigma_fn(xs.to(_model_device(self.sigma_fn, xs.device))).reshape(len(xs))
        if not torch.isfinite(sigma).all() or (sigma <= 0).any():
            raise ValueError("sigma_fn must return finite positive numbers")
        return self.base.scale * sigma

    def _smooth(self, level: float) -> Smooth:
        return Smooth(self.model, self.num_classes, Gaussian(level), input_shape=self.input_shape)

    def _finish(self, certificate: Certificate, level: float, dim: int) -> Certificate:
        radius = 0.0
        if not certificate.abstained:
            radius = elastic_sigma_radius(certificate.p_lower, level, self.elasticity, dim, self.pieces)
        regions = () if certificate.abstained else (CertifiedRegion(2, radius, Scaling.isotropic(dim)),)
        return dataclasses.replace(certificate, norm=2, regions=regions, is_certificate=True,
                                   extra={**certificate.extra, "level": level, "elasticity": self.elasticity})

    def certify_batch(self, xs, n0: int, n: int, alpha: float, batch_size: int = 1000, generator=None) -> list:
        with torch.no_grad():
            levels = self.level(xs).tolist()
        dim = math.prod(xs.shape[1:])
        rng = _resolve_generator(generator, _model_device(self.model, xs.device))
        out = [None] * len(xs)
        for level in sorted(set(levels)):  # inputs with the same level share one batched call
            rows = [i for i, value in enumerate(levels) if value == level]
            for i, certificate in zip(rows, self._smooth(level).certify_batch(xs[rows], n0, n, alpha,
                                                                              batch_size, rng)):
                out[i] = self._finish(certificate, level, dim)
        return out

    def certify(self, x, n0: int, n: int, alpha: float, batch_size: int = 1000, generator=None,
                progress: bool = False) -> Certificate:
        with torch.no_grad():
            level = float(self.level(x[None])[0])
        certificate = self._smooth(level).certify(x, n0, n, alpha, batch_size, generator, progress)
        return self._finish(certificate, level, x.numel())

    def predict(self, x, n: int, alpha: float, batch_size: int = 1000, generator=None) -> int:
        with torch.no_grad():
            level = float(self.level(x[None])[0])
        return self._smooth(level).predict(x, n, alpha, batch_size, generator)

    def noisy_logits(self, x: torch.Tensor, num: int, generator=None) -> torch.Tensor:
        level = self.level(x[None])[0]
        eps = torch.randn((num, *x.shape), generator=generator, device=x.device, dtype=x.dtype)
        return self.model(x + level * eps)


# --------------------------------------------------------------------------- the counterexamples


class Threshold1D(nn.Module):
    """``f(x) = [x > 0]`` on 1-D inputs ``(B, 1)``: logits ``(-x, x)``."""

    def forward(self, x):
        return torch.cat([-x, x], dim=1)


class Interval1D(nn.Module):
    """Three classes on 1-D inputs by affine logits ``(-(x + 1), 0, x - 1)``:
    class 0 below -1, class 1 on ``(-1, 1)``, class 2 above 1."""

    def forward(self, x):
        return torch.cat([-(x + 1), torch.zeros_like(x), x - 1], dim=1)


class ShiftNPG(nn.Module):
    """``mu(x) = height * tanh(steepness * (x - centre))``, ``sigma = 1``."""

    def __init__(self, height: float, steepness: float, centre: float):
        super().__init__()
        self.height, self.steepness, self.centre = height, steepness, centre

    def mu(self, x):
        return self.height * torch.tanh(self.steepness * (x - self.centre))

    def forward(self, x):
        return torch.ones_like(x), self.mu(x)


class ScaleNPG(nn.Module):
    """``sigma(x) = base + curvature * x^2``, ``mu = None``."""

    def __init__(self, base: float, curvature: float):
        super().__init__()
        self.base, self.curvature = base, curvature

    def sigma(self, x):
        return self.base + self.curvature * x**2

    def forward(self, x):
        return self.sigma(x), None


@dataclass
class Counterexample:
    """A 1-D setting where the paper's certificate fails, with everything exact.

    ``exact_probabilities(x')`` are the class probabilities of the paper's
    smoothed classifier at ``x'`` (its own ``sigma(x'), mu(x')``);
    ``flip_distance`` is the exact distance from ``x`` to the nearest point
    where that classifier changes its prediction.
    """

    name: str
    model: nn.Module
    npg: nn.Module
    base_noise: Noise
    x: torch.Tensor
    num_classes: int
    exact_probabilities: Callable
    flip_distance: float
    #: proven constants of the generator: Lipschitz of mu, or elasticity of sigma
    lipschitz: float

    def paper_mode(self) -> PaperModeSmooth:
        return PaperModeSmooth(self.model, self.num_classes, self.base_noise, self.npg, input_shape=(1,))

    def exact_class(self, point) -> int:
        return int(np.argmax(self.exact_probabilities(point)))


def shift_counterexample() -> Counterexample:
    """mu-generator: ``f = [x > 0]``, Gaussian level 1, ``mu(x) = 6 tanh(50 (x + 0.06))``, ``x = 0``.

    At ``x = 0`` the margin ``x + mu(x)`` is 5.97, so every one of 100,000
    samples votes class 1 and the paper claims ``PhiInv(0.001^(1/100000)) =
    3.81``. But ``x' + mu(x')`` changes sign at ``x' = -0.0598``: the smoothed
    prediction flips at distance 0.06. ``mu`` is 300-Lipschitz (slope 6 * 50).
    """
    npg = ShiftNPG(6.0, 50.0, -0.06)

    def margin(point):
        point = float(torch.as_tensor(point).reshape(-1)[0])
        return point + 6.0 * math.tanh(50.0 * (point + 0.06))

    def probabilities(point):
        p_one = float(stats.norm.cdf(margin(point)))
        return np.array([1 - p_one, p_one])

    root = optimize.brentq(margin, -1.0, 0.0, xtol=1e-14)
    return Counterexample("mu-generator", Threshold1D(), npg, Gaussian(1.0), torch.zeros(1), 2, probabilities,
                          abs(root), 300.0)


def _interval_probabilities(point: float, level: float) -> np.ndarray:
    below = stats.norm.cdf((-1 - point) / level)
    above = stats.norm.sf((1 - point) / level)
    return np.array([below, 1 - below - above, above])


def scale_counterexample() -> Counterexample:
    """sigma-generator: the three-interval classifier, ``sigma(x) = 0.2 + c x^2``, ``x = 0``.

    At ``x = 0`` the level is 0.2 and class 1 holds all 100,000 samples, so
    the paper claims ``0.2 * 3.81 = 0.76``. ``c = 6.673`` is chosen so that at
    ``|x'| = 0.5`` (level 1.868) class 2 overtakes class 1: the prediction
    flips at distance 0.50 (and not before: the level grows with ``|x'|``).
    ``log sigma`` is ``sqrt(c / 0.2) = 5.78``-Lipschitz.
    """
    def gap(level):  # class 1 minus class 2 at x' = 0.5
        probs = _interval_probabilities(0.5, level)
        return probs[1] - probs[2]

    level_at_flip = optimize.brentq(gap, 0.3, 10.0, xtol=1e-14)
    curvature = (level_at_flip - 0.2) / 0.25
    npg = ScaleNPG(0.2, curvature)

    def probabilities(point):
        point = float(torch.as_tensor(point).reshape(-1)[0])
        return _interval_probabilities(point, 0.2 + curvature * point**2)

    return Counterexample("sigma-generator", Interval1D(), npg, Gaussian(1.0), torch.zeros(1), 3, probabilities,
                          0.5, math.sqrt(curvature / 0.2))

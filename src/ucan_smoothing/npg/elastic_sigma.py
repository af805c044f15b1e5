"""Sound: an input-dependent Gaussian level ``sigma(x)`` with a proven semi-elasticity bound.

If ``log sigma(x)`` is ``r``-Lipschitz in l2 ("r-semi-elastic", Sukenik et
al., ICML 2022), the radius comes from a chained Neyman-Pearson bound
(:func:`elastic_sigma_radius`): sound, and a little looser than theirs.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable

import numpy as np
import torch
from scipy import stats
from torch import nn

from ..core.certificate import Certificate
from ..core.noises import Gaussian
from ..core.regions import CertifiedRegion, Scaling
from ..core.smooth import Smooth
from ..core.streams import model_device, resolve_generator
from ..results import ELASTIC_COLUMNS

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
    #: the column its rows add (the level used at each image, from the certificate's ``extra``)
    row_columns = ELASTIC_COLUMNS

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
        sigma = self.sigma_fn(xs.to(model_device(self.sigma_fn, xs.device))).reshape(len(xs))
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
        rng = resolve_generator(generator, model_device(self.model, xs.device))
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


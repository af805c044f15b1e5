"""Classifiers whose smoothed versions are known in closed form (DESIGN.md section 6).

Each oracle is a tiny ``nn.Module`` (so ``Smooth`` runs it like a network)
plus the exact top-class probability and the exact robust radius of its
smoothed classifier.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy import integrate, optimize, stats


class LinearBinary(torch.nn.Module):
    """``f(x) = [w . x + b > 0]`` as two logits (class 1 when positive)."""

    def __init__(self, w, b):
        super().__init__()
        self.w = torch.as_tensor(w, dtype=torch.float64)
        self.b = float(b)

    def forward(self, x):
        score = x.reshape(len(x), -1).to(torch.float64) @ self.w + self.b
        return torch.stack([-score, score], dim=1).to(x.dtype)

    def margin(self, x, mu=None):
        x = torch.as_tensor(x, dtype=torch.float64).reshape(-1)
        if mu is not None:
            x = x + torch.as_tensor(mu, dtype=torch.float64).reshape(-1)
        return float(self.w @ x + self.b)

    def label(self, x, mu=None) -> int:
        return int(self.margin(x, mu) > 0)

    def p_top_gaussian(self, x, scale, sigma, mu=None) -> float:
        """``P(f(x + scale * eps * sigma + mu) = g(x))`` for Gaussian ``eps``."""
        spread = scale * float(torch.linalg.vector_norm(torch.as_tensor(sigma, dtype=torch.float64).reshape(-1) * self.w))
        return float(stats.norm.cdf(abs(self.margin(x, mu)) / spread))

    def exact_radius(self, x, norm, mu=None) -> float:
        """Distance in ``norm`` from ``x`` to the smoothed decision boundary
        ``w . (x + delta + mu) + b = 0``: ``|m| / ||w||_dual``."""
        dual = {1: math.inf, 2: 2, math.inf: 1}[norm]
        return abs(self.margin(x, mu)) / float(torch.linalg.vector_norm(self.w, ord=dual))


class OneAxisThreshold(torch.nn.Module):
    """``f(x) = [x_0 > t]``: the smoothed classifier flips exactly at ``x_0 = t``
    for any symmetric noise, so the exact radius is ``|x_0 - t|`` in every norm."""

    def __init__(self, threshold: float = 0.0):
        super().__init__()
        self.threshold = threshold

    def forward(self, x):
        score = (x.reshape(len(x), -1)[:, 0] - self.threshold).to(torch.float64)
        return torch.stack([-score, score], dim=1).to(x.dtype)

    def exact_radius(self, x) -> float:
        return abs(float(x.reshape(-1)[0]) - self.threshold)


def marginal_tail(noise, s: float, dim: int) -> float:
    """``P(z_0 > s)`` for one coordinate of ``noise`` in dimension ``dim``, ``s >= 0``."""
    name, lam = noise.name, noise.scale
    if name == "gaussian":
        return float(stats.norm.sf(s / lam))
    if name == "laplace":
        return 0.5 * math.exp(-s / lam)
    if name == "uniform":
        return max(0.0, (lam - s) / (2 * lam))
    # ||z||_inf = r, z uniform on the cube surface: z_0 = +-r with prob 1/d,
    # else uniform on [-r, r]. Integrate over the radial law of r.
    if name == "expinf":
        radial = stats.gamma(dim, scale=lam)
    elif name == "powerlaw":
        radial = stats.betaprime(dim, noise.a - dim, scale=lam)
    else:
        raise ValueError(name)
    tail = radial.sf(s)
    if s == 0:
        return 0.5
    inverse_moment, _ = integrate.quad(lambda r: radial.pdf(r) / r, s, np.inf, limit=200)
    return tail / (2 * dim) + (dim - 1) / (2 * dim) * (tail - s * inverse_moment)


def one_axis_p_top(noise, x0_minus_t: float, sigma0: float, dim: int) -> float:
    """Exact ``P(f(x + noise) = g(x))`` of :class:`OneAxisThreshold`, noise scaled by ``sigma0`` on axis 0."""
    return 1.0 - marginal_tail(noise, abs(x0_minus_t) / sigma0, dim)


def ball_p_inside(norm_x: float, radius: float, scale: float, dim: int) -> float:
    """``P(||x + scale * eps|| <= radius)`` for Gaussian ``eps`` (noncentral chi-square)."""
    return float(stats.ncx2.cdf((radius / scale) ** 2, dim, (norm_x / scale) ** 2))


def ball_exact_radius(norm_x: float, radius: float, scale: float, dim: int) -> float:
    """Distance from an inside point to where the smoothed ball classifier flips."""
    flip = optimize.brentq(lambda rho: ball_p_inside(rho, radius, scale, dim) - 0.5, 0.0, radius + 10 * scale)
    return flip - norm_x


class BallClassifier(torch.nn.Module):
    """``f(x) = [||x||_2 <= r]`` (class 1 inside)."""

    def __init__(self, radius: float):
        super().__init__()
        self.radius = radius

    def forward(self, x):
        inside = (torch.linalg.vector_norm(x.reshape(len(x), -1).to(torch.float64), dim=1) <= self.radius)
        score = inside.to(torch.float64) * 2 - 1
        return torch.stack([-score, score], dim=1).to(x.dtype)

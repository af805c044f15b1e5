"""The two 1-D counterexamples of DESIGN.md section 4, with their exact smoothed class probabilities,
so anyone can check that the paper's input-dependent certificate is not sound."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from scipy import optimize, stats
from torch import nn

from ..core.noises import Gaussian, Noise
from .paper_mode import PaperModeSmooth

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

"""Sound: dual randomized smoothing, a noise chosen per input by a smoothed selector.

The idea is that of Sun, Mao and Vechev (ICLR 2026, "Dual randomized
smoothing"): randomized smoothing stays valid with an input-dependent noise
as long as the noise is constant on the certified region, and smoothing the
noise estimator itself makes it so. Here the estimator chooses among a finite
menu of EXPERTS, each a base classifier with its own FIXED noise (isotropic
levels, or fixed anisotropic noise): ``h(x) in {0, ..., K-1}`` is a selector
network, smoothed with its own Gaussian noise ``N(0, s^2 I)``. What follows is
our own statement and proof of the case we implement; we did not have the
paper's theorem text.

The classifier. With ``k(x') = argmax_k P(h(x' + s eps) = k)`` (ties to the
lowest index) and ``g_k`` the smoothed classifier of expert ``k`` under its
fixed noise, the dual classifier is ``G(x') = g_{k(x')}(x')``: a
deterministic function of ``x'``, which is what is certified.

The certificate (:meth:`DualSmooth.certify`). With ``alpha_s = share *
alpha`` and ``alpha_e = alpha - alpha_s``:

1. Cohen's CERTIFY on the selector at ``x`` at level ``alpha_s`` gives ``k``
   and ``R_s = s * PhiInv(p_lower_s)``;
2. the expert's CERTIFY (its own noise, the project's certificate table) at
   ``x`` at level ``alpha_e`` gives the class ``c`` and its regions.

The answer is ``c``, certified on the lq ball of radius
``min(r_q(expert), r_q(selector))`` for each q (``r_q(selector)`` is ``R_s``
for l1 and l2, ``R_s / sqrt(d)`` for l_inf: the lq balls inside the l2 ball).
Either step abstaining abstains.

Proof. Let ``E_s`` be the event that step 1's bound exceeds the true
``p_s = P(h(x + s eps) = k)`` and ``E_e`` the same for step 2; ``P(E_s) <=
alpha_s`` and ``P(E_e) <= alpha_e`` (Clopper-Pearson, given the selection
samples, which are independent of the estimation samples). Outside ``E_s``,
Cohen's theorem for the smoothed selector gives ``P(h(x' + s eps) = k) >
1/2`` for every ``||x' - x||_2 < R_s``, so ``k(x') = k`` there, uniquely.
Outside ``E_e``, the expert's certificate gives ``g_k(x') = c`` on its
region. On the intersection, ``G(x') = g_{k(x')}(x') = g_k(x') = c``. Both
hold outside ``E_s or E_e``, of probability ``<= alpha``. The second step's
choice of expert depends on the first step's samples only through ``k``, and
step 2 uses fresh samples, so its level holds conditionally on ``k``.

:meth:`DualSmooth.predict` is PREDICT the same way: the selector's PREDICT at
``alpha_s``, then the chosen expert's at ``alpha_e``; a returned class
differs from ``G(x)`` with probability at most ``alpha``.

What it assumes: nothing of the selector or the experts (any networks);
the experts' noises are fixed (not computed from the input), and the menu,
the selector and ``share`` are fixed before the data are seen.
The cost: two CERTIFY runs per input (``n0 + n`` samples each), and the
selector's radius caps every certificate.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from ..core.certificate import ABSTAIN, Certificate
from ..core.noises import Gaussian
from ..core.norms import NORMS
from ..core.regions import CertifiedRegion, Scaling
from ..core.smooth import Smooth
from ..core.statistics import check_alpha
from ..results import DUAL_COLUMNS

#: the ``kind`` recorded in a dual run's checkpoint and in the ``npg`` column
DUAL_KIND = "dual"


class FirstLogits(nn.Module):
    """``model`` restricted to its first ``k`` logits: a ``k``-way selector from a registered network."""

    def __init__(self, model: nn.Module, k: int):
        super().__init__()
        self.model, self.k = model, int(k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)[:, : self.k]


@dataclasses.dataclass(frozen=True)
class DualNoise:
    """What a dual run's ``noise`` column and config say: the experts' noises and the selector's."""

    experts: tuple  # the experts' Noise objects, in menu order
    selector: Gaussian
    is_certificate: bool = True
    primary_norm: float = 2
    native_norms: tuple = (2,)

    def describe(self) -> dict:
        return {"family": DUAL_KIND, "scale": self.selector.scale, "selector": self.selector.describe(),
                "experts": [noise.describe() for noise in self.experts]}


def describe_menu(experts) -> str:
    """``gaussian:0.25|gaussian:0.5|gaussian:1``: the menu of expert noises, for the ``npg`` column
    (``gaussian:0.25:anisotropic`` for a fixed anisotropic noise of that level)."""
    parts = []
    for noise in experts:
        info = noise.describe()
        parts.append(f"{info['family']}:{info['scale']:g}" + (":anisotropic" if info.get("anisotropic") else ""))
    return "|".join(parts)


class DualSmooth:
    """A smoothed selector choosing among fixed-noise experts, certified as the module docstring proves.

    ``selector`` is a :class:`~ucan_smoothing.Smooth` over ``K`` classes (the menu indices) with
    Gaussian noise; ``experts`` are ``K`` :class:`~ucan_smoothing.Smooth` objects with fixed noise
    and the same classes. ``share`` is the part of ``alpha`` spent on the selector.
    """

    is_certificate = True
    primary_norm = 2
    #: the columns its rows add (values in each certificate's ``extra``)
    row_columns = DUAL_COLUMNS

    def __init__(self, selector: Smooth, experts, share: float = 0.5):
        self.selector, self.experts = selector, tuple(experts)
        if not isinstance(selector.noise, Gaussian):
            raise ValueError(f"the selector's noise must be Gaussian (its l2 certificate), got {selector.noise!r}")
        if selector.num_classes != len(self.experts) or len(self.experts) < 2:
            raise ValueError(f"the selector chooses among {selector.num_classes} experts but {len(self.experts)} "
                             "were given (at least 2)")
        classes = {expert.num_classes for expert in self.experts}
        if len(classes) != 1:
            raise ValueError(f"the experts classify into different numbers of classes: {sorted(classes)}")
        if not (0 < share < 1):
            raise ValueError(f"share (the selector's part of alpha) must be in (0, 1), got {share}")
        self.share = float(share)
        self.num_classes = classes.pop()
        self.noise = DualNoise(tuple(expert.noise for expert in self.experts), selector.noise)
        self.model = self.experts[0].model  # the input-contract check's clean pass

    def _alphas(self, alpha: float) -> tuple:
        alpha = check_alpha(alpha)
        return self.share * alpha, (1 - self.share) * alpha

    def certify(self, x, n0: int, n: int, alpha: float, batch_size: int = 1000, generator=None,
                progress: bool = False) -> Certificate:
        """CERTIFY of the dual classifier at ``x`` (one input): proven at level ``alpha``."""
        alpha_s, alpha_e = self._alphas(alpha)
        chosen = self.selector.certify(x, n0, n, alpha_s, batch_size, generator, progress)
        info = {"expert": int(chosen.prediction), "selector_p_lower": chosen.p_lower,
                "selector_radius_l2": chosen.radius(2)}
        if chosen.abstained:
            return Certificate(ABSTAIN, 0.0, 2, (), True, n0, n, alpha, 0, extra=info)
        answer = self.experts[chosen.prediction].certify(x, n0, n, alpha_e, batch_size, generator, progress)
        if answer.abstained:
            return dataclasses.replace(answer, norm=2, regions=(), alpha=alpha, is_certificate=True,
                                       extra={**answer.extra, **info})
        dim = math.prod(x.shape)
        regions = []
        for q in NORMS:
            radius = min(answer.radius(q), chosen.radius(q))
            if radius > 0:
                regions.append(CertifiedRegion(q, radius, Scaling.isotropic(dim)))
        return dataclasses.replace(answer, norm=2, regions=tuple(regions), alpha=alpha, is_certificate=True,
                                   extra={**answer.extra, **info, "expert_radii": answer.radii()})

    def predict(self, x, n: int, alpha: float, batch_size: int = 1000, generator=None) -> int:
        """PREDICT of the dual classifier: wrong (not abstaining) with probability at most ``alpha``."""
        alpha_s, alpha_e = self._alphas(alpha)
        k = self.selector.predict(x, n, alpha_s, batch_size, generator)
        if k == ABSTAIN:
            return ABSTAIN
        return self.experts[k].predict(x, n, alpha_e, batch_size, generator)

    def choice(self, x: torch.Tensor, votes: int = 64, generator=None) -> int:
        """The selector's majority over ``votes`` noisy samples: an estimate of ``k(x)`` (for attacks)."""
        with torch.no_grad():
            counts = self.selector.count_votes(x.detach()[None], votes, batch_size=votes, generator=generator)
        return int(counts[0].argmax())

    def noisy_logits(self, x: torch.Tensor, num: int, generator=None) -> torch.Tensor:
        """Logits of the expert the selector picks at ``x``, on ``num`` samples of that expert's noise
        (differentiable in ``x`` through the expert; the discrete choice has no gradient)."""
        expert = self.experts[self.choice(x, generator=generator)]
        eps = expert.noise.sample((num, *x.shape), generator=generator, device=x.device, dtype=x.dtype)
        return expert.model(x + eps)

    def describe(self) -> str:
        """Text for the ``npg`` column: ``dual:gaussian:0.25|gaussian:0.5;selector=gaussian:0.5``."""
        return f"{DUAL_KIND}:{describe_menu(self.noise.experts)};selector=gaussian:{self.selector.noise.scale:g}"

"""Sound: ``mu(x)`` from the CLEAN input with a PROVEN Lipschitz bound; radius ``R / (1 + L)``.

If ``u -> mu(sigma * u) / sigma`` is ``L``-Lipschitz in the certified norm
(``sigma`` = the fixed noise's scale), the region ``||delta / sigma||_p <= R``
of the fixed-noise smoothed classifier at ``x + mu(x)`` becomes
``||delta / sigma||_p <= R / (1 + L)`` around ``x`` (proof in docs/adaptive.md).
:class:`LipschitzMLP` is a ``mu`` network whose bound is computed from exact
operator norms; :class:`LipschitzShiftNet` is the trainable one whose cap
enforces a chosen ``L``.

The sequential modes carry over. ``h(x) = g(x + mu(x))`` with ``g`` the
fixed-noise smoothed classifier, so "``h`` is robust at radius ``r`` around
``x``" follows from "``g`` is robust at ``r (1 + L)`` around ``x + mu(x)``"
(the shifted input moves by at most ``(1 + L) ||delta||``). A grid (or one
radius) for ``h`` is therefore the grid ``r_k (1 + L)`` for ``g`` at the
shifted input, whose guarantee (core/grid.py, core/sequential.py: with
probability at least ``1 - alpha`` every radius reported certified is a true
certificate of ``g``) becomes the same guarantee for ``h`` at ``r_k``.
:meth:`LipschitzShiftSmooth.certify_grid` and ``ucan certify --radii`` do
this; ``mu(x)`` is a function of the clean input only, so the shifted inputs
run in the same pool as any fixed-noise image.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import torch
from torch import nn

from ..core.certificate import Certificate, scale_radii
from ..core.grid import certify_grid, check_radii
from ..core.norms import norm_name, parse_norm
from ..core.sequential import certify_radius
from ..core.smooth import Smooth
from ..core.streams import model_device

_OPERATOR_ORD = {1: 1, 2: 2, math.inf: math.inf}


def operator_norm(weight: torch.Tensor, norm) -> torch.Tensor:
    """The induced ``norm -> norm`` operator norm of a matrix, computed exactly (direct solvers, not
    power iteration): l1: largest column sum, l_inf: largest row sum, l2: largest singular value.

    l2 is the square root of the largest eigenvalue of the smaller Gram matrix: the same number as an
    SVD up to rounding (relative error about the machine epsilon: the top eigenvalue is perturbed by
    at most eps ||W||^2), with its gradient about 3 times faster for the 256 x 784 layer that every
    training step of :class:`LipschitzShiftNet` caps. The floor keeps the gradient of a zero matrix
    (a fresh last layer) finite; it can only raise the norm, so a bound built from it stays a bound."""
    norm = parse_norm(norm)
    if norm != 2:
        return torch.linalg.matrix_norm(weight, ord=_OPERATOR_ORD[norm])
    gram = weight @ weight.mT if weight.shape[-2] <= weight.shape[-1] else weight.mT @ weight
    top = torch.linalg.eigvalsh(gram)[..., -1]
    return top.clamp(min=torch.finfo(weight.dtype).tiny).sqrt()


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
            xs = xs.to(model_device(self.mu_fn, xs.device))
            return xs + self.mu_fn(xs)

    def factor(self, norm) -> float:
        """``1 / (1 + L)`` in ``norm``: a radius ``r`` of this classifier is the radius ``r / factor`` of
        the fixed-noise one at ``x + mu(x)`` (module docstring)."""
        norm = parse_norm(norm)
        if norm not in self.factors:
            raise ValueError(f"no proven Lipschitz bound of mu in {norm_name(norm)}: nothing is certified in it "
                             f"(bounds for {', '.join(norm_name(q) for q in self.factors)})")
        return self.factors[norm]

    def shifted_radii(self, radii, norm) -> list:
        """The grid of the fixed-noise classifier at the shifted input that decides ``radii`` of this one."""
        factor = self.factor(norm)
        return [float(r) / factor for r in radii]

    def unshift_grid(self, decision, radii):
        """A grid decision of the fixed-noise classifier on :meth:`shifted_radii` as this classifier's
        decision on ``radii`` (the certified flags carry over one for one; the bound ``p_lower`` too)."""
        radii = check_radii(radii)
        if len(radii) != len(decision.radii):
            raise ValueError(f"the decision has {len(decision.radii)} grid radii, not {len(radii)}")
        certified = [r for r, ok in zip(radii, decision.certified) if ok]
        return dataclasses.replace(decision, radii=radii, certified_radius=max(certified, default=0.0))

    def unshift_radius(self, decision, radius: float):
        """A one-radius decision of the fixed-noise classifier at ``radius / factor`` as this one's at ``radius``."""
        return dataclasses.replace(decision, radius=float(radius))

    def certify_grid(self, x, radii, norm, alpha: float, **options):
        """The largest radius of ``radii`` at which ``x`` is certified (see
        :func:`ucan_smoothing.core.grid.certify_grid`; the grid runs at ``r (1 + L)`` on ``x + mu(x)``)."""
        decision = certify_grid(self.smooth, self.shift(x[None])[0], self.shifted_radii(radii, norm), norm, alpha,
                                **options)
        return self.unshift_grid(decision, radii)

    def certify_radius(self, x, radius: float, norm, alpha: float, **options):
        """Is ``x`` certified at ``radius``? (:func:`ucan_smoothing.core.sequential.certify_radius` at
        ``radius (1 + L)`` on ``x + mu(x)``.)"""
        decision = certify_radius(self.smooth, self.shift(x[None])[0], radius / self.factor(norm), norm, alpha,
                                  **options)
        return self.unshift_radius(decision, radius)

    def certify_batch(self, xs, n0: int, n: int, alpha: float, batch_size: int = 1000, generator=None) -> list:
        certificates = self.smooth.certify_batch(self.shift(xs), n0, n, alpha, batch_size, generator)
        return [scale_radii(certificate, self.factors) for certificate in certificates]

    def certify(self, x, n0: int, n: int, alpha: float, batch_size: int = 1000, generator=None,
                progress: bool = False) -> Certificate:
        certificate = self.smooth.certify(self.shift(x[None])[0], n0, n, alpha, batch_size, generator, progress)
        return scale_radii(certificate, self.factors)

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


def _json_norm(norm):
    norm = parse_norm(norm)
    return "inf" if math.isinf(norm) else int(norm)


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

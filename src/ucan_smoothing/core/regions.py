"""Certified regions ``{delta : ||delta / sigma||_p <= R}`` (DESIGN.md section 3).

An isotropic certificate ``R`` in norm ``p`` for noise ``eps`` becomes, for the
anisotropic noise ``eps * sigma + mu`` with FIXED ``sigma`` and ``mu``, the
axis-scaled ball above (UCAN Theorem 3.2: smoothing ``f`` with the scaled
noise equals smoothing ``u -> f(sigma * u + mu)`` with ``eps`` at
``x / sigma``). Isotropic noise is the case ``sigma = 1``.

From a region we report, for each norm ``q``, the radius of the largest
``lq`` ball inside it (a proven certificate), and ALM, the radius of the
isotropic ``lp`` ball of the same volume (NOT a certificate).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .norms import NORMS, holder_exponent, norm_name, parse_norm


def _as_float64(values) -> torch.Tensor:
    return torch.as_tensor(values).detach().to("cpu", torch.float64)


@dataclass(frozen=True)
class Scaling:
    """The per-dimension scale ``sigma`` of a region and the few numbers of it we
    need, computed once and shared by every certificate of the same noise."""

    dim: int
    sigma: torch.Tensor | None  # float64 on CPU, flattened; None means all ones
    min_sigma: float
    inverse_norms: dict = field(repr=False)  # t -> ||1/sigma||_t for t in (1, 2)
    log_geometric_mean: float

    @classmethod
    def isotropic(cls, dim: int) -> "Scaling":
        dim = int(dim)
        if dim < 1:
            raise ValueError(f"dim must be a positive integer, got {dim}")
        return cls(dim, None, 1.0, {1: float(dim), 2: math.sqrt(dim)}, 0.0)

    @classmethod
    def from_sigma(cls, sigma) -> "Scaling":
        sigma = _as_float64(sigma).reshape(-1)
        if sigma.numel() == 0:
            raise ValueError("sigma is empty")
        if not torch.isfinite(sigma).all() or (sigma <= 0).any():
            raise ValueError("sigma must be finite and > 0 everywhere")
        inv = 1.0 / sigma
        return cls(
            dim=sigma.numel(),
            sigma=sigma,
            min_sigma=float(sigma.min()),
            inverse_norms={1: float(inv.sum()), 2: float(torch.linalg.vector_norm(inv))},
            log_geometric_mean=float(sigma.log().mean()),
        )


@dataclass(frozen=True)
class CertifiedRegion:
    """The set ``{delta : ||delta / sigma||_norm <= radius_scaled}``.

    ``radius_scaled`` is the isotropic certificate of the base noise (it already
    includes the noise level). Every radius this object reports is backed by a
    theorem, except :attr:`alm`, which is a volume figure.
    """

    norm: float
    radius_scaled: float
    scaling: Scaling

    def __post_init__(self):
        object.__setattr__(self, "norm", parse_norm(self.norm))
        if not (self.radius_scaled >= 0) or math.isinf(self.radius_scaled):
            raise ValueError(f"radius must be finite and >= 0, got {self.radius_scaled}")

    @property
    def dim(self) -> int:
        return self.scaling.dim

    def radius(self, norm) -> float:
        """Radius of the largest ball of ``norm`` inside the region.

        ``q <= p``: ``R * min(sigma)`` (the l_q ball sits inside the l_p ball).
        ``q > p``: ``R / ||1/sigma||_t`` with ``1/t = 1/p - 1/q`` (Hoelder).
        """
        q = parse_norm(norm)
        if self.radius_scaled == 0.0:
            return 0.0
        if q <= self.norm:
            return self.radius_scaled * self.scaling.min_sigma
        t = holder_exponent(self.norm, q)
        return self.radius_scaled / self.scaling.inverse_norms[round(t)]

    def radii(self) -> dict:
        """``{'l1': r1, 'l2': r2, 'linf': rinf}``."""
        return {norm_name(q): self.radius(q) for q in NORMS}

    @property
    def alm(self) -> float:
        """The paper's ALM: ``geomean(sigma) * R``, the radius of the isotropic
        ball of the native norm with the same volume as the region.

        NOT A CERTIFICATE: points at distance ALM can lie outside the region
        (unless sigma is constant, where ALM equals the native radius).
        """
        return self.radius_scaled * math.exp(self.scaling.log_geometric_mean)

    def scaled_norm(self, delta) -> float:
        """``||delta / sigma||_p``, computed in float64."""
        delta = _as_float64(delta).reshape(-1)
        if delta.numel() != self.dim:
            raise ValueError(
                f"delta has {delta.numel()} elements but the region lives in dimension {self.dim}"
            )
        if self.scaling.sigma is not None:
            delta = delta / self.scaling.sigma
        return float(torch.linalg.vector_norm(delta, ord=self.norm))

    def contains(self, delta) -> bool:
        """True when the perturbation ``delta`` (shaped like one input, or flat)
        lies in the certified region."""
        return self.scaled_norm(delta) <= self.radius_scaled

"""Anisotropic noise ``eps * sigma + mu`` with FIXED ``sigma`` and ``mu`` (UCAN Theorem 3.2).

``sigma`` and ``mu`` are shaped like one input (or broadcastable to it). They
must not depend on the input being certified: the certificate of a
``sigma(x)`` or ``mu(x)`` computed from the clean input is not sound
(DESIGN.md section 4). Generators that are trained once and then frozen
(pattern-fixed, universal) produce exactly this fixed noise.
"""

from __future__ import annotations

import math

import torch

from .noises import NARROWEST_NOISE_DTYPE, Noise, check_fits_dtype
from .regions import CertifiedRegion, Scaling


def _check_tensor(name: str, value) -> torch.Tensor:
    tensor = torch.as_tensor(value).detach().to("cpu", torch.float64)
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{name} contains NaN or inf")
    return tensor


class Anisotropic:
    """The noise ``base.sample() * sigma + mu``; certificates are axis-scaled balls.

    ``base`` is any isotropic family of :mod:`ucan_smoothing.core.noises`; its
    scale is the noise level, ``sigma`` the per-dimension shape of the noise.
    """

    #: the certificates of fixed anisotropic noise are proven (Theorem 3.2)
    is_certificate = True

    def __init__(self, base: Noise, sigma, mu=None, sigma_min: float = 1e-6):
        if not isinstance(base, Noise):
            raise TypeError(f"base must be an isotropic noise family, got {type(base).__name__}")
        if not sigma_min > 0:
            raise ValueError(f"sigma_min must be > 0, got {sigma_min}")
        sigma = _check_tensor("sigma", sigma)
        if sigma.numel() == 0:
            raise ValueError("sigma is empty")
        low = float(sigma.min())
        if low < sigma_min:
            raise ValueError(
                f"sigma must be >= sigma_min={sigma_min} everywhere (a zero scale makes the "
                f"certified region degenerate); its smallest entry is {low}"
            )
        self.base = base
        self.sigma = sigma
        self.mu = None if mu is None else _check_tensor("mu", mu)
        self.sigma_min = sigma_min
        self._on_device = {}
        self._scalings = {}
        self.check_dtype(NARROWEST_NOISE_DTYPE)

    def check_dtype(self, dtype: torch.dtype) -> None:
        """Raise unless ``sigma`` and ``mu`` cast to ``dtype`` stay finite, ``sigma`` stays > 0
        there (the certificate divides by it), and ``eps * scale * sigma + mu`` does not overflow."""
        self.base.check_dtype(dtype)
        sigma_max, sigma_min = float(self.sigma.max()), float(self.sigma.min())
        check_fits_dtype("sigma", sigma_max, dtype, smallest=sigma_min)
        check_fits_dtype("scale * sigma", self.scale * sigma_max, dtype, smallest=self.scale * sigma_min)
        if self.mu is not None and self.mu.numel():
            check_fits_dtype("|mu|", float(self.mu.abs().max()), dtype)

    @property
    def scale(self) -> float:
        return self.base.scale

    @property
    def native_norms(self) -> tuple:
        return self.base.native_norms

    @property
    def primary_norm(self) -> float:
        return self.base.primary_norm

    def check_input_shape(self, input_shape) -> None:
        """Raise unless ``sigma`` and ``mu`` broadcast to one input of ``input_shape``."""
        input_shape = tuple(input_shape)
        for name, tensor in (("sigma", self.sigma), ("mu", self.mu)):
            if tensor is None:
                continue
            try:
                ok = torch.broadcast_shapes(tensor.shape, input_shape) == input_shape
            except RuntimeError:
                ok = False
            if not ok:
                raise ValueError(
                    f"{name} of shape {tuple(tensor.shape)} does not match inputs of shape {input_shape}"
                )

    def _device_params(self, device, dtype):
        key = (torch.device(device) if device is not None else torch.device("cpu"), dtype)
        if key not in self._on_device:
            mu = None if self.mu is None else self.mu.to(key[0], dtype)
            self._on_device[key] = (self.sigma.to(key[0], dtype), mu)
        return self._on_device[key]

    def sample(self, shape, *, generator=None, device=None, dtype=None) -> torch.Tensor:
        """``shape[0]`` draws of ``eps * sigma + mu``, each shaped like one input."""
        dtype = dtype or torch.get_default_dtype()
        self.check_input_shape(shape[1:])
        sigma, mu = self._device_params(device, dtype)
        noise = self.base.sample(shape, generator=generator, device=device, dtype=dtype) * sigma
        return noise if mu is None else noise + mu

    def scaling(self, input_shape) -> Scaling:
        input_shape = tuple(input_shape)
        if input_shape not in self._scalings:
            self.check_input_shape(input_shape)
            self._scalings[input_shape] = Scaling.from_sigma(self.sigma.expand(input_shape))
        return self._scalings[input_shape]

    def regions(self, p_lower: float, input_shape, p_runner_up: float | None = None) -> list:
        """The certified regions ``{||delta / sigma||_p <= R}``, one per native norm."""
        scaling = self.scaling(input_shape)
        radii = self.base.native_radii(p_lower, scaling.dim, p_runner_up)
        return [CertifiedRegion(norm, radius, scaling) for norm, radius in radii.items()]

    def radius(self, p_lower: float, norm, dim: int | None = None, p_runner_up: float | None = None) -> float:
        """Largest certified ball of ``norm`` for inputs shaped like ``sigma``."""
        if dim is not None and dim != self.sigma.numel():
            raise ValueError(
                f"dim={dim} does not match sigma with {self.sigma.numel()} elements; "
                "use regions(p_lower, input_shape) for a broadcast sigma"
            )
        regions = self.regions(p_lower, self.sigma.shape, p_runner_up)
        return max(region.radius(norm) for region in regions)

    def describe(self) -> dict:
        scaling = Scaling.from_sigma(self.sigma)
        return {
            **self.base.describe(),
            "anisotropic": True,
            "sigma_shape": list(self.sigma.shape),
            "sigma_geometric_mean": math.exp(scaling.log_geometric_mean),
            "sigma_min": scaling.min_sigma,
            "sigma_max": float(self.sigma.max()),
            "has_mu": self.mu is not None,
        }

    def __repr__(self) -> str:
        return f"Anisotropic({self.base!r}, sigma shape {tuple(self.sigma.shape)}, mu={'yes' if self.mu is not None else 'no'})"


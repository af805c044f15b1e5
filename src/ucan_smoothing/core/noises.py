"""Isotropic noise families and their certified radii (DESIGN.md section 2).

Each family knows how to draw noise and how to turn a lower bound ``p`` on the
top-class probability into certified radii. A family has one or two *native*
norms (where the theorem lives); a radius in another norm comes from the
inscribed-ball rule (:mod:`ucan_smoothing.core.regions`). Where two native regions
are certified, each norm reports the larger derived radius.

The binary forms use only ``p`` (the runner-up has at most ``1 - p``). The
multiclass forms, used when an upper bound ``q`` on the runner-up is given,
are sound for these reasons:

* Gaussian: Cohen et al. 2019, Theorem 1.
* Laplace (l1) and exp-l_inf (l_inf): the density ratio of the noise at ``x``
  and ``x + delta`` is at most ``exp(||delta|| / lambda)``, i.e. the
  mechanism is ``eps``-differentially private with ``eps = ||delta|| /
  lambda``; ``P'(A) >= max(e^-eps p, 1 - e^eps (1 - p))`` and
  ``P'(B) <= e^eps q`` give both terms of Teng et al. 2020.
* Uniform, exp-l_inf (l1), power-law (l1): these l1 radii have the form
  ``(p - 1/2) / L`` where every class probability of the smoothed classifier
  is ``L``-Lipschitz (total-variation / Yang et al. 2020 differential
  method), so ``(p - q) / (2 L)`` is certified too; for uniform l_inf the
  overlap of the two cubes bounds the total variation the same way. The
  total variation between the noise and its shift by ``delta`` is at most
  ``L ||delta||_1`` with: uniform ``TV = 1 - prod(1 - |delta_i| / (2 lambda))``,
  so ``L = 1 / (2 lambda)``; exp-l_inf ``L = 1 / (2 d lambda)``, since the
  integral of ``|d f / d z_i|`` is ``1 / (d lambda)`` by symmetry over the
  coordinate that attains the max; power-law ``L = (a - d) / (2 d lambda)``,
  since that integral is ``(a - d) / (d lambda)`` (a Beta-function ratio
  over the l_inf radius).

All radii are 0 unless ``p > 1/2``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
from scipy.stats import norm as _normal

from .regions import CertifiedRegion, Scaling


def _check_positive(name: str, value) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be finite and > 0, got {value}")
    return value


def _check_probability(name: str, value) -> float:
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {value}")
    return value


#: How far below the dtype's largest number the noise scale must stay (for float32 and wider,
#: the dtypes noise is drawn in). The standard samples of these families stay below 1e6
#: (Gaussian below 40, Laplace below 800, uniform 1; exp-l_inf near the input dimension), so
#: their noise stays finite. Power-law tails are heavy enough to overflow at any scale: Smooth
#: checks every noisy batch for that.
HEADROOM = 1e6

#: Noise is drawn in the model's dtype but never below float32 (see Smooth), so its parameters
#: are checked against float32 when they are made.
NARROWEST_NOISE_DTYPE = torch.float32


def check_fits_dtype(name: str, largest: float, dtype: torch.dtype, smallest: float | None = None) -> None:
    """Raise unless a noise parameter ``name`` of size up to ``largest`` keeps the noise finite
    in ``dtype`` and its ``smallest`` value (a scale, > 0) does not underflow there."""
    info = torch.finfo(dtype)
    limit = info.max / HEADROOM
    if not largest <= limit:
        raise ValueError(
            f"{name}={largest:.4g} is too large for noise drawn in {dtype}: the noise would overflow "
            f"to inf (it must stay below {limit:.3g})"
        )
    if smallest is not None and not smallest >= info.tiny:
        raise ValueError(
            f"{name}={smallest:.4g} is too small for noise drawn in {dtype}: it underflows "
            f"(it must be at least {info.tiny:.3g})"
        )


def _dim_of(shape) -> int:
    if isinstance(shape, int):
        return shape
    return math.prod(shape)


class Noise(ABC):
    """An isotropic noise family with scale ``lambda`` (``self.scale``)."""

    #: native norms, the first one is the family's primary norm
    native_norms: tuple = ()
    #: short name used in result files and checkpoints
    name: str = ""
    #: every radius of these families is a proven certificate
    is_certificate = True

    def __init__(self, scale: float):
        self.scale = _check_positive("scale", scale)
        self.check_dtype(NARROWEST_NOISE_DTYPE)

    def check_dtype(self, dtype: torch.dtype) -> None:
        """Raise unless noise drawn in ``dtype`` stays finite (and does not underflow)."""
        check_fits_dtype("scale", self.scale, dtype, smallest=self.scale)

    # -- sampling -----------------------------------------------------------
    @abstractmethod
    def sample(self, shape, *, generator=None, device=None, dtype=None) -> torch.Tensor:
        """Draw noise of ``shape``: ``shape[0]`` samples, each shaped like one input.

        Families defined by a norm of the whole vector (exp-l_inf, power-law)
        treat ``shape[1:]`` as one input.
        """

    # -- certificates -------------------------------------------------------
    @abstractmethod
    def _binary_radii(self, p: float, dim: int) -> dict:
        """Native norm -> radius from ``p`` alone (``p > 1/2``)."""

    def _multiclass_radii(self, p: float, q: float, dim: int) -> dict:
        """Native norm -> radius from ``p`` and a runner-up bound ``q``."""
        return {}

    def check_dim(self, dim: int) -> None:
        """Raise if the family is not defined in dimension ``dim``."""

    def check_input_shape(self, input_shape) -> None:
        """Raise if inputs of ``input_shape`` cannot be smoothed with this noise."""
        self.check_dim(_dim_of(tuple(input_shape)))

    @property
    def primary_norm(self) -> float:
        return self.native_norms[0]

    def native_radii(self, p_lower: float, dim: int, p_runner_up: float | None = None) -> dict:
        """Native norm -> isotropic certified radius."""
        p = _check_probability("p_lower", p_lower)
        dim = int(dim)
        self.check_dim(dim)
        if p <= 0.5:
            return {norm: 0.0 for norm in self.native_norms}
        radii = self._binary_radii(p, dim)
        if p_runner_up is not None:
            q = _check_probability("p_runner_up", p_runner_up)
            for norm, radius in self._multiclass_radii(p, q, dim).items():
                radii[norm] = max(radii[norm], radius)
        for norm, radius in radii.items():
            if not math.isfinite(radius):
                raise ValueError(
                    f"p_lower={p} gives an unbounded certificate; a Monte-Carlo lower bound "
                    "is always below 1"
                )
        return {norm: float(max(0.0, radius)) for norm, radius in radii.items()}

    def regions(self, p_lower: float, input_shape, p_runner_up: float | None = None) -> list:
        """The certified regions (one per native norm) around an input of ``input_shape``."""
        dim = _dim_of(input_shape)
        scaling = Scaling.isotropic(dim)
        return [
            CertifiedRegion(norm, radius, scaling)
            for norm, radius in self.native_radii(p_lower, dim, p_runner_up).items()
        ]

    def radius(self, p_lower: float, norm, dim: int, p_runner_up: float | None = None) -> float:
        """Certified radius in ``norm`` (1, 2 or inf) for inputs of dimension ``dim``."""
        return max(region.radius(norm) for region in self.regions(p_lower, dim, p_runner_up))

    def describe(self) -> dict:
        """What this noise is, for result files and checkpoints."""
        return {"family": self.name, "scale": self.scale}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in self.describe().items() if k != "family")
        return f"{type(self).__name__}({args})"


class Gaussian(Noise):
    """``N(0, lambda^2 I)``; native norm l2 (Cohen et al. 2019)."""

    native_norms = (2,)
    name = "gaussian"

    def sample(self, shape, *, generator=None, device=None, dtype=None):
        return torch.randn(shape, generator=generator, device=device, dtype=dtype).mul_(self.scale)

    def _binary_radii(self, p, dim):
        return {2: self.scale * _normal.ppf(p)}

    def _multiclass_radii(self, p, q, dim):
        return {2: self.scale / 2 * (_normal.ppf(p) - _normal.ppf(q))}


def _exponential(shape, generator, device, dtype):
    return torch.empty(shape, device=device, dtype=dtype).exponential_(generator=generator)


class Laplace(Noise):
    """i.i.d. Laplace, density ``~ exp(-||z||_1 / lambda)``; native norm l1."""

    native_norms = (1,)
    name = "laplace"

    def sample(self, shape, *, generator=None, device=None, dtype=None):
        # The difference of two Exp(1) variables is a standard Laplace variable.
        e = _exponential((2, *shape), generator, device, dtype)
        return self.scale * (e[0] - e[1])

    def _binary_radii(self, p, dim):
        return {1: -self.scale * math.log(2 * (1 - p))}

    def _multiclass_radii(self, p, q, dim):
        return {1: _privacy_multiclass(self.scale, p, q)}


def _privacy_multiclass(scale, p, q):
    """``max(lambda/2 log(p/q), -lambda log(1 - p + q))`` (Teng et al. 2020)."""
    first = math.inf if q == 0 else scale / 2 * math.log(p / q)
    second = math.inf if 1 - p + q <= 0 else -scale * math.log(1 - p + q)
    return max(first, second)


class Uniform(Noise):
    """Uniform on ``[-lambda, lambda]^d``; native norms l1 and l_inf (Lee et al. 2019)."""

    native_norms = (1, math.inf)
    name = "uniform"

    def sample(self, shape, *, generator=None, device=None, dtype=None):
        u = torch.rand(shape, generator=generator, device=device, dtype=dtype)
        return self.scale * (2 * u - 1)

    def _binary_radii(self, p, dim):
        return self._radii_from_overlap(1.5 - p, dim)

    def _multiclass_radii(self, p, q, dim):
        # With q = 1 - p this is the binary form: 1 - (p - q)/2 = 3/2 - p.
        return self._radii_from_overlap(1 - (p - q) / 2, dim)

    def _radii_from_overlap(self, needed_overlap, dim):
        # The cubes at x and x + delta must overlap in more than `needed_overlap`
        # of their volume; the overlap is prod(1 - |delta_i| / (2 lambda)).
        return {
            1: 2 * self.scale * (1 - needed_overlap),
            math.inf: -2 * self.scale * math.expm1(math.log(needed_overlap) / dim),
        }


class _NormRadialNoise(Noise):
    """Density ``~ h(||z||_inf)``: ``z = r * s`` with ``s`` uniform on the
    surface of the unit l_inf sphere and ``r`` from the radial law."""

    @abstractmethod
    def _sample_radius(self, count, dim, generator, device):
        """``count`` radii in float64 (``||z||_inf`` has density ``~ r^(d-1) h(r)``)."""

    def sample(self, shape, *, generator=None, device=None, dtype=None):
        if len(shape) < 2:
            raise ValueError(f"{self.name} noise needs shape (samples, *input_shape), got {tuple(shape)}")
        count, dim = shape[0], _dim_of(shape[1:])
        self.check_dim(dim)
        dtype = dtype or torch.get_default_dtype()
        radius = self._sample_radius(count, dim, generator, device).to(dtype)
        # Uniform on the cube surface: all 2d faces have the same area.
        z = 2 * torch.rand((count, dim), generator=generator, device=device, dtype=dtype) - 1
        face = torch.randint(dim, (count,), generator=generator, device=device)
        sign = 2 * torch.randint(2, (count,), generator=generator, device=device).to(dtype) - 1
        z[torch.arange(count, device=device), face] = sign
        return (z * radius[:, None]).reshape(shape)


class ExpInf(_NormRadialNoise):
    """Density ``~ exp(-||z||_inf / lambda)``; native norms l_inf and l1 (Yang et al. 2020)."""

    native_norms = (math.inf, 1)
    name = "expinf"

    def _sample_radius(self, count, dim, generator, device):
        return self.scale * standard_gamma(dim, count, generator=generator, device=device)

    def _binary_radii(self, p, dim):
        return {math.inf: -self.scale * math.log(2 * (1 - p)), 1: 2 * dim * self.scale * (p - 0.5)}

    def _multiclass_radii(self, p, q, dim):
        return {math.inf: _privacy_multiclass(self.scale, p, q), 1: dim * self.scale * (p - q)}


class PowerLaw(_NormRadialNoise):
    """Density ``~ (1 + ||z||_inf / lambda)^(-a)`` with ``a > d``; native norm l1."""

    native_norms = (1,)
    name = "powerlaw"

    def __init__(self, scale: float, a: float):
        super().__init__(scale)
        self.a = _check_positive("a", a)

    def check_dim(self, dim):
        if not self.a > dim:
            raise ValueError(
                f"power-law noise needs a > dim (the density is not normalisable otherwise): "
                f"a={self.a}, dim={dim}"
            )

    def _sample_radius(self, count, dim, generator, device):
        # r / lambda has density ~ t^(d-1) (1 + t)^(-a): a beta-prime(d, a - d) law.
        num = standard_gamma(dim, count, generator=generator, device=device)
        den = standard_gamma(self.a - dim, count, generator=generator, device=device)
        return self.scale * num / den

    def _binary_radii(self, p, dim):
        return {1: 2 * dim * self.scale * (p - 0.5) / (self.a - dim)}

    def _multiclass_radii(self, p, q, dim):
        return {1: dim * self.scale * (p - q) / (self.a - dim)}

    def describe(self):
        return {**super().describe(), "a": self.a}


def standard_gamma(shape_param: float, count: int, *, generator=None, device=None) -> torch.Tensor:
    """``count`` draws of Gamma(shape_param, 1) in float64 that honour ``generator``
    (``torch._standard_gamma`` takes no generator). Marsaglia and Tsang (2000)."""
    if shape_param < 1:
        # Gamma(a) = Gamma(a + 1) * U^(1/a)
        boost = torch.rand(count, generator=generator, device=device, dtype=torch.float64)
        return standard_gamma(shape_param + 1, count, generator=generator, device=device) * boost ** (
            1 / shape_param
        )
    d = shape_param - 1 / 3
    c = 1 / math.sqrt(9 * d)
    out = torch.empty(count, device=device, dtype=torch.float64)
    todo = torch.arange(count, device=device)
    while todo.numel():
        x = torch.randn(todo.numel(), generator=generator, device=device, dtype=torch.float64)
        u = torch.rand(todo.numel(), generator=generator, device=device, dtype=torch.float64)
        v = (1 + c * x) ** 3
        ok = (v > 0) & (torch.log(u) < 0.5 * x * x + d - d * v + d * torch.log(v.clamp_min(1e-300)))
        out[todo[ok]] = (d * v)[ok]
        todo = todo[~ok]
    return out


FAMILIES = {cls.name: cls for cls in (Gaussian, Laplace, Uniform, ExpInf, PowerLaw)}


def make_noise(family: str, scale: float, **params) -> Noise:
    """Build a noise family by name: ``make_noise('gaussian', 0.25)``."""
    try:
        cls = FAMILIES[family.lower()]
    except KeyError:
        raise ValueError(f"unknown noise family {family!r}; known: {', '.join(FAMILIES)}") from None
    return cls(scale, **params)

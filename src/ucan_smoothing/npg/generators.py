"""Noise Parameter Generators (NPGs): where the anisotropic ``sigma`` and ``mu`` come from.

Every generator is an ``nn.Module`` with the same interface:

* ``forward(x=None) -> (sigma, mu)``. Fixed generators (pattern-fixed,
  universal) ignore ``x`` and return tensors shaped like ONE input
  ``(C, H, W)``; the input-dependent generator needs a batch ``x`` and returns
  ``(B, C, H, W)`` tensors.
* ``input_dependent`` (bool) and ``is_certificate`` (bool).
* ``describe() -> dict``: the kind and every parameter, JSON-serialisable;
  ``generator_from_config(describe(), state_dict())`` rebuilds the same
  generator (same outputs).
* ``to_noise(base, sigma_min) -> Anisotropic``: for fixed generators, the
  frozen noise ``base.sample() * sigma + mu`` of the certification core, so
  certification code does not care where ``sigma`` came from. The
  input-dependent generator refuses (DESIGN.md section 4).

``sigma`` is the per-dimension SHAPE of the noise; the level is the scale
``lambda`` of the isotropic base family. The noise added to an input is
``base.sample() * sigma + mu`` (``base.sample()`` already includes
``lambda``), so the standard deviation of pixel ``i`` under Gaussian noise is
``lambda * sigma_i``.

Parametrisations (all keep ``sigma > 0`` by construction):

* pattern-fixed: ``sigma(a, b) = kappa * ||(a, b) - centre||_p^2 + iota``
  in pixel coordinates (row ``a``, column ``b``, both 0-based; the default
  centre is the geometric centre ``((H-1)/2, (W-1)/2)``), the same on every
  channel; ``kappa >= 0`` and ``iota > 0`` give ``sigma >= iota > 0``. By
  default it is divided by its geometric mean (so ``geomean(sigma) = 1`` and
  ``lambda`` is the level; then only ``kappa / iota`` matters). ``mu = 0``.
  Hand-set by default, as in the paper; ``trainable=True`` makes ``kappa``
  and ``iota`` learnable through their logarithms (then ``kappa > 0``).
* universal: ``h_s, h_m`` = two parallel 5-layer MLPs applied to a fixed
  random input vector (a buffer drawn from ``input_seed``);
  ``t = gamma * tanh(h_s)`` and ``sigma = exp(t)``, so
  ``sigma`` lies in ``[exp(-gamma), exp(gamma)]`` (``[0.0067, 148]`` for the
  paper's ``gamma = 5``): positive, bounded, and the log-scale makes
  multiplicative changes equally easy in both directions. With
  ``normalize="geometric"`` it is ``sigma = exp(t - mean(t))`` instead
  (geometric mean exactly 1, ``sigma`` in ``[exp(-2 gamma), exp(2 gamma)]``).
  ``mu = gamma_mu * tanh(h_m)``. The last layer of each MLP starts at zero,
  so a fresh generator is the isotropic noise (``sigma = 1, mu = 0``).

  Default ``normalize="none"``: the paper's generator learns the noise level
  too (that is how UCAN enlarges the noise), and the ``gamma * tanh`` bound
  caps the growth that the loss term ``-mean(sigma)`` would otherwise push
  without limit. Choose ``"geometric"`` to learn only the SHAPE at the level
  ``lambda`` (fair comparisons with isotropic noise of the same ``lambda``;
  note that at a fixed geometric mean ``-mean(sigma)`` still rewards
  dispersion, up to the ``exp(2 gamma)`` bound).
* input-dependent: ``mu(x) = gamma * tanh(G_mu(x))``, then
  ``sigma = exp(gamma * tanh(G_sigma(x + mu)))`` (optionally per-image
  geometric normalisation), each ``G`` being 4 conv + leaky-ReLU blocks and
  a dense head; ``gamma = 1`` as in the paper. ITS CERTIFICATES ARE NOT
  SOUND: ``is_certificate = False`` and ``to_noise`` raises.
* elastic_sigma: one level per input, ``sigma(x) = exp(gamma * tanh(MLP(x)))``
  with ``log sigma`` PROVABLY ``elasticity``-Lipschitz in l2, ``mu = 0``;
  sound only through :class:`~ucan_smoothing.npg.elastic_sigma.ElasticSigmaSmooth`
  (Sukenik et al.'s setting): ``to_noise`` raises, as for every input-dependent kind.
"""

from __future__ import annotations

import math

import torch
from torch import nn
import torch.nn.functional as F

from ..core.anisotropic import Anisotropic
from ..core.noises import Noise
from ..core.norms import parse_norm
from .lipschitz_shift import LipschitzMLP

__all__ = [
    "GENERATORS",
    "InputDependentGenerator",
    "NoiseGenerator",
    "PatternFixedGenerator",
    "UniversalGenerator",
    "generator_from_config",
    "make_generator",
    "sigma_stats",
]

NORMALIZATIONS = ("none", "geometric")


def _check_input_shape(input_shape) -> tuple:
    try:
        shape = tuple(int(s) for s in input_shape)
    except TypeError:
        raise ValueError(f"input_shape must be (C, H, W), got {input_shape!r}") from None
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"input_shape must be (C, H, W) with positive sizes, got {input_shape!r}")
    return shape


def _check_number(name: str, value, *, minimum: float | None = None, strict: bool = False) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if minimum is not None and (value <= minimum if strict else value < minimum):
        raise ValueError(f"{name} must be {'>' if strict else '>='} {minimum}, got {value}")
    return value


def _check_normalize(normalize) -> str:
    if normalize is True:
        return "geometric"
    if normalize is False or normalize is None:
        return "none"
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
    return normalize


def _norm_to_json(p: float):
    return "inf" if math.isinf(p) else int(p)


def _log_sigma_normalized(log_sigma: torch.Tensor, per_image: bool) -> torch.Tensor:
    """Subtract the mean of ``log sigma`` (over one input, or each image of a batch)."""
    if per_image:
        return log_sigma - log_sigma.flatten(1).mean(dim=1).view(-1, *([1] * (log_sigma.dim() - 1)))
    return log_sigma - log_sigma.mean()


def sigma_stats(sigma: torch.Tensor) -> dict:
    """mean / min / max / geometric mean of ``sigma`` (floats, for metrics files)."""
    sigma = sigma.detach().to(torch.float64)
    return {
        "sigma_mean": float(sigma.mean()),
        "sigma_min": float(sigma.min()),
        "sigma_max": float(sigma.max()),
        "sigma_geomean": float(sigma.log().mean().exp()),
    }


class NoiseGenerator(nn.Module):
    """Common base: the interface shared by every NPG."""

    kind: str = ""
    #: True when sigma/mu are functions of the input
    input_dependent: bool = False
    #: False where the certificate of the resulting noise would not be sound
    is_certificate: bool = True

    def __init__(self, input_shape):
        super().__init__()
        self.input_shape = _check_input_shape(input_shape)

    def describe(self) -> dict:  # pragma: no cover - every subclass overrides it
        raise NotImplementedError

    def has_trainable_parameters(self) -> bool:
        return any(p.requires_grad for p in self.parameters())

    def to_noise(self, base: Noise, sigma_min: float = 1e-6) -> Anisotropic:
        """The fixed noise ``base.sample() * sigma + mu`` for certification."""
        if self.input_dependent:
            raise ValueError(
                f"the {self.kind} generator computes sigma and mu from the input being certified, so the "
                "anisotropic certificate (Theorem 3.2) does not hold for it: at x + delta the smoothed "
                "classifier uses a different noise distribution (DESIGN.md section 4, counterexamples "
                "there). Use a pattern-fixed or universal generator for proven certificates."
            )
        if not isinstance(base, Noise):
            raise TypeError(f"base must be an isotropic noise family, got {type(base).__name__}")
        with torch.no_grad():
            sigma, mu = self()
        sigma = sigma.detach().to("cpu", torch.float64).contiguous()
        mu = None if mu is None or not bool(mu.any()) else mu.detach().to("cpu", torch.float64)
        return Anisotropic(base, sigma, mu, sigma_min=sigma_min)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.describe().items() if k != "kind")


# --------------------------------------------------------------------------- pattern-fixed


class PatternFixedGenerator(NoiseGenerator):
    """``sigma(a, b) = kappa * ||(a, b) - centre||_p^2 + iota``, ``mu = 0`` (see module docstring).

    ``p`` in {1, 2, inf}; ``centre`` (row, column) in pixel coordinates,
    default the image centre; ``normalize=True`` divides by the geometric
    mean. ``trainable=True`` learns ``log kappa`` and ``log iota``.
    """

    kind = "pattern"

    def __init__(self, input_shape, p=2, kappa: float = 1.0, iota: float = 1.0, centre=None,
                 normalize: bool = True, trainable: bool = False):
        super().__init__(input_shape)
        self.p = parse_norm(p)
        kappa = _check_number("kappa", kappa, minimum=0.0)
        iota = _check_number("iota", iota, minimum=0.0, strict=True)
        if trainable and kappa == 0:
            raise ValueError("a trainable pattern learns log(kappa): kappa must be > 0")
        _, height, width = self.input_shape
        if centre is None:
            centre = ((height - 1) / 2, (width - 1) / 2)
        try:
            centre = tuple(float(c) for c in centre)
        except TypeError:
            raise ValueError(f"centre must be (row, column), got {centre!r}") from None
        if len(centre) != 2 or not all(math.isfinite(c) for c in centre):
            raise ValueError(f"centre must be two finite numbers (row, column), got {centre!r}")
        self.centre = centre
        # True / "geometric": divide by the geometric mean; False / "none": the raw formula.
        self.normalize = _check_normalize(normalize) == "geometric"
        self.trainable = bool(trainable)
        rows = torch.arange(height, dtype=torch.float64)[:, None] - centre[0]
        cols = torch.arange(width, dtype=torch.float64)[None, :] - centre[1]
        if self.p == 1:
            dist = rows.abs() + cols.abs()
        elif self.p == 2:
            dist = torch.sqrt(rows**2 + cols**2)
        else:
            dist = torch.maximum(rows.abs(), cols.abs())
        # Computed once in float64; the forward pass casts.
        self.register_buffer("dist_sq", (dist**2).float(), persistent=False)
        if self.trainable:
            self.log_kappa = nn.Parameter(torch.tensor(math.log(kappa)))
            self.log_iota = nn.Parameter(torch.tensor(math.log(iota)))
        else:
            # float64 0-dim buffers: exact values in describe(); a 0-dim tensor does not
            # change the float32 result dtype of the forward pass.
            self.register_buffer("_kappa", torch.tensor(kappa, dtype=torch.float64), persistent=False)
            self.register_buffer("_iota", torch.tensor(iota, dtype=torch.float64), persistent=False)

    @property
    def kappa(self) -> torch.Tensor:
        return self.log_kappa.exp() if self.trainable else self._kappa

    @property
    def iota(self) -> torch.Tensor:
        return self.log_iota.exp() if self.trainable else self._iota

    def forward(self, x=None):
        sigma = self.kappa * self.dist_sq + self.iota
        if self.normalize:
            sigma = torch.exp(_log_sigma_normalized(sigma.log(), per_image=False))
        sigma = sigma.expand(self.input_shape)
        return sigma, torch.zeros_like(sigma)

    def describe(self) -> dict:
        return {
            "kind": self.kind,
            "input_shape": list(self.input_shape),
            "p": _norm_to_json(self.p),
            "kappa": float(self.kappa.detach()),
            "iota": float(self.iota.detach()),
            "centre": list(self.centre),
            "normalize": self.normalize,
            "trainable": self.trainable,
        }


# --------------------------------------------------------------------------- universal


def _mlp(in_features: int, hidden: int, out_features: int, layers: int = 5) -> nn.Sequential:
    modules: list[nn.Module] = []
    width = in_features
    for _ in range(layers - 1):
        modules += [nn.Linear(width, hidden), nn.LeakyReLU(0.2)]
        width = hidden
    last = nn.Linear(width, out_features)
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)
    modules.append(last)
    return nn.Sequential(*modules)


class UniversalGenerator(NoiseGenerator):
    """One ``sigma`` and one ``mu`` for the whole data set, from two parallel 5-layer MLPs.

    ``gamma`` bounds ``log sigma`` (paper: 5 for MNIST and CIFAR-10, 2 for
    ImageNet), ``gamma_mu`` bounds ``mu`` (default: ``gamma``);
    ``normalize`` is ``"none"`` (default) or ``"geometric"``; ``learn_mu=False``
    keeps ``mu = 0``. See the module docstring for the parametrisation.
    """

    kind = "universal"

    def __init__(self, input_shape, gamma: float = 5.0, gamma_mu: float | None = None,
                 normalize: str = "none", learn_mu: bool = True, latent_dim: int = 64,
                 hidden: int = 256, input_seed: int = 0):
        super().__init__(input_shape)
        self.gamma = _check_number("gamma", gamma, minimum=0.0, strict=True)
        self.gamma_mu = self.gamma if gamma_mu is None else _check_number("gamma_mu", gamma_mu, minimum=0.0,
                                                                          strict=True)
        self.normalize = _check_normalize(normalize)
        self.learn_mu = bool(learn_mu)
        self.latent_dim = int(latent_dim)
        self.hidden = int(hidden)
        self.input_seed = int(input_seed)
        if self.latent_dim < 1 or self.hidden < 1:
            raise ValueError(f"latent_dim and hidden must be >= 1, got {latent_dim}, {hidden}")
        dim = math.prod(self.input_shape)
        fixed = torch.randn(self.latent_dim, generator=torch.Generator().manual_seed(self.input_seed))
        self.register_buffer("fixed_input", fixed)
        self.sigma_net = _mlp(self.latent_dim, self.hidden, dim)
        self.mu_net = _mlp(self.latent_dim, self.hidden, dim) if self.learn_mu else None

    def sigma_bounds(self) -> tuple[float, float]:
        """The range ``sigma`` can take under this parametrisation."""
        bound = self.gamma * (2 if self.normalize == "geometric" else 1)
        return math.exp(-bound), math.exp(bound)

    def forward(self, x=None):
        log_sigma = self.gamma * torch.tanh(self.sigma_net(self.fixed_input))
        if self.normalize == "geometric":
            log_sigma = _log_sigma_normalized(log_sigma, per_image=False)
        sigma = log_sigma.exp().view(self.input_shape)
        if self.mu_net is None:
            mu = torch.zeros_like(sigma)
        else:
            mu = (self.gamma_mu * torch.tanh(self.mu_net(self.fixed_input))).view(self.input_shape)
        return sigma, mu

    def describe(self) -> dict:
        return {
            "kind": self.kind,
            "input_shape": list(self.input_shape),
            "gamma": self.gamma,
            "gamma_mu": self.gamma_mu,
            "normalize": self.normalize,
            "learn_mu": self.learn_mu,
            "latent_dim": self.latent_dim,
            "hidden": self.hidden,
            "input_seed": self.input_seed,
        }


# --------------------------------------------------------------------------- input-dependent


class ConvGenerator(nn.Module):
    """4 blocks of 3x3 conv + leaky ReLU (the first at stride 1, then stride 2),
    average pooling to ``pool x pool``, and a dense head to a ``(C, h, w)`` map.

    The head produces the full resolution when ``H * W <= 64 * 64`` (MNIST,
    CIFAR-10), else a ``head_size x head_size`` map upsampled bilinearly (a
    dense layer to 3 x 224 x 224 would hold ~150 M weights). The head starts
    at zero, so the raw output starts at 0.
    """

    def __init__(self, input_shape, channels=(32, 64, 64, 64), pool: int = 4, head_size: int | None = None):
        super().__init__()
        c, height, width = input_shape
        if len(channels) != 4:
            raise ValueError(f"the generator has 4 conv blocks: give 4 channel counts, got {channels!r}")
        blocks: list[nn.Module] = []
        width_in = c
        for i, out in enumerate(channels):
            blocks += [nn.Conv2d(width_in, int(out), 3, stride=1 if i == 0 else 2, padding=1), nn.LeakyReLU(0.2)]
            width_in = int(out)
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(pool)
        if head_size is None:
            head_hw = (height, width) if height * width <= 64 * 64 else (56, 56)
        else:
            head_hw = (min(int(head_size), height), min(int(head_size), width))
        self.out_shape = (c, *head_hw)
        self.input_hw = (height, width)
        self.head = nn.Linear(width_in * pool * pool, math.prod(self.out_shape))
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.head(torch.flatten(self.pool(self.features(x)), 1)).view(x.shape[0], *self.out_shape)
        if self.out_shape[1:] != self.input_hw:
            out = F.interpolate(out, size=self.input_hw, mode="bilinear", align_corners=False)
        return out


class InputDependentGenerator(NoiseGenerator):
    """``mu(x)`` from a conv generator, then ``sigma(x + mu)`` from a second one (paper, ``gamma = 1``).

    NOT A CERTIFICATE: the noise depends on the input being certified, which
    breaks Theorem 3.2 (DESIGN.md section 4). ``to_noise`` raises.
    """

    kind = "input_dependent"
    input_dependent = True
    is_certificate = False

    def __init__(self, input_shape, gamma: float = 1.0, normalize: str = "none",
                 channels=(32, 64, 64, 64), pool: int = 4, head_size: int | None = None):
        super().__init__(input_shape)
        self.gamma = _check_number("gamma", gamma, minimum=0.0, strict=True)
        self.normalize = _check_normalize(normalize)
        self.channels = tuple(int(c) for c in channels)
        self.pool = int(pool)
        self.head_size = None if head_size is None else int(head_size)
        self.mu_net = ConvGenerator(self.input_shape, self.channels, self.pool, self.head_size)
        self.sigma_net = ConvGenerator(self.input_shape, self.channels, self.pool, self.head_size)

    def forward(self, x=None):
        if x is None or x.dim() != 4 or tuple(x.shape[1:]) != self.input_shape:
            got = None if x is None else tuple(x.shape)
            raise ValueError(f"the input-dependent generator needs a batch (B, *{self.input_shape}), got {got}")
        mu = self.gamma * torch.tanh(self.mu_net(x))
        log_sigma = self.gamma * torch.tanh(self.sigma_net(x + mu))
        if self.normalize == "geometric":
            log_sigma = _log_sigma_normalized(log_sigma, per_image=True)
        return log_sigma.exp(), mu

    def describe(self) -> dict:
        return {
            "kind": self.kind,
            "input_shape": list(self.input_shape),
            "gamma": self.gamma,
            "normalize": self.normalize,
            "channels": list(self.channels),
            "pool": self.pool,
            "head_size": self.head_size,
            "is_certificate": False,
        }


class ElasticSigmaGenerator(NoiseGenerator):
    """A trainable semi-elastic level: ``sigma(x) = exp(gamma * tanh(MLP(x)))``, one number per input.

    The MLP is a :class:`~ucan_smoothing.npg.lipschitz_shift.LipschitzMLP` with a scalar output, its
    layers capped so that ``log sigma`` is at most ``elasticity``-Lipschitz in l2;
    :meth:`elasticity_bound` recomputes the PROVEN bound from the saved weights (exact operator
    norms), and that is what certification uses. The last layer starts at zero: a fresh generator
    is ``sigma = 1`` (the base level). As an NPG it returns ``(sigma, 0)`` broadcast to the input's
    shape, so ``ucan train npg --kind elastic_sigma`` trains it like the input-dependent NPG; it
    is certified only by :class:`ElasticSigmaSmooth` (Gaussian base noise), never by Theorem 3.2.
    """

    kind = "elastic_sigma"
    input_dependent = True
    is_certificate = True  # through ElasticSigmaSmooth's chained Neyman-Pearson bound

    def __init__(self, input_shape, elasticity: float = 0.01, gamma: float = 0.5, hidden: int = 64, depth: int = 2):
        super().__init__(input_shape)
        self.elasticity, self.gamma = float(elasticity), float(gamma)
        if not (math.isfinite(self.elasticity) and self.elasticity > 0):
            raise ValueError(f"elasticity must be finite and > 0, got {elasticity}")
        if not (math.isfinite(self.gamma) and self.gamma > 0) or int(depth) < 1 or int(hidden) < 1:
            raise ValueError(f"need gamma > 0, depth >= 1 and hidden >= 1, got {gamma}, {depth}, {hidden}")
        self.hidden, self.depth = int(hidden), int(depth)
        cap = (self.elasticity / self.gamma) ** (1.0 / self.depth)
        self.net = LipschitzMLP(self.input_shape, (1,), hidden=self.hidden, depth=self.depth, gamma=self.gamma,
                                norm=2, cap=cap)
        nn.init.zeros_(self.net.layers[-1].weight)
        nn.init.zeros_(self.net.layers[-1].bias)

    def level(self, x: torch.Tensor) -> torch.Tensor:
        """``sigma(x)``, shape ``(B,)``."""
        return self.net(x).reshape(len(x)).exp()

    def forward(self, x=None):
        if x is None or tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"the elastic_sigma generator needs a batch (B, *{self.input_shape}), got "
                             f"{None if x is None else tuple(x.shape)}")
        sigma = self.level(x).view(len(x), *([1] * len(self.input_shape))).expand_as(x)
        return sigma, torch.zeros_like(x)

    def as_level(self) -> nn.Module:
        """A module ``x -> sigma(x)`` (shape ``(B,)``): the ``sigma_fn`` of ``ElasticSigmaSmooth``."""
        return _Level(self)

    def elasticity_bound(self) -> float:
        """The proven bound ``r`` with ``|log sigma(x) - log sigma(x')| <= r ||x - x'||_2``."""
        return self.net.lipschitz_bound(2)

    def describe(self) -> dict:
        return {"kind": self.kind, "input_shape": list(self.input_shape), "elasticity": self.elasticity,
                "gamma": self.gamma, "hidden": self.hidden, "depth": self.depth}


class _Level(nn.Module):
    def __init__(self, generator: ElasticSigmaGenerator):
        super().__init__()
        self.generator = generator

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.generator.level(x)


# --------------------------------------------------------------------------- registry

GENERATORS: dict[str, type[NoiseGenerator]] = {
    cls.kind: cls for cls in (PatternFixedGenerator, UniversalGenerator, InputDependentGenerator,
                              ElasticSigmaGenerator)
}


def build_by_kind(registry: dict, what: str, kind: str, input_shape, **params) -> nn.Module:
    """``registry[kind](input_shape, **params)`` (kind case-insensitive, ``-`` for ``_``), with a clear
    ``ValueError`` for an unknown kind or bad parameters; ``what`` names the family in messages."""
    key = str(kind).strip().lower().replace("-", "_")
    if key not in registry:
        raise ValueError(f"unknown {what} kind {kind!r}; known: {', '.join(registry)}")
    try:
        return registry[key](input_shape, **params)
    except TypeError as err:
        raise ValueError(f"bad parameters for the {key} {what}: {err}") from None


def load_saved_weights(module: nn.Module, state_dict: dict | None, kind: str, what: str) -> nn.Module:
    """``module`` with ``state_dict`` loaded strictly (if given); weights of another shape: ``ValueError``."""
    if state_dict is not None:
        try:
            module.load_state_dict(state_dict, strict=True)
        except RuntimeError as err:
            raise ValueError(f"the saved weights do not fit the {kind} {what}: {err}") from err
    return module


def make_generator(kind: str, input_shape, **params) -> NoiseGenerator:
    """Build an NPG by kind: ``make_generator('pattern', (1, 28, 28), p=1, kappa=0.1)``."""
    return build_by_kind(GENERATORS, "generator", kind, input_shape, **params)


def generator_from_config(config: dict, state_dict: dict | None = None) -> NoiseGenerator:
    """Rebuild a generator from ``describe()`` (and its ``state_dict()``, for trained weights)."""
    if not isinstance(config, dict) or "kind" not in config:
        raise ValueError(f"a generator config is a dict with a 'kind' key, got {config!r}")
    params = {k: v for k, v in config.items() if k not in ("kind", "input_shape", "is_certificate")}
    if "input_shape" not in config:
        raise ValueError("the generator config has no 'input_shape'")
    generator = make_generator(config["kind"], config["input_shape"], **params)
    return load_saved_weights(generator, state_dict, config["kind"], "generator")

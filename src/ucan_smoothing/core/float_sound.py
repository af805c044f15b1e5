"""Randomized smoothing that stays sound in floating-point arithmetic (docs/float_sound.md).

Why the usual computation is not sound. CERTIFY's guarantee is about ``f(x + N)`` for a fixed
base classifier ``f`` and exact Gaussian ``N``. A program instead computes
``f(fl(x + fl(sigma * eps)))``: the noise is a float, and the sum is rounded. The last bits of
that sum depend on ``x`` and the noise separately, not only on their exact sum, so the network
can tell (for example) a clean input from its perturbed neighbours, and the certificate may fail
for the computation actually run (Voracek and Hein, ICLR 2023, "Sound randomized smoothing in
floating-point arithmetic", whose construction this module follows).

The sound mode (everything below is proven in the module, measured in docs/float_sound.md):

1. Grid. Inputs lie on the grid of step ``s`` (default ``1/255``): ``x = m s`` with ``m`` an
   integer vector (8-bit images are). ``quantize`` maps any input there; the certified input is
   the quantized one. Perturbations are grid points ``x' = m' s``, at distance
   ``||(m' - m) s||`` in input units (``s = 1/N`` exactly for a step ``1/N``, as
   ``1/255``; for other steps, the step's float64 value).
2. Noise. ``K`` has i.i.d. coordinates with ``P(K_i = j) = Phi((j + 1/2) s / sigma) -
   Phi((j - 1/2) s / sigma)``: the Gaussian ``N(0, sigma^2)`` rounded to the grid,
   ``K = round(N / s)``. The base classifier sees ``F(m + K)`` with ``F(n) = f(v(n))`` for one
   fixed map ``v`` (:func:`grid_value`).
3. Certificate: Cohen et al.'s, unchanged. For an integer ``m``, ``m + round(N / s) =
   round((m s + N) / s)``, so ``P(F(m + K) = c) = P(f~(m s + N) = c)`` with the fixed measurable
   base classifier ``f~(y) = F(round(y / s))``. Cohen et al.'s Theorem 1 holds for every
   measurable base classifier, so the Gaussian smoothing ``g~`` of ``f~`` keeps its class on the
   l2 ball of radius ``sigma PhiInv(p)`` (multiclass ``sigma/2 (PhiInv(p) - PhiInv(q))``) around
   ``m s``; at every grid point ``g~`` is exactly the discrete smoothed classifier above.
4. Sampler. ``K_i`` is drawn by inverse CDF from 62 random bits: ``U`` uniform on
   ``[0, 2^62)`` (its leading 16 and trailing 46 bits are independent ``torch.randint`` draws:
   the generator's words are the fair coins, reduced modulo a power of two, which keeps them
   uniform; the trailing bits are drawn only where the leading ones leave the bin open),
   ``K_i = -J + #{j : T_j <= U}`` with
   ``T_j = round(2^62 Phi((j + 1/2) s / sigma))`` for ``-J <= j < J``, computed once in
   160-bit arithmetic (mpmath). Coupling ``U = floor(2^62 V)`` with the exact inverse-CDF draw
   from ``V`` uniform on [0, 1): the two differ only when ``V`` falls between some ``T_j / 2^62``
   and the true CDF value, or ``|K_i| > J``, so each coordinate is wrong with probability at most
   ``tau = sum_j |T_j / 2^62 - Phi_j| + 2 Phi(-(J + 1/2) s / sigma)`` (about ``1e-16``; ``J``
   puts the tail below ``2^-64``). Over ``d`` coordinates the executed noise is within total
   variation ``eta = d tau`` of the rounded Gaussian, so every class probability of the executed
   mechanism is within ``eta`` of ``g~``'s: the certificate uses ``p - eta`` for the top class
   and ``q + eta`` for the runner-up (a one-sided Clopper-Pearson bound on the executed
   probability at level ``alpha`` minus ``eta`` bounds ``g~``'s at the same level).
5. Exact arithmetic. :class:`SnapToGrid` (outermost layer of the base classifier) recovers
   ``n = m + K`` exactly from the float sum ``z = fl(x + fl(K s))`` that ``Smooth`` computes and
   hands the network ``v(n)``; so the network's input is a fixed function of the integer vector
   ``m + K`` and rounding carries no information about ``x``. Proof, with ``u = 2^-p`` the unit
   roundoff of the dtype (float32: ``p = 24``): the noise is ``K s (1 + e1)``, ``|e1| <= 3u``
   (one rounding for ``s = 1/N``: ``K / N``; else the float64 product, then the cast);
   ``z = (x + K s (1 + e1))(1 + e2)`` and ``w = fl(z / s) = (z / s)(1 + e3)`` (``z * N``: one
   rounding; else the stored step and the division) with ``|e2| <= u``, ``|e3| <= 3u``. Hence
   ``|w - (x / s + K)| <= 8u (|x / s| + |K|)`` and, solving for ``x / s``,
   ``<= 8u (1.01 |w| + 2.01 J)``. ``SnapToGrid`` requires ``|round(w)| <= L`` and the noise
   requires ``J <= L`` with ``L = 2^(p - 8)``, so this error is at most ``1/8``; it also requires
   ``|w - round(w)| <= 1/8``. Then ``x / s`` lies within ``1/4`` of the integer
   ``round(w) - K``, which is therefore ``m = round(x / s)``: ``round(w) = m + K`` for every draw.
   Anything else (an input off the grid, a float16 network fed rounded inputs) is refused.

Cost: the radius loses only ``eta`` in ``p`` (below ``1e-10`` of the radius for CIFAR-10 and
``2e-9`` for ImageNet sizes); sampling is a table look-up instead of ``randn``, about 3.6 times
slower on a CPU, 5 times with the snapping (docs/float_sound.md).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from .noises import Gaussian, Noise, _check_positive, _check_probability, check_fits_dtype
from .smooth import Smooth

#: the grid of 8-bit images scaled to [0, 1]
GRID_STEP = 1 / 255

#: random bits per coordinate; thresholds are multiples of 2^-TABLE_BITS
TABLE_BITS = 62
#: the leading bits of U index a guide table; only buckets holding a threshold need a search
GUIDE_BITS = 16
#: the table spans |K| <= J with (J + 1/2) s / sigma >= TAIL_Z: tail mass 2 Phi(-9.3) < 2^-64
TAIL_Z = 9.3
#: digits of the table arithmetic (bits), far beyond the 62 bits kept
WORKING_BITS = 160
#: check_on_grid accepts values this close (in steps) to a grid point: float32 storage of
#: m * s is off by at most |m| 2^-24 steps
GRID_TOLERANCE = 1 / 128
#: SnapToGrid's bound on |w - round(w)| (in steps), as the proof above needs
SNAP_TOLERANCE = 1 / 8
#: dtypes in which snapping is proven exact
SNAP_DTYPES = (torch.float32, torch.float64)


def exact_grid_limit(dtype: torch.dtype) -> int:
    """``L = 2^(p - 8)``: grid indices up to ``L`` (and table half-widths up to ``L``) keep the
    snapping of :class:`SnapToGrid` exact in ``dtype`` (module docstring, step 5)."""
    if dtype not in SNAP_DTYPES:
        raise ValueError(
            f"float-sound smoothing computes noisy inputs in float32 or float64, not {dtype}: in a "
            "narrower type the grid cannot be recovered exactly (run a half-precision network "
            "under autocast, models.Autocast, behind SnapToGrid)"
        )
    significand_bits = 1 - round(math.log2(torch.finfo(dtype).eps))  # p: 24 for float32
    return 2 ** (significand_bits - 8)


def _levels(step: float) -> int | None:
    """``N`` when ``step == 1 / N`` for an integer ``N`` (the grid of N-level images), else None."""
    levels = round(1 / step)
    return levels if levels >= 1 and 1 / levels == step else None


def grid_value(n: torch.Tensor, step: float, dtype: torch.dtype) -> torch.Tensor:
    """The fixed map ``v``: grid indices ``n`` (integer-valued) to input values in ``dtype``.

    For ``step = 1 / N`` this is ``n / N`` computed in ``dtype`` (on the CPU bit for bit what
    ``torchvision.transforms.ToTensor`` gives for 8-bit images when ``N = 255``); for other steps
    ``n * step`` rounded once from float64. Either way a fixed function of ``n``."""
    levels = _levels(step)
    if levels is not None:
        return n.to(dtype) / levels
    return (n.to(torch.float64) * step).to(dtype)


def _grid_offsets(x: torch.Tensor, step: float):
    """``(round(x / step), |x / step - round(x / step)|)`` in float64, after checking ``x``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not torch.isfinite(x).all():
        raise ValueError("input contains NaN or inf")
    scaled = x.to(torch.float64) / _check_positive("step", step)
    index = torch.round(scaled)
    return index, (scaled - index).abs()


def quantize(x: torch.Tensor, step: float = GRID_STEP) -> torch.Tensor:
    """``x`` moved to the nearest grid point (in ``x``'s floating dtype, float32 for integers).

    Part of the classifier in the float-sound mode: what is certified is ``quantize(x)``.
    Idempotent; images read as ``uint8 / 255`` are returned unchanged."""
    index, _ = _grid_offsets(x, step)
    dtype = x.dtype if x.is_floating_point() else torch.float32
    return grid_value(index, step, dtype)


def check_on_grid(x: torch.Tensor, step: float = GRID_STEP) -> None:
    """Raise ``ValueError`` unless every value of ``x`` is a grid point ``m * step`` (within
    ``GRID_TOLERANCE`` steps, the float storage error)."""
    _, offset = _grid_offsets(x, step)
    if offset.numel() and float(offset.max()) > GRID_TOLERANCE:
        where = int(offset.reshape(-1).argmax())
        value = float(x.reshape(-1)[where])
        raise ValueError(
            f"input is not on the grid of step {step:.6g}: value {value:.8g} (element {where}) is "
            f"{float(offset.max()):.3g} steps from the nearest grid point; quantize it first "
            "(ucan_smoothing.core.float_sound.quantize)"
        )


def snap_to_indices(z: torch.Tensor, step: float) -> torch.Tensor:
    """The grid indices ``round(z / step)`` of noisy inputs ``z`` (same dtype), after checking
    what the exactness proof needs: ``z`` in float32/float64, every ``z / step`` within
    ``SNAP_TOLERANCE`` of an integer and at most ``exact_grid_limit`` in size."""
    limit = exact_grid_limit(z.dtype)
    levels = _levels(step)
    w = z * levels if levels is not None else z / step
    index = w.round()
    lowest, highest = index.aminmax()
    off_grid, lowest, highest = torch.stack((w.sub_(index).abs_().max(), lowest, highest)).tolist()
    largest = max(-lowest, highest)
    if not off_grid <= SNAP_TOLERANCE:
        raise ValueError(
            f"noisy input is {off_grid:.3g} steps off the grid of step {step:.6g}: the input was "
            "not on the grid; pass quantize(x, step) (ucan_smoothing.core.float_sound.quantize)"
        )
    if not largest <= limit:
        raise ValueError(
            f"noisy input reaches grid index {largest:.0f}, beyond {limit} where {z.dtype} "
            "snapping is proven exact; inputs must stay near the grid's range (e.g. [0, 1])"
        )
    return index


class SnapToGrid(torch.nn.Module):
    """Base classifier ``F(n) = model(grid_value(n))`` of the float-sound mode: it recovers the
    integer grid vector ``n = m + K`` from the float noisy input and feeds ``model`` its fixed
    image, so the model's input is a function of ``n`` alone (module docstring, step 5).

    Must be the outermost layer (a half-precision ``model`` would be given rounded inputs by
    ``Smooth``'s cast: refused; wrap such a model in ``models.Autocast`` inside instead)."""

    def __init__(self, model: torch.nn.Module, step: float = GRID_STEP):
        super().__init__()
        parameter = next(model.parameters(), None)
        if parameter is not None and parameter.is_floating_point() and parameter.dtype not in SNAP_DTYPES:
            raise ValueError(
                f"float-sound smoothing needs a float32 or float64 model, got {parameter.dtype} "
                "parameters: its inputs would be rounded before the grid is recovered; keep float32 "
                "weights and wrap them in models.Autocast inside this layer for half precision (Python API only)"
            )
        self.model = model
        self.step = _check_positive("step", step)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.model(grid_value(snap_to_indices(z, self.step), self.step, z.dtype))


# -- the noise table ------------------------------------------------------------------------


@dataclass(frozen=True)
class RoundingTable:
    """Inverse-CDF table of ``round(N(0, sigma^2) / step)``: ``K = -J + #{j : T_j <= U}`` for
    ``U`` uniform on ``[0, 2^TABLE_BITS)``; ``tv`` bounds ``P(K != exact draw)`` per coordinate."""

    half_width: int  # J
    thresholds: torch.Tensor  # int64, 2J nondecreasing values T_-J .. T_(J-1)
    tv: float  # tau, rounded up

    def pmf(self) -> torch.Tensor:
        """Probabilities of ``K = -J .. J`` under this table (float64; exact up to the cast)."""
        edges = torch.cat((torch.zeros(1, dtype=torch.int64), self.thresholds,
                           torch.full((1,), 2**TABLE_BITS, dtype=torch.int64)))
        return edges.diff().to(torch.float64) / 2**TABLE_BITS

    def bins(self, u: torch.Tensor) -> torch.Tensor:
        """``K`` for uniform words ``u`` by plain binary search (the reference for the sampler)."""
        return torch.searchsorted(self.thresholds.to(u.device), u, right=True) - self.half_width


def _mpmath():
    try:
        import mpmath
    except ImportError:  # pragma: no cover - mpmath comes with torch (through sympy)
        raise ValueError("the float-sound noise table needs mpmath (installed with torch through sympy)") from None
    return mpmath


@functools.lru_cache(maxsize=16)
def rounding_table(scale: float, step: float) -> RoundingTable:
    """The table for noise ``scale`` (sigma) on the grid ``step``, computed in 160-bit arithmetic
    from the exact value of sigma (a float) and of the step: ``1 / N`` exactly when ``step`` is
    the float of ``1 / N``, else its float value (module docstring, step 4)."""
    mp = _mpmath()
    ratio_float = step / scale
    half_width = max(1, math.ceil(TAIL_Z / ratio_float - 0.5))
    limit = exact_grid_limit(torch.float32) // 2
    if half_width > limit:
        raise ValueError(
            f"scale/step = {scale / step:.4g} is too large for the float-sound noise table (it needs "
            f"|K| up to {half_width}, at most {limit} is supported); use a coarser grid step"
        )
    one = 2**TABLE_BITS
    with mp.workprec(WORKING_BITS):
        levels = _levels(step)
        exact_step = mp.mpf(1) / levels if levels is not None else mp.mpf(step)
        ratio = exact_step / mp.mpf(scale)
        upper, error = [], mp.mpf(0)
        for j in range(half_width):  # F_j = Phi((j + 1/2) s / sigma) for j >= 0; mirrored below
            exact = mp.ncdf((j + mp.mpf(0.5)) * ratio) * one
            rounded = int(mp.nint(exact))
            upper.append(rounded)
            error += abs(rounded - exact)
        tail = 2 * mp.ncdf(-(half_width + mp.mpf(0.5)) * ratio)
        # both halves' rounding, the tail, and a margin for the working precision itself
        tau = 2 * error / one + tail + 2 * half_width * mp.mpf(2) ** (24 - WORKING_BITS)
        tv = math.nextafter(float(tau), math.inf)
    lower = [one - t for t in reversed(upper)]  # T_(-j-1) = 2^B - T_j, as Phi(-t) = 1 - Phi(t)
    return RoundingTable(half_width, torch.tensor(lower + upper, dtype=torch.int64), tv)


class RoundedGaussian(Noise):
    """Gaussian noise ``N(0, scale^2 I)`` rounded to the grid of ``step``, drawn exactly from
    integer random numbers; with :class:`SnapToGrid` its certificates hold for the arithmetic
    actually executed (module docstring). Native norm l2, Cohen et al.'s radii at ``p - eta``.

    ``sample`` returns ``grid_value(K)``: added to an input on the grid it gives grid values up
    to float rounding, which ``SnapToGrid`` removes exactly. Use :func:`float_sound_smooth`."""

    native_norms = (2,)
    name = "rounded_gaussian"

    def __init__(self, scale: float, step: float = GRID_STEP):
        scale = _check_positive("scale", scale)
        self.step = _check_positive("step", step)
        self.table = rounding_table(scale, self.step)
        self._continuous = Gaussian(scale)
        self._lookups = {}
        super().__init__(scale)

    def check_dtype(self, dtype: torch.dtype) -> None:
        limit = exact_grid_limit(dtype)
        check_fits_dtype("scale", self.scale, dtype, smallest=self.scale)
        if self.table.half_width > limit:
            raise ValueError(
                f"noise table reaches |K| = {self.table.half_width}, beyond {limit} where {dtype} "
                "snapping is proven exact"
            )

    # -- sampling ----------------------------------------------------------------------------
    def total_variation(self, dim: int) -> float:
        """``eta = dim * tau``: total variation between the executed noise on ``dim`` coordinates
        and the exact rounded Gaussian (rounded up)."""
        return math.nextafter(int(dim) * self.table.tv, math.inf)

    def _lookup(self, device, dtype):
        """Device tables: per guide bucket the value of its lowest word and whether a threshold
        falls inside it; the thresholds; per bin ``K = -J .. J`` its value (``K`` itself for
        int64, else ``grid_value(K)``)."""
        key = (torch.device("cpu") if device is None else torch.device(device), dtype)
        if key not in self._lookups:
            table, shift = self.table, TABLE_BITS - GUIDE_BITS
            low = torch.arange(2**GUIDE_BITS, dtype=torch.int64) << shift
            first = torch.searchsorted(table.thresholds, low, right=True)
            last = torch.searchsorted(table.thresholds, low + (2**shift - 1), right=True)
            bins = torch.arange(-table.half_width, table.half_width + 1)
            values = bins if dtype == torch.int64 else grid_value(bins, self.step, dtype)
            self._lookups[key] = tuple(
                t.to(key[0]) for t in (values[first], first != last, table.thresholds, values)
            )
        return self._lookups[key]

    def _from_words(self, top, low_bits, lookup):
        """Bin values for words ``U = top * 2^(B - G) + low``: ``top`` (int64, the leading
        ``GUIDE_BITS``) settles most draws; ``low_bits(where)`` gives the rest of the word only
        for the draws ``where`` whose bucket holds a threshold, then a binary search decides."""
        bucket_value, ambiguous, thresholds, values = lookup
        out = bucket_value[top]
        where = ambiguous[top].nonzero().squeeze(1)
        if where.numel():
            words = (top[where] << (TABLE_BITS - GUIDE_BITS)) | low_bits(where)
            out[where] = values[torch.searchsorted(thresholds, words, right=True)]
        return out

    def _draw(self, shape, generator, device, dtype):
        shape = tuple(shape)
        lookup = self._lookup(device, dtype)
        # U's leading and trailing bits are independent uniform numbers: draw the trailing ones
        # only where they matter. Both ranges are powers of two, so randint keeps them uniform.
        top = torch.randint(0, 2**GUIDE_BITS, (math.prod(shape),), generator=generator, device=device)
        def low_bits(where):
            return torch.randint(0, 2 ** (TABLE_BITS - GUIDE_BITS), (where.numel(),),
                                 generator=generator, device=device)
        return self._from_words(top, low_bits, lookup).view(shape)

    def sample(self, shape, *, generator=None, device=None, dtype=None):
        return self._draw(shape, generator, device, dtype or torch.get_default_dtype())

    def sample_indices(self, shape, *, generator=None, device=None) -> torch.Tensor:
        """The grid offsets ``K`` (int64) themselves, drawn exactly as :meth:`sample` draws them."""
        return self._draw(shape, generator, device, torch.int64)

    # -- certificates ------------------------------------------------------------------------
    def _binary_radii(self, p, dim):
        return self._continuous._binary_radii(p, dim)

    def native_radii(self, p_lower: float, dim: int, p_runner_up: float | None = None) -> dict:
        """Cohen et al.'s radii of the rounded Gaussian at ``p_lower - eta`` (and ``q + eta``)."""
        p = _check_probability("p_lower", p_lower)
        eta = self.total_variation(dim)
        q = None if p_runner_up is None else min(1.0, _check_probability("p_runner_up", p_runner_up) + eta)
        return self._continuous.native_radii(max(0.0, p - eta), dim, q)

    def describe(self) -> dict:
        return {**super().describe(), "step": self.step, "float_sound": True,
                "table_bits": TABLE_BITS, "tv_per_coordinate": self.table.tv}


def float_sound_smooth(model: torch.nn.Module, num_classes: int, scale: float, *, step: float = GRID_STEP,
                       input_shape=None) -> Smooth:
    """``Smooth`` with rounded Gaussian noise and the snapping base classifier: certificates
    that hold for the executed arithmetic, for inputs on the grid (``quantize`` them first)."""
    return Smooth(SnapToGrid(model, step), num_classes, RoundedGaussian(scale, step), input_shape=input_shape)

"""The float-sound mode (core/float_sound.py): the rounded-Gaussian table and sampler, the exact
recovery of the grid from float sums, and its certificates against exact oracles."""

import math

import mpmath
import numpy as np
import pytest
import torch
from scipy.stats import chisquare, norm

from ucan_smoothing.core.float_sound import (
    GRID_STEP,
    TABLE_BITS,
    GUIDE_BITS,
    RoundedGaussian,
    SnapToGrid,
    check_on_grid,
    float_sound_smooth,
    grid_value,
    quantize,
    rounding_table,
    snap_to_indices,
)
from ucan_smoothing.core.noises import Gaussian
from ucan_smoothing.core.statistics import clopper_pearson_lower

CIFAR_DIM = 3 * 32 * 32


def ideal_pmf(scale, step, half_width):
    """P(round(N(0, scale^2) / step) = j) for j = -J .. J in 100-digit arithmetic, and the mass
    beyond |j| > J."""
    with mpmath.workdps(100):
        r = 1 / (mpmath.mpf(round(1 / step)) * mpmath.mpf(scale))  # the grids here are 1/N
        pmf = [mpmath.ncdf((j + mpmath.mpf(0.5)) * r) - mpmath.ncdf((j - mpmath.mpf(0.5)) * r)
               for j in range(-half_width, half_width + 1)]
        tail = 2 * mpmath.ncdf(-(half_width + mpmath.mpf(0.5)) * r)
    return pmf, tail


def executed_pmf(noise):
    """The pmf of K = -J .. J that the sampler draws, as a numpy float64 array."""
    return noise.table.pmf().numpy()


# -- the table and the sampler --------------------------------------------------------------

@pytest.mark.parametrize("scale, step", [(0.25, GRID_STEP), (0.3, 0.1)])
def test_table_is_within_its_stated_total_variation_of_the_rounded_gaussian(scale, step):
    table = rounding_table(scale, step)
    thresholds = table.thresholds
    assert (thresholds.diff() >= 0).all() and 0 <= int(thresholds[0]) and int(thresholds[-1]) <= 2**TABLE_BITS
    pmf, tail = ideal_pmf(scale, step, table.half_width)
    with mpmath.workdps(100):
        edges = [0] + [int(t) for t in thresholds] + [2**TABLE_BITS]
        drawn = [mpmath.mpf(b - a) / 2**TABLE_BITS for a, b in zip(edges, edges[1:])]
        l1 = sum(abs(a - b) for a, b in zip(drawn, pmf)) + tail
    assert l1 <= 2 * table.tv  # L1 = 2 TV; the coupling bound tau bounds TV
    assert table.tv < 1e-15  # the accounting costs nothing visible (docs/float_sound.md)
    assert np.array_equal(executed_pmf(RoundedGaussian(scale, step)), executed_pmf(RoundedGaussian(scale, step))[::-1])


def test_guide_table_path_agrees_with_plain_binary_search():
    noise = RoundedGaussian(0.25)
    thresholds = noise.table.thresholds
    shift = TABLE_BITS - GUIDE_BITS
    edges = torch.arange(2**GUIDE_BITS, dtype=torch.int64) << shift
    words = torch.cat((
        thresholds - 1, thresholds, thresholds + 1, edges, edges - 1,
        torch.randint(0, 2**TABLE_BITS, (100_000,), generator=torch.Generator().manual_seed(0)),
        torch.tensor([0, 2**TABLE_BITS - 1]),
    )).clamp(0, 2**TABLE_BITS - 1)
    low_mask = 2**shift - 1
    guided = noise._from_words(words >> shift, lambda where: words[where] & low_mask,
                               noise._lookup(None, torch.int64))
    assert torch.equal(guided, noise.table.bins(words))


def test_sampler_frequencies_match_the_table_pmf():
    noise = RoundedGaussian(0.3, step=0.1)  # about 57 bins: a chi-square test in milliseconds
    draws = noise.sample_indices((200_000,), generator=torch.Generator().manual_seed(1))
    half_width = noise.table.half_width
    counts = torch.bincount(draws + half_width, minlength=2 * half_width + 1).numpy().astype(float)
    expected = executed_pmf(noise) * draws.numel()
    keep = expected >= 5  # pool the sparse tails into one cell
    observed = np.append(counts[keep], counts[~keep].sum())
    wanted = np.append(expected[keep], expected[~keep].sum())
    assert chisquare(observed, wanted * observed.sum() / wanted.sum()).pvalue > 1e-3


def test_sampler_moments_at_cifar_settings():
    scale = 0.25
    draws = RoundedGaussian(scale).sample_indices((300_000,), generator=torch.Generator().manual_seed(2))
    draws = draws.to(torch.float64)
    # Var round(N / s) = (sigma / s)^2 + 1/12 up to terms of order exp(-2 pi^2 sigma^2 / s^2)
    variance = (scale / GRID_STEP) ** 2 + 1 / 12
    count = draws.numel()
    assert abs(float(draws.mean())) < 5 * math.sqrt(variance / count)
    assert abs(float(draws.var()) - variance) < 5 * variance * math.sqrt(2 / count)


def test_sample_returns_the_grid_values_of_the_indices():
    noise = RoundedGaussian(0.25)
    values = noise.sample((64, 3, 4, 4), generator=torch.Generator().manual_seed(3), dtype=torch.float32)
    indices = noise.sample_indices((64, 3, 4, 4), generator=torch.Generator().manual_seed(3))
    assert values.shape == (64, 3, 4, 4) and values.dtype == torch.float32
    assert torch.equal(values, grid_value(indices, GRID_STEP, torch.float32))


# -- exact arithmetic ---------------------------------------------------------------------

def test_float_sums_leak_the_input_but_snapping_keeps_only_the_grid_sum():
    m = torch.arange(256)
    leaked = 0
    for total in range(-700, 900, 7):
        k = total - m  # every pair (m, k) with this sum m + k
        z = grid_value(k, GRID_STEP, torch.float32) + grid_value(m, GRID_STEP, torch.float32)  # as Smooth adds
        leaked += z.unique().numel() > 1
        snapped = snap_to_indices(z, GRID_STEP)
        assert torch.equal(snapped, torch.full_like(snapped, total))
        seen = []
        SnapToGrid(Recorder(seen))(z)
        assert torch.equal(seen[0], grid_value(torch.full((256,), total), GRID_STEP, torch.float32))
    # Without snapping, most sums reach the network as several different floats: the rounding
    # tells it which (x, noise) pair it sees, which is what an attacker exploits.
    assert leaked > 100


class Recorder(torch.nn.Module):
    """Identity-like model that keeps its inputs and returns two logits."""

    def __init__(self, seen):
        super().__init__()
        self.seen = seen
        self.weight = torch.nn.Parameter(torch.zeros(()))

    def forward(self, z):
        self.seen.append(z.detach().clone())
        flat = z.reshape(len(z), -1)
        return torch.stack((flat[:, 0] * 0, flat[:, 0] - 0.5), dim=1)


def test_grid_checks_and_quantize():
    images = torch.arange(256, dtype=torch.float32) / 255  # what ToTensor gives for 8-bit images
    check_on_grid(images)
    assert torch.equal(quantize(images), images)
    rough = torch.tensor([0.5 + 0.3 / 255, 0.1, -0.2])
    with pytest.raises(ValueError, match="not on the grid"):
        check_on_grid(rough)
    fixed = quantize(rough)
    check_on_grid(fixed)
    assert torch.equal(quantize(fixed), fixed)
    assert torch.allclose(fixed, torch.round(rough * 255) / 255)
    with pytest.raises(ValueError, match="NaN"):
        check_on_grid(torch.tensor([float("nan")]))


def test_smooth_refuses_an_input_off_the_grid():
    smooth = float_sound_smooth(Recorder([]), 2, 0.25, input_shape=(3,))
    with pytest.raises(ValueError, match="off the grid"):
        smooth.certify(torch.tensor([0.5 + 0.3 / 255, 0.1, 0.2]), n0=10, n=20, alpha=0.1, generator=0)


def test_refuses_precisions_where_snapping_is_not_proven():
    with pytest.raises(ValueError, match="float32 or float64 model"):
        SnapToGrid(torch.nn.Linear(3, 2).half())
    with pytest.raises(ValueError, match="float32 or float64"):
        RoundedGaussian(0.25).check_dtype(torch.float16)
    with pytest.raises(ValueError, match="float32 or float64"):
        snap_to_indices(torch.zeros(3, dtype=torch.bfloat16), GRID_STEP)
    with pytest.raises(ValueError, match="step"):
        RoundedGaussian(0.25, step=0)
    with pytest.raises(ValueError, match="too large"):
        RoundedGaussian(200.0)
    with pytest.raises(ValueError, match="beyond"):  # far outside the grid's range
        snap_to_indices(torch.tensor([1e6]), GRID_STEP)


# -- certificates against exact oracles ---------------------------------------------------

def axis_probability(noise, margin):
    """Exact executed probability of F(n) = [n_0 >= theta] at m_0 = theta + margin: the table's
    mass of K_0 >= -margin."""
    pmf = executed_pmf(noise)
    half_width = noise.table.half_width
    return float(pmf[max(0, half_width - margin):].sum())


@pytest.mark.parametrize("margin", [0, 5, 30, 100])
def test_axis_oracle_radius_is_below_the_grid_distance_and_cohen_tight(margin):
    scale = 0.25
    noise = RoundedGaussian(scale)
    p = axis_probability(noise, margin)
    # the executed probability is within tau of the rounded-Gaussian one, Phi((margin + 1/2) s / sigma)
    assert abs(p - norm.cdf((margin + 0.5) * GRID_STEP / scale)) <= noise.table.tv + 1e-15
    radius = noise.radius(p, 2, CIFAR_DIM)
    # the nearest grid point of the other class moves coordinate 0 by margin + 1 steps
    assert radius < (margin + 1) * GRID_STEP
    # and the radius is Cohen's for the rounded classifier, whose boundary is half a step closer
    assert radius == pytest.approx((margin + 0.5) * GRID_STEP, abs=1e-9)


def test_two_dimensional_linear_oracle_every_grid_point_in_the_ball_keeps_the_class():
    scale, step = 0.25, 0.1
    noise = RoundedGaussian(scale, step)
    half_width = noise.table.half_width
    drawn = executed_pmf(noise)
    j = np.arange(-half_width, half_width + 1)
    ideal = norm.cdf((j + 0.5) * step / scale) - norm.cdf((j - 0.5) * step / scale)

    def law_of_k0_plus_2k1(pmf):
        doubled = np.zeros(4 * half_width + 1)
        doubled[::2] = pmf  # 2 K_1 on the even offsets
        return np.convolve(pmf, doubled), -3 * half_width  # values start at -J - 2J

    def top_probability(pmf, m):  # P(F(m + K) = 1) for F(n) = [n_0 + 2 n_1 >= 0]
        law, start = law_of_k0_plus_2k1(pmf)
        return law[max(0, -(m[0] + 2 * m[1]) - start):].sum()

    window = range(-12, 13)
    checked = 0
    for m in [(1, 0), (2, 1), (4, -1), (0, 3), (6, 2)]:
        p = top_probability(drawn, m)
        radius = noise.radius(p, 2, 2)
        assert radius > 0
        for a in window:
            for b in window:
                other = (m[0] + a, m[1] + b)
                if math.hypot(a * step, b * step) <= radius:
                    assert top_probability(ideal, other) > 0.5, (m, other, radius)
                    checked += 1
    assert checked > 20


def test_statistical_validity_overclaims_at_most_alpha():
    scale, margin, n, alpha, trials = 0.25, 60, 100, 0.05, 4000
    noise = RoundedGaussian(scale)
    p_true = axis_probability(noise, margin)
    exact_radius = (margin + 0.5) * GRID_STEP  # the smoothed rounded classifier's true l2 robustness
    counts = np.random.default_rng(4).binomial(n, p_true, size=trials)
    values, repeats = np.unique(counts, return_counts=True)
    overclaims = sum(int(times) for k, times in zip(values, repeats)
                     if noise.radius(clopper_pearson_lower(int(k), n, alpha), 2, CIFAR_DIM) > exact_radius)
    assert overclaims / trials <= alpha + 3 * math.sqrt(alpha * (1 - alpha) / trials)
    assert overclaims > 0  # the bound is not vacuous: it is reached about alpha of the time


def test_certify_end_to_end_on_a_linear_model_sees_only_grid_values():
    theta, margin = 100, 40
    seen = []

    class Threshold(torch.nn.Module):  # class 1 iff x_0 > (theta - 1/2) s, i.e. n_0 >= theta
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(()))

        def forward(self, z):
            seen.append(z)
            score = z[:, 0] - (theta - 0.5) * GRID_STEP
            return torch.stack((-score, score), dim=1)

    smooth = float_sound_smooth(Threshold(), 2, 0.12, input_shape=(4,))
    x = grid_value(torch.tensor([theta + margin, 7, 200, 255]), GRID_STEP, torch.float32)
    certificate = smooth.certify(x, n0=64, n=4000, alpha=0.001, batch_size=1000, generator=5)
    assert certificate.prediction == 1
    assert certificate.radius(2) == smooth.noise.radius(certificate.p_lower, 2, 4)
    assert 0 < certificate.radius(2) < (margin + 1) * GRID_STEP
    batches = torch.cat(seen)
    assert torch.equal(quantize(batches), batches)  # the model's inputs are canonical grid values
    assert batches.shape[0] == 64 + 4000


def test_radius_cost_against_the_continuous_gaussian_is_negligible():
    for scale in (0.12, 0.25, 0.5):
        sound, continuous = RoundedGaussian(scale), Gaussian(scale)
        for p in (0.9, 0.99, 0.999):
            ours, cohen = sound.radius(p, 2, CIFAR_DIM), continuous.radius(p, 2, CIFAR_DIM)
            assert ours < cohen and (cohen - ours) / cohen < 1e-8
        ours = sound.radius(0.9, 2, CIFAR_DIM, p_runner_up=0.05)
        assert ours < continuous.radius(0.9, 2, CIFAR_DIM, p_runner_up=0.05)
        assert sound.radius(0.5, 2, CIFAR_DIM) == 0.0
        assert sound.describe() == {
            "family": "rounded_gaussian", "scale": scale, "step": GRID_STEP, "float_sound": True,
            "table_bits": TABLE_BITS, "tv_per_coordinate": sound.table.tv,
        }

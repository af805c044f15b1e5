"""The pool of images in flight (core/pool.py): per-image noise streams that do not depend on
batching, the same rows for every batch size and pool size as one image at a time (with a
batch-invariant model), full forward batches, the same answers as Smooth.certify,
certify_radius and certify_grid for the same votes, validity through the pool, bad input."""

import math

import pytest
import torch

from ucan_smoothing import Anisotropic, ExpInf, Gaussian, Laplace, Smooth
from ucan_smoothing.core.grid import certify_grid, plan_grid
from ucan_smoothing.core.pool import (
    QUANTUM,
    CertifyJob,
    GridJob,
    ImageStream,
    QuantumCache,
    RadiusJob,
    certify_grid_pool,
    certify_pool,
    certify_radius_pool,
    plan_radius,
    quantum_seed,
    run_pool,
)
from ucan_smoothing.core.sequential import certify_radius, p_needed

from oracles import OneAxisThreshold, one_axis_p_top


class FirstCoordinates(torch.nn.Module):
    """Logits = the first three coordinates: elementwise, so its output for one input does not
    depend on the rest of the batch (batch-invariant), and it has three classes."""

    def forward(self, x):
        return x.reshape(len(x), -1)[:, :3].clone()


class Recording(torch.nn.Module):
    """Wraps a model and records the size and dtype of every forward batch."""

    def __init__(self, model):
        super().__init__()
        self.model, self.sizes, self.dtypes = model, [], []

    def forward(self, x):
        self.sizes.append(len(x))
        self.dtypes.append(x.dtype)
        return self.model(x)


SHAPE = (4,)
NOISE = Anisotropic(Gaussian(0.8), torch.tensor([1.0, 1.3, 0.7, 2.0]))
#: inputs from clear to undecided: different stage counts, so the images finish out of order
INPUTS = [
    (3, torch.tensor([2.0, 0.0, 0.1, 0.5])),
    (10, torch.tensor([0.3, 0.0, 0.1, 0.0])),
    (11, torch.tensor([0.0, 0.0, 0.0, 0.0])),
    (0, torch.tensor([0.0, 1.5, 0.2, -1.0])),
    (7, torch.tensor([0.1, 0.2, 1.0, 0.0])),
    (5, torch.tensor([0.05, 0.0, 0.6, 0.0])),
]
RADII = (0.0, 0.1, 0.3, 0.6, 1.2)
GRID = dict(n0=20, max_n=1000, stages=5, first=40)


def smooth_of(model=None):
    return Smooth(model or FirstCoordinates(), 3, NOISE, input_shape=SHAPE)


def jobs(smooth):
    """make_job for each mode, built directly from the job classes."""
    grid_plan = plan_grid(NOISE, RADII, 2, SHAPE, 0.01, max_n=1000, stages=5, first=40)
    radius_plan = plan_radius(NOISE, 0.3, 2, SHAPE, 0.01, max_n=1000, stages=5, first=40)
    return {
        "certify": lambda idx, xs: CertifyJob(NOISE, SHAPE, 20, 300, 0.01),
        "radius": lambda idx, xs: RadiusJob(radius_plan, 20, True),
        "grid": lambda idx, xs: GridJob(grid_plan, 20, True),
    }


def stream_votes(smooth, xs, idx, seed, start, stop):
    """Votes of samples start..stop-1 of image idx's stream, in one forward pass."""
    stream = ImageStream(smooth.noise, seed, idx, xs.shape[1:], xs.device, xs.dtype)
    logits = smooth.model(stream.draw(start, stop) + xs)
    return torch.bincount(logits.argmax(dim=1), minlength=smooth.num_classes)


def one_at_a_time(smooth, items, make_job, seed):
    """The reference: each image alone, each request in one forward pass."""
    rows = []
    for idx, x in items:
        xs = smooth.prepare(x, single=True)
        job, position = make_job(idx, xs), 0
        while (wanted := job.next_request()):
            job.update(stream_votes(smooth, xs, idx, seed, position, position + wanted))
            position += wanted
        rows.append((idx, job.result()))
    return rows


# -- noise streams -----------------------------------------------------------------------------------


def test_quantum_seeds_are_distinct_within_an_image_and_differ_between_images():
    seeds = {quantum_seed(0, 5, j) for j in range(100_000)}
    assert len(seeds) == 100_000 and all(0 <= s < 2**32 for s in seeds)
    assert len({quantum_seed(0, idx, 0) for idx in range(2000)}) == 2000
    assert quantum_seed(0, 5, 3) != quantum_seed(1, 5, 3)
    assert quantum_seed(2**40 + 7, 10**9, 3) == quantum_seed(2**40 + 7, 10**9, 3)


@pytest.mark.parametrize("noise", [Gaussian(0.5), Laplace(0.3), ExpInf(0.2), NOISE], ids=repr)
def test_a_stream_is_the_same_however_it_is_cut(noise):
    stream = ImageStream(noise, 4, 9, SHAPE, "cpu", torch.float32)
    whole = stream.draw(0, 5 * QUANTUM + 3)
    cuts = [0, 7, QUANTUM, QUANTUM + 1, 3 * QUANTUM - 1, 5 * QUANTUM + 3]
    parts = torch.cat([stream.draw(a, b) for a, b in zip(cuts, cuts[1:])])
    assert torch.equal(whole, parts)
    assert torch.equal(stream.draw(100, 101)[0], whole[100])
    other = ImageStream(noise, 4, 10, SHAPE, "cpu", torch.float32).draw(0, 5 * QUANTUM + 3)
    assert not torch.equal(whole, other)


@pytest.mark.parametrize("capacity", [1, 2, 8])
def test_a_cached_stream_gives_the_same_samples(capacity):
    plain = ImageStream(NOISE, 4, 9, SHAPE, "cpu", torch.float32)
    cache = QuantumCache(capacity)
    cached = ImageStream(NOISE, 4, 9, SHAPE, "cpu", torch.float32, cache)
    other = ImageStream(NOISE, 4, 10, SHAPE, "cpu", torch.float32, cache)  # competes for the cache
    cuts = [0, 7, 100, QUANTUM, QUANTUM + 1, 3 * QUANTUM - 1, 3 * QUANTUM + 50, 5 * QUANTUM + 3]
    for a, b in zip(cuts, cuts[1:]):
        assert torch.equal(cached.draw(a, b), plain.draw(a, b))
        other.draw(a // 2, a // 2 + 3)
        assert len(cache) <= capacity
    # a draw out of order (an earlier quantum again) is drawn afresh, the same
    assert torch.equal(cached.draw(5, 9), plain.draw(5, 9))


def test_the_pool_draws_each_quantum_once_when_batches_and_stages_cut_it(monkeypatch):
    drawn = []
    original = ImageStream._quantum

    def counting(self, j):
        drawn.append((self.start, j))
        return original(self, j)

    monkeypatch.setattr(ImageStream, "_quantum", counting)
    smooth = smooth_of()
    n0, n = 100, 1000  # n0 ends inside quantum 0; batches of 64 cut every quantum in four
    list(certify_pool(smooth, INPUTS[:2], n0, n, 0.01, seed=0, batch_size=64))
    per_image = {}
    for key in drawn:
        per_image[key] = per_image.get(key, 0) + 1
    assert len({start for start, _ in per_image}) == 2
    assert sorted({j for _, j in per_image}) == list(range(-(-(n0 + n) // QUANTUM)))
    assert set(per_image.values()) == {1}, per_image  # before the cache: every quantum 4-5 times


# -- the pool against one image at a time -------------------------------------------------------------


@pytest.mark.parametrize("mode", ["certify", "radius", "grid"])
def test_rows_do_not_depend_on_batch_size_or_pool_size(mode):
    smooth = smooth_of()
    make_job = jobs(smooth)[mode]
    reference = one_at_a_time(smooth, INPUTS, make_job, seed=3)
    assert len({repr(result) for _, result in reference}) > 1
    for batch_size, pool_size in [(7, 1), (7, 16), *((b, p) for b in (64, 1000) for p in (1, 3, 16, None))]:
        rows = list(run_pool(smooth, INPUTS, make_job, seed=3, batch_size=batch_size, pool_size=pool_size))
        assert [(row.idx, row.result) for row in rows] == reference, (batch_size, pool_size)
        assert all(row.seconds >= 0 for row in rows)


@pytest.mark.parametrize("mode", ["certify", "radius", "grid"])
def test_unordered_pool_yields_each_image_when_finished_with_the_same_results(mode):
    smooth = smooth_of()
    make_job = jobs(smooth)[mode]
    ordered = list(run_pool(smooth, INPUTS, make_job, seed=3, batch_size=1000))
    unordered = list(run_pool(smooth, INPUTS, make_job, seed=3, batch_size=1000, ordered=False))
    assert sorted((r.idx, repr(r.result)) for r in unordered) == sorted((r.idx, repr(r.result)) for r in ordered)
    if mode != "certify":  # the images finish after different numbers of stages: a fast one no longer waits
        assert [r.idx for r in unordered] != [r.idx for r in ordered]


def recorded_source(items, model, exhausted_at):
    """``items``, noting how many forward batches had run when the pool found no image left."""
    yield from items
    exhausted_at.append(len(model.sizes))


def test_batches_are_full_until_no_image_is_left_to_admit():
    model = Recording(FirstCoordinates())
    smooth = smooth_of(model)
    items = [(i, torch.tensor([0.2 * (i % 7), 0.1, 0.4 * (i % 3), 0.0])) for i in range(40)]
    exhausted_at = []
    rows = list(certify_grid_pool(smooth, recorded_source(items, model, exhausted_at), RADII, 2, 0.01, seed=1,
                                  batch_size=500, **GRID))
    assert [row.idx for row in rows] == list(range(40))  # in input order
    assert exhausted_at[0] > 3 and set(model.sizes[:exhausted_at[0]]) == {500}
    # then only the last images' remaining stages; a short batch holds every pending request, so
    # each image in flight moves on a stage: at most one short batch per stage (and the selection)
    stages = len(plan_grid(NOISE, RADII, 2, SHAPE, 0.01, max_n=GRID["max_n"], stages=GRID["stages"],
                           first=GRID["first"]).schedule)
    assert sum(size < 500 for size in model.sizes[exhausted_at[0]:]) <= stages + 1
    assert sum(model.sizes) == sum(row.result.samples_used for row in rows)
    # a small pool may leave batches short; the rows stay the same
    model.sizes.clear()
    small = list(certify_grid_pool(smooth, items, RADII, 2, 0.01, seed=1, batch_size=500, pool_size=2, **GRID))
    assert [row.result for row in small] == [row.result for row in rows]
    assert min(model.sizes[:-1]) < 500


def test_fixed_n_fills_batches_with_many_images():
    model = Recording(FirstCoordinates())
    items = [(i, torch.tensor([1.0, 0.0, 0.0, 0.0])) for i in range(30)]
    exhausted_at = []
    rows = list(certify_pool(smooth_of(model), recorded_source(items, model, exhausted_at), 20, 80, 0.01, seed=0,
                             batch_size=250))
    assert exhausted_at[0] >= 9 and set(model.sizes[:exhausted_at[0]]) == {250}
    assert sum(model.sizes) == 3000 and len(model.sizes) <= 14
    assert all(row.result.n == 80 and row.result.n0 == 20 for row in rows)


def test_noise_is_drawn_in_the_models_dtype():
    class Float64(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.unused = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
            self.inner = Recording(FirstCoordinates())

        def forward(self, x):
            return self.inner(x)

    model = Float64()
    list(certify_pool(smooth_of(model), INPUTS[:2], 10, 50, 0.01, seed=0, batch_size=64))
    assert set(model.inner.dtypes) == {torch.float64}


# -- the same answers as the library functions for the same votes --------------------------------------


class StreamVotes:
    """Stands in for Smooth.count_votes: the votes of the next samples of one image's stream."""

    def __init__(self, smooth, idx, seed):
        self.smooth, self.idx, self.seed, self.position = smooth, idx, seed, 0
        self.count_votes = smooth.count_votes

    def __call__(self, xs, num, batch_size, generator=None, progress=False):
        assert len(xs) == 1
        votes = stream_votes(self.smooth, xs, self.idx, self.seed, self.position, self.position + num)
        self.position += num
        return votes[None]


def library_answer(mode, smooth, idx, x, seed):
    smooth.count_votes = StreamVotes(smooth, idx, seed)
    try:
        if mode == "certify":
            return smooth.certify(x, 20, 300, 0.01)
        if mode == "radius":
            return certify_radius(smooth, x, 0.3, 2, 0.01, **GRID)
        return certify_grid(smooth, x, RADII, 2, 0.01, **GRID)
    finally:
        del smooth.count_votes


@pytest.mark.parametrize("mode", ["certify", "radius", "grid"])
def test_the_pool_answers_as_smooth_certify_certify_radius_and_certify_grid(mode):
    smooth = smooth_of()
    expected = [library_answer(mode, smooth, idx, x, seed=8) for idx, x in INPUTS]
    run = {
        "certify": lambda: certify_pool(smooth, INPUTS, 20, 300, 0.01, seed=8, batch_size=100),
        "radius": lambda: certify_radius_pool(smooth, INPUTS, 0.3, 2, 0.01, seed=8, batch_size=100, **GRID),
        "grid": lambda: certify_grid_pool(smooth, INPUTS, RADII, 2, 0.01, seed=8, batch_size=100, **GRID),
    }[mode]
    assert [row.result for row in run()] == expected


def test_betting_through_the_pool():
    smooth = smooth_of()
    options = dict(n0=20, max_n=1000, first=40, method="betting")
    expected = []
    for idx, x in INPUTS:
        smooth.count_votes = StreamVotes(smooth, idx, 2)
        expected.append(certify_radius(smooth, x, 0.3, 2, 0.01, **options))
        del smooth.count_votes
    rows = certify_radius_pool(smooth, INPUTS, 0.3, 2, 0.01, seed=2, batch_size=64, **options)
    assert [row.result for row in rows] == expected


# -- validity through the pool -----------------------------------------------------------------------


def test_over_claim_rate_through_the_pool_is_at_most_alpha():
    """Many images (distinct streams) at one input whose exact radius is just below a grid point,
    anisotropic Gaussian noise with the decisive axis the narrowest (a tight certificate)."""
    from scipy import stats

    sigma = torch.tensor([0.8, 1.0, 2.0])
    noise, alpha, images = Anisotropic(Gaussian(0.5), sigma), 0.05, 400
    smooth = Smooth(OneAxisThreshold(0.0), 2, noise, input_shape=(3,))
    grid_point = 0.4
    gap = 0.5 * 0.8 * stats.norm.ppf(p_needed(noise, grid_point, 2, (3,)) - 0.003)  # true radius
    assert one_axis_p_top(Gaussian(0.5), gap, 0.8, 3) == pytest.approx(p_needed(noise, grid_point, 2, (3,)) - 0.003)
    items = [(i, torch.tensor([gap, 0.0, 0.0])) for i in range(images)]
    grid = list(certify_grid_pool(smooth, items, [0.1, grid_point], 2, alpha, seed=0, n0=10, max_n=1000,
                                  stages=4, first=50, batch_size=4096))
    fixed = list(certify_pool(smooth, items, 10, 1000, alpha, seed=1, batch_size=4096))
    tolerance = stats.binom.ppf(1 - 1e-3, images, alpha)
    assert sum(row.result.certified_radius > gap for row in grid) <= tolerance
    assert sum(row.result.radius(2) > gap for row in fixed) <= tolerance
    assert sum(row.result.certified[0] for row in grid) > 0.9 * images  # 0.1 is well inside


# -- bad input ---------------------------------------------------------------------------------------


def test_bad_input_is_refused_before_anything_runs():
    smooth = smooth_of()
    never = (None for _ in ())  # an empty source: errors must not wait for an image
    with pytest.raises(ValueError, match="strictly increasing"):
        certify_grid_pool(smooth, never, [0.5, 0.2], 2, 0.01, seed=0)
    with pytest.raises(ValueError, match="radius must be finite and > 0"):
        certify_radius_pool(smooth, never, -1.0, 2, 0.01, seed=0)
    with pytest.raises(ValueError, match="n=3 is too small"):
        certify_pool(smooth, never, 10, 3, 0.01, seed=0)
    with pytest.raises(ValueError, match="batch_size"):
        certify_pool(smooth, never, 10, 100, 0.01, seed=0, batch_size=0)
    with pytest.raises(TypeError, match="seed"):
        certify_pool(smooth, never, 10, 100, 0.01, seed=True)
    with pytest.raises(TypeError, match="fixed noise for a Smooth"):
        run_pool(object(), never, None, seed=0)


def test_bad_images_are_refused():
    smooth = Smooth(FirstCoordinates(), 3, Gaussian(0.5))
    twice = [(1, torch.zeros(4)), (1, torch.ones(4))]
    with pytest.raises(ValueError, match="image index 1 appears twice"):
        list(certify_pool(smooth, twice, 10, 100, 0.01, seed=0))
    shapes = [(1, torch.zeros(4)), (2, torch.zeros(5))]
    with pytest.raises(ValueError, match=r"image 2 has shape \(5,\) but the images before it \(4,\)"):
        list(certify_pool(smooth, shapes, 10, 100, 0.01, seed=0, batch_size=10))
    with pytest.raises(ValueError, match="NaN or inf"):
        list(certify_pool(smooth, [(0, torch.tensor([math.nan, 0, 0, 0]))], 10, 100, 0.01, seed=0))


def test_bad_model_output_is_refused():
    class NaNLogits(torch.nn.Module):
        def forward(self, x):
            return torch.full((len(x), 3), math.nan)

    class TwoLogits(torch.nn.Module):
        def forward(self, x):
            return x.reshape(len(x), -1)[:, :2]

    with pytest.raises(ValueError, match="NaN logits"):
        list(certify_pool(Smooth(NaNLogits(), 3, Gaussian(0.5)), INPUTS[:1], 10, 100, 0.01, seed=0))
    with pytest.raises(ValueError, match=r"expected \(10, 3\) logits"):
        list(certify_pool(Smooth(TwoLogits(), 3, Gaussian(0.5)), INPUTS[:1], 10, 100, 0.01, seed=0, batch_size=64))

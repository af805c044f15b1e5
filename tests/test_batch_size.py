"""The batch-size probe picks the fastest size from its measurements.

The fake model advances a simulated clock by a cost that depends on the batch
size, so which size is fastest is known and nothing depends on wall-clock time.
"""

import pytest
import torch

from ucan_smoothing.core import batch_size as probe
from ucan_smoothing.core.batch_size import fastest_batch_size
from ucan_smoothing.core.noises import Gaussian

CANDIDATES = [16, 32, 64, 128, 256]


class SimulatedClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class CostModel(torch.nn.Module):
    """Costs ``fixed_s`` per call plus ``per_sample_s`` per sample, ten times more per sample
    above ``cache_limit`` (as when a batch no longer fits in the caches); ``oom_above``:
    sizes above it run out of memory."""

    def __init__(self, clock, fixed_s=0.005, per_sample_s=5e-5, cache_limit=64, oom_above=None, disturbed=None,
                 slow_calls=None):
        super().__init__()
        self.clock, self.fixed_s, self.per_sample_s = clock, fixed_s, per_sample_s
        self.cache_limit, self.oom_above = cache_limit, oom_above
        #: {size: k}: the calls at ``size`` after the k-th run three times slower (another process)
        self.disturbed, self.calls = disturbed or {}, {}
        #: {size: calls}: these calls at ``size`` (1 = its first) run three times slower (a passing disturbance)
        self.slow_calls = slow_calls or {}
        self.inputs = []

    def cost(self, size):
        per_sample = self.per_sample_s * (1 if size <= self.cache_limit else 10)
        return self.fixed_s + per_sample * size

    def forward(self, z):
        size = z.shape[0]
        if self.oom_above is not None and size > self.oom_above:
            raise torch.cuda.OutOfMemoryError("simulated: out of memory")
        self.inputs.append(z.clone())
        self.calls[size] = self.calls.get(size, 0) + 1
        slow = self.calls[size] > self.disturbed.get(size, float("inf")) or self.calls[size] in self.slow_calls.get(size, ())
        slowdown = 3 if slow else 1
        self.clock.now += slowdown * self.cost(size)
        return torch.zeros(size, 3)


@pytest.fixture
def clock(monkeypatch):
    simulated = SimulatedClock()
    monkeypatch.setattr(probe, "_clock", simulated)
    return simulated


def sizes_measured(measurements):
    return [m["batch_size"] for m in measurements]


def test_returns_the_fastest_candidate_and_records_every_measurement(clock):
    model = CostModel(clock)
    best, measurements = fastest_batch_size(model, Gaussian(0.5), torch.zeros(1, 4, 4),
                                            candidates=CANDIDATES, budget_s=100.0)
    assert best == 64  # the largest size that still fits in the simulated caches
    # growth stops at the clear fall (128, measured twice to confirm it); then two more rounds, in
    # alternating order
    assert sizes_measured(measurements) == [16, 32, 64, 128, 128, 128, 64, 32, 16, 16, 32, 64, 128]
    for m in measurements:
        calls = m["samples"] // m["batch_size"]
        assert m["samples"] == calls * m["batch_size"] and calls >= 1
        assert m["seconds"] == pytest.approx(calls * model.cost(m["batch_size"]))
        assert m["samples_per_s"] == pytest.approx(m["samples"] / m["seconds"])


def test_a_size_slowed_down_by_another_process_in_most_repeats_is_still_found(clock):
    # 64 is fastest, but only its first timed measurement (calls 2 to 4) is undisturbed:
    # its median falls below 32's, its fastest repeat does not
    model = CostModel(clock, disturbed={64: 4})
    best, measurements = fastest_batch_size(model, Gaussian(0.5), torch.zeros(1, 4, 4),
                                            candidates=CANDIDATES, budget_s=100.0)
    rates_64 = sorted(m["samples_per_s"] for m in measurements if m["batch_size"] == 64)
    rates_32 = [m["samples_per_s"] for m in measurements if m["batch_size"] == 32]
    assert rates_64[1] < min(rates_32) < rates_64[2]
    assert best == 64


def test_a_passing_disturbance_of_one_measurement_does_not_end_the_growth(clock):
    # calls 2-4 at 32 run three times slower: the first timed measurement (calls 2-3) looks like a
    # clear fall below 16; measured again (calls 4-5) it is not, and the growth goes on to 64
    model = CostModel(clock, slow_calls={32: {2, 3, 4}})
    best, measurements = fastest_batch_size(model, Gaussian(0.5), torch.zeros(1, 4, 4),
                                            candidates=CANDIDATES, budget_s=100.0)
    assert sizes_measured(measurements)[:3] == [16, 32, 32]
    first_32, second_32 = (m["samples_per_s"] for m in measurements[1:3])
    assert first_32 < probe.CLEAR_FALL * measurements[0]["samples_per_s"] < second_32
    assert best == 64


def test_steadily_rising_throughput_tries_every_candidate(clock):
    model = CostModel(clock, cache_limit=10**6)
    best, measurements = fastest_batch_size(model, Gaussian(0.5), torch.zeros(1, 4, 4),
                                            candidates=CANDIDATES, budget_s=100.0, repeats=1)
    assert best == 256
    assert sizes_measured(measurements) == CANDIDATES


def test_the_budget_ends_the_growth(clock):
    model = CostModel(clock, cache_limit=10**6)
    best, measurements = fastest_batch_size(model, Gaussian(0.5), torch.zeros(1, 4, 4),
                                            candidates=CANDIDATES, budget_s=0.1)
    assert best in CANDIDATES
    assert 256 not in sizes_measured(measurements)
    assert clock.now < 0.2  # at most one size's warm-up and timed call past the budget


def test_out_of_memory_ends_the_growth_and_the_sizes_that_fit_are_kept(clock):
    model = CostModel(clock, cache_limit=10**6, oom_above=64)
    best, measurements = fastest_batch_size(model, Gaussian(0.5), torch.zeros(1, 4, 4),
                                            candidates=CANDIDATES, budget_s=100.0)
    assert best == 64
    assert set(sizes_measured(measurements)) == {16, 32, 64}


def test_out_of_memory_at_the_smallest_size_is_raised(clock):
    model = CostModel(clock, oom_above=8)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        fastest_batch_size(model, Gaussian(0.5), torch.zeros(1, 4, 4), candidates=CANDIDATES)


def test_the_model_sees_the_image_plus_noise_from_the_probes_own_stream(clock):
    model = CostModel(clock)
    x = torch.full((1, 4, 4), 0.25)
    state = torch.get_rng_state()
    fastest_batch_size(model, Gaussian(0.5), x, candidates=[128], budget_s=100.0, repeats=1)
    assert torch.equal(torch.get_rng_state(), state)  # the global stream is not consumed
    seen = torch.cat(model.inputs)
    assert seen.shape[1:] == x.shape
    assert seen.mean().item() == pytest.approx(0.25, abs=0.02)
    assert seen.std().item() == pytest.approx(0.5, rel=0.05)


def test_the_default_candidates_depend_on_the_device():
    assert max(probe.default_candidates("cpu")) == 1024
    assert max(probe.default_candidates("cuda")) >= 4096


@pytest.mark.parametrize("candidates", [[], [0, 16], [16.0], [True]])
def test_bad_candidates_are_refused(candidates):
    with pytest.raises(ValueError, match="positive integers"):
        fastest_batch_size(torch.nn.Identity(), Gaussian(0.5), torch.zeros(1, 2, 2), candidates=candidates)


def test_a_real_model_gets_one_of_the_candidates():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3)).eval()
    best, measurements = fastest_batch_size(model, Gaussian(0.5), torch.zeros(1, 4, 4), candidates=[8, 32],
                                            budget_s=0.5)
    assert best in (8, 32)
    assert {m["batch_size"] for m in measurements} <= {8, 32}
    assert all(m["samples_per_s"] > 0 for m in measurements)

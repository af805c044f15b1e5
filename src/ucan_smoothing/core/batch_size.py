"""The forward batch size at which a model runs fastest, found by a short probe.

Throughput depends on the batch size far more than one would guess: on a
2-core CPU the MNIST CNN runs about five times faster at batch 32-64 than at
1,000 (caches), while a GPU needs thousands of samples per batch to fill.
:func:`fastest_batch_size` times what ``Smooth.count_votes`` does per batch
(draw the noise, add the image, run the model, take the argmax) for a few
sizes and returns the one with the most samples per second.

The probe weakens no guarantee: it draws its noise from its own generator,
not from any image's stream, and a batch size chosen by timing says nothing
about the votes. It can change the votes themselves, though: the batch size
decides how an image's stream is cut into draws, and torch's generators do
not always give one draw of ``2b`` values the values of two draws of ``b``
(CUDA's Philox offsets advance per call; on a CPU draws whose sizes are not
multiples of 16 differ). A run is reproduced exactly at the batch size it
recorded.
"""

from __future__ import annotations

import time

import torch

CPU_CANDIDATES = (8, 16, 32, 64, 128, 256, 512, 1024)
GPU_CANDIDATES = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
#: a size measured twice below this fraction of the best so far ends the growth (once is not
#: enough: one short measurement slowed by another process would stop the probe at a small size)
CLEAR_FALL = 0.7
#: timed calls at one size last at least this long, so tiny batches are not timed one call at a time
MIN_MEASUREMENT_S = 0.02
_clock = time.perf_counter  # replaced by a simulated clock in the tests


def default_candidates(device) -> tuple:
    """The sizes tried on ``device``: large ones on a GPU, small ones on a CPU."""
    return GPU_CANDIDATES if torch.device(device).type == "cuda" else CPU_CANDIDATES


def fastest_batch_size(model, noise, x, *, candidates=None, budget_s: float = 2.0, repeats: int = 3,
                       device=None, seed: int = 0):
    """The batch size (one of ``candidates``) at which ``model(x + noise)`` processes the
    most samples per second, and every measurement made: ``(best, measurements)``.

    ``model`` is the classifier certify calls, ``noise`` the noise of the image ``x``
    (one input, no batch dimension; e.g. the first image to certify). Sizes are
    tried in increasing order; the growth stops at a clear fall in throughput (seen in two
    measurements of the same size), at
    the first size that does not fit in GPU memory, or when ``budget_s`` is spent.
    Then each size tried is measured again, in alternating order, up to
    ``repeats`` times within the budget; the best is the size with the highest
    rate among its repeats (other processes only ever slow a measurement down,
    so the fastest repeat is the least disturbed one).
    Each measurement is a dict with ``batch_size``, ``samples``, ``seconds`` and
    ``samples_per_s``.
    """
    candidates = sorted(set(default_candidates(device or _device_of(model, x)) if candidates is None else candidates))
    if not candidates or any(not isinstance(size, int) or isinstance(size, bool) or size < 1 for size in candidates):
        raise ValueError(f"batch size candidates must be positive integers, got {candidates!r}")
    if budget_s <= 0:
        raise ValueError(f"budget_s must be positive, got {budget_s}")
    device = torch.device(device) if device is not None else _device_of(model, x)
    x = x.to(device)
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    deadline = _clock() + budget_s

    def one_batch(size):
        noisy = noise.sample((size, *x.shape), generator=generator, device=device, dtype=x.dtype)
        noisy += x
        model(noisy).argmax(dim=1)

    def measure(size):
        """Samples per second at ``size``, over calls lasting at least MIN_MEASUREMENT_S."""
        _synchronize(device)
        start, calls = _clock(), 0
        while True:
            one_batch(size)
            calls += 1
            _synchronize(device)
            seconds = _clock() - start
            if seconds >= MIN_MEASUREMENT_S:
                break
        measurements.append({"batch_size": size, "samples": calls * size, "seconds": seconds,
                             "samples_per_s": calls * size / seconds})
        return calls * size / seconds

    measurements, tried, best_rate, last_rate = [], [], 0.0, 0.0
    with torch.inference_mode():
        for size in candidates:
            if tried and _clock() + 2 * size / last_rate > deadline:
                break  # its warm-up and one timed call would not fit in the budget
            try:
                one_batch(size)  # warm-up: kernels and buffers of this shape
                rate = measure(size)
            except torch.cuda.OutOfMemoryError:
                if not tried:
                    raise
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                break
            if rate < CLEAR_FALL * best_rate and _clock() < deadline:
                rate = max(rate, measure(size))  # confirm the fall: other processes only slow a measurement
            tried.append(size)
            last_rate, best_rate = rate, max(best_rate, rate)
            if rate < CLEAR_FALL * best_rate or _clock() >= deadline:
                break
        for repeat in range(1, repeats):
            for size in (reversed(tried) if repeat % 2 else tried):
                if _clock() >= deadline:
                    break
                measure(size)
    best = max(tried, key=lambda size: _best_rate(measurements, size))
    return best, measurements


def _best_rate(measurements, size) -> float:
    return max(m["samples_per_s"] for m in measurements if m["batch_size"] == size)


def _device_of(model, x) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else x.device


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)

"""Many images in flight: full forward batches whatever the stage sizes, one noise stream per image.

A sequential test asks for a few hundred samples per image at first; run one
image at a time, most of a GPU batch would be empty. :func:`run_pool` keeps a
pool of undecided images and fills every forward batch with ``batch_size``
samples drawn across them: the image admitted first is served first, an image
whose stage is complete advances its test and asks for the next stage, new
images are admitted while the pending requests cannot fill a batch, and a
finished image leaves (so only the last images' final stages, once no image
is left to admit, run in short batches). The same pool serves fixed-n CERTIFY
(:func:`certify_pool`: many small-n images per batch), one radius
(:func:`certify_radius_pool`) and a grid of radii (:func:`certify_grid_pool`).

Noise streams. Sample ``s`` of image ``idx`` depends on ``(seed, idx, s)`` only.
The stream of an image is cut into quanta of ``QUANTUM`` samples; quantum ``j``
is always drawn whole, as one ``noise.sample((QUANTUM, *shape))`` call, from its
own ``torch.Generator`` (on the model's device) seeded with
:func:`quantum_seed`; a batch that needs part of a quantum draws it whole and
keeps the part. So the noise of every sample is bit-identical whatever the
batch size, the pool size, the stage sizes, the other images sharing its
batches or the number of processes (for the same noise, input shape, dtype,
device type and torch version). Selection and estimation take consecutive,
disjoint parts of the stream, so the estimation never reuses a selection
sample. The guarantees of the tests (sequential.py, grid.py) need each
image's samples to be i.i.d.: distinct quanta of one image get distinct
seeds (:func:`quantum_seed` is injective in ``j``), which is the usual
assumption that distinct seeds give independent streams, the one
``image_generator`` makes for distinct images.

What is and is not identical. Given the noise, a row depends only on the
model's votes for that image's noisy inputs. A model whose output for one
input does not depend on the rest of its batch (an elementwise or float64
model, the tests' oracles) gives bit-identical rows for every batch size and
pool size, the same as one image at a time. A real network's kernels may
change with the batch size or composition, so its logits may differ in the
last bits; a vote then changes only where the top two logits are that close
(a tie broken by rounding), and a row only through such votes.

Memory does not grow with ``n``: only vote counts are kept, plus one input
and one test per image in flight, and at most ``max(2, ceil(batch / QUANTUM))``
quanta left part-used (:class:`QuantumCache`: a stream whose draw ends inside a
quantum continues it next time instead of drawing it again; about one batch of
noise for batches of 512 and more, two quanta below that).
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch

from .certificate import ABSTAIN, Certificate
from .grid import GridPlan, plan_grid
from .norms import parse_norm
from .sequential import (
    DEFAULT_STAGES,
    Betting,
    RadiusDecision,
    StagedClopperPearson,
    _check_method,
    check_budget,
    geometric_schedule,
    p_needed,
)
from .smooth import Smooth
from .statistics import check_alpha, check_can_certify, check_count, clopper_pearson_lower, predict_is_significant

#: samples per quantum of an image's noise stream; part of the stream's definition (changing it
#: changes the samples). Each quantum costs one ``noise.sample`` call (a few kernel launches and
#: the noise's Python checks), and a request that ends inside a quantum draws it whole: 256 keeps
#: the first cost small per sample and the second small next to stages of hundreds of samples.
QUANTUM = 256

_MASK32 = 0xFFFFFFFF


# -- noise streams -------------------------------------------------------------------------------


def _fmix32(h: int) -> int:
    """MurmurHash3's finaliser: a bijection of the 32-bit integers that mixes every bit."""
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & _MASK32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & _MASK32
    return h ^ (h >> 16)


def _image_key(seed: int, idx: int) -> tuple:
    """Two 32-bit numbers from ``(seed, idx)``: a start and an odd step."""
    digest = hashlib.blake2b(f"ucan-stream:{int(seed)}:{int(idx)}".encode(), digest_size=8).digest()
    start, step = int.from_bytes(digest[:4], "little"), int.from_bytes(digest[4:], "little")
    return start, step | 1


def quantum_seed(seed: int, idx: int, quantum: int) -> int:
    """The 32-bit seed of quantum ``quantum`` of image ``idx`` (PyTorch's CPU generator keeps only
    32 bits of a seed). For one image, ``quantum -> seed`` is injective for ``quantum < 2**32``: the
    start plus ``quantum`` odd steps modulo ``2**32``, then a bijective mix."""
    start, step = _image_key(seed, idx)
    return _fmix32((start + quantum * step) & _MASK32)


class QuantumCache:
    """Quanta drawn but not used to their end, kept for the draw that continues them.

    A batch smaller than a quantum, or a stage that ends inside one, would otherwise
    draw the same quantum again for the next samples of the stream (at batch 128 every
    quantum twice). At most ``capacity`` quanta are kept, the least recently kept
    dropped first (``for_batch``: ``max(2, ceil(batch / QUANTUM))``, so about one batch
    of noise, or two quanta for batches under ``2 * QUANTUM``); a dropped
    quantum is drawn again, bit-identical, so the cache changes the cost, never a sample.
    """

    def __init__(self, capacity: int):
        self.capacity = max(1, int(capacity))
        self._entries: OrderedDict = OrderedDict()

    @classmethod
    def for_batch(cls, batch_size: int) -> "QuantumCache":
        return cls(max(2, -(-batch_size // QUANTUM)))

    def take(self, key):
        return self._entries.pop(key, None)

    def keep(self, key, quantum: torch.Tensor) -> None:
        self._entries[key] = quantum
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


class ImageStream:
    """The noise stream of one image: ``draw(start, stop)`` gives its samples ``start..stop-1``.

    With a :class:`QuantumCache` (the pool shares one among its images), a quantum left
    part-used by one draw is continued by the next instead of drawn again."""

    def __init__(self, noise, seed: int, idx: int, shape: tuple, device, dtype, cache: QuantumCache | None = None):
        self.noise, self.shape, self.device, self.dtype = noise, tuple(shape), torch.device(device), dtype
        self.start, self.step = _image_key(seed, idx)
        self.cache = cache

    def _quantum(self, j: int) -> torch.Tensor:
        generator = torch.Generator(device=self.device)
        generator.manual_seed(_fmix32((self.start + j * self.step) & _MASK32))
        return self.noise.sample((QUANTUM, *self.shape), generator=generator, device=self.device, dtype=self.dtype)

    def draw_into(self, out: torch.Tensor, start: int, stop: int) -> None:
        """Write samples ``start..stop-1`` into ``out`` (``stop - start`` rows)."""
        offset = 0
        for j in range(start // QUANTUM, (stop - 1) // QUANTUM + 1):
            low, high = max(start, j * QUANTUM), min(stop, (j + 1) * QUANTUM)
            quantum = self.cache.take((self, j)) if self.cache is not None else None
            if quantum is None:
                quantum = self._quantum(j)
            out[offset:offset + high - low] = quantum[low - j * QUANTUM:high - j * QUANTUM]
            if self.cache is not None and high < (j + 1) * QUANTUM:
                self.cache.keep((self, j), quantum)  # the stream's next draw starts at ``high``
            offset += high - low

    def draw(self, start: int, stop: int) -> torch.Tensor:
        out = torch.empty((stop - start, *self.shape), device=self.device, dtype=self.dtype)
        self.draw_into(out, start, stop)
        return out


# -- jobs: what one image asks of the pool ------------------------------------------------------
#
# A job is one image's procedure as a sequence of requests: ``next_request()`` is the number of
# FRESH samples it wants next (0 when finished), ``update(votes)`` takes their vote counts (a
# CPU int64 tensor, one entry per class), ``result()`` is its answer once finished.


class StagedJob:
    """Selection on ``n0`` samples (the most voted class), then ``new_test(cls, selection_votes)``
    fed through the cumulative ``schedule`` until it is done, as ``run_stages`` does."""

    def __init__(self, n0: int, schedule, new_test):
        self.n0, self.schedule, self.new_test = n0, tuple(schedule), new_test
        self.selection = self.test = None
        self.stage = 0

    def next_request(self) -> int:
        if self.selection is None:
            return self.n0
        if self.test.done or self.stage == len(self.schedule):
            return 0
        return self.schedule[self.stage] - (self.schedule[self.stage - 1] if self.stage else 0)

    def update(self, votes) -> None:
        if self.selection is None:
            self.selection = votes
            self.test = self.new_test(int(votes.argmax()), votes)  # first maximum, as Smooth.certify
        else:
            self.test.update(votes)
            self.stage += 1

    def result(self):
        return self.test


class _FixedCount:
    """The estimation of CERTIFY: one stage of ``n`` votes."""

    def __init__(self, cls: int):
        self.cls, self.hits, self.n, self.done = cls, 0, 0, False

    def update(self, votes) -> None:
        self.hits, self.n, self.done = int(votes[self.cls]), int(votes.sum()), True


class CertifyJob(StagedJob):
    """Cohen's CERTIFY with ``n0`` selection and ``n`` estimation samples: the same
    :class:`Certificate` as ``Smooth.certify`` gives for the same votes."""

    def __init__(self, noise, input_shape, n0: int, n: int, alpha: float):
        super().__init__(n0, (n,), lambda cls, _: _FixedCount(cls))
        self.noise, self.input_shape, self.alpha = noise, tuple(input_shape), alpha

    def result(self) -> Certificate:
        test = self.test
        p_lower = clopper_pearson_lower(test.hits, test.n, self.alpha)
        abstain = p_lower <= 0.5
        return Certificate(
            prediction=ABSTAIN if abstain else test.cls,
            p_lower=p_lower,
            norm=self.noise.primary_norm,
            regions=() if abstain else tuple(self.noise.regions(p_lower, self.input_shape)),
            is_certificate=self.noise.is_certificate,
            n0=self.n0,
            n=test.n,
            alpha=self.alpha,
            top_count=test.hits,
        )


@dataclass(frozen=True)
class RadiusPlan:
    """One radius's threshold and stages, checked (as ``certify_radius`` checks them)."""

    radius: float
    norm: float
    alpha: float
    method: str
    threshold: float
    schedule: tuple


def plan_radius(noise, radius, norm, input_shape, alpha, *, max_n=100_000, stages=None, first=100,
                method="cp", n_name: str = "max_n") -> RadiusPlan:
    """The checked plan of one radius; ``n_name`` names the sample budget in messages (``--n``)."""
    alpha = check_alpha(alpha)
    method = _check_method(method)
    norm = parse_norm(norm)
    threshold = p_needed(noise, radius, norm, tuple(input_shape))
    schedule = geometric_schedule(max_n, DEFAULT_STAGES[method] if stages is None else stages, first)
    check_budget(method, schedule, threshold, alpha, float(radius), n_name=n_name, stages_hint=n_name == "max_n")
    return RadiusPlan(float(radius), norm, alpha, method, threshold, schedule)


class RadiusJob(StagedJob):
    """Is the image certified at one radius? The test of ``certify_radius`` (staged
    Clopper-Pearson or betting), giving the same :class:`RadiusDecision` for the same votes."""

    def __init__(self, plan: RadiusPlan, n0: int, is_certificate: bool):
        self.plan, self.is_certificate = plan, is_certificate
        super().__init__(n0, plan.schedule, self._new_test)

    def _new_test(self, cls, selection):
        plan = self.plan
        if plan.method == "cp":
            stage_alphas = [plan.alpha / len(plan.schedule)] * len(plan.schedule)
            return StagedClopperPearson(cls, plan.threshold, plan.schedule, stage_alphas)
        return Betting(cls, plan.threshold, plan.alpha, prior=(int(selection[cls]), self.n0))

    def result(self) -> RadiusDecision:
        test, plan = self.test, self.plan
        return RadiusDecision(
            decision=test.certified,
            prediction=test.cls if test.certified else ABSTAIN,
            radius=plan.radius,
            norm=plan.norm,
            alpha=plan.alpha,
            p_needed=plan.threshold,
            p_lower=test.p_lower,
            samples_used=self.n0 + test.n,
            n0=self.n0,
            n=test.n,
            top_count=test.hits,
            selected=test.cls,
            stages_run=test.stages_run,
            method=plan.method,
            is_certificate=self.is_certificate,
        )


class GridJob(StagedJob):
    """The largest certified radius of a grid (:mod:`.grid`): a :class:`~.grid.GridDecision`."""

    def __init__(self, plan: GridPlan, n0: int, is_certificate: bool):
        self.plan, self.is_certificate = plan, is_certificate
        super().__init__(n0, plan.schedule, lambda cls, _: plan.new_test(cls))

    def result(self):
        return self.plan.decision(self.test, self.n0, self.is_certificate)


@dataclass(frozen=True)
class Prediction:
    """Cohen's PREDICT for one input: the top class of ``n`` samples, or ``ABSTAIN`` when the
    two-sided binomial test of its votes against the runner-up's is not significant at ``alpha``
    (then a returned class is wrong with probability at most ``alpha``)."""

    prediction: int
    top_class: int
    top_count: int
    runner_up_count: int
    n: int
    alpha: float

    @property
    def abstained(self) -> bool:
        return self.prediction == ABSTAIN


class PredictJob:
    """Cohen's PREDICT: one request of ``n`` samples (no separate selection: the test is on the counts)."""

    def __init__(self, n: int, alpha: float):
        self.n, self.alpha, self.votes = n, alpha, None

    def next_request(self) -> int:
        return self.n if self.votes is None else 0

    def update(self, votes) -> None:
        self.votes = votes

    def result(self) -> Prediction:
        top2 = self.votes.topk(2)
        n_a, n_b = int(top2.values[0]), int(top2.values[1])
        top = int(top2.indices[0])
        significant = predict_is_significant(n_a, n_b, self.alpha)
        return Prediction(top if significant else ABSTAIN, top, n_a, n_b, self.n, self.alpha)


# -- the pool ------------------------------------------------------------------------------------


class PoolResult(NamedTuple):
    """One finished image: its index, its job's result, and the seconds attributed to it (its
    share of each forward batch's wall time, by samples, plus its test's own updates)."""

    idx: int
    result: object
    seconds: float


@dataclass(eq=False)
class _Slot:
    idx: int
    x: torch.Tensor  # (1, *shape) on the model's device
    job: object
    stream: ImageStream
    position: int = 0  # samples of the stream used so far
    remaining: int = 0  # samples still to draw for the job's current request
    votes: torch.Tensor | None = None  # votes of the current request so far
    seconds: float = 0.0
    finished: bool = False
    result: object = field(default=None, repr=False)


def run_pool(smooth, items, make_job, *, seed: int, batch_size: int = 1000, pool_size: int | None = None,
             on_batch=None, ordered: bool = True):
    """Run ``make_job(idx, x)`` for every ``(idx, x)`` of ``items`` (``x`` one input, all of one
    shape); yields a :class:`PoolResult` per image, in the order of ``items`` (``ordered``), or
    each as soon as it is finished (``ordered=False``: what a long run writes, so that an interruption
    loses no finished image waiting behind a slow one). Each image's result is the same either way.

    Every forward batch holds exactly ``batch_size`` samples until no image is left to admit;
    then the last images' remaining stages run in the batches they fill (a stage waits for the
    votes of the one before). A ``pool_size`` (default: as many images as it takes, at most
    ``batch_size``) can also leave a batch short, when that many images are in flight and ask
    for fewer samples. Image ``idx`` draws its noise from its own stream of ``(seed, idx)`` (module
    docstring). ``make_job`` gets ``x`` checked and on the model's device with a batch dimension.
    ``on_batch(size)``, if given, is called after each forward batch.
    """
    if not isinstance(smooth, Smooth):
        raise TypeError(
            f"the pool draws fixed noise for a Smooth, got {type(smooth).__name__} (its noise may depend on "
            "the input: certify it with its own methods)"
        )
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}")
    batch_size = check_count("batch_size", batch_size)
    pool_size = batch_size if pool_size is None else check_count("pool_size", pool_size)
    return _Pool(smooth, items, make_job, seed, batch_size, pool_size, on_batch, ordered).results()


class _Pool:
    def __init__(self, smooth, items, make_job, seed, batch_size, pool_size, on_batch, ordered=True):
        self.smooth, self.make_job, self.seed, self.ordered = smooth, make_job, seed, ordered
        self.batch_size, self.pool_size, self.on_batch = batch_size, pool_size, on_batch
        self.source = iter(items)
        self.exhausted = False
        self.flight: list = []  # images with a pending request, in admission order
        self.order: deque = deque()  # images not yet yielded, in admission order
        self.seen: set = set()
        self.shape = None
        self.cache = QuantumCache.for_batch(batch_size)

    def results(self):
        while True:
            segments = self._fill_batch()
            if segments:
                self._forward(segments)
            if self.ordered:
                while self.order and self.order[0].finished:
                    slot = self.order.popleft()
                    yield PoolResult(slot.idx, slot.result, slot.seconds)
            elif any(slot.finished for slot in self.order):
                finished = [slot for slot in self.order if slot.finished]
                self.order = deque(slot for slot in self.order if not slot.finished)
                for slot in finished:
                    yield PoolResult(slot.idx, slot.result, slot.seconds)
            if not segments:  # nothing in flight and nothing left to admit: all yielded
                return

    # -- admission -------------------------------------------------------------------------------
    def _admit(self) -> bool:
        """Take the next image of ``items`` into the pool; False when none can be taken."""
        if self.exhausted or len(self.flight) >= self.pool_size:
            return False
        try:
            idx, x = next(self.source)
        except StopIteration:
            self.exhausted = True
            return False
        idx = int(idx)
        if idx in self.seen:
            raise ValueError(f"image index {idx} appears twice: each index names one noise stream")
        self.seen.add(idx)
        xs = self.smooth.prepare(x, single=True)
        shape = tuple(xs.shape[1:])
        if self.shape is None:
            self.shape = shape
        elif shape != self.shape:
            raise ValueError(f"image {idx} has shape {shape} but the images before it {self.shape}: "
                             "the pool batches images of one shape")
        slot = _Slot(idx, xs, None, ImageStream(self.smooth.noise, self.seed, idx, shape, xs.device, xs.dtype,
                                                 self.cache))
        started = time.perf_counter()
        slot.job = self.make_job(idx, xs)
        slot.seconds += time.perf_counter() - started
        self.order.append(slot)
        if self._next_request(slot):
            self.flight.append(slot)
        return True

    @staticmethod
    def _next_request(slot: _Slot) -> bool:
        """Give ``slot`` its job's next request; False (and the result) when the job is finished."""
        slot.remaining, slot.votes = slot.job.next_request(), None
        if not slot.remaining:
            slot.result, slot.finished = slot.job.result(), True
        return not slot.finished

    # -- one forward batch -------------------------------------------------------------------------
    def _fill_batch(self) -> list:
        """``(slot, start, stop)`` stream segments for the next batch: pending requests first
        come first served, then new images while room is left."""
        segments, room, i = [], self.batch_size, 0
        while room:
            if i == len(self.flight) and not self._admit():
                break
            if i == len(self.flight):
                continue  # the admitted image finished without asking for samples
            slot = self.flight[i]
            take = min(slot.remaining, room)
            segments.append((slot, slot.position, slot.position + take))
            slot.position += take
            slot.remaining -= take
            room -= take
            i += 1
        return segments

    def _forward(self, segments) -> None:
        smooth, classes = self.smooth, self.smooth.num_classes
        sizes = [stop - start for _, start, stop in segments]
        total = sum(sizes)
        first = segments[0][0].x
        started = time.perf_counter()
        with torch.inference_mode():
            noisy = torch.empty((total, *self.shape), device=first.device, dtype=first.dtype)
            offset = 0
            for (slot, start, stop), size in zip(segments, sizes):
                part = noisy[offset:offset + size]
                slot.stream.draw_into(part, start, stop)
                part += slot.x
                offset += size
            logits = smooth.model(noisy)
            _check_forward(smooth, noisy, logits, total)
            # which segment each sample belongs to (numpy: torch.repeat_interleave is slow on a busy CPU)
            owner = torch.from_numpy(np.repeat(np.arange(len(segments)), sizes)).to(first.device)
            votes = torch.bincount(owner * classes + logits.argmax(dim=1), minlength=len(segments) * classes)
            votes = votes.view(len(segments), classes).cpu()
        seconds = time.perf_counter() - started
        if self.on_batch is not None:
            self.on_batch(total)
        for (slot, _, _), size, row in zip(segments, sizes, votes):
            slot.seconds += seconds * size / total
            slot.votes = row if slot.votes is None else slot.votes + row
            if slot.remaining == 0:  # its request is complete: advance its test
                started = time.perf_counter()
                slot.job.update(slot.votes)
                if not self._next_request(slot):
                    self.flight.remove(slot)  # it keeps its place in the queue while it asks for more
                slot.seconds += time.perf_counter() - started


def _check_forward(smooth, noisy, logits, total) -> None:
    """Refuse what would make the votes meaningless: logits of the wrong shape, noisy inputs
    that overflowed to inf or NaN (not draws of the noise the certificate assumes), NaN logits."""
    classes = smooth.num_classes
    if logits.shape != (total, classes):
        raise ValueError(
            f"the model returned output of shape {tuple(logits.shape)} for a batch of {total}; "
            f"expected ({total}, {classes}) logits (num_classes={classes})"
        )
    noisy_finite, logits_valid = torch.stack((torch.isfinite(noisy).all(), ~torch.isnan(logits).any())).tolist()
    if not noisy_finite:
        raise ValueError(
            f"the noisy inputs overflow {noisy.dtype} to inf or NaN (noise {smooth.noise!r}): the noise cannot be "
            "drawn faithfully in this dtype; use a smaller noise scale or a float64 model"
        )
    if not logits_valid:
        raise ValueError(f"the model returned NaN logits for noisy inputs (noise {smooth.noise!r}); its votes "
                         "would be arbitrary, so nothing is certified")


# -- the three modes -----------------------------------------------------------------------------


def certify_pool(smooth, items, n0: int, n: int, alpha: float, *, seed: int, batch_size: int = 1000,
                 pool_size: int | None = None, on_batch=None, ordered: bool = True):
    """Cohen's CERTIFY (``n0`` selection, ``n`` estimation samples) for every ``(idx, x)`` of
    ``items``: :class:`PoolResult` rows holding a :class:`Certificate`, in input order."""
    alpha = check_alpha(alpha)
    n0, n = check_count("n0", n0), check_count("n", n)
    check_can_certify(n, alpha)

    def make_job(idx, xs):
        return CertifyJob(smooth.noise, xs.shape[1:], n0, n, alpha)

    return run_pool(smooth, items, make_job, seed=seed, batch_size=batch_size, pool_size=pool_size,
                    on_batch=on_batch, ordered=ordered)


def predict_pool(smooth, items, n: int, alpha: float, *, seed: int, batch_size: int = 1000,
                 pool_size: int | None = None, on_batch=None, ordered: bool = True):
    """Cohen's PREDICT (``n`` samples, binomial test at ``alpha``) for every ``(idx, x)`` of ``items``:
    :class:`PoolResult` rows holding a :class:`Prediction`, in input order."""
    alpha = check_alpha(alpha)
    n = check_count("n", n)
    return run_pool(smooth, items, lambda idx, xs: PredictJob(n, alpha), seed=seed, batch_size=batch_size,
                    pool_size=pool_size, on_batch=on_batch, ordered=ordered)


def _plans_per_shape(make_plan, input_shape):
    """``plan(shape)``, made once per input shape; made now (its checks raising now) when the shape
    is known."""
    plans = {}

    def plan(shape):
        shape = tuple(shape)
        if shape not in plans:
            plans[shape] = make_plan(shape)
        return plans[shape]

    if input_shape is not None:
        plan(input_shape)
    return plan


def certify_radius_pool(smooth, items, radius: float, norm, alpha: float, *, seed: int, n0: int = 100,
                        max_n: int = 100_000, stages: int | None = None, first: int = 100, method: str = "cp",
                        batch_size: int = 1000, pool_size: int | None = None, input_shape=None, on_batch=None,
                        ordered: bool = True):
    """``certify_radius`` for every ``(idx, x)`` of ``items``: :class:`PoolResult` rows holding a
    :class:`RadiusDecision`, in input order. The options are checked now when the input shape is
    known (``input_shape`` or the Smooth's), else at the first image."""
    n0 = check_count("n0", n0)
    plan = _plans_per_shape(
        lambda shape: plan_radius(smooth.noise, radius, norm, shape, alpha, max_n=max_n, stages=stages,
                                  first=first, method=method),
        input_shape if input_shape is not None else smooth.input_shape,
    )

    def make_job(idx, xs):
        return RadiusJob(plan(xs.shape[1:]), n0, smooth.noise.is_certificate)

    return run_pool(smooth, items, make_job, seed=seed, batch_size=batch_size, pool_size=pool_size,
                    on_batch=on_batch, ordered=ordered)


def certify_grid_pool(smooth, items, radii, norm, alpha: float, *, seed: int, n0: int = 100,
                      max_n: int = 100_000, stages: int | None = None, first: int = 100,
                      batch_size: int = 1000, pool_size: int | None = None, input_shape=None, on_batch=None,
                      ordered: bool = True):
    """``certify_grid`` for every ``(idx, x)`` of ``items``: :class:`PoolResult` rows holding a
    :class:`~.grid.GridDecision`, in input order. The options are checked now when the input shape
    is known (``input_shape`` or the Smooth's), else at the first image."""
    n0 = check_count("n0", n0)
    plan = _plans_per_shape(
        lambda shape: plan_grid(smooth.noise, radii, norm, shape, alpha, max_n=max_n, stages=stages, first=first),
        input_shape if input_shape is not None else smooth.input_shape,
    )

    def make_job(idx, xs):
        return GridJob(plan(xs.shape[1:]), n0, smooth.noise.is_certificate)

    return run_pool(smooth, items, make_job, seed=seed, batch_size=batch_size, pool_size=pool_size,
                    on_batch=on_batch, ordered=ordered)

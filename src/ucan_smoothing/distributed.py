"""Process-group set-up for ``torchrun`` (DistributedDataParallel), shared by training and certification.

Under ``torchrun --nproc_per_node=N ...`` every process sees ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK`` and ``MASTER_ADDR``/``MASTER_PORT`` in its
environment; :func:`init_distributed` then joins the process group (``nccl``
on CUDA, ``gloo`` on CPU) and picks the device ``cuda:LOCAL_RANK``. Without
those variables (or with ``WORLD_SIZE=1``) it returns a single-process
context and touches nothing, so the same code runs in both cases.

Joining waits at most ``UCAN_DIST_TIMEOUT`` seconds (default 300) for every
process to arrive, then fails with :class:`DistributedSetupError` (one line)
instead of hanging, e.g. when the launcher died during start-up. That bound is
only for joining: once all have joined, collective operations keep torch's
default timeout, as processes may legitimately wait long for each other.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    """Who this process is: ``rank`` of ``world_size``, on ``device``."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: torch.device = torch.device("cpu")
    backend: str | None = None  # None: not distributed

    @property
    def distributed(self) -> bool:
        return self.backend is not None

    @property
    def is_main(self) -> bool:
        """Only the main process (rank 0) writes files and prints progress."""
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over all processes (in place; returned for chaining)."""
        if self.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def broadcast_object(self, obj):
        """``obj`` of rank 0, on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def resolve_device(device: str | None) -> torch.device:
    """``None`` / ``"auto"``: CUDA when available, else CPU. Raises if CUDA is asked for but absent."""
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but CUDA is not available here; use --device cpu")
    return device


#: seconds to wait for every process to join the process group (env ``UCAN_DIST_TIMEOUT``)
DEFAULT_JOIN_TIMEOUT_S = 300


class DistributedSetupError(RuntimeError):
    """The processes of a ``torchrun`` job did not all join the process group in time."""


def join_timeout() -> timedelta:
    """The bound on joining the process group: ``UCAN_DIST_TIMEOUT`` seconds, default 300."""
    text = os.environ.get("UCAN_DIST_TIMEOUT", "").strip()
    try:
        seconds = float(text) if text else DEFAULT_JOIN_TIMEOUT_S
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise ValueError(f"UCAN_DIST_TIMEOUT must be a number of seconds > 0, got {text!r}")
    return timedelta(seconds=seconds)


def _join_store(rank: int, world_size: int, timeout: timedelta):
    """Connect to the rendezvous store and wait until all ``world_size`` processes have checked in,
    each step bounded by ``timeout``; returns the store, its timeout reset to torch's default."""
    where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
    try:
        store, _, _ = next(dist.rendezvous("env://", rank=rank, world_size=world_size, timeout=timeout))
        # a check-in barrier: under torchrun every process is a client of the launcher's store, so
        # connecting alone does not mean the others are there (the key is per launcher restart)
        key = f"ucan_joined/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
        if store.add(key, 1) == world_size:
            store.set(key + "/all", "1")
        store.wait([key + "/all"], timeout)
    except dist.DistError as error:
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise DistributedSetupError(
            f"rank {rank} of {world_size} could not join the process group at {where} within "
            f"{timeout.total_seconds():g} s (the launcher or another process died or never started; "
            f"UCAN_DIST_TIMEOUT sets the wait): {first_line}") from error
    store.set_timeout(dist.constants.default_pg_timeout)
    return dist.PrefixStore("default_pg", store)  # as init_process_group(init_method=...) does


def init_distributed(device: str | None = None) -> DistContext:
    """Join the ``torchrun`` process group if there is one; pick this process's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    wanted = resolve_device(device)
    if world_size <= 1:
        return DistContext(device=wanted)
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
    if wanted.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"local rank {local_rank} but only {torch.cuda.device_count()} CUDA devices")
        wanted = torch.device("cuda", local_rank)
        torch.cuda.set_device(wanted)
        backend = "nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        store = _join_store(rank, world_size, join_timeout())
        dist.init_process_group(backend=backend, store=store, world_size=world_size, rank=rank)
    return DistContext(rank, world_size, local_rank, local_world, wanted, backend)


def cleanup(context: DistContext) -> None:
    """Leave the process group (no-op for a single process)."""
    if context.distributed and dist.is_initialized():
        dist.destroy_process_group()

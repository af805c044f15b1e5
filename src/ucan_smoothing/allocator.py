"""Fixed glibc malloc thresholds, so the speed of a batch size does not depend on what ran before.

Why: a forward pass allocates and frees the same large activation buffers every
batch. glibc serves a request above ``M_MMAP_THRESHOLD`` with fresh pages from the
OS and hands free memory at the top of the heap back once more than
``M_TRIM_THRESHOLD`` is free; both start at 128 KiB and rise only as large blocks
are freed. So whether each batch faults in new pages depends on the batch sizes the
process happened to run before. On this project's 2-core CPU the MNIST CNN at
batch 16 stayed at 0.6 of its speed at batch 8 in a fresh process (the batch-size
probe then stopped growing at 8), while the same batch in a process that had run
larger ones first was faster than batch 8. With both thresholds fixed, every
size keeps its buffers from one batch to the next and the probe's ranking is the
one the run then sees.

The cost: up to :data:`TRIM_THRESHOLD` of freed heap stays with the process
(one batch's activations; blocks above 32 MiB, glibc's largest mmap threshold,
still come from the OS each time). :func:`tune_malloc` changes nothing when the
user has set any ``MALLOC_*_`` variable or preloads another allocator (jemalloc,
tcmalloc: their choice wins), when the C library is not glibc, or when
``UCAN_MALLOC=default``. The ``ucan`` command calls it at start; code that uses
the library from Python may call it once itself.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

M_TRIM_THRESHOLD = -1  # mallopt parameter numbers, from glibc's malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 2**20  # glibc's largest allowed value on 64-bit systems
TRIM_THRESHOLD = 256 * 2**20
_USER_VARIABLES = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_",
                   "GLIBC_TUNABLES")
_state = "default"


def tune_malloc() -> str:
    """Fix glibc's mmap and trim thresholds for this process (see the module docstring) and return
    what holds now, as :func:`malloc_state` does. Calling it again does nothing more."""
    global _state
    if _state != "default":
        return _state
    reason = _reason_to_leave_alone()
    if reason is not None:
        _state = f"left as found ({reason})"
        return _state
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    mmap_set = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    trim_set = libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    done = mmap_set and trim_set
    _state = (f"glibc mmap threshold {MMAP_THRESHOLD // 2**20} MiB, trim threshold {TRIM_THRESHOLD // 2**20} MiB"
              if done else "left as found (mallopt refused the thresholds)")
    return _state


def malloc_state() -> str:
    """``"default"`` (nothing was changed), the thresholds set, or why they were left as found."""
    return _state


def _reason_to_leave_alone() -> str | None:
    if os.environ.get("UCAN_MALLOC") == "default":
        return "UCAN_MALLOC=default"
    named = [name for name in _USER_VARIABLES if name in os.environ]
    if named:
        return f"{named[0]} is set"
    preload = os.environ.get("LD_PRELOAD", "")
    if any(name in preload for name in ("jemalloc", "tcmalloc", "mimalloc")):
        return "another allocator is preloaded"
    if platform.libc_ver()[0] != "glibc":
        return "not glibc"
    return None

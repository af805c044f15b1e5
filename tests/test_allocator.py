"""allocator.tune_malloc: a batch size's forward passes stop faulting in fresh pages.

Page faults are counted, not timed: a count does not depend on other processes. Each
check runs in a fresh process, since glibc's thresholds depend on the process's history.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

from ucan_smoothing import allocator

# Batch sizes in increasing order, as the batch-size probe grows them; the faults per batch
# of the last size (the median over nine, after three warm-up batches), on the MNIST CNN.
FAULTS_SCRIPT = """
import json, resource, sys, torch
from ucan_smoothing.allocator import tune_malloc
from ucan_smoothing.models import build_model, to_channels_last
state = tune_malloc()
net = to_channels_last(build_model("mnist_cnn").eval())
with torch.inference_mode():
    for size in (8, 16, 32, 64):
        for _ in range(3):
            net(torch.rand(size, 1, 28, 28)).argmax(1)
        counts = []
        for _ in range(9):
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            net(torch.rand(size, 1, 28, 28)).argmax(1)
            counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"state": state, "faults": sorted(counts)[4]}))
"""

glibc_only = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the thresholds are glibc's")


def faults_per_batch(**env) -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "UCAN_MALLOC"}
    done = subprocess.run([sys.executable, "-c", FAULTS_SCRIPT], env={**clean, **env}, capture_output=True,
                          text=True, check=True, timeout=300)
    return json.loads(done.stdout.strip().splitlines()[-1])


@glibc_only
def test_tuned_forward_passes_reuse_their_pages():
    untuned = faults_per_batch(UCAN_MALLOC="default")
    assert untuned["state"] == "left as found (UCAN_MALLOC=default)"
    tuned = faults_per_batch()
    assert tuned["state"].startswith("glibc mmap threshold 32 MiB")
    # a batch of 64 has ~10 MB of activations: untuned, glibc maps and faults them in again every
    # batch (about 2,700 faults here); tuned, they stay on the heap
    assert tuned["faults"] < 20, tuned
    if untuned["faults"] < 200:
        pytest.skip(f"this glibc keeps the pages without tuning too ({untuned['faults']} faults per batch)")
    assert tuned["faults"] < untuned["faults"] / 10


def test_the_users_settings_win(monkeypatch):
    monkeypatch.setattr(allocator, "_state", "default")
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")
    assert allocator.tune_malloc() == "left as found (MALLOC_TRIM_THRESHOLD_ is set)"
    assert allocator.malloc_state() == "left as found (MALLOC_TRIM_THRESHOLD_ is set)"
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_")
    monkeypatch.setattr(allocator, "_state", "default")
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/libjemalloc.so.2")
    assert allocator.tune_malloc() == "left as found (another allocator is preloaded)"


def test_the_sidecar_records_the_allocator_state():
    from ucan_smoothing.results import run_environment

    assert run_environment()["malloc"] == allocator.malloc_state()

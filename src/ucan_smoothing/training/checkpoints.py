"""What a training run writes besides its weights: metrics, random states, checkpoint metadata, config."""

from __future__ import annotations

import csv
import io
import os
import platform
import random
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .. import __version__
from ..fileio import atomic_open, atomic_write_bytes
from ..npg.generators import NoiseGenerator
from .config import TrainConfig, describe_training_noise

METRIC_FIELDS = ["epoch", "lr", "train_loss", "train_ce", "train_acc", "test_acc_noisy", "test_acc_clean",
                 "epoch_time_s", "train_samples_per_s", "sigma_mean", "sigma_min", "sigma_max", "sigma_geomean"]
NOISE_SEEDING = "per-step"  # training noise seeded by (seed, epoch, rank, step); older checkpoints: per epoch


def atomic_torch_save(path: Path, obj) -> None:
    """``torch.save`` to ``path`` atomically."""
    with atomic_open(path) as handle:
        torch.save(obj, handle)


def versions() -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
            "ucan_smoothing": __version__, "platform": platform.platform()}


def write_metrics(path: Path, rows: list) -> None:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=METRIC_FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in METRIC_FIELDS})
    atomic_write_bytes(path, text.getvalue().encode())


def read_metrics(run_dir: str | os.PathLike) -> list:
    """``metrics.csv`` of a run as a list of dicts (numbers as floats, blanks as None)."""
    rows = []
    with open(Path(run_dir) / "metrics.csv", newline="") as f:
        for row in csv.DictReader(f):
            rows.append({k: (float(v) if v not in ("", None) else None) for k, v in row.items()})
    return rows


def generator_label(gen: NoiseGenerator) -> str:
    d = gen.describe()
    if d["kind"] == "pattern":
        return (f"pattern NPG (p={d['p']}, kappa {d['kappa']:.3g}, iota {d['iota']:.3g}"
                + (", geometric mean 1)" if d["normalize"] else ")"))
    if d["kind"] == "universal":
        return f"universal NPG (gamma {d['gamma']:g}" + (", geometric mean 1)" if d["normalize"] != "none" else ")")
    return f"{d['kind']} NPG (gamma {d['gamma']:g})"


def rng_states() -> dict:
    states = {"torch": torch.get_rng_state(), "numpy": numpy_state(), "python": python_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def numpy_state():
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached": float(cached)}


def python_state():
    version, state, gauss = random.getstate()
    return {"version": version, "state": list(state), "gauss": gauss}


def restore_rng(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    n = states["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    p = states["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if "cuda" in states and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])


def checkpoint_extra(cfg: TrainConfig, generator: NoiseGenerator | None, epoch: int,
                      train_state: dict | None, world_size: int = 1, shift: nn.Module | None = None) -> dict:
    extra = {
        "ucan_train": {"target": cfg.target, "epoch": epoch, "epochs": cfg.epochs, "world_size": world_size,
                       "noise_seeding": NOISE_SEEDING},
        "noise": describe_training_noise(cfg),
        "npg": None if generator is None else generator.describe(),
        "npg_state": None if generator is None else {k: v.detach().cpu() for k, v in generator.state_dict().items()},
        "npg_trained": cfg.target == "npg" and shift is None,
        "config": cfg.to_dict(),
    }
    if shift is not None:  # a sound input-adaptive mode: the mu network (the generator, if any, is the fixed noise)
        extra["shift"] = shift.describe()
        extra["shift_state"] = {k: v.detach().cpu() for k, v in shift.state_dict().items()}
    if train_state is not None:
        extra["train_state"] = train_state
    return extra

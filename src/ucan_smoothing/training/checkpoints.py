"""What a training run writes besides its weights: metrics, random states, checkpoint metadata, config."""

from __future__ import annotations

import csv
import io
import json
import os
import platform
import random
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .. import __version__
from ..fileio import atomic_open, atomic_write_bytes
from ..models import load_torch_file
from ..npg.generators import NoiseGenerator
from ..runs import LAST
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


def read_run_record(run_dir: str | os.PathLike) -> dict:
    """``config.json`` of a run folder (its ``"config"`` is a dict); ValueError naming the file if it
    is damaged or not written by ``ucan train``."""
    path = Path(run_dir) / "config.json"
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        problem = None if isinstance(record, dict) and isinstance(record.get("config"), dict) else "no \"config\""
    except ValueError as error:  # JSONDecodeError, UnicodeDecodeError
        problem = _first_sentence(error)
    if problem:
        raise ValueError(f"{str(path)!r} is damaged or not the record of a `ucan train` run ({problem}); "
                         "restore it or choose another --out")
    return record


#: what ``--resume`` reads from last.pt: top-level keys, then keys of its ``extra``
_RESUME_KEYS = ("state_dict", "model_name", "dataset", "extra")
_RESUME_EXTRA_KEYS = ("config", "train_state", "ucan_train")


def read_resume_checkpoint(run_dir: str | os.PathLike) -> dict:
    """``last.pt`` of a run folder, checked to hold what ``--resume`` needs: a one-line ValueError for
    an empty, truncated or foreign file (FileNotFoundError if there is none)."""
    path = Path(run_dir) / LAST
    try:
        payload = load_torch_file(path)
    except ValueError as error:  # unreadable: load_torch_file keeps torch's error as the cause
        problem = f"unreadable: {_first_sentence(error.__cause__ or error)}"
    else:
        problem = _missing_resume_part(payload)
    if problem:
        raise ValueError(f"cannot resume {str(run_dir)!r}: {LAST} is truncated or not a checkpoint of "
                         f"`ucan train` ({problem}); move it aside to train the run again from scratch")
    return payload


def _missing_resume_part(payload) -> str | None:
    if not isinstance(payload, dict):
        return f"it holds a {type(payload).__name__}"
    for key in _RESUME_KEYS:
        if key not in payload:
            return f"no {key!r}"
    extra = payload["extra"]
    for key in _RESUME_EXTRA_KEYS:
        if not isinstance(extra, dict) or not isinstance(extra.get(key), dict):
            return f"no training state: no extra[{key!r}]"
    for key in ("optimizer", "rng", "metrics"):
        if key not in extra["train_state"]:
            return f"no training state: no train_state[{key!r}]"
    if not isinstance(extra["ucan_train"].get("epoch"), int):
        return "no epoch number"
    return None


def _first_sentence(error: BaseException) -> str:
    """The start of an error's message on one line (torch's can run to paragraphs)."""
    lines = str(error).strip().splitlines()
    text = lines[0].split(". ")[0] if lines else ""
    text = text if len(text) <= 160 else text[:157] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__

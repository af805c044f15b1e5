"""Train a base classifier under noise, or a noise parameter generator (NPG).

Two targets (``ucan train classifier ...`` / ``ucan train npg ...``):

* ``classifier``: noise-augmented training (Cohen et al. 2019): every batch is
  ``x + noise`` with noise of any family of :mod:`ucan_smoothing.noises`,
  isotropic, or anisotropic with the fixed ``sigma`` of a pattern-fixed NPG
  (``--kind pattern``) or of a trained NPG (``--npg-checkpoint``); loss =
  cross-entropy.
* ``npg``: the paper's loss ``-w * mean(sigma) + CE(f(x + eps * sigma + mu), y)``
  (``w`` = ``--sigma-weight``), with the base classifier loaded from a
  checkpoint (``--base``) and frozen, or trained jointly (``--joint``).
  The two SOUND input-adaptive kinds train a shift ``mu`` under FIXED noise
  (isotropic, or that of a trained fixed NPG given by ``--npg-checkpoint``)
  with the cross-entropy alone: ``--kind noisy_shift`` learns
  ``f(z + mu(z))`` on the noisy sample ``z`` (certified as that base
  classifier), ``--kind lipschitz_shift`` learns ``f(x + mu(x) + noise)``
  with a capped Lipschitz bound ``L`` (certified with radius ``R / (1 + L)``);
  docs/adaptive.md.

A run folder (``--out``) holds ``config.json`` (the resolved configuration,
versions, seed, the command line), ``metrics.csv`` (one row per epoch),
``last.pt`` (everything needed to resume, rewritten atomically after every
epoch, and every ``--checkpoint-every`` steps inside one) and ``final.pt`` (written at the end); NPG runs and anisotropic
classifier runs add ``sigma.png`` (the sigma map, per channel, with colour
bars), ``sigma.pt`` and ``mu.pt``. ``--resume`` continues from ``last.pt``
and gives bit-for-bit the weights of an uninterrupted run on the same
device (the training noise is seeded per step, and an epoch resumed inside
skips the batches it trained); it refuses a changed configuration (the number of epochs may be
raised, the device, thread count and data folder may change).

Multi-process: ``torchrun --nproc_per_node=N -m ucan_smoothing.cli train ...``
runs DistributedDataParallel (gloo on CPU, nccl on CUDA); ``--batch-size`` is
the global batch, split over the processes; only rank 0 writes files.

Python API: :func:`train_classifier`, :func:`train_generator` (both return the
run folder), :func:`train` (either), :func:`load_trained` (a checkpoint back
as model + noise, with checks).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import math
import os
import platform
import random
import shlex
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from . import __version__
from .adaptive import SHIFTS, PaperModeSmooth, lipschitz_bounds, make_shift, shift_from_config, shift_smoothed
from .anisotropic import Anisotropic
from .fileio import atomic_open
from .data import DATASETS, canonical_dataset_name, load_dataset
from .distributed import DistContext, cleanup, init_distributed
from .generators import GENERATORS, NoiseGenerator, generator_from_config, make_generator, sigma_stats
from .models import (
    Autocast,
    build_model,
    checkpoint_identity,
    load_checkpoint,
    model_spec,
    save_checkpoint,
    to_channels_last,
)
from .noises import FAMILIES, Noise, make_noise
from .norms import parse_norm
from .smooth import Smooth

TARGETS = ("classifier", "npg")
OPTIMIZERS = ("sgd", "adam")
#: fields that may differ when a run is resumed (they do not change what is computed,
#: or, for ``epochs``, only extend it)
RESUMABLE_CHANGES = ("epochs", "device", "threads", "workers", "data_root", "out", "resume", "progress",
                     "checkpoint_every")
METRIC_FIELDS = ["epoch", "lr", "train_loss", "train_ce", "train_acc", "test_acc_noisy", "test_acc_clean",
                 "epoch_time_s", "train_samples_per_s", "sigma_mean", "sigma_min", "sigma_max", "sigma_geomean"]
LAST, FINAL = "last.pt", "final.pt"
NOISE_SEEDING = "per-step"  # training noise seeded by (seed, epoch, rank, step); older checkpoints: per epoch


# --------------------------------------------------------------------------- configuration


@dataclass
class TrainConfig:
    """Everything that defines a training run. ``None`` means "the default for this model/target"
    (filled in by :func:`resolve_config` and recorded resolved in config.json)."""

    target: str = "classifier"
    model: str | None = None  # default: the --base classifier's model, else mnist_cnn
    dataset: str | None = None  # default: the --base classifier's data set, else the model's
    data_root: str | None = None
    # noise: the isotropic family and its level
    noise: str = "gaussian"
    scale: float = 0.25
    noise_params: dict = field(default_factory=dict)  # e.g. {"a": 800.0} for power-law
    # NPG: {"kind": ..., parameters of generators.make_generator}; classifier target: pattern only
    npg: dict | None = None
    npg_checkpoint: str | None = None  # classifier target: noise shaped by a trained fixed NPG
    base: str | None = None  # npg target: checkpoint of the base classifier
    joint: bool = False  # npg target: train the classifier too
    # w in -w * mean(sigma) + CE. On MNIST (universal, gamma 5, scale 0.25, frozen classifier, 20k images):
    # w = 0.01 kept noisy test accuracy at 98.6% (base 98.7%) with geomean(sigma) 1.48;
    # w = 0.1 dropped it to 81%, w = 1 to chance (sigma pinned at exp(gamma)).
    sigma_weight: float = 0.01
    # optimisation
    epochs: int | None = None
    batch_size: int | None = None
    optimizer: str | None = None
    lr: float | None = None
    momentum: float = 0.9
    weight_decay: float | None = None
    lr_step: int | None = None  # epochs between lr decays; 0: constant lr
    lr_decay: float = 0.1
    classifier_lr: float | None = None  # npg target with joint: the classifier's lr (default: lr)
    # run
    seed: int = 0
    max_train: int | None = None
    max_test: int | None = None
    device: str | None = None
    threads: int | None = None
    workers: int = 0
    # also save last.pt every N training steps inside an epoch (0: at epoch ends only); for long
    # epochs (ImageNet) so that an interruption loses at most N steps
    checkpoint_every: int = 0
    out: str | None = None
    resume: bool = False
    progress: bool = True

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown training options {unknown}; known: {sorted(names)}")
        return cls(**values)


def _model_defaults(model: str, target: str) -> dict:
    small = model == "mnist_cnn"
    if target == "npg":
        return dict(epochs=5, batch_size=128 if small else 256, optimizer="adam", lr=1e-3, weight_decay=0.0,
                    lr_step=0)
    if small:
        return dict(epochs=10, batch_size=128, optimizer="adam", lr=1e-3, weight_decay=0.0, lr_step=0)
    # Cohen et al. 2019: SGD, lr 0.1, momentum 0.9, weight decay 1e-4, lr x 0.1 every 30 of 90 epochs.
    return dict(epochs=90, batch_size=256, optimizer="sgd", lr=0.1, weight_decay=1e-4, lr_step=30)


def _npg_defaults(kind: str, dataset: str, noise: Noise | None = None) -> dict:
    if kind == "noisy_shift":
        return dict(gamma=1.0, channels=[16, 32, 32, 32], pool=4, head_size=None)
    if kind == "lipschitz_shift":
        norm = 2 if noise is None else noise.primary_norm
        return dict(lipschitz=0.5, gamma=1.0, hidden=256, depth=2, norm="inf" if math.isinf(norm) else int(norm))
    if kind == "pattern":
        return dict(p=2, kappa=0.01, iota=1.0, centre=None, normalize=True, trainable=False)
    if kind == "universal":
        return dict(gamma=2.0 if dataset == "imagenet" else 5.0, gamma_mu=None, normalize="none", learn_mu=True,
                    latent_dim=64, hidden=256, input_seed=0)
    return dict(gamma=1.0, normalize="none")


def resolve_config(config: TrainConfig | dict) -> TrainConfig:
    """Check ``config`` and fill in every default; raises ``ValueError`` with a clear message."""
    cfg = TrainConfig.from_dict(dict(config)) if isinstance(config, dict) else dataclasses.replace(config)
    for name in ("data_root", "npg_checkpoint", "base", "out"):
        value = getattr(cfg, name)
        if value is not None:
            setattr(cfg, name, os.fspath(value))
    if cfg.target not in TARGETS:
        raise ValueError(f"unknown training target {cfg.target!r}; use one of {TARGETS}")
    if cfg.target == "npg" and cfg.base is not None and (cfg.model is None or cfg.dataset is None):
        # an NPG is trained for its base classifier: take what that classifier is unless told
        try:  # the header only: the weights are read once, when training loads the base
            base_model, base_dataset = checkpoint_identity(_run_checkpoint(cfg.base))
        except (OSError, ValueError):
            base_model = base_dataset = None  # reported with the other checks, or when training loads it
        cfg.model = cfg.model or base_model
        cfg.dataset = cfg.dataset or base_dataset
    cfg.model = cfg.model or "mnist_cnn"
    spec = model_spec(cfg.model)
    cfg.dataset = canonical_dataset_name(cfg.dataset or spec.dataset)
    info = DATASETS[cfg.dataset]
    if info.input_shape != spec.input_shape or info.num_classes != spec.num_classes:
        raise ValueError(f"model {cfg.model!r} takes {spec.input_shape} inputs with {spec.num_classes} classes; "
                         f"data set {cfg.dataset!r} has {info.input_shape} and {info.num_classes}")
    if cfg.noise.lower() not in FAMILIES:
        raise ValueError(f"unknown noise family {cfg.noise!r}; known: {', '.join(FAMILIES)}")
    cfg.noise = cfg.noise.lower()
    cfg.scale = float(cfg.scale)
    cfg.noise_params = dict(cfg.noise_params or {})
    base_noise = make_noise(cfg.noise, cfg.scale, **cfg.noise_params)
    base_noise.check_input_shape(spec.input_shape)
    for key, value in _model_defaults(cfg.model, cfg.target).items():
        if getattr(cfg, key) is None:
            setattr(cfg, key, value)
    if cfg.optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {cfg.optimizer!r}; use one of {OPTIMIZERS}")
    for name in ("epochs", "batch_size"):
        if int(getattr(cfg, name)) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    if not cfg.lr > 0:
        raise ValueError(f"lr must be > 0, got {cfg.lr}")
    if cfg.lr_step < 0:
        raise ValueError(f"lr_step must be >= 0 (0: constant), got {cfg.lr_step}")
    if int(cfg.checkpoint_every) < 0:
        raise ValueError(f"checkpoint_every must be >= 0 (0: at epoch ends only), got {cfg.checkpoint_every}")
    for name in ("max_train", "max_test"):
        value = getattr(cfg, name)
        if value is not None and int(value) < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if cfg.npg is not None:
        npg = dict(cfg.npg)
        kind = str(npg.pop("kind", "")).replace("-", "_")
        if kind not in GENERATORS and kind not in SHIFTS:
            raise ValueError(f"unknown NPG kind {kind!r}; known: {', '.join([*GENERATORS, *SHIFTS])}")
        cfg.npg = {"kind": kind, **{k: v for k, v in _npg_defaults(kind, cfg.dataset, base_noise).items()}, **npg}
        if kind == "lipschitz_shift":
            norm = parse_norm(cfg.npg["norm"])
            cfg.npg["norm"] = "inf" if math.isinf(norm) else int(norm)
        build = make_shift if kind in SHIFTS else make_generator
        build(kind, spec.input_shape, **{k: v for k, v in cfg.npg.items() if k != "kind"})  # validate
    shift_kind = cfg.npg is not None and cfg.npg["kind"] in SHIFTS
    if cfg.target == "classifier":
        if cfg.npg is not None and cfg.npg["kind"] != "pattern":
            raise ValueError(f"a classifier is trained under FIXED noise: --kind {cfg.npg['kind']} must be trained "
                             "as `ucan train npg`; load a trained NPG with --npg-checkpoint")
        if cfg.npg is not None and cfg.npg_checkpoint:
            raise ValueError("give either --kind pattern or --npg-checkpoint, not both")
        if cfg.base or cfg.joint:
            raise ValueError("--base and --joint belong to `ucan train npg`")
    else:
        if cfg.npg is None:
            raise ValueError("`ucan train npg` needs --kind (pattern, universal or input_dependent; "
                             "noisy_shift or lipschitz_shift for the sound input-adaptive modes)")
        if cfg.npg_checkpoint and not shift_kind:
            raise ValueError("--npg-checkpoint belongs to `ucan train classifier` (and to the shift kinds "
                             "noisy_shift / lipschitz_shift: the fixed noise they are trained under)")
        if cfg.base is None and not cfg.joint:
            raise ValueError("an NPG needs a classifier: --base CHECKPOINT (frozen) or --joint (trained together)")
        if (cfg.npg["kind"] == "pattern" and not cfg.npg.get("trainable") and not cfg.joint):
            raise ValueError("nothing to train: a hand-set pattern with a frozen classifier has no parameters; "
                             "pass --joint (fine-tune the classifier under the pattern) or --train-pattern")
    if cfg.threads is not None and int(cfg.threads) < 1:
        raise ValueError(f"threads must be >= 1, got {cfg.threads}")
    return cfg


def _describe_noise(cfg: TrainConfig) -> dict:
    return make_noise(cfg.noise, cfg.scale, **cfg.noise_params).describe()


# --------------------------------------------------------------------------- small file helpers


def _atomic_write(path: Path, data: bytes) -> None:
    with atomic_open(path) as handle:
        handle.write(data)


def _atomic_torch_save(path: Path, obj) -> None:
    with atomic_open(path) as handle:
        torch.save(obj, handle)


def _versions() -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
            "ucan_smoothing": __version__, "platform": platform.platform()}


def _write_metrics(path: Path, rows: list) -> None:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=METRIC_FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in METRIC_FIELDS})
    _atomic_write(path, text.getvalue().encode())


def read_metrics(run_dir: str | os.PathLike) -> list:
    """``metrics.csv`` of a run as a list of dicts (numbers as floats, blanks as None)."""
    rows = []
    with open(Path(run_dir) / "metrics.csv", newline="") as f:
        for row in csv.DictReader(f):
            rows.append({k: (float(v) if v not in ("", None) else None) for k, v in row.items()})
    return rows


def save_sigma_png(path: str | os.PathLike, sigma: torch.Tensor, mu: torch.Tensor | None = None,
                   title: str = "", images: torch.Tensor | None = None) -> None:
    """Save a sigma map (and mu, when non-zero) as a PNG: one panel per channel, colour bars.

    ``sigma`` is ``(C, H, W)`` (a fixed NPG) or ``(B, C, H, W)`` for a few
    images of an input-dependent NPG (then ``images`` are shown beside them).
    """
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    sigma = sigma.detach().float().cpu()
    mu = None if mu is None else mu.detach().float().cpu()
    if sigma.dim() == 3:
        sigma, mu = sigma[None], None if mu is None else mu[None]
        images = None
    show_mu = mu is not None and bool(mu.abs().max() > 0)
    channels = sigma.shape[1]
    offset = int(images is not None)
    columns = offset + channels * (1 + show_mu)
    rows = sigma.shape[0]
    fig, axes = plt.subplots(rows, columns, squeeze=False,
                             figsize=(max(3.4 * columns, 5.4), 3.1 * rows + 0.7))
    for item in range(rows):
        if images is not None:
            image = images[item].detach().float().cpu()
            ax = axes[item, 0]
            ax.imshow((image[0] if image.shape[0] == 1 else image.permute(1, 2, 0).clamp(0, 1)).numpy(), cmap="gray")
            ax.set_title(f"input {item}")
            ax.axis("off")
        panels = [("sigma", c, sigma[item, c], "viridis") for c in range(channels)]
        if show_mu:
            panels += [("mu", c, mu[item, c], "coolwarm") for c in range(channels)]
        for column, (name, c, values, cmap) in enumerate(panels, start=offset):
            ax = axes[item, column]
            kwargs, scale_note = {}, ""
            if name == "mu":
                bound = float(values.abs().max()) or 1.0
                kwargs = dict(vmin=-bound, vmax=bound)
            elif float(values.max()) > 20 * float(values.min()):
                # A wide range (a learnt sigma often spans exp(-gamma)..exp(gamma)): log colours.
                kwargs = dict(norm=LogNorm(vmin=float(values.min()), vmax=float(values.max())))
                scale_note = " (log colours)"
            shown = ax.imshow(values.numpy(), cmap=cmap, **kwargs)
            ax.set_title(f"{name}" + (f" channel {c}" if channels > 1 else "") + scale_note
                         + f"\nmin {float(values.min()):.3g}, max {float(values.max()):.3g}", fontsize=10)
            ax.set_xticks([])
            ax.set_yticks([])
            fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    _atomic_write(Path(path), buffer.getvalue())


def _generator_label(gen: NoiseGenerator) -> str:
    d = gen.describe()
    if d["kind"] == "pattern":
        return (f"pattern NPG (p={d['p']}, kappa {d['kappa']:.3g}, iota {d['iota']:.3g}"
                + (", geometric mean 1)" if d["normalize"] else ")"))
    if d["kind"] == "universal":
        return f"universal NPG (gamma {d['gamma']:g}" + (", geometric mean 1)" if d["normalize"] != "none" else ")")
    return f"{d['kind']} NPG (gamma {d['gamma']:g})"


# --------------------------------------------------------------------------- data


class _Batches:
    """Shuffled batches of (images in [0, 1], labels) for one process of one epoch.

    In-memory data sets (``ArrayDataset``) are sliced directly from their uint8
    tensor (moved to the device once when it is a GPU): no per-sample Python
    work. Other data sets (ImageFolder) go through a DataLoader. The order
    comes from a ``DistributedSampler`` seeded by ``(seed, epoch)``, so it is
    the same after a resume and is split between processes.
    """

    def __init__(self, dataset, batch_size: int, context: DistContext, seed: int, shuffle: bool,
                 workers: int = 0, limit: int | None = None):
        from torch.utils.data import DataLoader, DistributedSampler, Subset

        self.context, self.batch_size, self.shuffle, self.workers = context, batch_size, shuffle, workers
        self.count = len(dataset) if limit is None else min(limit, len(dataset))
        self.images = self.labels = None
        if hasattr(dataset, "images") and isinstance(getattr(dataset, "images"), torch.Tensor):
            images, labels = dataset.images[:self.count], dataset.labels[:self.count]
            on_gpu = context.device.type == "cuda" and images.numel() < 2**31
            self.images = images.to(context.device) if on_gpu else images
            self.labels = labels.to(context.device) if on_gpu else labels
            self.dataset = None
        else:
            self.dataset = dataset if limit is None else Subset(dataset, range(self.count))
        indexable = self.dataset if self.dataset is not None else range(self.count)
        if shuffle:
            self.sampler = DistributedSampler(indexable, num_replicas=context.world_size, rank=context.rank,
                                              shuffle=True, seed=seed)
        else:
            self.sampler = None
        self.loader = None
        if self.dataset is not None:
            sampler = self.sampler if shuffle else _ShardSampler(self.count, context)
            self.loader = DataLoader(self.dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                                     pin_memory=context.device.type == "cuda")

    def set_epoch(self, epoch: int) -> None:
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)

    def _indices(self) -> torch.Tensor:
        if self.shuffle:
            return torch.tensor(list(iter(self.sampler)), dtype=torch.int64)
        return torch.arange(self.context.rank, self.count, self.context.world_size)

    def __len__(self) -> int:
        if self.loader is not None:
            return len(self.loader)
        per_rank = (len(self.sampler) if self.shuffle
                    else len(range(self.context.rank, self.count, self.context.world_size)))
        return math.ceil(per_rank / self.batch_size)

    def __iter__(self):
        return self.batches()

    def batches(self, start: int = 0):
        """This epoch's batches from batch ``start`` on (a resumed epoch skips those it trained)."""
        from torch.utils.data import DataLoader

        device = self.context.device
        if self.loader is not None:
            loader = self.loader
            if start:
                remaining = list(iter(loader.sampler))[start * self.batch_size:]
                loader = DataLoader(loader.dataset, batch_size=self.batch_size, sampler=remaining,
                                    num_workers=self.workers, pin_memory=device.type == "cuda")
            for x, y in loader:
                yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            return
        indices = self._indices().to(self.images.device)
        for begin in range(start * self.batch_size, len(indices), self.batch_size):
            idx = indices[begin:begin + self.batch_size]
            x = self.images[idx].to(device, non_blocking=True).float().div_(255)
            yield x, self.labels[idx].to(device, non_blocking=True)


class _ShardSampler(torch.utils.data.Sampler):
    """Indices ``rank, rank + world, ...``: each test image on exactly one process."""

    def __init__(self, count: int, context: DistContext):
        self.indices = list(range(context.rank, count, context.world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


# --------------------------------------------------------------------------- noise application


class _NoiseSource:
    """``x -> x + noise`` for training and evaluation: isotropic, fixed anisotropic, or an NPG."""

    def __init__(self, base: Noise, generator: NoiseGenerator | None = None, fixed: Anisotropic | None = None):
        self.base, self.generator, self.fixed = base, generator, fixed

    def params(self, x: torch.Tensor, module: nn.Module | None = None):
        """(sigma, mu) of the NPG for batch ``x`` (``module``: its DDP wrapper, if any)."""
        gen = module if module is not None else self.generator
        return gen(x) if self.generator.input_dependent else gen()

    def perturb(self, x: torch.Tensor, rng: torch.Generator, sigma=None, mu=None) -> torch.Tensor:
        shape = tuple(x.shape)
        if self.generator is not None:
            eps = self.base.sample(shape, generator=rng, device=x.device, dtype=x.dtype)
            return x + eps * sigma + mu
        source = self.fixed if self.fixed is not None else self.base
        return x + source.sample(shape, generator=rng, device=x.device, dtype=x.dtype)


def _rng(device: torch.device, *seeds: int) -> torch.Generator:
    rng = torch.Generator(device=device)
    # A fixed mixing of (seed, epoch, rank, purpose) into one 63-bit seed.
    value = 0x9E3779B97F4A7C15
    for s in seeds:
        value = (value * 6364136223846793005 + int(s) + 1442695040888963407) % (2**63)
    rng.manual_seed(value)
    return rng


# --------------------------------------------------------------------------- checkpoints


def _rng_states() -> dict:
    states = {"torch": torch.get_rng_state(), "numpy": _numpy_state(), "python": _python_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _numpy_state():
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached": float(cached)}


def _python_state():
    version, state, gauss = random.getstate()
    return {"version": version, "state": list(state), "gauss": gauss}


def _restore_rng(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    n = states["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    p = states["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if "cuda" in states and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])


def _checkpoint_extra(cfg: TrainConfig, generator: NoiseGenerator | None, epoch: int,
                      train_state: dict | None, world_size: int = 1, shift: nn.Module | None = None) -> dict:
    extra = {
        "ucan_train": {"target": cfg.target, "epoch": epoch, "epochs": cfg.epochs, "world_size": world_size,
                       "noise_seeding": NOISE_SEEDING},
        "noise": _describe_noise(cfg),
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


@dataclass
class TrainedRun:
    """A checkpoint of :mod:`ucan_smoothing.train` turned back into objects.

    ``noise()`` is the FIXED noise: the isotropic family, or the fixed
    ``Anisotropic`` noise of a pattern-fixed / universal NPG; it raises for an
    input-dependent NPG (its certificate would not be sound).
    ``shift`` is the trained ``mu`` network of a sound input-adaptive run
    (``noisy_shift`` / ``lipschitz_shift``), else None.

    :meth:`smoothed` is what certification and attacks need: the smoothed
    classifier the run is certified as (``certify``, ``certify_batch``,
    ``predict``; ``noisy_logits`` except for a plain ``Smooth``), and
    :meth:`description` its text for the ``npg`` column of result files.
    """

    model: nn.Module
    base_noise: Noise
    generator: NoiseGenerator | None
    meta: dict
    shift: nn.Module | None = None

    def noise(self, sigma_min: float = 1e-6):
        if self.generator is None:
            return self.base_noise
        return self.generator.to_noise(self.base_noise, sigma_min=sigma_min)

    @property
    def input_dependent(self) -> bool:
        """True for the paper's input-dependent NPG (certified only in the labelled paper mode)."""
        return self.generator is not None and self.generator.input_dependent

    def smoothed(self, device=None, *, paper_mode: bool = False, sigma_min: float = 1e-6,
                 channels_last: bool = False, amp: str | None = None):
        """The smoothed classifier to certify, on ``device`` (default: where the model is),
        with the classifier's weights stored channels-last if asked (faster convolutions,
        see :func:`~ucan_smoothing.models.to_channels_last`) and run in mixed precision
        with ``amp`` ("bf16" or "fp16", :class:`~ucan_smoothing.models.Autocast`):

        * plain or fixed-NPG runs: ``Smooth(model, num_classes, noise())``;
        * ``noisy_shift``: ``Smooth(NoisyInputShift(model, mu), ...)`` under the fixed noise;
        * ``lipschitz_shift``: ``LipschitzShiftSmooth`` (radius ``R / (1 + L)``);
        * input-dependent NPG: only with ``paper_mode=True``, a ``PaperModeSmooth``
          (NOT a certificate; every certificate it returns says so).
        """
        if paper_mode and not self.input_dependent:
            raise ValueError("--paper-mode is only for runs with an input-dependent generator")
        if self.input_dependent and not paper_mode:
            raise ValueError("this run's generator computes sigma and mu from the input being certified: its "
                             "certificate is not sound (DESIGN.md section 4). Pass --paper-mode to reproduce the "
                             "paper's figures, labelled is_certificate=false, or use a sound mode of "
                             "ucan_smoothing.adaptive")
        model = self.model if device is None else self.model.to(device)
        if channels_last:
            model = to_channels_last(model)
        if amp is not None:
            model = Autocast(model, amp)
        if paper_mode:
            generator = self.generator if device is None else self.generator.to(device)
            return PaperModeSmooth(model, self.num_classes, self.base_noise, generator,
                                   input_shape=self.input_shape)
        noise = self.noise(sigma_min)
        if self.shift is not None:
            shift = self.shift if device is None else self.shift.to(device)
            return shift_smoothed(model, self.num_classes, noise, shift, input_shape=self.input_shape)
        return Smooth(model, self.num_classes, noise, input_shape=self.input_shape)

    def lipschitz(self) -> float | None:
        """``lipschitz_shift`` runs: the proven ``L`` of the noise's primary norm (sigma folded in); else None."""
        if self.shift is None or not getattr(self.shift, "clean_input", False):
            return None
        noise = self.noise()
        return lipschitz_bounds(self.shift, noise)[noise.primary_norm]

    def description(self) -> str:
        """Text for the ``npg`` column: ``none``, ``pattern:p=2``, ``universal``, ``input_dependent``,
        ``noisy_shift``, ``lipschitz_shift:L=0.5``; a shift under a fixed NPG's noise adds it after a ``+``
        (``noisy_shift+pattern:p=1``)."""
        text = "none"
        if self.generator is not None:
            info = self.generator.describe()
            text = f"{info['kind']}:p={info['p']}" if "p" in info else info["kind"]
        if self.shift is None:
            return text
        lipschitz = self.lipschitz()
        shift = self.shift.kind if lipschitz is None else f"{self.shift.kind}:L={lipschitz:.4g}"
        return shift if self.generator is None else f"{shift}+{text}"

    @property
    def num_classes(self) -> int:
        return model_spec(self.meta["model_name"]).num_classes

    @property
    def input_shape(self) -> tuple:
        return model_spec(self.meta["model_name"]).input_shape


def _check_noise_matches(path, saved: dict, expected) -> None:
    if expected is None:
        return
    want = expected.describe() if isinstance(expected, Noise) else dict(expected)
    for key in ("family", "scale"):
        if key in want and saved.get(key) is not None:
            same = (math.isclose(float(saved[key]), float(want[key]), rel_tol=1e-9) if key == "scale"
                    else saved[key] == want[key])
            if not same:
                raise ValueError(f"checkpoint {os.fspath(path)!r} was trained with {saved.get('family')} noise of "
                                 f"scale {saved.get('scale')} but {want.get('family', saved.get('family'))} noise "
                                 f"of scale {want.get('scale', saved.get('scale'))} was expected")


def _run_checkpoint(path: str | os.PathLike) -> Path:
    """The checkpoint file of ``path``: itself, or a run folder's ``final.pt`` (else ``last.pt``)."""
    path = Path(path)
    if path.is_dir():
        for name in (FINAL, LAST):
            if (path / name).is_file():
                return path / name
        raise FileNotFoundError(f"run folder {str(path)!r} holds neither {FINAL} nor {LAST}")
    return path


def load_trained(path: str | os.PathLike, expected_model: str | None = None, expected_dataset: str | None = None,
                 expected_noise=None) -> TrainedRun:
    """Load a checkpoint written by training (``final.pt`` / ``last.pt``), or a run folder.

    ``expected_*`` (model name, data set, noise: a ``Noise`` or ``{"family",
    "scale"}``) are checked; a mismatch raises ``ValueError`` naming both.
    """
    path = _run_checkpoint(path)
    if expected_dataset is not None:
        expected_dataset = canonical_dataset_name(expected_dataset)
    model, meta = load_checkpoint(path, expected_model_name=expected_model, expected_dataset=expected_dataset)
    extra = meta["extra"]
    inside = extra.get("ucan_train", {}).get("inside_epoch")
    if inside is not None:
        warnings.warn(f"{str(path)!r} was saved inside epoch {inside['epoch']} (after step {inside['step']}) of an "
                      "unfinished run: its weights are not those of a finished epoch")
    saved_noise = extra.get("noise")
    if not saved_noise:
        raise ValueError(f"checkpoint {str(path)!r} does not record its training noise (not written by `ucan train`)")
    _check_noise_matches(path, saved_noise, expected_noise)
    params = {k: v for k, v in saved_noise.items() if k not in ("family", "scale")}
    base = make_noise(saved_noise["family"], saved_noise["scale"], **params)
    generator = None
    if extra.get("npg") is not None:
        generator = generator_from_config(extra["npg"], extra.get("npg_state"))
        generator.eval()
    shift = None
    if extra.get("shift") is not None:
        shift = shift_from_config(extra["shift"], extra.get("shift_state"))
    return TrainedRun(model, base, generator, meta, shift)


# --------------------------------------------------------------------------- the training loop


class _Run:
    """One training run (both targets): set-up, resume, epochs, files."""

    def __init__(self, cfg: TrainConfig, context: DistContext, command: str):
        self.cfg, self.context, self.command = cfg, context, command
        self.device = context.device
        self.out = Path(cfg.out) if cfg.out else self._default_out()
        self.spec = model_spec(cfg.model)
        self.base_noise = make_noise(cfg.noise, cfg.scale, **cfg.noise_params)

    def _default_out(self) -> Path:
        cfg = self.cfg
        stamp = time.strftime("%Y%m%d-%H%M%S")
        kind = f"-{cfg.npg['kind']}" if cfg.npg else ""
        name = f"{cfg.target}-{cfg.model}-{cfg.noise}{cfg.scale:g}{kind}-{stamp}"
        return Path("runs") / self.context.broadcast_object(name)

    # -- set-up ------------------------------------------------------------------
    def setup(self) -> None:
        cfg, ctx = self.cfg, self.context
        if cfg.threads:
            torch.set_num_threads(int(cfg.threads))
        elif self.device.type == "cpu":
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, ctx.local_world_size)))
        self._check_out_folder()
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed % 2**32)
        self.train_data = _Batches(load_dataset(cfg.dataset, "train", cfg.data_root), self._per_rank_batch(),
                                   ctx, cfg.seed, shuffle=True, workers=cfg.workers, limit=cfg.max_train)
        # No gradients at test time: larger batches are faster and give the same numbers.
        self.test_data = _Batches(load_dataset(cfg.dataset, "test", cfg.data_root), 4 * self._per_rank_batch(),
                                  ctx, cfg.seed, shuffle=False, workers=cfg.workers, limit=cfg.max_test)
        self._build_model_and_noise()
        self._build_optimizer()
        self.rows: list = []
        self.start_epoch, self.start_step, self.partial_sums = 1, 0, None
        if cfg.resume and not self.restarted:
            self._resume()

    def _per_rank_batch(self) -> int:
        world = self.context.world_size
        if self.cfg.batch_size % world:
            raise ValueError(f"--batch-size {self.cfg.batch_size} (the global batch) must be divisible by the "
                             f"{world} processes")
        return self.cfg.batch_size // world

    def _check_out_folder(self) -> None:
        """Refuse to overwrite a run that saved a checkpoint; resume it with --resume.

        A folder with ``config.json`` but no checkpoint is a run killed before
        its first checkpoint: nothing finished is lost by starting it again, so
        a fresh start is allowed, and ``--resume`` starts it from scratch (with
        the saved configuration: a changed one is refused as for any resume).
        """
        cfg = self.cfg
        config_path = self.out / "config.json"
        has_checkpoint = (self.out / LAST).is_file() or (self.out / FINAL).is_file()
        self.restarted = False
        if cfg.resume and not has_checkpoint:
            if not config_path.is_file():
                raise FileNotFoundError(f"nothing to resume: {str(self.out / LAST)!r} does not exist")
            saved = TrainConfig.from_dict(json.loads(config_path.read_text())["config"])
            differences = _config_differences(saved, cfg)
            if differences:
                raise ValueError(f"cannot restart {str(self.out)!r} with a changed configuration: "
                                 + "; ".join(differences))
            self.restarted = True
        elif not cfg.resume and has_checkpoint:
            raise ValueError(f"{str(self.out)!r} already holds a run; pass --resume to continue it "
                             "or choose another --out")
        elif not cfg.resume and config_path.is_file():
            self.restarted = True
        if self.restarted and self.context.is_main and cfg.progress:
            print(f"note: {str(self.out)!r} holds config.json but no checkpoint (a run stopped before its first "
                  "checkpoint): starting it from scratch", file=sys.stderr)
        if self.context.is_main:
            self.out.mkdir(parents=True, exist_ok=True)

    def _build_model_and_noise(self) -> None:
        cfg = self.cfg
        self.generator = None
        self.shift = None
        shift_kind = cfg.npg is not None and cfg.npg["kind"] in SHIFTS
        #: an NPG run that trains the generator (not a shift kind, whose generator is the fixed noise)
        self.trains_generator = cfg.target == "npg" and not shift_kind
        fixed = None
        if cfg.target == "npg" and cfg.base is not None:
            trained = load_trained(cfg.base, expected_model=cfg.model, expected_dataset=cfg.dataset,
                                   expected_noise={"family": cfg.noise, "scale": cfg.scale})
            self.model = trained.model
        else:
            self.model = build_model(cfg.model)
        self.model.to(self.device)
        if shift_kind:
            params = {k: v for k, v in cfg.npg.items() if k != "kind"}
            self.shift = make_shift(cfg.npg["kind"], self.spec.input_shape, **params).to(self.device)
        if cfg.npg is not None and not shift_kind:
            params = {k: v for k, v in cfg.npg.items() if k != "kind"}
            self.generator = make_generator(cfg.npg["kind"], self.spec.input_shape, **params).to(self.device)
        elif cfg.npg_checkpoint:
            trained = load_trained(cfg.npg_checkpoint, expected_model=cfg.model, expected_dataset=cfg.dataset,
                                   expected_noise={"family": cfg.noise, "scale": cfg.scale})
            if trained.generator is None:
                raise ValueError(f"{cfg.npg_checkpoint!r} holds no noise parameter generator")
            self.generator = trained.generator.to(self.device)
        if self.generator is not None and not self.trains_generator:
            fixed = self.generator.to_noise(self.base_noise)  # raises for input-dependent generators
            self.generator.requires_grad_(False)
        self.noise = _NoiseSource(self.base_noise, self.generator if self.trains_generator else None, fixed)
        self.train_classifier = cfg.target == "classifier" or cfg.joint
        self.model.requires_grad_(self.train_classifier)
        self.model_ddp = self.model
        self.generator_ddp = self.generator
        self.shift_ddp = self.shift
        if self.context.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            if self.train_classifier:
                self.model_ddp = DDP(self.model, device_ids=ids)
            if self.trains_generator and self.generator.has_trainable_parameters():
                self.generator_ddp = DDP(self.generator, device_ids=ids)
            if self.shift is not None:
                self.shift_ddp = DDP(self.shift, device_ids=ids)

    def _shifted_logits(self, x: torch.Tensor, rng: torch.Generator | None, model, shift) -> torch.Tensor:
        """Logits of a shift run: ``f(z + mu(z))`` with ``z = x + noise`` (noisy_shift) or
        ``f(x + mu(x) + noise)`` (lipschitz_shift); ``rng=None``: the clean input (no noise)."""
        if self.shift.clean_input:
            shifted = x + shift(x)
            return model(shifted if rng is None else self.noise.perturb(shifted, rng))
        z = x if rng is None else self.noise.perturb(x, rng)
        return model(z + shift(z))

    def _build_optimizer(self) -> None:
        cfg = self.cfg
        groups = []
        if self.trains_generator:
            params = [p for p in self.generator.parameters() if p.requires_grad]
            if params:
                groups.append({"params": params, "lr": cfg.lr})
        if self.shift is not None:
            groups.append({"params": list(self.shift.parameters()), "lr": cfg.lr})
        if self.train_classifier:
            lr = cfg.classifier_lr if (cfg.target == "npg" and cfg.classifier_lr) else cfg.lr
            groups.append({"params": list(self.model.parameters()), "lr": lr})
        if cfg.optimizer == "sgd":
            self.optimizer = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        else:
            self.optimizer = torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = (torch.optim.lr_scheduler.StepLR(self.optimizer, cfg.lr_step, cfg.lr_decay)
                          if cfg.lr_step else None)

    def _resume(self) -> None:
        path = self.out / LAST
        payload = torch.load(path, map_location="cpu", weights_only=True)
        extra = payload["extra"]
        saved = TrainConfig.from_dict(extra["config"])
        differences = _config_differences(saved, self.cfg)
        if differences:
            raise ValueError(f"cannot resume {str(self.out)!r} with a changed configuration: "
                             + "; ".join(differences) + ". Resume with the original options "
                             "(only " + ", ".join(RESUMABLE_CHANGES) + " may change).")
        if payload["model_name"] != self.cfg.model or payload["dataset"] != self.cfg.dataset:
            raise ValueError(f"{str(path)!r} holds {payload['model_name']} on {payload['dataset']}")
        state = extra["train_state"]
        saved_world = extra["ucan_train"].get("world_size", 1)
        if saved_world != self.context.world_size and self.context.is_main:
            print(f"warning: {str(self.out)!r} ran with {saved_world} process(es), resumed with "
                  f"{self.context.world_size}: the data split and noise streams change, so the result will not be "
                  "bit-identical to an uninterrupted run", file=sys.stderr)
        if extra["ucan_train"].get("noise_seeding") != NOISE_SEEDING and self.context.is_main:
            print(f"warning: {str(path)!r} was written by an older version that seeded the training noise per "
                  "epoch: the resumed run is valid but not bit-identical to an uninterrupted one", file=sys.stderr)
        if extra["ucan_train"]["epoch"] >= self.cfg.epochs:
            raise ValueError(f"{str(self.out)!r} already finished {extra['ucan_train']['epoch']} epochs; "
                             f"raise --epochs to train further")
        self.model.load_state_dict(payload["state_dict"])
        if self.generator is not None and extra.get("npg_state") is not None:
            self.generator.load_state_dict(extra["npg_state"])
        if self.shift is not None:
            if extra.get("shift_state") is None:
                raise ValueError(f"{str(path)!r} holds no {self.shift.kind} network to resume")
            self.shift.load_state_dict(extra["shift_state"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        _restore_rng(state["rng"])
        self.start_epoch = extra["ucan_train"]["epoch"] + 1
        partial = state.get("partial")  # saved inside an epoch (--checkpoint-every)
        if partial is not None:
            self.start_step, self.partial_sums = partial["step"], partial["sums"]
        self.rows = [r for r in state["metrics"] if r["epoch"] < self.start_epoch]

    # -- files ---------------------------------------------------------------------
    def write_config(self) -> None:
        if not self.context.is_main:
            return
        path = self.out / "config.json"
        record = {
            "config": self.cfg.to_dict(),
            "command": self.command,
            "argv": list(sys.argv),
            "seed": self.cfg.seed,
            "versions": _versions(),
            "world_size": self.context.world_size,
            "device": str(self.device),
            "noise": _describe_noise(self.cfg),
            "npg": None if self.generator is None else self.generator.describe(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        if self.shift is not None:
            record["shift"] = self.shift.describe()
        if self.restarted and path.is_file():
            old = json.loads(path.read_text())
            record["restarted"] = old.get("restarted", []) + [
                {"command": self.command, "time": time.strftime("%Y-%m-%d %H:%M:%S"),
                 "previous_start": old.get("started")}]
        elif self.cfg.resume and path.is_file():
            old = json.loads(path.read_text())
            record["started"] = old.get("started", record["started"])
            record["resumed"] = old.get("resumed", []) + [
                {"at_epoch": self.start_epoch, "command": self.command, "time": time.strftime("%Y-%m-%d %H:%M:%S")}]
            record["command"] = old.get("command", self.command)
        _atomic_write(path, (json.dumps(record, indent=2, sort_keys=False) + "\n").encode())

    def _train_state(self) -> dict:
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "rng": _rng_states(),
            "metrics": self.rows,
        }

    def _save_partial(self, epoch: int, steps_done: int, sums: torch.Tensor) -> None:
        """last.pt inside ``epoch`` after ``steps_done`` steps; its ``epoch`` field stays the last
        finished one, so readers of last.pt see the same as before."""
        total = sums.clone()
        self.context.all_reduce_sum(total)  # every rank's running sums, summed: resumed on rank 0
        if not self.context.is_main:
            return
        state = {**self._train_state(), "partial": {"epoch": epoch, "step": steps_done, "sums": total.tolist()}}
        extra = _checkpoint_extra(self.cfg, self.generator, epoch - 1, state, self.context.world_size, self.shift)
        extra["ucan_train"]["inside_epoch"] = {"epoch": epoch, "step": steps_done}  # weights from mid-epoch
        save_checkpoint(self.out / LAST, self.model, model_name=self.cfg.model, dataset=self.cfg.dataset,
                        extra=extra)

    def _save(self, epoch: int, final: bool = False) -> None:
        if not self.context.is_main:
            return
        train_state = self._train_state()
        world = self.context.world_size
        save_checkpoint(self.out / LAST, self.model, model_name=self.cfg.model, dataset=self.cfg.dataset,
                        extra=_checkpoint_extra(self.cfg, self.generator, epoch, train_state, world, self.shift))
        if final:
            save_checkpoint(self.out / FINAL, self.model, model_name=self.cfg.model, dataset=self.cfg.dataset,
                            extra=_checkpoint_extra(self.cfg, self.generator, epoch, None, world, self.shift))
        _write_metrics(self.out / "metrics.csv", self.rows)
        if self.generator is not None:
            self._save_sigma(epoch)

    def _save_sigma(self, epoch: int) -> None:
        gen = self.generator
        title = (f"{_generator_label(gen)}\nepoch {epoch}: noise = eps * sigma + mu, eps ~ {self.cfg.noise} "
                 f"of scale {self.cfg.scale:g}")
        with torch.no_grad():
            if gen.input_dependent:
                x, _ = next(iter(self.test_data))
                x = x[:4]
                sigma, mu = gen(x)
                _atomic_torch_save(self.out / "sigma_examples.pt", {"x": x.cpu(), "sigma": sigma.cpu(),
                                                                     "mu": mu.cpu()})
                save_sigma_png(self.out / "sigma.png", sigma, mu, title + " (NOT a certificate)",
                               images=x)
            else:
                sigma, mu = gen()
                _atomic_torch_save(self.out / "sigma.pt", sigma.detach().cpu().contiguous())
                _atomic_torch_save(self.out / "mu.pt", mu.detach().cpu().contiguous())
                save_sigma_png(self.out / "sigma.png", sigma, mu, title)

    # -- epochs ----------------------------------------------------------------------
    def _train_epoch(self, epoch: int) -> dict:
        cfg, ctx = self.cfg, self.context
        self.model.train(self.train_classifier)
        if self.generator is not None:
            self.generator.train(self.trains_generator)
        if self.shift is not None:
            self.shift.train()
        self.train_data.set_epoch(epoch)
        sums = torch.zeros(4, dtype=torch.float64, device=self.device)  # loss*n, ce*n, correct, n
        first, earlier = 0, 0.0
        if epoch == self.start_epoch and self.start_step:  # resumed inside this epoch
            first = self.start_step
            earlier = float(self.partial_sums[3])  # samples trained before the interruption
            if ctx.is_main:  # all ranks' sums so far; the epoch-end all-reduce adds them up
                sums += torch.tensor(self.partial_sums, dtype=torch.float64, device=self.device)
        steps = len(self.train_data)
        bar = tqdm(total=steps, initial=first, desc=f"epoch {epoch}/{cfg.epochs}", unit="batch", leave=False,
                   disable=not (ctx.is_main and cfg.progress), dynamic_ncols=True)
        npg = self.trains_generator
        for step, (x, y) in enumerate(self.train_data.batches(first), start=first):
            # noise seeded per step, so a run resumed at any step draws what it would have drawn
            rng = _rng(self.device, cfg.seed, epoch, ctx.rank, 1, step)
            if self.shift is not None:
                logits = self._shifted_logits(x, rng, self.model_ddp, self.shift_ddp)
            else:
                if npg:
                    sigma, mu = self.noise.params(x, self.generator_ddp)
                    noisy = self.noise.perturb(x, rng, sigma, mu)
                else:
                    noisy = self.noise.perturb(x, rng)
                logits = self.model_ddp(noisy)
            ce = F.cross_entropy(logits, y)
            loss = ce - cfg.sigma_weight * sigma.mean() if npg else ce
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            with torch.no_grad():
                n = y.shape[0]
                sums += torch.stack([loss.detach().double() * n, ce.detach().double() * n,
                                     (logits.argmax(1) == y).sum().double(),
                                     torch.tensor(float(n), dtype=torch.float64, device=self.device)])
            bar.update(1)
            if ctx.is_main and cfg.progress and (step % 20 == 0 or step == steps - 1):
                s = sums.tolist()
                bar.set_postfix(loss=f"{s[0] / s[3]:.4f}", acc=f"{s[2] / s[3]:.4f}")
            if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < steps:
                self._save_partial(epoch, step + 1, sums)
        bar.close()
        ctx.all_reduce_sum(sums)
        s = sums.tolist()
        # "samples": those trained in this call, for the throughput column of a resumed epoch
        return {"train_loss": s[0] / s[3], "train_ce": s[1] / s[3], "train_acc": s[2] / s[3],
                "samples": s[3] - earlier}

    @torch.no_grad()
    def _evaluate(self) -> dict:
        cfg, ctx = self.cfg, self.context
        self.model.eval()
        if self.generator is not None:
            self.generator.eval()
        if self.shift is not None:
            self.shift.eval()
        rng = _rng(self.device, cfg.seed, 0, ctx.rank, 2)  # the same test noise every epoch
        counts = torch.zeros(3, dtype=torch.float64, device=self.device)  # noisy correct, clean correct, n
        # sigma statistics over the test set (input-dependent) or of the fixed sigma
        stats = torch.tensor([0.0, math.inf, -math.inf, 0.0, 0.0], dtype=torch.float64, device=self.device)
        fixed_sigma = None
        if self.generator is not None and not self.generator.input_dependent:
            fixed_sigma = self.generator()[0]
        for x, y in self.test_data:
            if self.shift is not None:
                counts[0] += (self._shifted_logits(x, rng, self.model, self.shift).argmax(1) == y).sum()
                counts[1] += (self._shifted_logits(x, None, self.model, self.shift).argmax(1) == y).sum()
                counts[2] += y.shape[0]
                continue
            if self.generator is not None and self.trains_generator:
                sigma, mu = self.noise.params(x)
                noisy = self.noise.perturb(x, rng, sigma, mu)
                if self.generator.input_dependent:
                    s = sigma.double()
                    stats[0] += s.sum()
                    stats[1] = torch.minimum(stats[1], s.min())
                    stats[2] = torch.maximum(stats[2], s.max())
                    stats[3] += s.log().sum()
                    stats[4] += s.numel()
            else:
                noisy = self.noise.perturb(x, rng)
            counts[0] += (self.model(noisy).argmax(1) == y).sum()
            counts[1] += (self.model(x).argmax(1) == y).sum()
            counts[2] += y.shape[0]
        ctx.all_reduce_sum(counts)
        result = {"test_acc_noisy": float(counts[0] / counts[2]), "test_acc_clean": float(counts[1] / counts[2])}
        if fixed_sigma is not None:
            result.update(sigma_stats(fixed_sigma))
        elif self.generator is not None and self.generator.input_dependent:
            if ctx.distributed:
                import torch.distributed as dist
                for i, op in ((0, dist.ReduceOp.SUM), (1, dist.ReduceOp.MIN), (2, dist.ReduceOp.MAX),
                              (3, dist.ReduceOp.SUM), (4, dist.ReduceOp.SUM)):
                    part = stats[i:i + 1].clone()
                    dist.all_reduce(part, op=op)
                    stats[i] = part[0]
            s = stats.tolist()
            result.update(sigma_mean=s[0] / s[4], sigma_min=s[1], sigma_max=s[2], sigma_geomean=math.exp(s[3] / s[4]))
        return result

    def run(self) -> Path:
        cfg, ctx = self.cfg, self.context
        self.write_config()
        if ctx.is_main and cfg.progress:
            what = f"{cfg.npg['kind']} NPG" if cfg.target == "npg" else "classifier"
            if self.shift is not None:
                what = f"{cfg.npg['kind']} mu network (sound input-adaptive mode)"
            print(f"training {what} {cfg.model} on {cfg.dataset} ({self.train_data.count} images) with "
                  f"{cfg.noise} noise of scale {cfg.scale:g}, epochs {self.start_epoch}..{cfg.epochs}, "
                  f"{ctx.world_size} process(es) on {self.device}; run folder {str(self.out)!r}", file=sys.stderr)
        for epoch in range(self.start_epoch, cfg.epochs + 1):
            lr = self.optimizer.param_groups[0]["lr"]
            start = time.perf_counter()
            metrics = self._train_epoch(epoch)
            train_time = time.perf_counter() - start
            if self.scheduler is not None:
                self.scheduler.step()
            metrics.update(self._evaluate())
            elapsed = time.perf_counter() - start
            row = {"epoch": epoch, "lr": lr, "epoch_time_s": round(elapsed, 3),
                   "train_samples_per_s": round(metrics.pop("samples") / train_time, 1), **metrics}
            self.rows.append(row)
            self._save(epoch, final=epoch == cfg.epochs)
            if ctx.is_main and cfg.progress:
                extra = (f", sigma mean {row['sigma_mean']:.3f} [{row['sigma_min']:.3f}, {row['sigma_max']:.3f}]"
                         if row.get("sigma_mean") is not None else "")
                print(f"epoch {epoch}/{cfg.epochs}: loss {row['train_loss']:.4f}, train acc {row['train_acc']:.4f}, "
                      f"test acc under noise {row['test_acc_noisy']:.4f} (clean {row['test_acc_clean']:.4f}), "
                      f"{elapsed:.1f} s{extra}", file=sys.stderr)
        ctx.barrier()
        if os.environ.get("UCAN_DEBUG_DDP"):
            checksum = sum(float(p.detach().double().sum()) for p in self.model.parameters())
            if self.generator is not None:
                checksum += sum(float(p.detach().double().sum()) for p in self.generator.parameters())
            if self.shift is not None:
                checksum += sum(float(p.detach().double().sum()) for p in self.shift.parameters())
            # one write per line: print() writes text and newline separately, and the two ranks'
            # lines then interleave on the shared stderr pipe
            sys.stderr.write(f"rank {ctx.rank}/{ctx.world_size}: parameter checksum {checksum:.12e}\n")
            sys.stderr.flush()
        return self.out


def _config_differences(saved: TrainConfig, new: TrainConfig) -> list:
    out = []
    for key, old_value in saved.to_dict().items():
        if key in RESUMABLE_CHANGES:
            continue
        value = getattr(new, key)
        if _normalise_value(old_value) != _normalise_value(value):
            out.append(f"{key} was {old_value!r}, now {value!r}")
    return out


def _normalise_value(value):
    # JSON turns tuples into lists; compare through it.
    return json.loads(json.dumps(value, default=str))


def train(config: TrainConfig | dict | None = None, *, command: str | None = None, **options) -> Path:
    """Run training (either target) and return the run folder. Works under ``torchrun`` too."""
    values = {} if config is None else (config.to_dict() if isinstance(config, TrainConfig) else dict(config))
    values.update(options)
    cfg = resolve_config(values)
    if command is None:
        command = "python API: ucan_smoothing.train.train(" + ", ".join(
            f"{k}={v!r}" for k, v in values.items()) + ")"
    context = init_distributed(cfg.device)
    threads = torch.get_num_threads()
    try:
        run = _Run(cfg, context, command)
        run.setup()
        return run.run()
    finally:
        torch.set_num_threads(threads)  # set_num_threads is process-wide: leave it as found
        cleanup(context)


def train_classifier(config: TrainConfig | dict | None = None, **options) -> Path:
    """Noise-augmented training of a base classifier; returns the run folder."""
    return train(config, **{**options, "target": "classifier"})


def train_generator(config: TrainConfig | dict | None = None, **options) -> Path:
    """Train a noise parameter generator (``npg={"kind": ...}``); returns the run folder."""
    return train(config, **{**options, "target": "npg"})


# --------------------------------------------------------------------------- command line


def _centre(text: str):
    parts = text.replace(",", " ").split()
    if len(parts) != 2:
        raise argparse.ArgumentTypeError("--centre takes ROW,COLUMN")
    return [float(p) for p in parts]


def configure(parser: argparse.ArgumentParser) -> None:
    """Options of ``ucan train``. Unset options take the model's / target's defaults (listed in the help)."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (
        "examples:\n"
        "  ucan train classifier --model mnist_cnn --noise gaussian --scale 0.25 --out runs/mnist-g025\n"
        "  ucan train npg --kind universal --base runs/mnist-g025/final.pt --out runs/mnist-g025-universal\n"
        "  ucan train npg --kind pattern --p inf --kappa 0.01 --iota 1 --joint --base runs/mnist-g025/final.pt\n"
        "  ucan train npg --kind noisy_shift --base runs/mnist-g025 --out runs/mnist-g025-noisy-shift\n"
        "  ucan train npg --kind lipschitz_shift --lipschitz 0.5 --base runs/mnist-g025 --out runs/mnist-g025-lip\n"
        "  ucan train --resume --out runs/mnist-g025          (continue an interrupted run)\n"
        "  torchrun --nproc_per_node=2 -m ucan_smoothing.cli train classifier ...   (DDP)\n")
    parser.add_argument("target", nargs="?", choices=TARGETS,
                        help="classifier: noise-augmented training; npg: train a noise parameter generator")
    g = parser.add_argument_group("model and data")
    g.add_argument("--model", help="model name (mnist_cnn, resnet20, resnet110, resnet50); default: for `npg`, the "
                   "--base classifier's, else mnist_cnn")
    g.add_argument("--dataset", help="data set; default: for `npg`, the --base classifier's, else the model's")
    g.add_argument("--data-root", help="data folder (MNIST/Fashion-MNIST have defaults; CIFAR-10/ImageNet need one)")
    g.add_argument("--max-train", type=int, help="train on the first N training images only")
    g.add_argument("--max-test", type=int, help="evaluate on the first N test images only")
    g = parser.add_argument_group("noise")
    g.add_argument("--noise", help=f"isotropic family: {', '.join(FAMILIES)} (default gaussian)")
    g.add_argument("--scale", type=float, help="noise level lambda (default 0.25)")
    g.add_argument("--power-a", type=float, help="exponent a of the power-law family (a > input dimension)")
    g = parser.add_argument_group("noise parameter generator")
    g.add_argument("--kind", choices=sorted(GENERATORS) + sorted(SHIFTS),
                   help="NPG kind (npg target); with `classifier`, only pattern (a fixed noise shape). The sound "
                        "input-adaptive modes: noisy_shift (f(z + mu(z)) on the noisy sample z) and lipschitz_shift "
                        "(f(x + mu(x) + noise), mu L-Lipschitz, radius R / (1 + L)); docs/adaptive.md")
    g.add_argument("--npg-checkpoint", help="classifier target, or a shift kind: shape the (fixed) noise by the NPG "
                   "of this checkpoint (pattern or universal)")
    g.add_argument("--p", choices=["1", "2", "inf"], help="pattern: norm of the distance (default 2)")
    g.add_argument("--kappa", type=float, help="pattern: kappa >= 0 (default 0.01, pixel units)")
    g.add_argument("--iota", type=float, help="pattern: iota > 0 (default 1)")
    g.add_argument("--centre", type=_centre, help="pattern: centre ROW,COLUMN in pixels (default: image centre)")
    g.add_argument("--train-pattern", action="store_true", default=None,
                   help="pattern: learn kappa and iota (default: hand-set, as in the paper)")
    g.add_argument("--gamma", type=float, help="universal / input-dependent: bound of log sigma "
                   "(default 5; 2 on ImageNet; 1 for input-dependent); shift kinds: bound of |mu| (default 1)")
    g.add_argument("--gamma-mu", type=float, help="universal: bound of |mu| (default gamma)")
    g.add_argument("--normalize", choices=["none", "geometric"],
                   help="divide sigma by its geometric mean (default: geometric for pattern, none otherwise)")
    g.add_argument("--no-mu", action="store_true", default=None, help="universal: keep mu = 0")
    g.add_argument("--hidden", type=int, help="universal, lipschitz_shift: width of the MLP layers (default 256)")
    g.add_argument("--lipschitz", type=float, help="lipschitz_shift: the Lipschitz bound L enforced on mu "
                   "(default 0.5; certified radius R / (1 + L), L recomputed from the weights)")
    g.add_argument("--depth", type=int, help="lipschitz_shift: number of linear layers of mu (default 2)")
    g.add_argument("--latent-dim", type=int, help="universal: size of the fixed input vector (default 64)")
    g.add_argument("--base", help="npg target: checkpoint (or run folder) of the base classifier")
    g.add_argument("--joint", action="store_true", default=None, help="npg target: train the classifier too")
    g.add_argument("--sigma-weight", type=float, help="w in the loss -w * mean(sigma) + CE (default 0.01; "
                   "on MNIST 0.1 already costs ~18 points of accuracy under noise, 1 collapses to chance)")
    g = parser.add_argument_group("optimisation (defaults: Adam 1e-3 for mnist_cnn and NPGs; SGD 0.1, "
                                  "momentum 0.9, weight decay 1e-4, lr x0.1 every 30 of 90 epochs for ResNets)")
    g.add_argument("--epochs", type=int, help="number of epochs (default 10 mnist_cnn, 90 ResNets, 5 NPGs)")
    g.add_argument("--batch-size", type=int, help="global batch size (default 128; 256 for ResNets)")
    g.add_argument("--optimizer", choices=OPTIMIZERS)
    g.add_argument("--lr", type=float, help="learning rate")
    g.add_argument("--momentum", type=float, help="SGD momentum (default 0.9)")
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--lr-step", type=int, help="epochs between learning-rate decays (0: constant)")
    g.add_argument("--lr-decay", type=float, help="learning-rate factor at each step (default 0.1)")
    g.add_argument("--classifier-lr", type=float, help="npg target with --joint: the classifier's learning rate")
    g = parser.add_argument_group("run")
    g.add_argument("--seed", type=int, help="random seed (default 0)")
    g.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    g.add_argument("--threads", type=int, help="CPU threads per process (default: cores / processes)")
    g.add_argument("--workers", type=int, help="DataLoader workers for on-disk image folders (default 0)")
    g.add_argument("--checkpoint-every", type=int, metavar="STEPS",
                   help="also save last.pt every STEPS training steps inside an epoch, so an interruption "
                        "loses at most STEPS steps (default 0: at epoch ends only)")
    g.add_argument("--out", help="run folder (default runs/<target>-<model>-<noise><scale>-<time>)")
    g.add_argument("--resume", action="store_true", default=None,
                   help="continue the run in --out from its last checkpoint (same options; --epochs may grow)")
    g.add_argument("--no-progress", action="store_true", default=None, help="no progress bars or epoch lines")
    parser.set_defaults(_train_parser=parser)


_NPG_FLAGS = {"p": "p", "kappa": "kappa", "iota": "iota", "centre": "centre", "train_pattern": "trainable",
              "gamma": "gamma", "gamma_mu": "gamma_mu", "normalize": "normalize", "hidden": "hidden",
              "latent_dim": "latent_dim", "lipschitz": "lipschitz", "depth": "depth"}
_PLAIN_FLAGS = ("model", "dataset", "data_root", "max_train", "max_test", "noise", "scale", "npg_checkpoint", "base",
                "joint", "sigma_weight", "epochs", "batch_size", "optimizer", "lr", "momentum", "weight_decay",
                "lr_step", "lr_decay", "classifier_lr", "seed", "device", "threads", "workers", "checkpoint_every",
                "out", "resume")


def config_from_args(args: argparse.Namespace) -> dict:
    """The options given on the command line as a partial config (unset options left out).

    With ``--resume`` the saved config of the run folder fills in every option
    not given, so ``ucan train --resume --out RUN`` is enough.
    """
    given = {name: getattr(args, name) for name in _PLAIN_FLAGS if getattr(args, name, None) is not None}
    if args.target is not None:
        given["target"] = args.target
    if args.no_progress:
        given["progress"] = False
    if args.power_a is not None:
        given["noise_params"] = {"a": args.power_a}
    npg_given = {}
    for flag, key in _NPG_FLAGS.items():
        value = getattr(args, flag, None)
        if value is not None:
            npg_given[key] = (value if flag != "p" else (value if value == "inf" else int(value)))
    if args.no_mu:
        npg_given["learn_mu"] = False
    if args.kind is not None:
        given["npg"] = {"kind": args.kind, **npg_given}
    if args.resume:
        if not args.out:
            raise ValueError("--resume needs --out RUN_FOLDER")
        path = Path(args.out) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"nothing to resume: {str(path)!r} does not exist")
        saved = json.loads(path.read_text())["config"]
        if "npg" in given and saved.get("npg") is not None:
            given["npg"] = {**saved["npg"], **given["npg"]}
        elif npg_given and saved.get("npg") is not None:
            given["npg"] = {**saved["npg"], **npg_given}
        elif npg_given:
            raise ValueError("generator options were given but the run has no NPG")
        return {**saved, **given}
    if npg_given and args.kind is None:
        raise ValueError(f"generator options ({', '.join('--' + k.replace('_', '-') for k in npg_given)}) "
                         "need --kind")
    if "target" not in given:
        raise ValueError("say what to train: `ucan train classifier ...` or `ucan train npg ...`")
    return given


def command_line(args: argparse.Namespace) -> str:
    """The ``ucan train ...`` command equivalent to the parsed ``args`` (the options given, in order)."""
    parser = getattr(args, "_train_parser", None)
    words = ["ucan", "train"]
    if parser is None:
        return shlex.join(words + sys.argv[1:])
    for action in parser._actions:
        value = getattr(args, action.dest, None)
        if action.dest in ("help", "_train_parser") or value is None or value is False:
            continue
        if not action.option_strings:
            words.append(str(value))
        elif action.nargs == 0:
            words.append(action.option_strings[0])
        else:
            text = ",".join(f"{v:g}" for v in value) if isinstance(value, list) else str(value)
            words += [action.option_strings[0], text]
    return shlex.join(words)


def run(args: argparse.Namespace) -> int:
    values = config_from_args(args)
    out = train(values, command=command_line(args))
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"run folder: {out}")
    return 0

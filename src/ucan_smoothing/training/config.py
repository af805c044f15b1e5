"""The configuration of a training run: every option, its defaults per model and target, and checks."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field

from ..core.noises import FAMILIES, Noise, make_noise
from ..core.norms import parse_norm
from ..data import DATASETS, canonical_dataset_name
from ..models import checkpoint_identity, model_spec
from ..npg.generators import GENERATORS, make_generator
from ..npg.shifts import SHIFTS, make_shift
from ..runs import run_checkpoint

TARGETS = ("classifier", "npg")
OPTIMIZERS = ("sgd", "adam")
#: fields that may differ when a run is resumed (they do not change what is computed,
#: or, for ``epochs``, only extend it)
RESUMABLE_CHANGES = ("epochs", "device", "threads", "workers", "data_root", "out", "resume", "progress",
                     "checkpoint_every")


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
    if kind == "elastic_sigma":
        return dict(elasticity=0.01, gamma=0.5, hidden=64, depth=2)
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
            base_model, base_dataset = checkpoint_identity(run_checkpoint(cfg.base))
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
    _resolve_npg(cfg, spec.input_shape, base_noise)
    _check_target(cfg)
    if cfg.threads is not None and int(cfg.threads) < 1:
        raise ValueError(f"threads must be >= 1, got {cfg.threads}")
    return cfg


def _resolve_npg(cfg: TrainConfig, input_shape, base_noise: Noise) -> None:
    """Fill in the NPG's (or shift's) defaults and build it once to check its parameters."""
    if cfg.npg is None:
        return
    npg = dict(cfg.npg)
    kind = str(npg.pop("kind", "")).replace("-", "_")
    if kind not in GENERATORS and kind not in SHIFTS:
        raise ValueError(f"unknown NPG kind {kind!r}; known: {', '.join([*GENERATORS, *SHIFTS])}")
    cfg.npg = {"kind": kind, **{k: v for k, v in _npg_defaults(kind, cfg.dataset, base_noise).items()}, **npg}
    if kind == "lipschitz_shift":
        norm = parse_norm(cfg.npg["norm"])
        cfg.npg["norm"] = "inf" if math.isinf(norm) else int(norm)
    build = make_shift if kind in SHIFTS else make_generator
    build(kind, input_shape, **{k: v for k, v in cfg.npg.items() if k != "kind"})  # validate


def _check_target(cfg: TrainConfig) -> None:
    """The options that belong to one target only."""
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


def describe_training_noise(cfg: TrainConfig) -> dict:
    return make_noise(cfg.noise, cfg.scale, **cfg.noise_params).describe()


def config_differences(saved: TrainConfig, new: TrainConfig) -> list:
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

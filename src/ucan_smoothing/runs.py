"""The one way to open something to certify: :func:`load_model`.

It takes a run folder or checkpoint of ``ucan train`` (:func:`load_trained`,
:class:`TrainedRun`: the run carries its noise and generators), or a model
from elsewhere (:class:`ExternalModel`, with the FIXED noise given by the
caller): a checkpoint in Cohen et al.'s layout, a torchvision-style ResNet-50
state dict, a TorchScript file, or ``package.module:factory`` with optional
weights. Both kinds answer the same questions (``smoothed()``, ``noise()``,
``description()``, ``num_classes``, ``input_shape``, ``meta["dataset"]``), so
``ucan certify``, ``ucan attack`` and ``ucan predict`` depend on this module,
not on the training code.

The input contract, for every model: inputs are images in ``[0, 1]``, the
noise scale is in those pixel units, and any normalisation happens inside the
model (:mod:`ucan_smoothing.contract` checks it on a few images first).
"""

from __future__ import annotations

import importlib
import math
import os
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .core.anisotropic import Anisotropic
from .core.noises import Gaussian, Noise, make_noise
from .core.smooth import Smooth
from .data import DATASETS, canonical_dataset_name
from .models import CHECKPOINT_FORMAT, Autocast, load_checkpoint, load_torch_file, model_spec, to_channels_last
from .published import is_cohen_checkpoint, load_cohen_checkpoint, load_strict, load_torchvision_resnet50, read_state_dict
from .npg.generators import NoiseGenerator, generator_from_config
from .npg.dual import DualNoise, DualSmooth, FirstLogits, describe_menu
from .npg.elastic_sigma import ElasticSigmaSmooth
from .npg.lipschitz_shift import lipschitz_bounds
from .npg.paper_mode import PaperModeSmooth
from .npg.shifts import shift_from_config, shift_smoothed

#: the checkpoints of a run folder: rewritten after every epoch / written at the end
LAST, FINAL = "last.pt", "final.pt"


def prepare_model(model: nn.Module, device=None, channels_last: bool = False, amp: str | None = None) -> nn.Module:
    """``model`` on ``device`` (default: where it is), with weights channels-last if asked (faster
    convolutions, same outputs up to rounding) and in mixed precision with ``amp`` ("bf16"/"fp16")."""
    model = model if device is None else model.to(device)
    if channels_last:
        model = to_channels_last(model)
    return model if amp is None else Autocast(model, amp)


@dataclass
class TrainedRun:
    """A checkpoint of :mod:`ucan_smoothing.training` turned back into objects.

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
        if self.generator is None or self.elastic:
            return self.base_noise  # an elastic level scales it per input (the npg column says so)
        return self.generator.to_noise(self.base_noise, sigma_min=sigma_min)

    @property
    def elastic(self) -> bool:
        """True for a semi-elastic level (``elastic_sigma``): input-dependent, certified by its own bound."""
        return self.generator is not None and self.generator.kind == "elastic_sigma"

    @property
    def input_dependent(self) -> bool:
        """True for the paper's input-dependent NPG (certified only in the labelled paper mode)."""
        return self.generator is not None and self.generator.input_dependent and not self.elastic

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
                             "ucan_smoothing.npg")
        model = prepare_model(self.model, device, channels_last, amp)
        if self.elastic:
            return self._elastic_smoothed(model, device)
        if paper_mode:
            generator = self.generator if device is None else self.generator.to(device)
            return PaperModeSmooth(model, self.num_classes, self.base_noise, generator,
                                   input_shape=self.input_shape)
        noise = self.noise(sigma_min)
        if self.shift is not None:
            shift = self.shift if device is None else self.shift.to(device)
            return shift_smoothed(model, self.num_classes, noise, shift, input_shape=self.input_shape)
        return Smooth(model, self.num_classes, noise, input_shape=self.input_shape)

    def _elastic_smoothed(self, model, device) -> ElasticSigmaSmooth:
        if not isinstance(self.base_noise, Gaussian):
            raise ValueError(f"an elastic_sigma run is certified with Gaussian noise only, not {self.base_noise!r}")
        generator = (self.generator if device is None else self.generator.to(device)).eval()
        return ElasticSigmaSmooth(model, self.num_classes, self.base_noise.scale, generator.as_level(),
                                  generator.elasticity_bound(), input_shape=self.input_shape)

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
        if self.elastic:
            return f"elastic_sigma:r={self.generator.elasticity_bound():.4g}"
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


def run_checkpoint(path: str | os.PathLike) -> Path:
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
    path = run_checkpoint(path)
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
    run = TrainedRun(model, base, generator, meta, shift)
    return _dual_run(path, run, extra["dual"]) if extra.get("dual") is not None else run


@dataclass
class DualRun:
    """A dual-smoothing run (``ucan train-dual``, :mod:`ucan_smoothing.npg.dual`): a selector
    network under its own Gaussian noise and the fixed-noise expert runs it chooses among.
    It answers the questions of :class:`TrainedRun`; ``smoothed()`` is a :class:`DualSmooth`."""

    selector: TrainedRun
    experts: tuple  # TrainedRun each, in menu order
    share: float  # the selector's part of alpha
    generator = None  # the noise of each expert is fixed, the choice is certified
    shift = None
    input_dependent = False

    @property
    def model(self) -> nn.Module:
        return self.experts[0].model

    @property
    def meta(self) -> dict:
        return self.selector.meta

    @property
    def base_noise(self) -> Noise:
        return self.selector.base_noise

    def noise(self, sigma_min: float = 1e-6) -> DualNoise:
        return DualNoise(tuple(expert.noise() for expert in self.experts), self.selector.base_noise)

    def smoothed(self, device=None, *, paper_mode: bool = False, sigma_min: float = 1e-6,
                 channels_last: bool = False, amp: str | None = None) -> DualSmooth:
        if paper_mode:
            raise ValueError("--paper-mode is only for runs with an input-dependent generator; a dual run is sound")
        net = prepare_model(self.selector.model, device, channels_last, amp)
        selector = Smooth(FirstLogits(net, len(self.experts)).eval(), len(self.experts), self.selector.base_noise,
                          input_shape=self.input_shape)
        experts = [expert.smoothed(device, channels_last=channels_last, amp=amp) for expert in self.experts]
        return DualSmooth(selector, experts, self.share)

    def lipschitz(self):
        return None

    def description(self) -> str:
        """``dual:gaussian:0.25|gaussian:0.5|gaussian:1;selector=gaussian:0.5``"""
        return f"dual:{describe_menu([e.noise() for e in self.experts])};selector=gaussian:{self.base_noise.scale:g}"

    @property
    def num_classes(self) -> int:
        return self.experts[0].num_classes

    @property
    def input_shape(self) -> tuple:
        return self.experts[0].input_shape


def _dual_run(path, selector: TrainedRun, record: dict) -> DualRun:
    """The experts a dual checkpoint names, each checked against the SHA-256 it was trained with."""
    from .fileio import file_sha256

    experts = []
    for entry in record["experts"]:
        checkpoint = Path(entry["checkpoint"])
        if not checkpoint.is_file():
            raise FileNotFoundError(f"dual run {str(path)!r} needs its expert {str(checkpoint)!r}, which is missing")
        if file_sha256(checkpoint) != entry["sha256"]:
            raise ValueError(f"expert {str(checkpoint)!r} of dual run {str(path)!r} changed since the selector "
                             "was trained (SHA-256 differs): retrain the selector with ucan train-dual")
        experts.append(load_trained(checkpoint))
    if selector.base_noise.describe()["family"] != "gaussian":
        raise ValueError(f"dual run {str(path)!r}: the selector's noise must be Gaussian")
    return DualRun(selector, tuple(experts), float(record["share"]))


# --------------------------------------------------------------------------- models from elsewhere


@dataclass
class ExternalModel:
    """A model not trained by ``ucan train``, certified under FIXED noise given by the caller:
    isotropic ``base_noise``, or ``Anisotropic(base_noise, sigma, mu)`` when ``sigma`` / ``mu`` are set.

    ``meta`` says where it came from (``format``: cohen, torchvision, torchscript, factory; ``path``,
    ``arch``, ``normalization`` when known) and its ``dataset``.
    """

    model: nn.Module
    base_noise: Noise
    num_classes: int
    input_shape: tuple
    meta: dict = field(default_factory=dict)
    sigma: torch.Tensor | None = None
    mu: torch.Tensor | None = None
    generator = None  # no noise parameter generator, no shift: the noise is fixed
    shift = None
    input_dependent = False

    def noise(self, sigma_min: float = 1e-6):
        if self.sigma is None and self.mu is None:
            return self.base_noise
        sigma = torch.ones(self.input_shape) if self.sigma is None else self.sigma
        return Anisotropic(self.base_noise, sigma, self.mu, sigma_min=sigma_min)

    def smoothed(self, device=None, *, paper_mode: bool = False, sigma_min: float = 1e-6,
                 channels_last: bool = False, amp: str | None = None) -> Smooth:
        if paper_mode:
            raise ValueError("--paper-mode is only for `ucan train` runs with an input-dependent generator")
        model = prepare_model(self.model, device, channels_last, amp)
        return Smooth(model, self.num_classes, self.noise(sigma_min), input_shape=self.input_shape)

    def description(self) -> str:
        """Text for the ``npg`` column: ``none``, or ``fixed_sigma`` for noise shaped by ``--sigma`` / ``--mu``."""
        return "none" if self.sigma is None and self.mu is None else "fixed_sigma"

    def lipschitz(self):
        return None


def is_torchscript(path: Path) -> bool:
    """A TorchScript archive (``torch.jit.save``) rather than a ``torch.save`` file: it holds code."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("/constants.pkl") or "/code/" in name for name in archive.namelist())


def import_factory(spec: str):
    """``package.module:function`` -> the function (the user's own code, imported as they name it)."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"--model takes package.module:factory, got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"--model {spec}: cannot import {module_name!r} ({error})") from None
    factory = getattr(module, attribute, None)
    if not callable(factory):
        raise ValueError(f"--model {spec}: {module_name} has no callable {attribute!r}")
    return factory


def _factory_model(spec: str, weights) -> tuple[nn.Module, dict]:
    model = import_factory(spec)()
    if not isinstance(model, nn.Module):
        raise ValueError(f"--model {spec} returned {type(model).__name__}, not a torch.nn.Module")
    meta = {"format": "factory", "factory": spec}
    if weights is not None:
        load_strict(model, read_state_dict(weights), f"the weights of {os.fspath(weights)!r}")
        meta["weights"] = os.fspath(weights)
    return model, meta


def _file_model(path: Path, arch: str | None) -> tuple[nn.Module, dict]:
    if is_torchscript(path):
        if arch is not None:
            raise ValueError(f"{str(path)!r} is a TorchScript file: it needs no --arch")
        try:
            model = torch.jit.load(str(path), map_location="cpu")
        except Exception as error:  # torch raises several types for a broken archive
            raise ValueError(f"cannot load TorchScript file {str(path)!r}: {error}") from None
        return model, {"format": "torchscript", "path": str(path)}
    if arch == "resnet50":
        model, meta = load_torchvision_resnet50(path)
        return model, {**meta, "path": str(path)}
    if arch is not None:
        raise ValueError(f"--arch {arch!r}: a plain state dict can be read as resnet50 (torchvision-style); "
                         "other architectures come as Cohen-layout checkpoints or through --model")
    payload = load_torch_file(path)
    if is_cohen_checkpoint(payload):
        model, meta = load_cohen_checkpoint(path, payload)
        return model, {**meta, "path": str(path)}
    raise ValueError(f"cannot tell what {str(path)!r} holds: not a `ucan train` checkpoint, not Cohen et al.'s "
                     "layout (a dict with 'arch' and 'state_dict') and not TorchScript. For a torchvision "
                     "ResNet-50 state dict pass --arch resnet50; for your own model --model package.module:factory "
                     "--weights FILE")


def _is_ucan_run(path: Path) -> bool:
    if path.is_dir():
        return True
    if is_torchscript(path) or not zipfile.is_zipfile(path):
        return False
    try:  # the header only: memory-mapped, the weights are not read
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return False
    return isinstance(payload, dict) and payload.get("format") == CHECKPOINT_FORMAT


def _dataset_of(meta_dataset, dataset, where: str) -> str:
    if dataset is not None:
        dataset = canonical_dataset_name(dataset)
        if meta_dataset is not None and dataset != meta_dataset:
            raise ValueError(f"{where} is a {meta_dataset} model but --dataset {dataset} was given")
        return dataset
    if meta_dataset is None:
        raise ValueError(f"{where}: say which data set it classifies with --dataset "
                         f"({', '.join(DATASETS)})")
    return meta_dataset


def _output_classes(model: nn.Module, input_shape) -> int:
    """The number of logits ``model`` returns for one input of ``input_shape`` (one clean forward pass)."""
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    with torch.inference_mode():
        try:
            logits = model.eval()(torch.zeros((2, *input_shape), device=device))
        except Exception as error:
            raise ValueError(f"the model fails on a batch of {tuple(input_shape)} inputs: "
                             f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}") from None
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != 2:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"the model must return logits of shape (batch, classes); for a batch of 2 "
                         f"{tuple(input_shape)} inputs it returned {shape}")
    return int(logits.shape[1])


def _fixed_tensor(path, name: str, input_shape) -> torch.Tensor | None:
    if path is None:
        return None
    value = load_torch_file(path)
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"--{name} {os.fspath(path)!r} must hold one tensor, got {type(value).__name__}")
    try:
        return torch.broadcast_to(value, input_shape).clone()
    except RuntimeError:
        raise ValueError(f"--{name} {os.fspath(path)!r} has shape {tuple(value.shape)}, which does not fit the "
                         f"input shape {tuple(input_shape)}") from None


def load_model(source=None, *, arch: str | None = None, factory: str | None = None, weights=None,
               noise: Noise | None = None, sigma=None, mu=None, dataset: str | None = None,
               num_classes: int | None = None):
    """Open what the user names for certification: a :class:`TrainedRun` or an :class:`ExternalModel`.

    * ``source``: a run folder or checkpoint of ``ucan train``; a Cohen-layout checkpoint
      (``arch`` and ``state_dict``); a TorchScript file; a torchvision-style ResNet-50
      state dict with ``arch="resnet50"``.
    * ``factory="package.module:function"`` (no ``source``): the function's ``nn.Module``,
      with ``weights`` (a state dict file, read with ``weights_only=True``) if given.

    Models from elsewhere need their FIXED noise: ``noise`` (an isotropic family, in
    pixel units of [0, 1] inputs) and optionally ``sigma`` / ``mu`` files (tensors of
    the input's shape) for anisotropic noise; ``dataset`` when the file does not say.
    """
    if (source is None) == (factory is None):
        raise ValueError("name one model: a run folder or checkpoint file, or --model package.module:factory")
    external_options = noise is not None or sigma is not None or mu is not None
    if source is not None and _is_ucan_run(Path(source)):
        if external_options or arch is not None or weights is not None or num_classes is not None:
            raise ValueError(f"{os.fspath(source)!r} is a `ucan train` run: it carries its own model, noise and "
                             "generator; drop --arch/--weights/--noise/--scale/--sigma/--mu/--num-classes")
        return load_trained(source, expected_dataset=dataset)
    if factory is not None:
        model, meta = _factory_model(factory, weights)
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"no such model file or run folder: {str(path)!r}")
        if weights is not None:
            raise ValueError("--weights goes with --model package.module:factory")
        model, meta = _file_model(path, arch)
    where = meta.get("path") or meta.get("factory")
    meta["dataset"] = _dataset_of(meta.get("dataset"), dataset, repr(where))
    input_shape = tuple(meta.get("input_shape") or DATASETS[meta["dataset"]].input_shape)
    classes = _output_classes(model, input_shape)
    expected = num_classes if num_classes is not None else meta.get("num_classes", DATASETS[meta["dataset"]].num_classes)
    if classes != expected:
        raise ValueError(f"{where!r} returns {classes} logits per input but {expected} classes are expected"
                         + ("" if num_classes is not None else " (pass --num-classes if that is right)"))
    if noise is None:
        raise ValueError(f"{where!r} is not a `ucan train` run: give its noise with --noise FAMILY --scale LAMBDA "
                         "(pixel units of [0, 1] inputs), and --sigma/--mu files for fixed anisotropic noise")
    meta.update(input_shape=list(input_shape), num_classes=classes)
    return ExternalModel(model.eval(), noise, classes, input_shape, meta,
                         _fixed_tensor(sigma, "sigma", input_shape), _fixed_tensor(mu, "mu", input_shape))

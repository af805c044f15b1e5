"""The field's published checkpoints: Cohen et al.'s layout, and torchvision-style ResNet-50 weights.

Cohen et al. (and SmoothAdv, MACER, Consistency, SmoothMix, ... which reuse
their code) save ``torch.save({'epoch', 'arch', 'state_dict', 'optimizer'})``
where ``state_dict`` belongs to ``Sequential(NormalizeLayer, network)``: the
network's keys start with ``1.`` (``1.module.`` for the ImageNet ResNet-50,
which they wrap in ``DataParallel``; later works may wrap the whole
``Sequential`` as well: ``module.1.``). ``NormalizeLayer`` has no parameters,
so its means and standard deviations are not in the file: they are those of
that code, which for CIFAR-10 are NOT the data set's true standard deviations
that :mod:`ucan_smoothing.models` uses. A loader that kept ours would compute
another function with the same weights, so each architecture here carries the
normalisation of the layout.

Inputs are images in ``[0, 1]``; the noise is added before the normalisation
(inside the model), exactly as in Cohen et al.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from torch import nn

from .models import IMAGENET_MEAN, IMAGENET_STD, CifarResNet, Normalize, NormalizedNet, ResNet50, load_torch_file

#: Cohen et al.'s CIFAR-10 normalisation (``datasets.py`` of their code): these standard
#: deviations (0.2023, ...) differ from CIFAR-10's true ones (0.2470, ...) used by models.py
COHEN_CIFAR10_MEAN, COHEN_CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)


@dataclass(frozen=True)
class PublishedArch:
    """An architecture of a published layout: how to build it and what it expects."""

    name: str
    dataset: str
    num_classes: int
    input_shape: tuple

    def build(self) -> nn.Module:
        """The network with the layout's normalisation in front (random weights)."""
        if self.name == "resnet50":
            return NormalizedNet(ResNet50(self.num_classes), IMAGENET_MEAN, IMAGENET_STD)
        net = CifarResNet(int(self.name.removeprefix("cifar_resnet")), self.num_classes)
        net.normalize = Normalize(COHEN_CIFAR10_MEAN, COHEN_CIFAR10_STD)
        return net

    def network(self, model: nn.Module) -> nn.Module:
        """The part of ``model`` whose state dict is the checkpoint's network."""
        return model.net if isinstance(model, NormalizedNet) else model


COHEN_ARCHS = {
    arch.name: arch for arch in (
        PublishedArch("cifar_resnet20", "cifar10", 10, (3, 32, 32)),
        PublishedArch("cifar_resnet110", "cifar10", 10, (3, 32, 32)),
        PublishedArch("resnet50", "imagenet", 1000, (3, 224, 224)),
    )
}
#: prefixes of the network's keys in Cohen-layout state dicts, longest first
COHEN_PREFIXES = ("module.1.module.", "module.1.", "1.module.", "1.")


def is_cohen_checkpoint(payload) -> bool:
    """True for a loaded file in Cohen et al.'s layout: a dict with ``arch`` and ``state_dict``."""
    return isinstance(payload, dict) and isinstance(payload.get("arch"), str) and isinstance(
        payload.get("state_dict"), dict)


def strip_prefix(state: dict, prefixes) -> tuple[dict, str]:
    """``state`` without the first of ``prefixes`` that every key has (``""`` when none does)."""
    for prefix in prefixes:
        if state and all(key.startswith(prefix) for key in state):
            return {key[len(prefix):]: value for key, value in state.items()}, prefix
    return state, ""


def read_state_dict(path: str | os.PathLike) -> dict:
    """The state dict saved in ``path`` (bare, or under ``"state_dict"``), without a ``module.``
    (DataParallel) prefix; read with ``weights_only=True``."""
    state = load_torch_file(path)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(key, str) for key in state):
        raise ValueError(f"{os.fspath(path)!r} does not hold a state dict (got {type(state).__name__})")
    return strip_prefix(state, ("module.",))[0]


def load_strict(module: nn.Module, state: dict, source: str) -> None:
    """``module.load_state_dict(state, strict=True)`` with an error that names the file and a few keys."""
    expected, found = set(module.state_dict()), set(state)
    missing, unexpected = sorted(expected - found), sorted(found - expected)
    if missing or unexpected:
        raise ValueError(
            f"{source} does not fit {type(module).__name__}: {len(missing)} missing keys "
            f"{missing[:4]}, {len(unexpected)} unexpected keys {unexpected[:4]}")
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as error:  # same keys, other shapes
        lines = [line.strip() for line in str(error).splitlines() if "size mismatch" in line]
        raise ValueError(f"{source} does not fit {type(module).__name__}: "
                         f"{lines[0] if lines else str(error).splitlines()[-1].strip()}") from None


def load_cohen_checkpoint(path: str | os.PathLike, payload: dict | None = None) -> tuple[nn.Module, dict]:
    """The model of a Cohen-layout checkpoint, in eval mode on the CPU, and what is known about it.

    ``meta`` has ``arch``, ``dataset``, ``num_classes``, ``input_shape``,
    ``epoch`` (when saved) and ``normalization`` (the means and standard
    deviations applied inside the model).
    """
    path = os.fspath(path)
    payload = load_torch_file(path) if payload is None else payload
    if not is_cohen_checkpoint(payload):
        raise ValueError(f"{path!r} is not a checkpoint in Cohen et al.'s layout (a dict with 'arch' and "
                         "'state_dict')")
    arch = COHEN_ARCHS.get(payload["arch"])
    if arch is None:
        raise ValueError(f"{path!r} has arch {payload['arch']!r}; Cohen et al.'s layout knows "
                         f"{', '.join(COHEN_ARCHS)}")
    state, prefix = strip_prefix(payload["state_dict"], COHEN_PREFIXES)
    if not prefix:
        some = sorted(payload["state_dict"])[:3]
        raise ValueError(f"{path!r}: the state dict is not that of Sequential(NormalizeLayer, network) "
                         f"(keys should start with 1., 1.module. or module.1.; found {some})")
    model = arch.build()
    load_strict(arch.network(model), state, f"the weights of {path!r} (arch {arch.name})")
    normalize = model.normalize
    meta = {
        "format": "cohen", "arch": arch.name, "dataset": arch.dataset, "num_classes": arch.num_classes,
        "input_shape": arch.input_shape, "epoch": payload.get("epoch"), "key_prefix": prefix,
        "normalization": {"mean": normalize.mean.flatten().tolist(), "std": normalize.std.flatten().tolist()},
    }
    return model.eval(), meta


def load_torchvision_resnet50(path: str | os.PathLike, num_classes: int = 1000) -> tuple[nn.Module, dict]:
    """A torchvision-style ResNet-50 state dict (e.g. torchvision's ``resnet50-*.pth``) with ImageNet
    normalisation in front; a ``module.`` prefix (DataParallel) is removed."""
    path = os.fspath(path)
    state = read_state_dict(path)
    model = NormalizedNet(ResNet50(num_classes), IMAGENET_MEAN, IMAGENET_STD)
    load_strict(model.net, state, f"the weights of {path!r} (torchvision-style resnet50)")
    meta = {"format": "torchvision", "arch": "resnet50", "dataset": "imagenet", "num_classes": num_classes,
            "input_shape": (3, 224, 224),
            "normalization": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}}
    return model.eval(), meta

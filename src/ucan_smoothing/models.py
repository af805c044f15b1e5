"""The paper's base classifiers, a name registry, and self-describing checkpoints.

Every model takes images in [0, 1] pixel space and normalises them itself (a
``Normalize`` module runs first), so smoothing noise is added in pixel space,
as in Cohen et al. The models are written here so that torchvision is not
needed; ``imagenet_resnet50`` keeps torchvision's parameter names so that a
torchvision ``resnet50-*.pth`` file loads into its inner network unchanged.

Models: ``mnist_cnn`` (small 2-conv CNN), ``resnet20`` / ``resnet110``
(CIFAR-10 ResNets of He et al. 2016), ``resnet50`` (ImageNet).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
import torch.nn.functional as F

from .fileio import atomic_open

MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

CHECKPOINT_FORMAT = "ucan_smoothing.checkpoint"
CHECKPOINT_VERSION = 1


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel, for NCHW input in [0, 1].

    mean/std are fixed by the model's name, so they are non-persistent buffers:
    they follow ``.to(device)`` but stay out of the state dict (which keeps the
    ResNet-50 inner state dict identical to torchvision's).
    """

    def __init__(self, mean, std):
        super().__init__()
        if len(mean) != len(std) or min(std) <= 0:
            raise ValueError(f"bad normalisation mean={mean} std={std}")
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


class NormalizedNet(nn.Module):
    """``net(normalize(x))``; ``net``'s own state dict is left untouched."""

    def __init__(self, net: nn.Module, mean, std):
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x))


# --------------------------------------------------------------------------- MNIST


class MnistCNN(nn.Module):
    """Two conv layers and two dense layers for 1x28x28 MNIST digits.

    Small on purpose: Monte-Carlo certification runs thousands of noisy
    forward passes per image, and this one does about 30,000 samples/s on two
    CPU cores, stored channels-last (28 -> conv3 26 -> pool 13 -> conv3 11 -> pool 5).
    Each ReLU runs after its max-pool, on a quarter of the values: ReLU is
    nondecreasing, so ``relu(max_pool(x)) == max_pool(relu(x))`` exactly.
    """

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.normalize = Normalize(MNIST_MEAN, MNIST_STD)
        self.conv1 = nn.Conv2d(1, 32, 3)
        self.conv2 = nn.Conv2d(32, 64, 3)
        self.fc1 = nn.Linear(64 * 5 * 5, 128)
        self.fc2 = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.normalize(x)
        x = F.relu(F.max_pool2d(self.conv1(x), 2))
        x = F.relu(F.max_pool2d(self.conv2(x), 2))
        x = F.relu(self.fc1(torch.flatten(x, 1)))
        return self.fc2(x)


# --------------------------------------------------------------------------- CIFAR ResNets


class BasicBlock(nn.Module):
    """Two 3x3 convs with an identity (or 1x1 conv projection) shortcut."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(out + shortcut)


class CifarResNet(nn.Module):
    """ResNet for 3x32x32 input (He et al. 2016, section 4.2): depth = 6n + 2.

    Three stages of n basic blocks with 16, 32, 64 channels, global average
    pooling, one linear layer. Stage changes use a 1x1 conv projection (as in
    the CIFAR ResNet-110 used by Cohen et al., whose parameter names -- conv1,
    bn1, layer1..3, fc -- this module shares).
    """

    def __init__(self, depth: int, num_classes: int = 10):
        super().__init__()
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1 (20, 32, 44, 56, 110, ...), got {depth}")
        n = (depth - 2) // 6
        self.depth = depth
        self.normalize = Normalize(CIFAR10_MEAN, CIFAR10_STD)
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._stage(16, 16, n, stride=1)
        self.layer2 = self._stage(16, 32, n, stride=2)
        self.layer3 = self._stage(32, 64, n, stride=2)
        self.fc = nn.Linear(64, num_classes)
        _init_weights(self)

    @staticmethod
    def _stage(in_planes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [BasicBlock(in_planes, planes, stride)]
        layers += [BasicBlock(planes, planes) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(self.normalize(x))))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = F.adaptive_avg_pool2d(x, 1)
        return self.fc(torch.flatten(x, 1))


def cifar_resnet(depth: int, num_classes: int = 10) -> CifarResNet:
    """CIFAR-10 ResNet of the given depth (6n + 2), normalisation inside."""
    return CifarResNet(depth, num_classes)


def resnet20(num_classes: int = 10) -> CifarResNet:
    return CifarResNet(20, num_classes)


def resnet110(num_classes: int = 10) -> CifarResNet:
    return CifarResNet(110, num_classes)


# --------------------------------------------------------------------------- ImageNet ResNet-50


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (strided, "ResNet v1.5") -> 1x1 with 4x expansion; torchvision names."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        out_planes = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_planes != out_planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, out_planes, 1, stride, bias=False), nn.BatchNorm2d(out_planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(out + shortcut)


class ResNet50(nn.Module):
    """ImageNet ResNet-50 whose state dict matches torchvision's ``resnet50()`` key for key."""

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._stage(64, 64, 3, stride=1)
        self.layer2 = self._stage(256, 128, 4, stride=2)
        self.layer3 = self._stage(512, 256, 6, stride=2)
        self.layer4 = self._stage(1024, 512, 3, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512 * Bottleneck.expansion, num_classes)
        _init_weights(self)

    @staticmethod
    def _stage(in_planes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [Bottleneck(in_planes, planes, stride)]
        layers += [Bottleneck(planes * Bottleneck.expansion, planes) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def imagenet_resnet50(pretrained_weights_path: str | os.PathLike | None = None,
                      num_classes: int = 1000) -> NormalizedNet:
    """ResNet-50 with ImageNet normalisation inside: ``model.net`` is the bare network.

    If ``pretrained_weights_path`` is given it must hold a state dict of a
    torchvision-style ResNet-50 (e.g. torchvision's ``resnet50-*.pth``); it is
    loaded strictly into ``model.net`` (see ``load_state_dict_file``).
    """
    if pretrained_weights_path is not None and not os.path.isfile(pretrained_weights_path):
        # Checked before building: initialising 25 M weights takes a second.
        raise FileNotFoundError(f"no such ResNet-50 weights file: {os.fspath(pretrained_weights_path)!r}")
    model = NormalizedNet(ResNet50(num_classes), IMAGENET_MEAN, IMAGENET_STD)
    if pretrained_weights_path is not None:
        load_state_dict_file(model.net, pretrained_weights_path)
    return model


def to_channels_last(model: nn.Module) -> nn.Module:
    """Store the model's 4-D weights channels-last (NHWC), in place; returns the model.

    The values do not change (outputs agree up to float rounding), but
    convolutions then run on NHWC kernels: `ucan bench` measured the MNIST CNN
    about 1.7x and ResNet-20 about 1.3x faster on this project's 2-core CPU.
    Layers without 4-D weights are left as they are.
    """
    return model.to(memory_format=torch.channels_last)


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class Autocast(nn.Module):
    """``model`` run under ``torch.autocast`` (mixed precision), returning float32 logits.

    Meant for GPUs, where half-precision convolutions use the tensor cores.
    The noisy input stays float32 and the rounding happens inside, so the
    autocast model is simply another deterministic base classifier and the
    certificates stay sound; they certify THIS classifier, whose votes can
    differ slightly from the float32 model's.
    """

    def __init__(self, model: nn.Module, dtype: str | torch.dtype = "bf16"):
        super().__init__()
        if isinstance(dtype, str):
            if dtype not in AMP_DTYPES:
                raise ValueError(f"unknown mixed-precision type {dtype!r}; use one of {', '.join(AMP_DTYPES)}")
            dtype = AMP_DTYPES[dtype]
        self.model, self.dtype = model, dtype

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        with torch.autocast(z.device.type, dtype=self.dtype):
            return self.model(z).float()


def _init_weights(model: nn.Module) -> None:
    # He initialisation for convs, unit BN: the usual ResNet start.
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def load_state_dict_file(module: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a saved state dict into ``module`` strictly, with errors that name the file.

    Accepts a bare state dict or a dict holding one under ``"state_dict"`` /
    ``"model"``; a leading ``"module."`` (DataParallel) or ``"1.module."``
    (Cohen et al.'s normalise-then-network checkpoints) prefix is removed.
    """
    state = load_torch_file(path)
    if isinstance(state, dict):
        for key in ("state_dict", "model"):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise ValueError(f"{os.fspath(path)!r} does not hold a state dict (got {type(state).__name__})")
    for prefix in ("1.", "module."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as err:
        expected, found = set(module.state_dict()), set(state)
        missing, unexpected = sorted(expected - found), sorted(found - expected)
        raise ValueError(
            f"weights in {os.fspath(path)!r} do not fit {type(module).__name__}: "
            f"{len(missing)} missing keys {missing[:5]}, {len(unexpected)} unexpected keys "
            f"{unexpected[:5]}" + ("" if missing or unexpected else f"; {str(err).splitlines()[-1].strip()}")
        ) from err
    return module


def load_torch_file(path: str | os.PathLike, mmap: bool = False):
    """The object saved in ``path``, read with ``weights_only=True`` (tensors, dicts, numbers: never
    pickled code); a missing file raises FileNotFoundError, an unreadable one ValueError naming it."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such file: {path!r}")
    try:
        # weights_only: never run pickled code from a file we are handed.
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:  # torch raises several types for corrupt files
        raise ValueError(f"cannot read {path!r} as a torch file: {err}") from err


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class ModelSpec:
    """What a registered model is: its builder and the data it expects."""

    name: str
    dataset: str
    input_shape: tuple[int, int, int]
    num_classes: int
    builder: Callable[..., nn.Module]


MODELS: dict[str, ModelSpec] = {
    spec.name: spec for spec in (
        ModelSpec("mnist_cnn", "mnist", (1, 28, 28), 10, MnistCNN),
        ModelSpec("resnet20", "cifar10", (3, 32, 32), 10, resnet20),
        ModelSpec("resnet110", "cifar10", (3, 32, 32), 10, resnet110),
        ModelSpec("resnet50", "imagenet", (3, 224, 224), 1000, imagenet_resnet50),
    )
}
MODEL_INPUT_SHAPES: dict[str, tuple[int, int, int]] = {n: s.input_shape for n, s in MODELS.items()}
MODEL_NUM_CLASSES: dict[str, int] = {n: s.num_classes for n, s in MODELS.items()}
MODEL_DATASETS: dict[str, str] = {n: s.dataset for n, s in MODELS.items()}


def model_spec(name: str) -> ModelSpec:
    """The registry entry for ``name``; ``ValueError`` listing known names otherwise."""
    try:
        return MODELS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(MODELS)}") from None


def build_model(name: str, **kwargs) -> nn.Module:
    """A fresh (randomly initialised) model by registry name; kwargs go to its builder."""
    return model_spec(name).builder(**kwargs)


# --------------------------------------------------------------------------- checkpoints


def save_checkpoint(path: str | os.PathLike, model: nn.Module, *, model_name: str,
                    dataset: str, extra: dict | None = None) -> None:
    """Save ``model``'s weights with what they are, atomically.

    ``extra`` holds any further metadata (noise family, scale, NPG kind, an
    NPG state dict, ...); it must be made of plain Python values and tensors,
    because loading uses ``torch.load(weights_only=True)``. The file is written
    to a temporary name in the same folder and then renamed over ``path``, so
    a crash never leaves a half-written checkpoint under the real name.
    """
    model_spec(model_name)  # fail before writing if the name is unknown
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "model_name": model_name,
        "dataset": dataset,
        "extra": dict(extra or {}),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    with atomic_open(path) as handle:
        torch.save(payload, handle)


def _checkpoint_payload(path: str, mmap: bool = False) -> dict:
    payload = load_torch_file(path, mmap=mmap)
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path!r} is not a ucan_smoothing checkpoint (no {CHECKPOINT_FORMAT!r} header)")
    if payload.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"{path!r} has checkpoint version {payload.get('version')!r}; "
                         f"this code reads version {CHECKPOINT_VERSION}")
    return payload


def checkpoint_identity(path: str | os.PathLike) -> tuple[str, str]:
    """``(model name, data set)`` of a ``save_checkpoint`` file, without reading its weights
    (memory-mapped); errors as for :func:`load_checkpoint`."""
    payload = _checkpoint_payload(os.fspath(path), mmap=True)
    return payload["model_name"], payload["dataset"]


def load_checkpoint(path: str | os.PathLike, expected_model_name: str | None = None,
                    expected_dataset: str | None = None) -> tuple[nn.Module, dict]:
    """Rebuild the model saved by ``save_checkpoint``; return ``(model, meta)``.

    ``meta`` has ``model_name``, ``dataset``, ``extra`` and ``path``. The model
    is in eval mode on the CPU. A checkpoint of another model or data set than
    expected raises ``ValueError`` naming both; a missing file raises
    ``FileNotFoundError`` and an unreadable one ``ValueError``, naming the path.
    """
    path = os.fspath(path)
    payload = _checkpoint_payload(path)
    name, dataset = payload["model_name"], payload["dataset"]
    if expected_model_name is not None and name != expected_model_name:
        raise ValueError(f"checkpoint {path!r} holds model {name!r} but {expected_model_name!r} was expected")
    if expected_dataset is not None and dataset != expected_dataset:
        raise ValueError(f"checkpoint {path!r} was trained on {dataset!r} but {expected_dataset!r} was expected")
    model = build_model(name)
    try:
        model.load_state_dict(payload["state_dict"], strict=True)
    except RuntimeError as err:
        raise ValueError(f"weights in checkpoint {path!r} do not fit model {name!r}: {err}") from err
    model.eval()
    meta = {"model_name": name, "dataset": dataset, "extra": payload["extra"], "path": path}
    return model, meta

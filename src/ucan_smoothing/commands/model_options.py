"""The options that name a model, shared by ``ucan certify``, ``ucan predict`` and ``ucan attack``.

``MODEL`` is a run folder or checkpoint of ``ucan train``, a checkpoint in
Cohen et al.'s layout, a TorchScript file, or (with ``--arch resnet50``) a
torchvision-style state dict; ``--model package.module:factory`` names any
other model. A model not trained here is certified under the noise given by
``--noise/--scale`` (and ``--sigma/--mu`` for fixed anisotropic noise).
"""

from __future__ import annotations

import argparse
import math

import torch

from ..contract import DEFAULT_IMAGES, check_input_contract
from ..core.batch_size import fastest_batch_size
from ..core.noises import FAMILIES, make_noise
from ..core.smooth import Smooth
from ..core.statistics import check_count
from ..distributed import cleanup, init_distributed
from ..results import merge_shards
from ..runs import load_model


def add_model_options(parser: argparse.ArgumentParser, *, positional: bool = True) -> None:
    if positional:
        parser.add_argument("model", nargs="?", default=None, metavar="MODEL",
                            help="run folder or checkpoint of `ucan train`, a Cohen et al. checkpoint "
                                 "({'arch', 'state_dict'}), a TorchScript file, or a state dict with --arch")
    group = parser.add_argument_group("a model not trained by `ucan train` (with its fixed noise)")
    group.add_argument("--model", dest="factory", default=None, metavar="PACKAGE.MODULE:FACTORY",
                       help="a function returning your torch.nn.Module (inputs in [0, 1], normalisation inside)")
    group.add_argument("--weights", default=None, help="state dict for --model (read with weights_only=True)")
    group.add_argument("--arch", choices=("resnet50",), default=None,
                       help="read MODEL as a plain state dict of this architecture (torchvision-style)")
    group.add_argument("--noise", choices=sorted(FAMILIES), default=None,
                       help="noise family the model is smoothed with")
    group.add_argument("--scale", type=float, default=None,
                       help="noise level lambda, in pixel units of [0, 1] inputs")
    group.add_argument("--power-a", type=float, default=None, help="exponent a of the power-law family")
    group.add_argument("--sigma", default=None, metavar="FILE.pt",
                       help="fixed per-pixel noise scale (a tensor of the input's shape): anisotropic noise")
    group.add_argument("--mu", default=None, metavar="FILE.pt", help="fixed noise shift (a tensor of the input's shape)")
    group.add_argument("--num-classes", type=int, default=None,
                       help="number of classes (default: the data set's; checked against the model's logits)")


def noise_from_args(args):
    """The isotropic family of ``--noise/--scale`` (None when not given); one clear error otherwise."""
    if args.noise is None:
        if args.scale is not None or args.power_a is not None:
            raise ValueError("--scale and --power-a need --noise FAMILY")
        if args.sigma is not None or args.mu is not None:
            raise ValueError("--sigma and --mu shape the noise of --noise FAMILY --scale LAMBDA: give those too")
        return None
    if args.scale is None:
        raise ValueError(f"--noise {args.noise} needs --scale LAMBDA (in pixel units of [0, 1] inputs)")
    if not (math.isfinite(args.scale) and args.scale > 0):
        raise ValueError(f"--scale must be finite and > 0, got {args.scale}")
    params = {} if args.power_a is None else {"a": args.power_a}
    return make_noise(args.noise, args.scale, **params)


def open_model(args):
    """The model the options name (:func:`ucan_smoothing.runs.load_model`)."""
    if args.num_classes is not None and args.num_classes < 2:
        raise ValueError(f"--num-classes must be >= 2, got {args.num_classes}")
    return load_model(args.model, arch=args.arch, factory=args.factory, weights=args.weights,
                      noise=noise_from_args(args), sigma=args.sigma, mu=args.mu,
                      dataset=getattr(args, "dataset", None), num_classes=args.num_classes)


def model_identity(args, loaded) -> dict:
    """What the result file's config records about the model (its identity for resuming)."""
    from ..fileio import file_sha256
    from ..runs import ExternalModel, run_checkpoint

    if not isinstance(loaded, ExternalModel):
        checkpoint = run_checkpoint(args.model)
        return {"checkpoint": str(checkpoint.resolve()), "checkpoint_sha256": file_sha256(checkpoint)}
    identity = {"model_format": loaded.meta["format"], "base_noise": loaded.base_noise.describe()}
    for key, option in (("model_file", args.model), ("weights", args.weights), ("sigma", args.sigma),
                        ("mu", args.mu)):
        if option is not None:
            identity[key] = str(option)
            identity[f"{key}_sha256"] = file_sha256(option)
    if args.factory is not None:
        identity["factory"] = args.factory
    for key in ("arch", "normalization", "input_shape", "num_classes"):
        if key in loaded.meta:
            identity[key] = loaded.meta[key]
    return identity


def reopen_model(config: dict, dataset: str | None = None):
    """The model a result file's config names (``model_identity``): a ``ucan train`` checkpoint, or a
    model from elsewhere with the noise it was certified under."""
    if "model_format" not in config:
        return load_model(config["checkpoint"], dataset=dataset)
    base = dict(config["base_noise"])
    noise = make_noise(base.pop("family"), base.pop("scale"), **{k: v for k, v in base.items() if k == "a"})
    return load_model(config.get("model_file"), arch=config.get("arch") if config["model_format"] == "torchvision"
                      else None, factory=config.get("factory"), weights=config.get("weights"), noise=noise,
                      sigma=config.get("sigma"), mu=config.get("mu"), dataset=dataset or config.get("dataset"),
                      num_classes=config.get("num_classes"))

#: config keys that change how fast rows come, not what they are (with the pool's noise streams)
SPEED_KEYS = ("batch_size", "batch_probe", "pool_size", "contract")


def batch_size_option(text: str):
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--batch-size takes a number or auto, got {text!r}") from None


def add_run_options(parser: argparse.ArgumentParser, what: str) -> None:
    """The data, device and speed options of a per-image command (certify, predict)."""
    parser.add_argument("--dataset", default=None, help="data set (default: the one the model is for)")
    parser.add_argument("--split", default="test", help="train, test or foolbox (the real sample images)")
    parser.add_argument("--data-root", default=None, help="folder of the data set in its standard format")
    parser.add_argument("--batch-size", type=batch_size_option, default="auto",
                        help="noisy samples per forward pass; auto: a short probe picks the fastest")
    parser.add_argument("--pool-size", type=int, default=None,
                        help="images in flight at once (default: as many as fill the batches)")
    parser.add_argument("--skip", type=int, default=1, help=f"{what} every k-th image")
    parser.add_argument("--max", type=int, default=None, help=f"{what} at most this many images")
    parser.add_argument("--seed", type=int, default=0, help="noise seed; image i uses (seed, i)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                        help="store the classifier's conv weights channels-last: same outputs up to rounding, "
                             "faster convolutions")
    parser.add_argument("--amp", choices=("bf16", "fp16"), default=None,
                        help="run the classifier in mixed precision (for GPUs); certifies that classifier")
    parser.add_argument("--contract-images", type=int, default=DEFAULT_IMAGES,
                        help="images for the input-contract check (clean vs noisy accuracy)")
    parser.add_argument("--no-contract-check", dest="contract_check", action="store_false",
                        help="go on even when the input-contract check finds accuracy at chance")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def check_run_options(args) -> None:
    check_count("--skip", args.skip)
    check_count("--contract-images", args.contract_images)
    for name, value in (("--batch-size", None if args.batch_size == "auto" else args.batch_size),
                        ("--max", args.max), ("--pool-size", args.pool_size)):
        if value is not None:
            check_count(name, value)


def check_contract(model, smooth, data, args):
    """The input-contract check on the first of the split's every ``--skip``-th images (however few
    ``--max`` asks for); stops, before any file is written, when it looks broken."""
    chosen = range(0, len(data), args.skip)[: args.contract_images]
    images, labels = zip(*(data[i] for i in chosen))
    report = check_input_contract(smooth, getattr(smooth, "model", model.model), torch.stack(images),
                                  [int(label) for label in labels], model.num_classes, seed=args.seed)
    print(report.line())
    problem = report.problem()
    if problem and args.contract_check:
        raise ValueError(f"{problem}. Check the input range ([0, 1]), the normalisation (inside the model) and "
                         "the noise units, or pass --no-contract-check to certify anyway")
    if problem:
        print(f"warning: {problem} (certifying anyway: --no-contract-check)")
    return report


def choose_batch_size(smooth, x, args, device) -> tuple:
    """``(batch size, probe measurements or None)``: the fixed --batch-size, or the probe's fastest."""
    if args.batch_size != "auto":
        return args.batch_size, None
    if not isinstance(smooth, Smooth):
        return 1000, None  # input-adaptive modes draw their own noise per image
    best, measurements = fastest_batch_size(smooth.model, smooth.noise, x, device=device)
    return best, [{k: round(v, 6) if isinstance(v, float) else v for k, v in m.items()} for m in measurements]


def first_image_shape(model, data, indices, split: str) -> tuple:
    """The shape of the first image to process, checked against the model's (one image at least)."""
    if not indices:
        raise ValueError(f"the {split} split has no images to certify")
    shape = tuple(data[indices[0]][0].shape)
    if shape != tuple(model.input_shape):
        raise ValueError(f"image {indices[0]} of the {split} split has shape {shape} but the model "
                         f"takes {tuple(model.input_shape)}")
    return shape


def run_in_process_group(args, body) -> int:
    """``body(args, context)`` inside the ``torchrun`` process group, if there is one."""
    context = init_distributed(args.device)
    try:
        return body(args, context)
    finally:
        cleanup(context)


def merge_parts(context, out, indices, non_identity) -> None:
    """Under ``torchrun``: once every rank has written its part, rank 0 merges them into ``out``."""
    if context.distributed:
        context.barrier()
        if context.is_main:
            merge_shards(out, context.world_size, expected_indices=indices, non_identity=non_identity)
        context.barrier()

"""Certify a model on a data split, one TSV row per image, resumable.

``ucan certify MODEL --out results.tsv`` runs Cohen's CERTIFY on every
``--skip``-th test image, at most ``--max`` of them; ``--radius r`` only
decides each image at one radius (:mod:`ucan_smoothing.core.sequential`) and
``--radii r1 r2 ...`` the whole certified-accuracy table
(:mod:`ucan_smoothing.core.grid`), both stopping as soon as the answer is
known. ``MODEL`` is anything :func:`ucan_smoothing.runs.load_model` opens: a
``ucan train`` run, a Cohen-layout checkpoint, a TorchScript file, a
torchvision ResNet-50 state dict (``--arch resnet50``) or ``--model
package.module:factory``; a model from elsewhere needs its noise
(``--noise/--scale``, ``--sigma/--mu``).

Before anything is written the command checks every option, then the input
contract on a few images (:mod:`ucan_smoothing.contract`: clean and noisy
accuracy, printed and recorded), and picks the fastest forward batch size
(``--batch-size auto``, :mod:`ucan_smoothing.core.batch_size`).

Many images are in flight at once (:mod:`ucan_smoothing.core.pool`), so every
forward batch is full even while sequential stages are small. Image ``idx``
draws its noise from its own stream of ``(--seed, idx)`` whatever the batch
size, the pool or the number of processes, so a resumed or multi-process run
gives the rows of a single uninterrupted one (up to logit ties broken by
batch-dependent rounding, see the pool's docstring), and a larger ``--max``
extends a file. Under ``torchrun`` the images are split across processes,
each writes its own part, and rank 0 merges them.

What is certified is the model's own smoothed classifier: fixed noise, the
sound input-adaptive modes (``noisy_shift``: ``f(z + mu(z))`` under fixed
noise; ``lipschitz_shift``: radius ``R / (1 + L)``, the fixed-noise classifier
at ``x + mu(x)``, so it runs in the pool and in the sequential modes at radii
times ``1 + L``), or, only with ``--paper-mode``, the paper's input-dependent
NPG, labelled NOT a certificate.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from tqdm.auto import tqdm

from ..core.certificate import ABSTAIN, Certificate, scale_radii
from ..core.grid import FUTILITY_LEVEL, check_radii, plan_grid
from ..core.norms import norm_name, parse_norm
from ..core.pool import QUANTUM, certify_grid_pool, certify_pool, certify_radius_pool, plan_radius
from ..core.float_sound import float_sound_smooth, quantize
from ..core.noises import Gaussian
from ..core.smooth import Smooth
from ..core.statistics import check_alpha, check_can_certify, check_count
from ..core.streams import image_generator
from ..data import load_dataset
from ..fileio import atomic_open
from ..models import load_torch_file
from ..npg.lipschitz_shift import LipschitzShiftSmooth
from ..npg.memory import MemorySmooth
from ..runs import DualRun, prepare_model
from ..results import (
    FLOAT_SOUND_COLUMN,
    GRID_COLUMNS,
    PER_IMAGE_NON_IDENTITY_KEYS,
    RESULT_SCHEMA,
    SEQUENTIAL_COLUMNS,
    ResultWriter,
    describe_noise,
    row_from_certificate,
    shard_path,
    split_indices,
)
from .model_options import (
    SPEED_KEYS,
    first_image_shape,
    merge_parts,
    run_in_process_group,
    add_model_options,
    add_run_options,
    check_contract,
    check_run_options,
    choose_batch_size,
    model_identity,
    open_model,
)

#: the noise streams of the pool: part of a file's identity (rows of another stream definition differ)
NOISE_STREAMS = f"pool-quanta-{QUANTUM}"


def configure(parser: argparse.ArgumentParser) -> None:
    add_model_options(parser)
    parser.add_argument("--out", required=True, help="result file (TSV); a JSON sidecar is written beside it")
    parser.add_argument("--n0", type=int, default=100, help="selection samples")
    parser.add_argument("--n", type=int, default=100_000,
                        help="estimation samples (with --radius/--radii: at most this many)")
    parser.add_argument("--alpha", type=float, default=0.001, help="failure probability")
    add_run_options(parser, what="certify")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--radius", type=float, default=None,
                      help="sequential mode: only decide whether each image is certified at this radius")
    mode.add_argument("--radii", type=float, nargs="+", default=None, metavar="R",
                      help="grid mode: the largest of these radii at which each image is certified "
                           "(a whole certified-accuracy table)")
    parser.add_argument("--norm", default=None,
                        help="norm of --radius / --radii: l1, l2, linf (default: the noise's native norm)")
    parser.add_argument("--method", choices=("cp", "betting"), default="cp", help="sequential test of --radius")
    parser.add_argument("--float-sound", action="store_true",
                        help="certificates that hold for the floating-point arithmetic actually run (Voracek and "
                             "Hein 2023): images on the 1/255 grid, Gaussian noise rounded to it, the model sees "
                             "grid values only; isotropic Gaussian noise only (docs/float_sound.md)")
    parser.add_argument("--paper-mode", action="store_true",
                        help="certify an input-dependent NPG as the paper does (sigma(x), mu(x) frozen at the clean "
                             "input): reproduces its numbers, NOT a certificate (rows get is_certificate=false)")
    parser.add_argument("--memory", action="store_true",
                        help="with --paper-mode: answer the images in order through a memory of the regions already "
                             "issued (abstain on a conflict, shrink a region over an earlier answer of another "
                             "class): a guarantee about this sequence of queries, still NOT a certificate "
                             "(npg/memory.py, docs/adaptive.md); kept in OUT.memory.pt for resuming")


# -- checks, all before anything is written --------------------------------------------------------


def _check_options(args) -> None:
    """The options that need no file, checked before anything is loaded or written."""
    check_alpha(args.alpha)
    check_count("--n0", args.n0)
    check_count("--n", args.n)
    check_run_options(args)
    if args.radius is None and args.radii is None:
        if args.norm is not None:
            raise ValueError("--norm only applies with --radius or --radii; without them every row has "
                             "the certified radius in each norm (radius_l1, radius_l2, radius_linf)")
        check_can_certify(args.n, args.alpha)
    elif args.norm is not None:
        parse_norm(args.norm)
    if args.radii is not None:
        check_radii(args.radii)


def _check_mode(model, args) -> bool:
    """True for a paper-mode run; refuses the combinations with the sequential modes that are not proven.
    (An input-dependent NPG without --paper-mode, and the reverse, are refused by ``model.smoothed``.)"""
    paper_mode = getattr(args, "paper_mode", False)
    sequential = args.radius is not None or args.radii is not None
    if paper_mode and sequential:
        raise ValueError("--paper-mode cannot be combined with --radius or --radii")
    if getattr(args, "memory", False) and not paper_mode:
        raise ValueError("--memory goes with --paper-mode (the memory guards the paper's input-dependent answers; "
                         "the other modes are proven certificates and need none)")
    if isinstance(model, DualRun) and sequential:
        raise ValueError("the sequential mode (--radius, --radii) is not available for a dual run: certify it "
                         "without them (two CERTIFY runs per image, the selector's and the expert's)")
    return paper_mode


def _float_sound(model, args, device) -> Smooth:
    """The float-sound smoothed classifier of an isotropic Gaussian model (refused for anything else)."""
    noise = model.noise()
    if model.generator is not None or model.shift is not None or not isinstance(noise, Gaussian):
        raise ValueError(f"--float-sound certifies isotropic Gaussian noise only, not {describe_noise(noise)}"
                         f"{' with ' + model.description() if model.description() != 'none' else ''}")
    if args.amp:
        raise ValueError("--float-sound needs the model's own precision: drop --amp (rounding inside the model "
                         "happens before the grid could be recovered)")
    prepared = prepare_model(model.model, device, args.channels_last)
    return float_sound_smooth(prepared, model.num_classes, noise.scale, input_shape=model.input_shape)


def _check_first_image(model, smooth, data, indices, args) -> tuple:
    """The checks that need the data: one image at least, of the model's shape, and a radius (or grid)
    that this noise reaches within --n samples. Returns the input shape."""
    shape = first_image_shape(model, data, indices, args.split)
    radius, radii = _pool_radii(smooth, args)
    if radius is not None:
        plan_radius(smooth.noise, radius, args.norm, shape, args.alpha, max_n=args.n, method=args.method,
                    n_name="--n")
    if radii is not None:
        plan_grid(smooth.noise, radii, args.norm, shape, args.alpha, max_n=args.n, n_name="--n")
    return shape


def _pooled(smooth) -> Smooth | None:
    """The fixed-noise Smooth the pool runs for ``smooth``: itself, the one of a lipschitz_shift
    classifier (at ``x + mu(x)``), or None for modes with their own noise per image."""
    if isinstance(smooth, LipschitzShiftSmooth):
        return smooth.smooth
    return smooth if isinstance(smooth, Smooth) else None


def _pool_radii(smooth, args) -> tuple:
    """``(--radius, --radii)`` as the pooled Smooth decides them: a lipschitz_shift classifier's
    radius r is the radius r (1 + L) of the fixed-noise one (npg/lipschitz_shift.py)."""
    if not isinstance(smooth, LipschitzShiftSmooth):
        return args.radius, args.radii
    radius = None if args.radius is None else smooth.shifted_radii([args.radius], args.norm)[0]
    radii = None if args.radii is None else smooth.shifted_radii(args.radii, args.norm)
    return radius, radii


# -- rows ------------------------------------------------------------------------------------------


def _certificate_from(decision, noise, shape, alpha) -> Certificate:
    """The certificate of a sequential or grid decision: its stopping bound is a valid ``p_lower``
    (jointly with every other stage, see core/sequential.py and core/grid.py)."""
    abstain = decision.p_lower <= 0.5
    return Certificate(
        prediction=ABSTAIN if abstain else decision.selected,
        p_lower=decision.p_lower,
        norm=noise.primary_norm,
        regions=() if abstain else tuple(noise.regions(decision.p_lower, shape)),
        is_certificate=noise.is_certificate,
        n0=decision.n0,
        n=decision.n,
        alpha=alpha,
        top_count=decision.top_count,
    )


def _results(smooth, data, todo, labels, shape, args, batch_size, device):
    """``(idx, certificate, extra columns, seconds)`` for every image of ``todo``, in order; each
    image's label goes into ``labels`` as it is read (once: on-disk images are decoded once)."""
    def images():
        for idx in todo:
            x, labels[idx] = data[idx]
            yield idx, quantize(x) if args.float_sound else x  # uint8 images are on the grid already

    pooled = _pooled(smooth)
    if pooled is None:  # paper mode, dual, elastic_sigma, ...: their own noise per image
        for idx, x in images():
            start = time.perf_counter()
            answered = len(getattr(smooth, "answers", ()))
            certificate = smooth.certify(x, args.n0, args.n, args.alpha, batch_size,
                                         generator=image_generator(args.seed, idx, device))
            if isinstance(smooth, MemorySmooth):  # saved before its row is written: no row lacks its memory
                smooth.indices += [idx] * (len(smooth.answers) - answered)
                smooth.queried.append(idx)
                save_memory(args.out, smooth)
            extra = {column.name: certificate.extra[column.name] for column in getattr(smooth, "row_columns", ())}
            yield idx, certificate, extra, time.perf_counter() - start
        return
    shifted = smooth if isinstance(smooth, LipschitzShiftSmooth) else None
    # a lipschitz_shift image enters the pool as x + mu(x) (mu reads the clean input only)
    items = images() if shifted is None else ((idx, shifted.shift(x[None])[0]) for idx, x in images())
    radius, radii = _pool_radii(smooth, args)
    # rows are written as images finish (a slow image holds back no finished one); sorted at the end
    common = dict(seed=args.seed, batch_size=batch_size, pool_size=args.pool_size, ordered=False)
    if radius is not None:
        mode = f"sequential-{args.method}"
        pool = certify_radius_pool(pooled, items, radius, args.norm, args.alpha, n0=args.n0, max_n=args.n,
                                   method=args.method, input_shape=shape, **common)
    elif radii is not None:
        mode = "grid-cp"
        pool = certify_grid_pool(pooled, items, radii, args.norm, args.alpha, n0=args.n0, max_n=args.n,
                                 input_shape=shape, **common)
    else:
        pool = certify_pool(pooled, items, args.n0, args.n, args.alpha, **common)
    for idx, result, seconds in pool:
        if radius is not None:
            if shifted is not None:
                result = shifted.unshift_radius(result, args.radius)
            extra = dict(mode=mode, decided_radius=args.radius, certified=result.certified,
                         samples_used=result.samples_used)
        elif radii is not None:
            if shifted is not None:
                result = shifted.unshift_grid(result, args.radii)
            extra = dict(mode=mode, grid_radius=result.certified_radius, samples_used=result.samples_used)
        if radius is None and radii is None:
            certificate, extra = result, {}
        else:
            certificate = _certificate_from(result, pooled.noise, shape, args.alpha)
        if shifted is not None:  # the fixed-noise regions at x + mu(x), shrunk by 1 / (1 + L) around x
            certificate = scale_radii(certificate, shifted.factors)
        yield idx, certificate, extra, seconds


def memory_path(out) -> Path:
    return Path(str(out) + ".memory.pt")


def save_memory(out, smooth: MemorySmooth) -> None:
    """The memory, atomically: its answers, the image index of each, and every image queried so far."""
    state = {**smooth.state(), "indices": list(smooth.indices), "queried": list(smooth.queried)}
    with atomic_open(memory_path(out)) as handle:
        torch.save(state, handle)


def load_memory(out, smooth: MemorySmooth, done) -> None:
    """The memory of the images already in the result file (the answers of unwritten rows are dropped:
    those images are asked again, and answered identically from their own noise streams)."""
    smooth.indices, smooth.queried = [], []
    path = memory_path(out)
    if not done:
        return
    if not path.is_file():
        raise ValueError(f"{out} has rows but its memory {path} is missing: certify into a new --out")
    state = load_torch_file(path)
    if not set(done) <= set(state["queried"]):
        raise ValueError(f"{path} does not hold the memory of every row of {out}: certify into a new --out")
    kept = [(i, answer) for i, answer in zip(state["indices"], MemorySmooth.answers_from_state(state)) if i in done]
    smooth.indices = [i for i, _ in kept]
    smooth.answers = [answer for _, answer in kept]
    smooth.queried = [i for i in state["queried"] if i in done]


def run(args) -> int:
    return run_in_process_group(args, _certify)


def _certify(args, context) -> int:
    _check_options(args)
    model = open_model(args)
    dataset_name = args.dataset or model.meta["dataset"]
    paper_mode = _check_mode(model, args)
    if args.float_sound:
        smooth = _float_sound(model, args, context.device)
    else:
        smooth = model.smoothed(context.device, paper_mode=paper_mode, channels_last=args.channels_last,
                                amp=args.amp)
    if (args.radius is not None or args.radii is not None) and _pooled(smooth) is None:
        raise ValueError(f"the sequential modes (--radius, --radii) need a fixed-noise run; {model.description()} "
                         "certifies each image with its own noise: certify it without them")
    args.memory = getattr(args, "memory", False)
    if args.memory:
        if context.distributed:
            raise ValueError("--memory answers the images as one sequence: run it in one process, not under torchrun")
        smooth = MemorySmooth(smooth)
    noise = model.base_noise if paper_mode else smooth.noise if args.float_sound else model.noise()
    is_certificate = noise.is_certificate and not paper_mode
    sequential = args.radius is not None or args.radii is not None
    if sequential:
        args.norm = noise.primary_norm if args.norm is None else parse_norm(args.norm)
    data = load_dataset(dataset_name, args.split, args.data_root)
    indices = list(range(0, len(data), args.skip))[: args.max]
    shape = _check_first_image(model, smooth, data, indices, args)
    report = check_contract(model, smooth, data, args) if context.is_main else None
    pooled = _pooled(smooth)  # lipschitz_shift: the fixed-noise classifier its pool runs
    batch_size, probe = choose_batch_size(smooth if pooled is None else pooled, data[indices[0]][0], args,
                                          context.device)

    if args.radius is not None:
        mode, schema = f"sequential-{args.method}", RESULT_SCHEMA.with_columns(*SEQUENTIAL_COLUMNS)
    elif args.radii is not None:
        mode, schema = "grid-cp", RESULT_SCHEMA.with_columns(*GRID_COLUMNS)
    else:
        mode, schema = ("paper+memory" if args.memory else "paper" if paper_mode else "certify"), RESULT_SCHEMA
    schema = schema.with_columns(*getattr(smooth, "row_columns", ()))  # a mode's own columns (dual: the expert)
    schema = schema.with_columns(FLOAT_SOUND_COLUMN)  # every row says whether it holds in floating point
    config = {
        **model_identity(args, model),
        "dataset": dataset_name, "split": args.split, "data_root": args.data_root,
        "n0": args.n0, "n": args.n, "alpha": args.alpha, "batch_size": batch_size,
        "skip": args.skip, "max": args.max, "seed": args.seed,
        "noise": noise.describe(), "npg": model.description(),
        "is_certificate": is_certificate, "mode": mode,
        "radius": args.radius, "norm": norm_name(args.norm) if sequential else None,
        "out": str(args.out), "progress": args.progress, "device": str(context.device),
        "channels_last": args.channels_last, "float_sound": args.float_sound,
        "noise_streams": NOISE_STREAMS if pooled is not None else "per-image-generator",
        "batch_probe": probe, "pool_size": args.pool_size,
        "contract": None if report is None else report.to_dict(),
    }
    if args.radii is not None:
        config["radii"] = sorted(set(args.radii))
        config["grid_stages"] = "aligned"  # core/grid.py aligned_schedule: files of the geometric stages differ
        config["grid_futility"] = f"reach-{FUTILITY_LEVEL:g}"  # rule (b) of core/grid.py: earlier files differ
    if args.radius is not None and args.method == "cp":
        config["radius_futility"] = f"reach-{FUTILITY_LEVEL:g}"  # core/sequential.py out_of_reach: earlier files differ
    if args.memory:  # only when set, so files written before --memory existed still resume
        config["memory"] = True
    if args.amp:  # only when set, so files of float32 runs keep their config
        config["amp"] = args.amp
    # with the pool's streams the batch size changes the speed, not the rows
    non_identity = PER_IMAGE_NON_IDENTITY_KEYS + (SPEED_KEYS if pooled is not None else SPEED_KEYS[1:])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    target = shard_path(out, context.rank, context.world_size) if context.distributed else out
    noise_text, npg_text = describe_noise(noise), config["npg"]
    if context.is_main and args.progress:
        print(f"batch size {batch_size}" + (" (fastest of the probe)" if probe else ""))

    with ResultWriter(target, config, schema=schema, non_identity=non_identity) as writer:
        mine = split_indices(indices, context.rank, context.world_size)
        todo = [i for i in mine if i not in writer.done_indices()]
        if args.memory:
            load_memory(args.out, smooth, [i for i in mine if i in writer.done_indices()])
        bar = tqdm(total=len(mine), initial=len(mine) - len(todo), unit="image",
                   disable=not (args.progress and context.is_main))
        certified = abstained = finished = 0
        labels = {}
        for idx, certificate, extra, seconds in _results(smooth, data, todo, labels, shape, args, batch_size,
                                                         context.device):
            row = row_from_certificate(idx, int(labels.pop(idx)), certificate, seconds, noise_text, npg_text)
            row.update(extra, float_sound=args.float_sound)
            writer.write(row)
            finished += 1
            abstained += certificate.abstained
            certified += row["correct"]
            bar.set_postfix(abstain=abstained, cert_acc=f"{certified / finished:.3f}")
            bar.update(1)
        bar.close()
        writer.sort_rows()

    merge_parts(context, out, indices, non_identity)
    if context.is_main:
        label = "" if is_certificate else " (NOT a certificate: paper-mode figures)"
        print(f"wrote {out} ({len(indices)} images){label}")
    return 0


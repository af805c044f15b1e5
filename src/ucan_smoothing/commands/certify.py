"""Certify a trained run on a data split, one TSV row per image, resumable.

``ucan certify RUN --out results.tsv`` runs Cohen's CERTIFY (or, with
``--radius``, the sequential test of :mod:`ucan_smoothing.core.sequential`) on every
``--skip``-th test image, at most ``--max`` of them. Rows are appended as
images finish; killing the process and running the same command again goes on
where it stopped. Each image draws its noise from its own seed
(``--seed`` and its index), so a resumed or multi-process run gives the same
rows as a single uninterrupted one, and a larger ``--max`` on the same file
extends it. Under ``torchrun`` the images are split
across processes, each writes its own part, and rank 0 merges them.

What is certified is the run's own smoothed classifier
(:meth:`~ucan_smoothing.runs.TrainedRun.smoothed`): fixed noise, the sound
input-adaptive modes (``noisy_shift``: ``f(z + mu(z))`` under fixed noise;
``lipschitz_shift``: radius ``R / (1 + L)``), or, only with ``--paper-mode``,
the paper's input-dependent NPG, labelled NOT a certificate.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from tqdm.auto import tqdm

from ..core.certificate import ABSTAIN, Certificate
from ..core.norms import norm_name, parse_norm
from ..core.sequential import DEFAULT_STAGES, certify_radius, check_budget, geometric_schedule, p_needed
from ..core.statistics import check_alpha, check_can_certify, check_count
from ..core.streams import image_generator
from ..data import load_dataset
from ..distributed import cleanup, init_distributed
from ..fileio import file_sha256
from ..results import (
    PER_IMAGE_NON_IDENTITY_KEYS,
    RESULT_SCHEMA,
    SEQUENTIAL_COLUMNS,
    ResultWriter,
    describe_noise,
    merge_shards,
    row_from_certificate,
    shard_path,
    split_indices,
)
from ..runs import load_trained, run_checkpoint


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="run folder or checkpoint written by `ucan train`")
    parser.add_argument("--out", required=True, help="result file (TSV); a JSON sidecar is written beside it")
    parser.add_argument("--dataset", default=None, help="data set (default: the one the model was trained on)")
    parser.add_argument("--split", default="test", help="train, test or foolbox (the real sample images)")
    parser.add_argument("--data-root", default=None, help="folder of the data set in its standard format")
    parser.add_argument("--n0", type=int, default=100, help="selection samples (default 100)")
    parser.add_argument("--n", type=int, default=100_000, help="estimation samples (default 100,000)")
    parser.add_argument("--alpha", type=float, default=0.001, help="failure probability (default 0.001)")
    parser.add_argument("--batch-size", type=int, default=1000, help="noisy samples per forward pass")
    parser.add_argument("--skip", type=int, default=1, help="certify every k-th image (default 1)")
    parser.add_argument("--max", type=int, default=None, help="certify at most this many images")
    parser.add_argument("--seed", type=int, default=0, help="noise seed; image i uses (seed, i)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                        help="store the classifier's conv weights channels-last: same outputs up to rounding, "
                             "faster convolutions (default: on)")
    parser.add_argument("--amp", choices=("bf16", "fp16"), default=None,
                        help="run the classifier in mixed precision (for GPUs); certifies that classifier")
    parser.add_argument("--radius", type=float, default=None,
                        help="sequential mode: only decide whether each image is certified at this radius")
    parser.add_argument("--norm", default=None, help="norm of --radius (default: the noise's native norm)")
    parser.add_argument("--method", choices=("cp", "betting"), default="cp", help="sequential test (default cp)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    parser.add_argument("--paper-mode", action="store_true",
                        help="certify an input-dependent NPG as the paper does (sigma(x), mu(x) frozen at the clean "
                             "input): reproduces its numbers, NOT a certificate (rows get is_certificate=false)")


def _sequential_certificate(smooth, x, args, generator) -> Certificate:
    """A certificate built from the sequential test's stopping bound (valid, see sequential.py)."""
    decision = certify_radius(smooth, x, args.radius, args.norm, args.alpha, n0=args.n0, max_n=args.n,
                              method=args.method, batch_size=args.batch_size, generator=generator)
    abstain = decision.p_lower <= 0.5
    return Certificate(
        prediction=ABSTAIN if abstain else decision.selected,
        p_lower=decision.p_lower,
        norm=smooth.noise.primary_norm,
        regions=() if abstain else tuple(smooth.noise.regions(decision.p_lower, tuple(x.shape))),
        is_certificate=smooth.noise.is_certificate,
        n0=decision.n0,
        n=decision.n,
        alpha=args.alpha,
        top_count=decision.top_count,
    ), decision


def _check_mode(trained, args) -> bool:
    """True for a paper-mode run; refuses the combinations with the sequential mode that are not proven.
    (An input-dependent NPG without --paper-mode, and the reverse, are refused by ``trained.smoothed``.)"""
    paper_mode = getattr(args, "paper_mode", False)
    if paper_mode and args.radius is not None:
        raise ValueError("--paper-mode cannot be combined with the sequential mode (--radius)")
    if getattr(trained.shift, "clean_input", False) and args.radius is not None:
        raise ValueError("the sequential mode (--radius) is not available for a lipschitz_shift run: certify it "
                         "without --radius (its radius is R / (1 + L))")
    return paper_mode


def _check_options(args) -> None:
    """The options that need no file, checked before anything is loaded or written."""
    check_alpha(args.alpha)
    for name, value in (("--n0", args.n0), ("--n", args.n), ("--batch-size", args.batch_size), ("--skip", args.skip)):
        check_count(name, value)
    if args.max is not None:
        check_count("--max", args.max)
    if args.radius is None:
        if args.norm is not None:
            raise ValueError("--norm only applies with --radius (the sequential mode); without it every row has "
                             "the certified radius in each norm (radius_l1, radius_l2, radius_linf)")
        check_can_certify(args.n, args.alpha)
    elif args.norm is not None:
        parse_norm(args.norm)


def _check_first_image(trained, smooth, data, indices, args) -> None:
    """The checks that need the data: one image at least, of the model's shape, and (sequential mode)
    a radius that this noise reaches within --n samples."""
    if not indices:
        raise ValueError(f"the {args.split} split has no images to certify")
    shape = tuple(data[indices[0]][0].shape)
    if shape != tuple(trained.input_shape):
        raise ValueError(f"image {indices[0]} of the {args.split} split has shape {shape} but the model "
                         f"takes {tuple(trained.input_shape)}")
    if args.radius is not None:
        threshold = p_needed(smooth.noise, args.radius, args.norm, shape)
        schedule = geometric_schedule(args.n, DEFAULT_STAGES[args.method])  # as certify_radius draws them
        check_budget(args.method, schedule, threshold, args.alpha, args.radius, n_name="--n", stages_hint=False)


def run(args) -> int:
    context = init_distributed(args.device)
    try:
        return _certify(args, context)
    finally:
        cleanup(context)


def _certify(args, context) -> int:
    _check_options(args)
    run_path = Path(args.run)
    trained = load_trained(run_path, expected_dataset=args.dataset)
    dataset_name = args.dataset or trained.meta["dataset"]
    paper_mode = _check_mode(trained, args)
    smooth = trained.smoothed(context.device, paper_mode=paper_mode, channels_last=args.channels_last,
                              amp=args.amp)
    noise = trained.base_noise if paper_mode else trained.noise()
    is_certificate = noise.is_certificate and not paper_mode
    sequential = args.radius is not None
    if sequential:
        args.norm = noise.primary_norm if args.norm is None else parse_norm(args.norm)
    data = load_dataset(dataset_name, args.split, args.data_root)
    indices = list(range(0, len(data), args.skip))[: args.max]
    _check_first_image(trained, smooth, data, indices, args)  # last check: nothing is written before it

    config = {
        "checkpoint": str(run_checkpoint(run_path).resolve()),
        "checkpoint_sha256": file_sha256(run_checkpoint(run_path)),
        "dataset": dataset_name, "split": args.split, "data_root": args.data_root,
        "n0": args.n0, "n": args.n, "alpha": args.alpha, "batch_size": args.batch_size,
        "skip": args.skip, "max": args.max, "seed": args.seed,
        "noise": noise.describe(), "npg": trained.description(),
        "is_certificate": is_certificate,
        "mode": f"sequential-{args.method}" if sequential else ("paper" if paper_mode else "certify"),
        "radius": args.radius, "norm": norm_name(args.norm) if sequential else None,
        "out": str(args.out), "progress": args.progress, "device": str(context.device),
        "channels_last": args.channels_last,
    }
    if args.amp:  # only when set, so files of float32 runs keep their config
        config["amp"] = args.amp
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    target = shard_path(out, context.rank, context.world_size) if context.distributed else out
    schema = RESULT_SCHEMA.with_columns(*SEQUENTIAL_COLUMNS) if sequential else RESULT_SCHEMA
    noise_text, npg_text = describe_noise(noise), config["npg"]

    with ResultWriter(target, config, schema=schema, non_identity=PER_IMAGE_NON_IDENTITY_KEYS) as writer:
        mine = [i for i in split_indices(indices, context.rank, context.world_size) if i not in writer.done_indices()]
        done = len(split_indices(indices, context.rank, context.world_size)) - len(mine)
        bar = tqdm(total=len(mine) + done, initial=done, unit="image", disable=not (args.progress and context.is_main))
        certified = abstained = finished = 0
        for idx in mine:
            x, label = data[idx]
            start = time.perf_counter()
            generator = image_generator(args.seed, idx, context.device)
            if sequential:
                certificate, decision = _sequential_certificate(smooth, x, args, generator)
            else:
                certificate = smooth.certify(x, args.n0, args.n, args.alpha, args.batch_size, generator=generator)
            row = row_from_certificate(idx, int(label), certificate, time.perf_counter() - start, noise_text, npg_text)
            if sequential:
                row.update(mode=config["mode"], decided_radius=args.radius, certified=decision.certified,
                           samples_used=decision.samples_used)
            writer.write(row)
            finished += 1
            abstained += certificate.abstained
            certified += row["correct"]
            bar.set_postfix(abstain=abstained, cert_acc=f"{certified / finished:.3f}")
            bar.update(1)
        bar.close()

    if context.distributed:
        context.barrier()
        if context.is_main:
            merge_shards(out, context.world_size, expected_indices=indices, non_identity=PER_IMAGE_NON_IDENTITY_KEYS)
        context.barrier()
    if context.is_main:
        label = "" if is_certificate else " (NOT a certificate: paper-mode figures)"
        print(f"wrote {out} ({len(indices)} images){label}")
    return 0

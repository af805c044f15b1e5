"""Cohen et al.'s PREDICT over a data split, one TSV row per image, resumable.

``ucan predict MODEL --out predictions.tsv`` draws ``--n`` noisy samples per
image and returns the top class when a two-sided binomial test separates it
from the runner-up at ``--alpha`` (else it abstains, ``predict = -1``): a
returned class is the smoothed classifier's with probability at least
``1 - alpha``. ``MODEL`` and the data, device and speed options are those of
``ucan certify``; rows start with Cohen's ``idx label predict correct time``
and add the two vote counts, ``n``, ``alpha``, the noise and the guarantee.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from tqdm.auto import tqdm

from ..core.pool import QUANTUM, predict_pool
from ..core.smooth import Smooth
from ..core.statistics import check_alpha, check_count
from ..core.streams import image_generator
from ..data import load_dataset
from ..results import PER_IMAGE_NON_IDENTITY_KEYS, PREDICT_SCHEMA, ResultWriter, describe_noise, shard_path, split_indices
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


def configure(parser: argparse.ArgumentParser) -> None:
    add_model_options(parser)
    parser.add_argument("--out", required=True, help="prediction file (TSV); a JSON sidecar is written beside it")
    parser.add_argument("--n", type=int, default=100_000, help="noisy samples per image")
    parser.add_argument("--alpha", type=float, default=0.001, help="failure probability of a returned class")
    add_run_options(parser, what="predict")
    parser.add_argument("--paper-mode", action="store_true",
                        help="the paper's input-dependent NPG, sigma(x), mu(x) at the clean input (its smoothed "
                             "classifier; rows get is_certificate=false)")


def _predictions(smooth, data, todo, labels, args, batch_size, device):
    """``(idx, prediction, top_count, runner_up_count, seconds)`` for every image of ``todo``, in order."""
    def images():
        for idx in todo:
            x, labels[idx] = data[idx]
            yield idx, x

    if isinstance(smooth, Smooth):
        for idx, result, seconds in predict_pool(smooth, images(), args.n, args.alpha, seed=args.seed,
                                                 batch_size=batch_size, pool_size=args.pool_size,
                                                 ordered=False):  # written as finished, sorted at the end
            yield idx, result.prediction, result.top_count, result.runner_up_count, seconds
        return
    for idx, x in images():  # input-adaptive modes: their own noise per image; no vote counts exposed
        start = time.perf_counter()
        prediction = smooth.predict(x, args.n, args.alpha, batch_size, generator=image_generator(args.seed, idx, device))
        yield idx, prediction, -1, -1, time.perf_counter() - start


def run(args) -> int:
    return run_in_process_group(args, _predict)


def _predict(args, context) -> int:
    check_alpha(args.alpha)
    check_count("--n", args.n)
    check_run_options(args)
    model = open_model(args)
    dataset_name = args.dataset or model.meta["dataset"]
    smooth = model.smoothed(context.device, paper_mode=args.paper_mode, channels_last=args.channels_last,
                            amp=args.amp)
    noise = model.base_noise if args.paper_mode else model.noise()
    is_certificate = noise.is_certificate and not args.paper_mode
    data = load_dataset(dataset_name, args.split, args.data_root)
    indices = list(range(0, len(data), args.skip))[: args.max]
    first_image_shape(model, data, indices, args.split)
    report = check_contract(model, smooth, data, args) if context.is_main else None
    batch_size, probe = choose_batch_size(smooth, data[indices[0]][0], args, context.device)
    pooled = isinstance(smooth, Smooth)
    config = {
        **model_identity(args, model),
        "dataset": dataset_name, "split": args.split, "data_root": args.data_root,
        "n": args.n, "alpha": args.alpha, "batch_size": batch_size, "skip": args.skip, "max": args.max,
        "seed": args.seed, "noise": noise.describe(), "npg": model.description(),
        "is_certificate": is_certificate, "mode": "predict" + ("-paper" if args.paper_mode else ""),
        "out": str(args.out), "progress": args.progress, "device": str(context.device),
        "channels_last": args.channels_last,
        "noise_streams": f"pool-quanta-{QUANTUM}" if pooled else "per-image-generator",
        "batch_probe": probe, "pool_size": args.pool_size,
        "contract": None if report is None else report.to_dict(),
    }
    if args.amp:
        config["amp"] = args.amp
    non_identity = PER_IMAGE_NON_IDENTITY_KEYS + (SPEED_KEYS if pooled else SPEED_KEYS[1:])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    target = shard_path(out, context.rank, context.world_size) if context.distributed else out
    noise_text = describe_noise(noise)

    with ResultWriter(target, config, schema=PREDICT_SCHEMA, non_identity=non_identity) as writer:
        mine = split_indices(indices, context.rank, context.world_size)
        todo = [i for i in mine if i not in writer.done_indices()]
        bar = tqdm(total=len(mine), initial=len(mine) - len(todo), unit="image",
                   disable=not (args.progress and context.is_main))
        labels = {}
        for idx, prediction, top, runner_up, seconds in _predictions(smooth, data, todo, labels, args, batch_size,
                                                                      context.device):
            label = int(labels.pop(idx))
            writer.write({"idx": idx, "label": label, "predict": prediction, "correct": int(prediction == label),
                          "time": seconds, "top_count": top, "runner_up_count": runner_up, "n": args.n,
                          "alpha": args.alpha, "noise": noise_text, "npg": config["npg"],
                          "is_certificate": is_certificate})
            bar.update(1)
        bar.close()
        writer.sort_rows()

    merge_parts(context, out, indices, non_identity)
    if context.is_main:
        print(f"wrote {out} ({len(indices)} images)")
    return 0

"""Search the certified regions of a result file for counterexamples: ``ucan attack RESULTS.tsv --out A.tsv``.

For every row (at most ``--max``) it runs PGD on the smoothed classifier the
file was certified with, inside the certified ball of the row's radius, then
PREDICT at the attacked point (:mod:`ucan_smoothing.attack`). Rows are
appended as they finish (resumable); ``A.tsv.summary.json`` tests the
violation count against what proven certificates allow.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..attack import ATTACK_SCHEMA, attack_certificate, load_target, summarize
from ..core.norms import norm_name, parse_norm
from ..core.streams import image_generator
from ..data import load_dataset
from ..fileio import atomic_write_text, file_sha256
from .model_options import reopen_model
from ..results import (PER_IMAGE_NON_IDENTITY_KEYS, ResultFileError, ResultWriter, read_results, read_sidecar,
                       sidecar_path)



def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("results", help="result file of `ucan certify` (TSV with its JSON sidecar)")
    parser.add_argument("--out", required=True, help="attack file (TSV, one row per image, resumable)")
    parser.add_argument("--run", default=None, help="run folder or checkpoint (default: the sidecar's)")
    parser.add_argument("--dataset", default=None, help="data set (default: the sidecar's)")
    parser.add_argument("--split", default=None, help="split (default: the sidecar's)")
    parser.add_argument("--data-root", default=None, help="data folder (default: the sidecar's)")
    parser.add_argument("--norm", default=None, help="norm of the attacked ball: l1, l2, linf (default: native)")
    parser.add_argument("--steps", type=int, default=20, help="PGD steps (default 20)")
    parser.add_argument("--samples", type=int, default=32, help="noise samples per PGD step (default 32)")
    parser.add_argument("--n", type=int, default=10_000, help="PREDICT samples at the attacked point")
    parser.add_argument("--alpha", type=float, default=0.001, help="PREDICT level at the attacked point")
    parser.add_argument("--batch-size", type=int, default=1000, help="noisy samples per forward pass")
    parser.add_argument("--max", type=int, default=None, help="attack at most this many rows")
    parser.add_argument("--seed", type=int, default=0, help="noise seed; row idx uses (seed, idx)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                        help="store the classifier's conv weights channels-last: same outputs up to rounding, "
                             "faster convolutions (default: on)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def run(args) -> int:
    results_path = Path(args.results)
    rows = read_results(results_path)
    try:
        config = read_sidecar(results_path)["config"]
    except ResultFileError:
        config = {}  # e.g. a file of Cohen et al.'s scripts: --run and --dataset are needed
    run_path = args.run or config.get("checkpoint")
    dataset = args.dataset or config.get("dataset")
    external = args.run is None and "model_format" in config  # certified as a model from elsewhere
    if (run_path is None and not external) or dataset is None:
        raise ValueError(f"{results_path} has no sidecar naming its run and data set: pass --run and --dataset")
    split = args.split or config.get("split", "test")
    data_root = args.data_root if args.data_root is not None else config.get("data_root")
    if args.data_root is None and data_root is not None:  # never open a folder a file named without saying so
        print(f"ucan attack: reading data from {data_root} (data_root recorded in {sidecar_path(results_path)}; "
              "pass --data-root to choose)", file=sys.stderr)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    # the classifier the file certified: mixed precision too, if it used it
    model = reopen_model(config, dataset) if external else run_path
    target, trained = load_target(model, device, channels_last=args.channels_last, amp=config.get("amp"))
    norm = target.primary_norm if args.norm is None else parse_norm(args.norm)
    alpha_certify = float(config.get("alpha", rows[0]["alpha"] if rows and "alpha" in rows[0] else 0.001))
    data = load_dataset(dataset, split, data_root)
    if not external and "checkpoint_sha256" in config and Path(run_path).is_file() and file_sha256(Path(run_path)) != config["checkpoint_sha256"]:
        print(f"warning: {run_path} is not the checkpoint {results_path} was certified with", file=sys.stderr)

    column = f"radius_{norm_name(norm)}"
    todo = rows[: args.max] if args.max is not None else rows
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    attack_config = {
        "results": str(results_path.resolve()), "results_sha256": file_sha256(results_path),
        "run": config.get("model_file") or config.get("factory") if external else str(run_path), "dataset": dataset, "split": split, "data_root": data_root,
        "norm": norm_name(norm), "steps": args.steps, "samples": args.samples, "n": args.n, "alpha": args.alpha,
        "batch_size": args.batch_size, "max": args.max, "seed": args.seed,
        "out": str(out), "progress": args.progress, "device": str(device),
        "channels_last": args.channels_last,
    }
    is_certificate = bool(getattr(target, "is_certificate", True)) and config.get("is_certificate", True) is not False
    with ResultWriter(out, attack_config, schema=ATTACK_SCHEMA, non_identity=PER_IMAGE_NON_IDENTITY_KEYS) as writer:
        mine = [row for row in todo if row["idx"] not in writer.done_indices()]
        bar = tqdm(total=len(todo), initial=len(todo) - len(mine), unit="image", disable=not args.progress)
        for row in mine:
            start = time.perf_counter()
            x, _ = data[row["idx"]]
            radius = row[column] if column in row else row["radius"]
            result = attack_certificate(target, x, row["predict"], radius, norm, steps=args.steps,
                                        samples=args.samples, n=args.n, alpha=args.alpha, batch_size=args.batch_size,
                                        generator=image_generator(args.seed, row["idx"], device))
            writer.write({"idx": row["idx"], "label": row["label"], "predict": row["predict"], "radius": radius,
                          "correct": row["correct"], "time": time.perf_counter() - start,
                          **result.row(), "is_certificate": is_certificate})
            bar.update(1)
        bar.close()

    attacked = [r for r in read_results(out, ATTACK_SCHEMA) if r["attacked"]]
    summary = summarize([r["violation"] for r in attacked], alpha_certify, args.alpha)
    summary.update(results=str(results_path), is_certificate=is_certificate, norm=norm_name(norm))
    atomic_write_text(Path(f"{out}.summary.json"), json.dumps(summary, indent=2, sort_keys=True) + "\n")
    kind = "proven certificates" if is_certificate else "paper mode (NOT a certificate)"
    verdict = ("consistent with the certificates" if summary["consistent_with_certificates"]
               else "MORE than alpha allows: these regions are not certified")
    print(f"{results_path} [{kind}]: {summary['violations']} violations in {summary['attacked']} attacked rows "
          f"({summary['violation_rate']:.2%}; proven certificates allow {summary['allowed_rate']:.2%}, "
          f"p = {summary['p_value']:.3g}): {verdict}; wrote {out}")
    return 0

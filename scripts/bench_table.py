"""Benchmark: the grid mode of `ucan certify` against fixed-n CERTIFY on the paper's MNIST Table 2 protocol.

    python scripts/bench_table.py --out runs/bench-table          # 500 images x 3 levels; fixed n on 10 per level
    python scripts/bench_table.py --out /tmp/b --levels 0.5 --images 2 --fixed-images 1 --rounds 1 --n 300 \\
        --max-train 256 --max-test 32 --epochs 1 --no-contract-check   # seconds: checks the pipeline

Protocol (the defaults): every 20th MNIST test image, 500 of them (``--skip 20
--max 500``), alpha = 0.001, n0 = 100, l2 radii 0, 0.25, ..., 2.25, at most
n = 100,000 estimation samples, Gaussian noise 0.25, 0.5 and 1.0, each with
the MNIST CNN trained under that noise (trained here under ``<out>/g<level>``,
or reused when its ``final.pt`` exists).

At each level the script runs, in this process and timed with
``time.perf_counter`` around ``ucan_smoothing.cli.main``, fixed-n CERTIFY
(``ucan certify RUN --n 100000``) on the first ``--fixed-images`` of the same
images and the grid mode (``ucan certify RUN --radii ... --norm l2 --n
100000``) on all ``--images``, in ``--rounds`` alternating chunks (fixed,
grid, fixed, grid, ...; each chunk extends its file to a larger ``--max``), so
that a change of the machine's load falls on both (after one short untimed
warm-up run, so that no chunk pays the process's one-time costs). The first fixed chunk
picks the batch size (``--batch-size auto``: the probe) and every other chunk
of the level, grid included, uses it: both run the same forward batches.

Model calls: the sum of ``samples_used`` for the grid (n0 included), ``n0 + n``
per image for fixed n. The fixed run is scaled to all ``--images`` images:
calls exactly (``n0 + n`` each), wall time as its set-ups (each call's wall
time less the seconds its rows attribute to images: loading, contract check,
batch probe; as many calls as the grid made) plus its per-image seconds times
``images / fixed_images``. The per-round spread of the cost of one model call
(fixed over grid) says how much the load moved the wall-time ratio.

Decisions: image ``i`` is "certified at r" when it is correctly classified and
its grid radius (grid) or its ``radius_l2`` (fixed) is at least ``r``; the
images whose decisions differ at any grid radius are counted on the images
both runs hold.

A grid radius the noise cannot certify for any float ``p_lower < 1`` (2.25 at
noise 0.25: the largest is about 2.05) is refused by the grid mode; it is left
out of that level's grid, counted as never certified by the grid, and still
compared with fixed n (which cannot certify it either). Radii that ``n`` cannot
reach stay in the grid and are never certified.

Writes ``<out>/bench_table.json`` (everything, with the conditions: threads,
load averages, torch version, batch sizes) and ``<out>/bench_table.md`` (the
table). A level whose result files and timing record exist (same options) is
reused; an unfinished one is run again from scratch (its timing would be wrong).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from ucan_smoothing import Gaussian
from ucan_smoothing.cli import main as ucan
from ucan_smoothing.core.grid import largest_certifiable_radius
from ucan_smoothing.core.sequential import p_needed
from ucan_smoothing.fileio import atomic_write_text
from ucan_smoothing.results import read_results, read_sidecar, sidecar_path

MNIST_SHAPE = (1, 28, 28)
TABLE_RADII = tuple(0.25 * k for k in range(10))  # 0, 0.25, ..., 2.25


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/bench-table", help="folder of models, result files and the report")
    parser.add_argument("--levels", type=float, nargs="+", default=[0.25, 0.5, 1.0], help="Gaussian noise levels")
    parser.add_argument("--images", type=int, default=500, help="test images of the grid mode")
    parser.add_argument("--fixed-images", type=int, default=10,
                        help="the first this many of the same images get fixed-n CERTIFY (scaled to --images)")
    parser.add_argument("--skip", type=int, default=20, help="every k-th test image")
    parser.add_argument("--n", type=int, default=100_000, help="fixed n, and the grid's largest sample budget")
    parser.add_argument("--n0", type=int, default=100)
    parser.add_argument("--alpha", type=float, default=0.001)
    parser.add_argument("--radii", type=float, nargs="+", default=list(TABLE_RADII), help="l2 grid radii")
    parser.add_argument("--batch-size", default="auto", help="of the fixed run (auto: the probe); the grid reuses it")
    parser.add_argument("--rounds", type=int, default=5,
                        help="alternating chunks of fixed n and grid images per level (load drift falls on both)")
    parser.add_argument("--epochs", type=int, default=10, help="training epochs of each CNN")
    parser.add_argument("--max-train", type=int, default=None, help="train on the first N training images only")
    parser.add_argument("--max-test", type=int, default=None, help="evaluate training on the first N test images")
    parser.add_argument("--no-contract-check", dest="contract_check", action="store_false",
                        help="for smoke runs on barely trained models only: certify even at chance accuracy")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.fixed_images > args.images:
        parser.error("--fixed-images cannot exceed --images (they are the first of the same images)")
    if not 1 <= args.rounds <= args.fixed_images:
        parser.error("--rounds must be between 1 and --fixed-images (every round certifies a fixed-n image)")
    return args


def run_ucan(*argv: str) -> None:
    status = ucan([str(a) for a in argv])
    if status != 0:
        raise SystemExit(f"ucan {' '.join(map(str, argv))} exited with {status}")


# -- models ------------------------------------------------------------------------------------------


def train(run: Path, scale: float, args) -> dict:
    """The CNN trained under Gaussian(scale) in ``run`` (reused when finished); returns its training config."""
    if not (run / "final.pt").is_file():
        resume = ["--resume"] if (run / "last.pt").is_file() else []
        limit = [*(["--max-train", args.max_train] if args.max_train else []),
                 *(["--max-test", args.max_test] if args.max_test else [])]
        run_ucan("train", "classifier", "--model", "mnist_cnn", "--noise", "gaussian", "--scale", f"{scale:g}",
                 "--epochs", args.epochs, *limit, "--seed", args.seed, "--no-progress", "--out", run, *resume)
    return json.loads((run / "config.json").read_text())["config"]


# -- timed runs --------------------------------------------------------------------------------------


def timed_chunk(path: Path, run: Path, options: list) -> dict:
    """``ucan certify RUN --out path OPTIONS`` (extending ``path`` to a larger ``--max``), timed: the
    call's wall time, the seconds the new rows attribute to their images, their model calls, the load."""
    before = len(read_results(path)) if path.is_file() else 0
    load_before = os.getloadavg()
    start = time.perf_counter()
    run_ucan("certify", run, "--out", path, *options, "--no-progress")
    wall = time.perf_counter() - start
    rows = read_results(path)[before:]
    image_s = sum(row["time"] for row in rows)
    return {"images": len(rows), "calls": sum(row.get("samples_used", row["n0"] + row["n"]) for row in rows),
            "wall_s": wall, "image_s": image_s, "setup_s": wall - image_s,
            "load_before": load_before, "load_after": os.getloadavg()}


def warm_up(run: Path, path: Path, common: list, args) -> None:
    """One short untimed certify first, so that no timed chunk pays the process's one-time costs
    (kernel set-up, first allocations)."""
    run_ucan("certify", run, "--out", path, *common, "--n", min(args.n, 1000), "--max", 1,
             "--batch-size", args.batch_size, "--no-progress")
    for done in (path, sidecar_path(path)):
        done.unlink()


def run_rounds(run: Path, fixed_path: Path, grid_path: Path, common: list, grid_options: list, args) -> dict:
    """Fixed n and the grid in ``--rounds`` alternating chunks (each run extends its file), so that a
    change of the machine's load falls on both; the batch size the first fixed chunk chose is kept."""
    for stale in (fixed_path, sidecar_path(fixed_path), grid_path, sidecar_path(grid_path)):
        stale.unlink(missing_ok=True)
    warm_up(run, fixed_path.with_name("warm-up.tsv"), common, args)
    rounds, batch_size, probe = [], args.batch_size, None
    for k in range(1, args.rounds + 1):
        fixed = timed_chunk(fixed_path, run, [*common, "--max", math.ceil(args.fixed_images * k / args.rounds),
                                              "--batch-size", batch_size])
        if probe is None:
            config = read_sidecar(fixed_path)["config"]
            batch_size, probe = config["batch_size"], config.get("batch_probe") or []
        grid = timed_chunk(grid_path, run, [*common, "--max", math.ceil(args.images * k / args.rounds),
                                            *grid_options, "--batch-size", batch_size])
        rounds.append({"fixed": fixed, "grid": grid})
    return {"rounds": rounds, "batch_size": batch_size, "batch_probe": probe}


def totals(rounds: list, run: str) -> dict:
    return {key: sum(r[run][key] for r in rounds) for key in ("images", "calls", "wall_s", "image_s", "setup_s")}


def cost_ratio(chunk_fixed: dict, chunk_grid: dict) -> float:
    """Seconds per model call of fixed n over those of the grid (1 when both run equally full batches)."""
    return (chunk_fixed["image_s"] / chunk_fixed["calls"]) / (chunk_grid["image_s"] / chunk_grid["calls"])


# -- decisions ---------------------------------------------------------------------------------------


def grid_radii(scale: float, radii) -> tuple:
    """``(radii the grid mode takes, radii it refuses)`` at this level: it refuses those beyond the
    noise's certificate at the largest float below 1."""
    largest = largest_certifiable_radius(Gaussian(scale), 2, MNIST_SHAPE)
    return [r for r in radii if r <= largest], [r for r in radii if r > largest]


def certified(row: dict, column: str, radius: float) -> bool:
    return bool(row["correct"]) and row["predict"] != -1 and row[column] >= radius


def compare(grid_rows: list, fixed_rows: list, radii, grid_taken) -> dict:
    """Per radius, the images (of those both files hold) whose decisions differ; a radius left out
    of the grid is never certified by it."""
    grid = {row["idx"]: row for row in grid_rows}
    fixed = {row["idx"]: row for row in fixed_rows}
    common = sorted(set(grid) & set(fixed))
    by_radius = {}
    for r in radii:
        by_radius[f"{r:g}"] = [
            i for i in common
            if (r in grid_taken and certified(grid[i], "grid_radius", r)) != certified(fixed[i], "radius_l2", r)
        ]
    differing = sorted({i for images in by_radius.values() for i in images})
    return {"common_images": len(common), "differing_images": differing, "differing_by_radius": by_radius,
            "grid_calls_on_common": sum(grid[i]["samples_used"] for i in common),
            "fixed_calls_on_common": sum(fixed[i]["n0"] + fixed[i]["n"] for i in common)}


def calls_floor(rows: list, scale: float, n0: int, alpha: float) -> int:
    """The fewest model calls with which any valid monotone test (more votes for the class never
    hurt: Clopper-Pearson, betting, ...) could certify each image at its grid radius: ``n0`` plus the
    smallest ``N`` with ``t^N <= alpha``, ``t`` the radius's threshold (1/2 at radius 0), since all
    ``N`` votes for the class happen with probability about ``t^N`` when ``p`` is just below ``t``."""
    noise, total = Gaussian(scale), 0
    for row in rows:
        total += n0
        if row["predict"] == -1:
            continue  # abstaining is no claim
        r = row["grid_radius"]
        threshold = 0.5 if r == 0 else p_needed(noise, r, 2, MNIST_SHAPE)
        total += math.ceil(math.log(alpha) / math.log(threshold))
    return total


def certified_accuracy(rows: list, radii, grid_taken) -> dict:
    return {f"{r:g}": sum(r in grid_taken and certified(row, "grid_radius", r) for row in rows) / len(rows)
            for r in radii}


# -- one level ---------------------------------------------------------------------------------------


def bench_level(scale: float, args, out: Path) -> dict:
    run = out / f"g{scale:g}"
    training = train(run, scale, args)
    results = out / "results"
    results.mkdir(parents=True, exist_ok=True)
    common = ["--n0", args.n0, "--n", args.n, "--alpha", args.alpha, "--skip", args.skip, "--seed", args.seed,
              *([] if args.contract_check else ["--no-contract-check"])]
    taken, refused = grid_radii(scale, args.radii)
    grid_options = ["--radii", *taken, "--norm", "l2"]
    fixed_path, grid_path = results / f"g{scale:g}_fixed.tsv", results / f"g{scale:g}_grid.tsv"

    # a finished level is reused with its timings; anything else is run again from scratch
    plan = {"run": str(run), "common": list(map(str, common)), "grid": list(map(str, grid_options)),
            "images": args.images, "fixed_images": args.fixed_images, "rounds": args.rounds,
            "batch_size": str(args.batch_size)}
    record_path = results / f"g{scale:g}.timing.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else None
    if not (record and record["plan"] == plan and fixed_path.is_file() and grid_path.is_file()):
        record = {"plan": plan, **run_rounds(run, fixed_path, grid_path, common, grid_options, args)}
        atomic_write_text(record_path, json.dumps(record, indent=1))

    rounds = record["rounds"]
    grid, fixed = totals(rounds, "grid"), totals(rounds, "fixed")
    grid_rows, fixed_rows = read_results(grid_path), read_results(fixed_path)
    images, per_image = grid["images"], fixed["calls"] // fixed["images"]
    fixed_scaled = {"images": images, "calls": per_image * images,
                    # R set-ups as the grid had, and the per-image seconds of all the images
                    "wall_s": fixed["setup_s"] + fixed["image_s"] * images / fixed["images"]}
    call_ratio = fixed_scaled["calls"] / grid["calls"]
    wall_ratio = fixed_scaled["wall_s"] / grid["wall_s"]
    per_round = [cost_ratio(r["fixed"], r["grid"]) for r in rounds]
    floor = calls_floor(grid_rows, scale, args.n0, args.alpha)
    return {
        "scale": scale, "model": str(run), "train_epochs": training["epochs"], "max_train": training["max_train"],
        "radii": list(args.radii), "grid_radii": taken, "radii_refused_by_grid": refused,
        "batch_size": record["batch_size"], "batch_probe": record["batch_probe"],
        "contract": read_sidecar(fixed_path)["config"].get("contract"),
        "grid": {**grid, "calls_per_image_mean": grid["calls"] / images,
                 "calls_per_image_median": statistics.median(row["samples_used"] for row in grid_rows),
                 "calls_per_image_max": max(row["samples_used"] for row in grid_rows),
                 "images_at_full_budget": sum(row["samples_used"] == per_image for row in grid_rows),
                 "certified_accuracy": certified_accuracy(grid_rows, args.radii, taken)},
        "fixed": {**fixed, "calls_per_image": per_image},
        "fixed_scaled": fixed_scaled,
        "call_ratio": call_ratio, "wall_ratio": wall_ratio, "wall_over_call": wall_ratio / call_ratio,
        "calls_floor": floor,
        "floor_ratio": fixed_scaled["calls"] / floor,
        "image_time_ratio": fixed["image_s"] * images / fixed["images"] / grid["image_s"],
        "cost_ratio_per_round": per_round, "cost_ratio_median": statistics.median(per_round),
        "rounds": rounds,
        **compare(grid_rows, fixed_rows, args.radii, taken),
    }


# -- report ------------------------------------------------------------------------------------------


def overall(levels: list) -> dict:
    grid_calls = sum(level["grid"]["calls"] for level in levels)
    fixed_calls = sum(level["fixed_scaled"]["calls"] for level in levels)
    grid_wall = sum(level["grid"]["wall_s"] for level in levels)
    fixed_wall = sum(level["fixed_scaled"]["wall_s"] for level in levels)
    call_ratio, wall_ratio = fixed_calls / grid_calls, fixed_wall / grid_wall
    floor = sum(level["calls_floor"] for level in levels)
    return {"grid_calls": grid_calls, "fixed_scaled_calls": fixed_calls, "grid_wall_s": grid_wall,
            "fixed_scaled_wall_s": fixed_wall, "call_ratio": call_ratio, "wall_ratio": wall_ratio,
            "wall_over_call": wall_ratio / call_ratio, "calls_floor": floor, "floor_ratio": fixed_calls / floor,
            "cost_ratio_median": statistics.median(r for level in levels for r in level["cost_ratio_per_round"]),
            "common_images": sum(level["common_images"] for level in levels),
            "differing_images": sum(len(level["differing_images"]) for level in levels),
            "goal_10x_fewer_calls": call_ratio >= 10,
            "goal_wall_within_15pct": abs(wall_ratio / call_ratio - 1) <= 0.15}


def markdown(report: dict) -> str:
    lines = ["| noise | grid images | grid calls (mean/image) | fixed n calls, scaled | call ratio | "
             "grid wall | fixed wall, scaled | wall ratio | wall / call ratio (per round: median, range) | "
             "decisions differ |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for level in report["levels"]:
        grid, fixed = level["grid"], level["fixed_scaled"]
        lines.append(
            f"| {level['scale']:g} | {grid['images']} | {grid['calls']:,} ({grid['calls_per_image_mean']:,.0f}) | "
            f"{fixed['calls']:,} | {level['call_ratio']:.1f}x | {grid['wall_s']:.0f} s | {fixed['wall_s']:.0f} s | "
            f"{level['wall_ratio']:.1f}x | {level['wall_over_call']:.2f} (median {level['cost_ratio_median']:.2f}, "
            f"{min(level['cost_ratio_per_round']):.2f}-{max(level['cost_ratio_per_round']):.2f}) | "
            f"{len(level['differing_images'])} of {level['common_images']} |")
    total = report["overall"]
    lines.append(f"| all | | {total['grid_calls']:,} | {total['fixed_scaled_calls']:,} | {total['call_ratio']:.1f}x | "
                 f"{total['grid_wall_s']:.0f} s | {total['fixed_scaled_wall_s']:.0f} s | {total['wall_ratio']:.1f}x | "
                 f"{total['wall_over_call']:.2f} (median {total['cost_ratio_median']:.2f}) | "
                 f"{total['differing_images']} of {total['common_images']} |")
    lines += ["", "The fewest calls any valid monotone test could certify the grid's radii with (all votes for "
              "the class), and the largest call ratio that allows:", "",
              "| noise | floor of the calls | largest call ratio possible | grid images at the full budget |",
              "|---|---|---|---|"]
    for level in report["levels"]:
        lines.append(f"| {level['scale']:g} | {level['calls_floor']:,} | {level['floor_ratio']:.1f}x | "
                     f"{level['grid']['images_at_full_budget']} of {level['grid']['images']} |")
    lines.append(f"| all | {total['calls_floor']:,} | {total['floor_ratio']:.1f}x | |")
    lines += ["", "Certified accuracy of the grid mode (l2, % of the grid images):", "",
              "| noise | " + " | ".join(f"{r:g}" for r in report["protocol"]["radii"]) + " |",
              "|---|" + "---|" * len(report["protocol"]["radii"])]
    for level in report["levels"]:
        accuracy = level["grid"]["certified_accuracy"]
        lines.append(f"| {level['scale']:g} | " + " | ".join(f"{100 * a:.1f}" for a in accuracy.values()) + " |")
    return "\n".join(lines) + "\n"


def conditions() -> dict:
    return {"threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform(),
            "load_at_start": os.getloadavg()}


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"command": " ".join(["python", "scripts/bench_table.py", *(sys.argv[1:] if argv is None else argv)]),
              "protocol": {"images": args.images, "skip": args.skip, "fixed_images": args.fixed_images,
                           "n": args.n, "n0": args.n0, "alpha": args.alpha, "radii": list(args.radii),
                           "norm": "l2", "levels": args.levels, "seed": args.seed, "rounds": args.rounds,
                           "contract_check": args.contract_check},
              "conditions": conditions()}
    report["levels"] = []
    for scale in args.levels:
        report["levels"].append(bench_level(scale, args, out))
        print(f"noise {scale:g} done", flush=True)
    report["overall"] = overall(report["levels"])
    report["conditions"]["load_at_end"] = os.getloadavg()
    table = markdown(report)
    atomic_write_text(out / "bench_table.json", json.dumps(report, indent=1))
    atomic_write_text(out / "bench_table.md", table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())

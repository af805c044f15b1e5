"""Compare sequential certification (`ucan certify --radius r`) with fixed-n CERTIFY runs.

    python scripts/compare_sequential.py SEQUENTIAL.tsv REFERENCE.tsv [REFERENCE.tsv ...] [--fixed-n N]

The files must certify the same checkpoint with the same noise, data and
alpha. A reference is a fixed-n CERTIFY file, a grid file (`--radii`) or
another sequential file (say, of an earlier stopping rule). On the images
that every file holds (matched by index), prints a Markdown table: certified
accuracy at the first file's radius and norm (correct and certified at that
radius), the images whose decision differs, and the model calls per image
(mean and median for the sequential and grid files, n0 + n for a fixed run)
with each reference's ratio to the first file. ``--fixed-n N`` adds the calls
fixed-n CERTIFY with ``n = N`` would make (n0 + N per image; not run, so no
decisions).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from ucan_smoothing.results import read_results, read_sidecar


SAME_KEYS = ("checkpoint_sha256", "noise", "npg", "dataset", "split", "alpha")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sequential", help="result file of `ucan certify --radius r` (the first file)")
    parser.add_argument("fixed", nargs="+", metavar="reference",
                        help="result files of fixed-n, grid (--radii) or sequential `ucan certify` on the same run")
    parser.add_argument("--fixed-n", type=int, help="also list the calls of fixed-n CERTIFY at this n (not run)")
    return parser.parse_args()


def certified(row: dict, column: str, radius: float) -> bool:
    return bool(row["correct"]) and row["predict"] != -1 and row[column] >= radius


def main() -> int:
    args = parse_args()
    config = read_sidecar(args.sequential)["config"]
    if config.get("radius") is None:
        raise SystemExit(f"{args.sequential} is not a sequential run (its config has no radius)")
    radius, column = config["radius"], f"radius_{config['norm']}"
    for path in args.fixed:  # the same classifier, noise, data and level, or the comparison means nothing
        other = read_sidecar(path)["config"]
        differing = [key for key in SAME_KEYS if other.get(key) != config.get(key)]
        if differing:
            raise SystemExit(f"{path} and {args.sequential} differ in {', '.join(differing)}")
    tables = {path: {row["idx"]: row for row in read_results(path)} for path in [args.sequential, *args.fixed]}
    common = sorted(set.intersection(*(set(rows) for rows in tables.values())))
    if not common:
        raise SystemExit("the files share no image")
    sequential = tables[args.sequential]
    decisions = [certified(sequential[i], column, radius) for i in common]
    calls = [sequential[i]["samples_used"] for i in common]
    mean_calls = statistics.mean(calls)

    print(f"{len(common)} common images; radius {radius:g} in {config['norm']}; "
          f"sequential: {Path(args.sequential).name}\n")
    print("| run | model calls per image | certified accuracy | decisions that differ from sequential |")
    print("|---|---|---|---|")
    print(f"| sequential ({config['mode']}) | mean {mean_calls:,.0f}, median {statistics.median(calls):,.0f}, "
          f"max {max(calls):,} | {100 * sum(decisions) / len(common):.1f}% | - |")
    for path in args.fixed:
        rows = tables[path]
        fixed_config = read_sidecar(path)["config"]
        if fixed_config.get("radii") is not None or fixed_config.get("radius") is not None:
            # staged runs: the calls each image made
            used = [rows[i]["samples_used"] for i in common]
            per_image, kind = statistics.mean(used), "grid" if fixed_config.get("radii") is not None else "sequential"
            calls_text = (f"mean {per_image:,.0f}, median {statistics.median(used):,.0f}")
            label = f"{kind} ({fixed_config['mode']}), n at most {fixed_config['n']:,}"
        else:
            per_image = fixed_config["n0"] + fixed_config["n"]
            calls_text, label = f"{per_image:,}", f"fixed n = {fixed_config['n']:,}"
        fixed_decisions = [certified(rows[i], column, radius) for i in common]
        differ = [i for i, a, b in zip(common, decisions, fixed_decisions) if a != b]
        print(f"| {label} ({Path(path).name}) | {calls_text} ({per_image / mean_calls:.1f}x the first file's mean) | "
              f"{100 * sum(fixed_decisions) / len(common):.1f}% | {len(differ)} {differ[:10] if differ else ''} |")
    if args.fixed_n is not None:
        per_image = config["n0"] + args.fixed_n
        print(f"| fixed n = {args.fixed_n:,} (calls only, not run) | {per_image:,} "
              f"({per_image / mean_calls:.1f}x the first file's mean) | - | - |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The built-in demo: isotropic Gaussian against UCAN's pattern-fixed and universal noise on MNIST.

With no argument, on 2 CPU cores in a few minutes, it

1. trains the MNIST CNN under isotropic Gaussian noise (the baseline),
2. fine-tunes it jointly with a pattern-fixed NPG (p = 2, more noise away
   from the centre; geometric mean 1, so the level stays ``--scale``) and,
   from the same baseline, trains a universal NPG (classifier frozen),
3. certifies the same fixed subset of the MNIST test set with each
   (a REDUCED protocol: ``--images`` images, ``--n`` samples; the paper uses
   n = 100,000 on the whole test set),
4. prints the comparison table (:func:`headline_table`, also in
   ``analysis/demo_table.md``) and writes the full tables, the plots and
   ``analysis/analysis.json``.

Reproducibility: training noise, data order and certification noise all
follow ``--seed``, so two runs on one machine with the same torch thread
count give the same weights and the same table, bit for bit. A different
thread count changes the order of float sums in torch's CPU kernels: the
weights differ in the last bits, training drifts, and a few images near a
threshold can move. The demo therefore prints, at its start, the conditions
its numbers depend on, and records them in ``demo.json`` in ``--out``.

Every step is resumable: running the demo again reuses finished training
runs and result rows in ``--out`` (``demo.json`` lists what it reused).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from ..analysis import (
    ALM_NAME,
    DISPLAY,
    accuracy_key,
    analysis_record,
    load_methods,
    markdown_table,
    plot_certified_accuracy,
    plot_sigma_maps,
    summarize,
    write_csv,
)
from ..cli import main as cli_main
from ..distributed import resolve_device
from ..fileio import atomic_write_text
from ..results import run_environment
from ..training import train_classifier, train_generator

RECORD_FORMAT = "ucan-demo-v1"
#: the (norm, radius) columns of the demo's table (the README shows it)
HEADLINE = (("l2", 0.0), ("l2", 0.25), ("l2", 0.5), ("l2", 0.75), ("l2", 1.0), ("linf", 0.02), ("alm", 0.75))


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", help="folder for runs, results and plots (default runs/demo)")
    parser.add_argument("--scale", type=float, default=0.5, help="Gaussian noise level (default 0.5)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs of the baseline (default 2)")
    parser.add_argument("--npg-epochs", type=int, default=1, help="epochs of each NPG (default 1)")
    parser.add_argument("--max-train", type=int, default=None, help="train on the first N images (default all 60,000)")
    parser.add_argument("--images", type=int, default=100, help="test images to certify (default 100, evenly spaced)")
    parser.add_argument("--n", type=int, default=1000, help="estimation samples per image (default 1,000)")
    parser.add_argument("--n0", type=int, default=100, help="selection samples per image (default 100)")
    parser.add_argument("--alpha", type=float, default=0.001, help="failure probability (default 0.001)")
    parser.add_argument("--seed", type=int, default=0, help="seed of training and certification noise")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def conditions(seed: int) -> dict:
    """What the demo's numbers depend on besides its options: torch's thread count (it changes the
    order of float sums), the device and torch's version; the seed fixes every random draw."""
    return {"torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "cpu_count": os.cpu_count(),
            "device": str(resolve_device(None)), "seed": seed}


def _conditions_line(found: dict) -> str:
    omp = found["OMP_NUM_THREADS"]
    return (f"conditions: torch {found['torch']}, {found['torch_threads']} torch threads "
            f"(OMP_NUM_THREADS={'unset' if omp is None else omp}, {found['cpu_count']} cores), "
            f"device {found['device']}, seed {found['seed']}; the table is reproducible for these")


def headline_table(summary: list) -> str:
    """The demo's table: certified accuracy (% of the images) at the :data:`HEADLINE` radii, one row
    per method. No timing in it, so the same weights and seed give the same bytes."""
    def header(norm, radius):
        if norm == "alm":
            return f"ALM >= {radius:g} {ALM_NAME.removeprefix('ALM ')}"
        return f"{DISPLAY[norm]} >= {radius:g}"

    lines = ["| method | " + " | ".join(header(norm, r) for norm, r in HEADLINE) + " |",
             "|---|" + "---|" * len(HEADLINE)]
    for row in summary:
        cells = [f"{100 * row[accuracy_key(norm, r)]:.3g}" for norm, r in HEADLINE]
        lines.append(f"| {row['method']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _train_once(trainer, out: Path, reused: list, **options) -> Path:
    """Train into ``out`` unless a finished run is there; resume an interrupted one."""
    if (out / "final.pt").is_file():
        reused.append(str(out))
        return out
    return trainer(out=str(out), resume=(out / "last.pt").is_file(), **options)


def _certify(run_dir: Path, path: Path, args, skip: int, reused: list) -> None:
    if path.is_file():
        reused.append(str(path))  # certify resumes it: finished rows are kept, not recomputed
    # The demo's models are trained here on images in [0, 1], so the input contract holds by
    # construction; a small --max-train gives a model near chance, which certify would otherwise
    # refuse as a broken contract (it still prints a warning).
    argv = ["certify", str(run_dir), "--out", str(path), "--n0", str(args.n0), "--n", str(args.n),
            "--alpha", str(args.alpha), "--skip", str(skip), "--max", str(args.images), "--seed", str(args.seed),
            "--no-contract-check"]
    if not args.progress:
        argv.append("--no-progress")
    if cli_main(argv) != 0:
        raise RuntimeError(f"certification of {run_dir} failed")


def _analyse(results: dict, sigma_runs: dict, analysis: Path) -> tuple:
    """Full tables, plots and analysis.json into ``analysis``; returns (demo table, files written)."""
    methods = load_methods(results)
    summary = summarize(methods)
    table = headline_table(summary)
    analysis.mkdir(parents=True, exist_ok=True)
    atomic_write_text(analysis / "demo_table.md", table)
    atomic_write_text(analysis / "summary.md", markdown_table(summary))
    written = [analysis / "demo_table.md", analysis / "summary.md", write_csv(summary, analysis / "summary.csv"),
               plot_certified_accuracy(methods, analysis / "certified_accuracy.png"),
               plot_sigma_maps(list(sigma_runs.values()), analysis / "sigma_maps.png", labels=list(sigma_runs))]
    record = analysis_record(methods, sigma=list(sigma_runs.values()), outputs=written)
    atomic_write_text(analysis / "analysis.json", json.dumps(record, indent=2, sort_keys=True) + "\n")
    return table, [*written, analysis / "analysis.json"]


def _record(args, found: dict, reused: list, written: list, seconds: float, load: tuple) -> dict:
    environment = run_environment()
    options = {k: v for k, v in vars(args).items() if not k.startswith("_") and k != "progress"}
    return {"format": RECORD_FORMAT, "command": environment.pop("command"), "environment": environment,
            "conditions": found, "options": options, "reused": reused, "outputs": [str(p) for p in written],
            "seconds": round(seconds, 1), "load_average_start": load[0], "load_average_end": load[1]}


def _load_average():
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def run(args) -> int:
    started, load_start = time.monotonic(), _load_average()
    out = Path(args.out)
    found = conditions(args.seed)
    print(_conditions_line(found))
    reused: list = []
    common = {"seed": args.seed, "progress": args.progress, "max_train": args.max_train, "max_test": 1000,
              "noise": "gaussian", "scale": args.scale}
    print(f"[1/4] baseline: MNIST CNN under isotropic Gaussian noise, scale {args.scale}")
    baseline = _train_once(train_classifier, out / "isotropic", reused, epochs=args.epochs, **common)
    base = str(baseline / "final.pt")
    print("[2/4] UCAN noise parameter generators from the baseline")
    runs = {
        "isotropic Gaussian": baseline,
        "pattern-fixed (p=2)": _train_once(
            train_generator, out / "pattern_p2", reused, base=base, joint=True, epochs=args.npg_epochs,
            npg={"kind": "pattern", "p": 2}, **common),
        "universal": _train_once(
            train_generator, out / "universal", reused, base=base, epochs=args.npg_epochs,
            npg={"kind": "universal"}, **common),
    }

    skip = max(1, 10_000 // args.images)
    print(f"[3/4] certifying {args.images} test images (every {skip}th), n0 = {args.n0}, n = {args.n}, "
          f"alpha = {args.alpha}: a reduced protocol (the paper: n = 100,000)")
    results = {}
    for label, run_dir in runs.items():
        results[label] = out / "results" / f"{run_dir.name}.tsv"
        _certify(run_dir, results[label], args, skip, reused)

    print("[4/4] analysis")
    sigma_runs = {label: runs[label] for label in ("pattern-fixed (p=2)", "universal")}
    table, written = _analyse(results, sigma_runs, out / "analysis")
    seconds = time.monotonic() - started
    record = _record(args, found, reused, written, seconds, (load_start, _load_average()))
    atomic_write_text(out / "demo.json", json.dumps(record, indent=2, sort_keys=True) + "\n")
    print()
    print(f"Certified accuracy (% of the {args.images} images; n = {args.n}, alpha = {args.alpha}):")
    print()
    print(table)
    print("Radii in l1/l2/l_inf are certificates (probability >= 1 - alpha each); ALM is a volume figure, "
          "not a radius.")
    print(f"full tables (every radius, ACR, l1, abstentions, time per image): {out / 'analysis' / 'summary.md'}")
    print("written: " + ", ".join(str(p) for p in [*written, out / "demo.json"]))
    if reused:
        print(f"reused from an earlier run: {', '.join(reused)}")
    minutes, rest = divmod(round(seconds), 60)
    print(f"took {minutes} min {rest} s; {_conditions_line(found).removeprefix('conditions: ')}")
    return 0

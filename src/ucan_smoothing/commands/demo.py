"""The built-in demo: isotropic Gaussian against UCAN's pattern-fixed and universal noise on MNIST.

With no argument, on 2 CPU cores in a few minutes, it

1. trains the MNIST CNN under isotropic Gaussian noise (the baseline),
2. fine-tunes it jointly with a pattern-fixed NPG (p = 2, more noise away
   from the centre; geometric mean 1, so the level stays ``--scale``) and,
   from the same baseline, trains a universal NPG (classifier frozen),
3. certifies the same fixed subset of the MNIST test set with each
   (a REDUCED protocol: ``--images`` images, ``--n`` samples; the paper uses
   n = 100,000 on the whole test set),
4. prints the comparison table and writes the plots.

Every step is resumable: running the demo again reuses finished training
runs and result rows in ``--out``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..analysis import markdown_table, plot_certified_accuracy, plot_sigma_maps, summarize, write_csv
from ..cli import main as cli_main
from ..training import train_classifier, train_generator


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
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", dest="progress", action="store_false")


def _train_once(trainer, out: Path, **options) -> Path:
    """Train into ``out`` unless a finished run is there; resume an interrupted one."""
    if (out / "final.pt").is_file():
        return out
    return trainer(out=str(out), resume=(out / "last.pt").is_file(), **options)


def run(args) -> int:
    out = Path(args.out)
    common = dict(seed=args.seed, progress=args.progress, max_train=args.max_train, max_test=1000,
                  noise="gaussian", scale=args.scale)
    print(f"[1/4] baseline: MNIST CNN under isotropic Gaussian noise, scale {args.scale}")
    baseline = _train_once(train_classifier, out / "isotropic", epochs=args.epochs, **common)
    base = str(baseline / "final.pt")
    print("[2/4] UCAN noise parameter generators from the baseline")
    runs = {
        "isotropic Gaussian": baseline,
        "pattern-fixed (p=2)": _train_once(
            train_generator, out / "pattern_p2", base=base, joint=True, epochs=args.npg_epochs,
            npg={"kind": "pattern", "p": 2}, **common),
        "universal": _train_once(
            train_generator, out / "universal", base=base, epochs=args.npg_epochs,
            npg={"kind": "universal"}, **common),
    }

    skip = max(1, 10_000 // args.images)
    print(f"[3/4] certifying {args.images} test images (every {skip}th), n0 = {args.n0}, n = {args.n}, "
          f"alpha = {args.alpha}: a reduced protocol (the paper: n = 100,000)")
    results = {}
    for label, run_dir in runs.items():
        path = out / "results" / f"{run_dir.name}.tsv"
        argv = ["certify", str(run_dir), "--out", str(path), "--n0", str(args.n0), "--n", str(args.n),
                "--alpha", str(args.alpha), "--skip", str(skip), "--max", str(args.images), "--seed", str(args.seed)]
        if not args.progress:
            argv.append("--no-progress")
        if cli_main(argv) != 0:
            raise RuntimeError(f"certification of {run_dir} failed")
        results[label] = path

    print("[4/4] analysis")
    analysis = out / "analysis"
    analysis.mkdir(parents=True, exist_ok=True)
    summary = summarize(results)
    table = markdown_table(summary)
    (analysis / "summary.md").write_text(table)
    write_csv(summary, analysis / "summary.csv")
    plot = plot_certified_accuracy(results, analysis / "certified_accuracy.png")
    sigma = plot_sigma_maps([runs["pattern-fixed (p=2)"], runs["universal"]], analysis / "sigma_maps.png",
                            labels=["pattern-fixed (p=2)", "universal"])
    print()
    print(table)
    print(f"tables: {analysis / 'summary.md'}, {analysis / 'summary.csv'}")
    print(f"plots:  {plot}, {sigma}")
    print("Radii in l1/l2/l_inf are certificates (probability >= 1 - alpha each); ALM is a volume figure, "
          "not a radius.")
    return 0

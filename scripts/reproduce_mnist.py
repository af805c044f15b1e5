"""Reproduce the paper's MNIST comparison at a protocol this machine finishes.

Methods at each noise level lambda in {0.25, 0.5, 1.0} (Gaussian family):

* isotropic    the MNIST CNN trained under isotropic Gaussian noise (baseline)
* pattern      pattern-fixed NPG (p = 2, hand-set kappa/iota, geometric mean 1),
               classifier fine-tuned jointly
* universal    universal NPG trained from the baseline (classifier frozen)
* input-dep.   the paper's input-dependent NPG, trained jointly; certified in
               the paper's mode, which is NOT a certificate (DESIGN.md section 4)
* noisy_shift  sound input-adaptive mode: mu computed from the NOISY sample
               (part of the base classifier), fixed isotropic noise
* lipschitz_shift  sound input-adaptive mode: clean-input mu with a proven
               Lipschitz bound L (here 0.5), radius R / (1 + L)

The two sound adaptive modes run at lambda = 0.5 only (time), on the same images.

Protocol (default): n0 = 100, n = 10,000, alpha = 0.001; 200 evenly spaced
test images at lambda = 0.5, 100 at the others. Every step is resumable: run
the script again after an interruption and it continues. Each command it runs
is printed and logged to ``<out>/commands.txt``, so the report can quote them.

    python scripts/reproduce_mnist.py --out runs/reproduce           # full (about 1.5 h on 2 cores)
    python scripts/reproduce_mnist.py --out /tmp/r --quick           # minutes: checks the pipeline
    python scripts/reproduce_mnist.py --dataset fashion_mnist --out runs/reproduce-fashion

The NPG runs take their model and data set from the baseline (``--base``).
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path

SCALES = (0.5, 0.25, 1.0)  # the main level first: its results land first


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/reproduce")
    parser.add_argument("--quick", action="store_true", help="tiny protocol to check the pipeline")
    parser.add_argument("--epochs", type=int, default=5, help="baseline epochs (default 5)")
    parser.add_argument("--npg-epochs", type=int, default=2, help="NPG epochs (default 2)")
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-paper-mode", action="store_true", help="leave out the input-dependent method")
    parser.add_argument("--attack", action="store_true", help="also run `ucan attack` on every result file")
    parser.add_argument("--levels", type=float, nargs="+", default=list(SCALES),
                        help="noise levels to run, in this order (default 0.5 0.25 1.0)")
    parser.add_argument("--sound-levels", type=float, nargs="*", default=[0.5],
                        help="noise levels at which the sound adaptive modes run (default 0.5)")
    parser.add_argument("--dataset", choices=("mnist", "fashion_mnist"), default="mnist",
                        help="MNIST (default) or Fashion-MNIST: same model, same protocol")
    parser.add_argument("--images", type=int, default=None,
                        help="test images per level (default 200 at lambda 0.5, 100 at the others)")
    return parser.parse_args()


class Runner:
    """Runs `ucan` commands, printing and logging each one."""

    def __init__(self, out: Path):
        self.out = out
        self.log = out / "commands.txt"

    def __call__(self, *argv: str) -> None:
        command = ["ucan", *argv]
        text = shlex.join(command)
        print(f"$ {text}", flush=True)
        with open(self.log, "a") as handle:
            handle.write(text + "\n")
        start = time.time()
        subprocess.run([sys.executable, "-m", "ucan_smoothing.cli", *argv], check=True)
        print(f"  ({time.time() - start:.0f} s)", flush=True)


def attack_counts(summary: Path) -> str:
    """``violations of attacked`` from an attack file's summary, or ``not attacked``."""
    if not summary.is_file():
        return "not attacked"
    import json

    info = json.loads(summary.read_text())
    return f"{info['violations']} of {info['attacked']}"


def curve_panels(panels: dict, path: Path) -> None:
    """One panel per ``(title, x label)`` key, a certified-accuracy curve per method: ``panels[key]``
    maps a method to ``(radii, accuracies)``. The paper mode is dashed and labelled NOT a certificate;
    a curve known only at a few radii (a grid-mode table) is drawn with markers."""
    import math

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(4, len(panels))
    rows = math.ceil(len(panels) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4 * columns, 3.2 * rows), squeeze=False)
    # one colour per method in every panel (a panel may lack a method), one legend for all
    methods = list(dict.fromkeys(method for curves in panels.values() for method in curves))
    colours = {method: f"C{k % 10}" for k, method in enumerate(methods)}
    legend = {}  # label -> the first line drawn with it
    for ax, ((title, xlabel), curves) in zip(axes.flat, panels.items()):
        for method, (radii, accuracy) in curves.items():
            style = ("--" if method == "paper mode" else "-") + ("o" if len(radii) <= 20 else "")
            label = method + (" (NOT a certificate)" if method == "paper mode" else "")
            (line,) = ax.plot(radii, accuracy, style, color=colours[method], label=label, markersize=3)
            legend.setdefault(label, line)
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("certified accuracy")
        ax.set_ylim(0, 1)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    axes.flat[0].legend(list(legend.values()), list(legend), fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def train_once(ucan: Runner, run: Path, *options: str) -> None:
    """``ucan train OPTIONS --out RUN``, unless RUN is finished; resumed when it has a checkpoint."""
    if (run / "final.pt").is_file():
        return
    resume = ["--resume"] if (run / "last.pt").is_file() else []
    ucan("train", *options, "--out", str(run), *resume)


class Reproduction:
    """What every reproduction script starts from: its output folder (created), the logging
    command runner, and the options every command shares (``seed``; ``quick``: a small training
    set with ``--quick``)."""

    def __init__(self, args):
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.ucan = Runner(self.out)
        self.quick = ["--max-train", "2000"] if args.quick else []
        self.seed = ["--seed", str(args.seed), "--no-progress"]

    def train(self, run: Path, *options: str) -> None:
        """``ucan train`` once (resumed if interrupted), with the shared options."""
        train_once(self.ucan, run, *options, *self.quick, *self.seed)


def main() -> int:
    args = parse_args()
    reproduction = Reproduction(args)
    out, ucan, seed, train = reproduction.out, reproduction.ucan, reproduction.seed, reproduction.train
    epochs = ["--epochs", "1" if args.quick else str(args.epochs)]
    npg_epochs = ["--epochs", "1" if args.quick else str(args.npg_epochs)]
    n = "200" if args.quick else str(args.n)

    results = {}
    for scale in args.levels:
        level = f"g{scale:g}"
        noise = ["--noise", "gaussian", "--scale", f"{scale:g}"]
        base = out / level / "isotropic"
        train(base, "classifier", "--dataset", args.dataset, *noise, *epochs)
        runs = {"isotropic": base}
        runs["pattern"] = out / level / "pattern_p2"
        train(runs["pattern"], "npg", "--kind", "pattern", "--p", "2", "--joint", "--base", str(base / "final.pt"),
              *noise, *npg_epochs)
        runs["universal"] = out / level / "universal"
        train(runs["universal"], "npg", "--kind", "universal", "--base", str(base / "final.pt"), *noise, *npg_epochs)
        if not args.skip_paper_mode:
            runs["input-dependent"] = out / level / "input_dependent"
            train(runs["input-dependent"], "npg", "--kind", "input_dependent", "--joint",
                  "--base", str(base / "final.pt"), *noise, *npg_epochs)

        sigma_runs = [str(run) for method, run in runs.items() if method != "isotropic"]
        if scale in args.sound_levels:
            runs["noisy_shift"] = out / level / "noisy_shift"
            train(runs["noisy_shift"], "npg", "--kind", "noisy_shift", "--base", str(base / "final.pt"),
                  *noise, *npg_epochs)
            runs["lipschitz_shift"] = out / level / "lipschitz_shift"
            train(runs["lipschitz_shift"], "npg", "--kind", "lipschitz_shift", "--lipschitz", "0.5",
                  "--base", str(base / "final.pt"), *noise, *npg_epochs)

        images = 4 if args.quick else args.images or (200 if scale == 0.5 else 100)
        for method, run in runs.items():
            path = out / "results" / f"{level}_{run.name}.tsv"
            extra = ["--paper-mode"] if method == "input-dependent" else []
            ucan("certify", str(run), "--out", str(path), "--n0", "100", "--n", n, "--alpha", "0.001",
                 "--skip", str(10_000 // images), "--max", str(images), *seed, *extra)
            results[(scale, method)] = path
            if args.attack:
                # PGD on the smoothed classifier inside each certified ball, checked by
                # PREDICT with n = 2,000 at the attacked point; first 50 images of each file
                ucan("attack", str(path), "--out", str(path.with_suffix(".attack.tsv")), "--n", "2000",
                     "--max", "8" if args.quick else "50", *seed)

        labels = [item for (s, method) in results if s == scale for item in ("--label", f"{method} (lambda={scale:g})")]
        files = [str(path) for (s, _), path in results.items() if s == scale]
        ucan("analyze", *files, *labels, "--out", str(out / "analysis" / level),
             "--sigma", *sigma_runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())

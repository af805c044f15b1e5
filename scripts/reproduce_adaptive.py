"""Sound input-dependent noise against isotropic noise, on the same images, every file attacked.

For each (data set, level lambda) of ``--settings`` (default: MNIST 0.5 and 1.0, Fashion-MNIST 0.5):

* isotropic        the CNN trained under N(0, l^2 I) for l in 0.25, 0.5, 1.0 (the experts, and the
                   baselines: a sound per-input method must beat the best of them at some radius)
* paper mode       the paper's input-dependent NPG at lambda, certified in its mode: NOT a certificate
* noisy_shift      mu from the noisy sample under fixed noise lambda (sound)
* elastic_sigma    a per-input Gaussian level with a proven l2 elasticity bound r = 0.01 (Sukenik et
                   al.'s setting, our chained bound; sound)
* memory           the paper mode answered through a memory of issued regions (npg/memory.py): a
                   guarantee about the sequence of queries, NOT a certificate
* dual             dual randomized smoothing (npg/dual.py): a selector under its own Gaussian noise
                   of level lambda chooses one of the three isotropic experts per input (sound)

Protocol: n0 = 100, n = 10,000, alpha = 0.001, the same ``--images`` evenly spaced test images for
every method of a data set; ``ucan attack`` (PGD in the l2 ball, PREDICT with n = 2,000 at the
attacked point) on the first ``--attack-rows`` rows of every file. Resumable; every command is
printed and logged to ``<out>/commands.txt``; ``<out>/comparison.md`` gets the tables, and a paired
sign test of each sound per-input method against each isotropic level at l2 0.5, 1.0 and 1.5.

    python scripts/reproduce_adaptive.py --out runs/adaptive            # about 1 h on 2 cores
    python scripts/reproduce_adaptive.py --out /tmp/a --quick           # minutes: checks the pipeline
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reproduce_mnist import Reproduction, attack_counts  # noqa: E402  (the logging command runner)

from scipy.stats import binomtest  # noqa: E402

from ucan_smoothing.results import read_results  # noqa: E402

EXPERT_LEVELS = (0.25, 0.5, 1.0)
L2_RADII = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5)
LINF_RADII = (0.0, 0.005, 0.01, 0.02, 0.03, 0.04)
PAIRED_RADII = (0.5, 1.0, 1.5)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/adaptive")
    parser.add_argument("--settings", nargs="+", default=["mnist:0.5", "mnist:1", "fashion_mnist:0.5"],
                        help="DATASET:LAMBDA pairs")
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--epochs", type=int, default=5, help="epochs of the isotropic experts")
    parser.add_argument("--npg-epochs", type=int, default=2, help="epochs of the paper's NPG and noisy_shift")
    parser.add_argument("--selector-epochs", type=int, default=3)
    parser.add_argument("--selector-train", type=int, default=20_000, help="training images of the selector")
    parser.add_argument("--attack-rows", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="tiny protocol to check the pipeline")
    return parser.parse_args(argv)


def certified_accuracy(rows, column, radius) -> float:
    return sum(row["correct"] and row[column] >= radius for row in rows) / len(rows)


def paired_cell(rows, baseline, radius) -> str:
    """``a / b (p)``: images only ``rows`` certifies (correct, l2 radius >= ``radius``), images only
    ``baseline`` does, and the two-sided sign-test p of that split (the same images: a paired test)."""
    mine, theirs = ({row["idx"] for row in r if row["correct"] and row["radius_l2"] >= radius} for r in (rows, baseline))
    a, b = len(mine - theirs), len(theirs - mine)
    p = binomtest(a, a + b).pvalue if a + b else 1.0
    return f"{a} / {b} (p {p:.2g})"


def summary_row(label, guarantee, rows, attack) -> str:
    l2 = " | ".join(f"{100 * certified_accuracy(rows, 'radius_l2', r):.1f}" for r in L2_RADII)
    linf = " | ".join(f"{100 * certified_accuracy(rows, 'radius_linf', r):.1f}" for r in LINF_RADII[1:])
    acr = sum(row["radius_l2"] * row["correct"] for row in rows) / len(rows)
    return f"| {label} | {guarantee} | {l2} | {acr:.3f} | {linf} | {attack} |"


def attack_text(path: Path) -> str:
    return attack_counts(path.with_suffix(".attack.tsv.summary.json"))


def main(argv=None) -> int:
    args = parse_args(argv)
    reproduction = Reproduction(args)
    out, ucan, seed, train = reproduction.out, reproduction.ucan, reproduction.seed, reproduction.train
    n, images = ("200", 4) if args.quick else (str(args.n), args.images)
    epochs = "1" if args.quick else str(args.epochs)
    npg_epochs = "1" if args.quick else str(args.npg_epochs)

    def certify_and_attack(run: Path, path: Path, *extra: str) -> Path:
        if not (path.is_file() and len(read_results(path)) == images):
            ucan("certify", str(run), "--out", str(path), "--n0", "100", "--n", n, "--alpha", "0.001",
                 "--skip", str(10_000 // images), "--max", str(images), *seed, *extra)
        attacked = path.with_suffix(".attack.tsv")
        if not attacked.with_suffix(".tsv.summary.json").is_file():
            ucan("attack", str(path), "--out", str(attacked), "--n", "2000",
                 "--max", "4" if args.quick else str(args.attack_rows), *seed)
        return path

    report = ["# Sound input-dependent noise against isotropic noise", "",
              "Written by `scripts/reproduce_adaptive.py` (commands in `<out>/commands.txt`). Certified accuracy (%) "
              f"of {images} test images, n = {n}, alpha = 0.001; attack: violations among the attacked rows.", ""]
    for setting in args.settings:
        dataset, level = setting.split(":")
        level = float(level)
        where = out / dataset
        experts = {}
        for scale in EXPERT_LEVELS:
            experts[scale] = where / f"g{scale:g}" / "isotropic"
            train(experts[scale], "classifier", "--dataset", dataset, "--noise", "gaussian", "--scale", f"{scale:g}",
                  "--epochs", epochs)
        base, noise = experts[level] / "final.pt", ["--noise", "gaussian", "--scale", f"{level:g}"]
        paper = where / f"g{level:g}" / "input_dependent"
        train(paper, "npg", "--kind", "input_dependent", "--joint", "--base", str(base), *noise, "--epochs", npg_epochs)
        shift = where / f"g{level:g}" / "noisy_shift"
        train(shift, "npg", "--kind", "noisy_shift", "--base", str(base), *noise, "--epochs", npg_epochs)
        elastic = where / f"g{level:g}" / "elastic_sigma"
        train(elastic, "npg", "--kind", "elastic_sigma", "--elasticity", "0.01", "--base", str(base), *noise,
              "--epochs", npg_epochs)
        dual = where / f"dual-s{level:g}"
        if not (dual / "final.pt").is_file():
            ucan("train-dual", *map(str, experts.values()), "--sigma", f"{level:g}", "--out", str(dual),
                 "--epochs", "1" if args.quick else str(args.selector_epochs),
                 "--max-train", "500" if args.quick else str(args.selector_train), *seed)

        results = where / "results"
        files = [(f"isotropic {scale:g}", "proven", certify_and_attack(run, results / f"g{scale:g}_isotropic.tsv"))
                 for scale, run in experts.items()]
        files.append((f"paper mode {level:g}", "**NOT a certificate**",
                      certify_and_attack(paper, results / f"g{level:g}_input_dependent.tsv", "--paper-mode")))
        files.append((f"memory {level:g}", "sequence of queries (NOT a certificate)",
                      certify_and_attack(paper, results / f"g{level:g}_memory.tsv", "--paper-mode", "--memory")))
        files.append((f"noisy_shift {level:g}", "proven", certify_and_attack(shift, results / f"g{level:g}_noisy_shift.tsv")))
        files.append((f"elastic_sigma {level:g}", "proven",
                      certify_and_attack(elastic, results / f"g{level:g}_elastic_sigma.tsv")))
        files.append((f"dual, selector {level:g}", "proven", certify_and_attack(dual, results / f"dual-s{level:g}.tsv")))

        report += [f"## {dataset}, lambda = {level:g}", "",
                   "| method | guarantee | " + " | ".join(f"l2 {r:g}" for r in L2_RADII) + " | ACR (l2) | "
                   + " | ".join(f"linf {r:g}" for r in LINF_RADII[1:]) + " | attack |",
                   "|---|---|" + "---|" * (len(L2_RADII) + len(LINF_RADII))]
        for label, guarantee, path in files:
            report.append(summary_row(label, guarantee, read_results(path), attack_text(path)))
        chosen = [row["expert"] for row in read_results(results / f"dual-s{level:g}.tsv")]
        counts = ", ".join(f"{scale:g}: {chosen.count(k)}" for k, scale in enumerate(EXPERT_LEVELS))
        report += ["", f"Experts the dual selector chose: {counts}; abstained: {chosen.count(-1)}.", ""]
        report += ["Paired on the same images: images only the sound per-input method certifies at l2 r / images "
                   "only the isotropic run does (two-sided sign-test p; one test per cell, uncorrected):", "",
                   "| method | against | " + " | ".join(f"l2 {r:g}" for r in PAIRED_RADII) + " |",
                   "|---|---|" + "---|" * len(PAIRED_RADII)]
        isotropic = [(label, read_results(path)) for label, _, path in files[: len(EXPERT_LEVELS)]]
        for label, guarantee, path in files[len(EXPERT_LEVELS):]:
            if guarantee != "proven":
                continue
            rows = read_results(path)
            for baseline_label, baseline in isotropic:
                cells = " | ".join(paired_cell(rows, baseline, r) for r in PAIRED_RADII)
                report.append(f"| {label} | {baseline_label} | {cells} |")
        report.append("")
        (out / "comparison.md").write_text("\n".join(report) + "\n")
    print((out / "comparison.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())

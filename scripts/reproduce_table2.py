"""The paper's MNIST Table 2 protocol, with decisions as strong as n = 100,000, every file attacked.

For each noise level lambda of ``--levels`` (default 0.25, 0.5, 1.0), Gaussian family:

* isotropic     the MNIST CNN trained under N(0, lambda^2 I)
* pattern       pattern-fixed NPG, p = 2 (geometric mean 1), classifier fine-tuned jointly
* universal     universal NPG from the isotropic classifier (classifier frozen)
* noisy_shift   sound adaptive mode: mu from the noisy sample, fixed isotropic noise
* lipschitz_shift  sound adaptive mode: mu from the clean input with a proven L = 0.5, radius R / (1 + L)
* elastic_sigma sound adaptive mode: a per-input level with a proven elasticity bound (Sukenik et al.)
* paper mode    the paper's input-dependent NPG in its mode: NOT a certificate

Protocol: every ``10000 / --images``-th test image (500: every 20th), alpha = 0.001, n0 = 100,
l2 radii 0, 0.25, ..., 2.25. The fixed-noise methods run in grid mode
(``ucan certify RUN --radii ... --norm l2 --n 100000``, core/grid.py): decisions at every grid
radius as strong as n = 100,000, with far fewer samples. Radii that a run's noise cannot certify
for any ``p_lower < 1`` are left out of its grid (reported 0, as fixed n would). The paper mode
and elastic_sigma have per-input noise, which the grid cannot plan for: they run fixed-n CERTIFY
at n = 100,000 on the first ``--fixed-images`` of the same images (said so in the table).
``ucan attack`` (PGD in the l2 ball, PREDICT n = 2,000 at the attacked point) runs on the first
``--attack-rows`` rows of every file. Resumable; commands in ``<out>/commands.txt``; the tables in
``<out>/table2.md``, the certified-accuracy curves (a panel per level) in ``<out>/table2.png``.

    python scripts/reproduce_table2.py --out runs/table2                 # hours on 2 CPU cores
    python scripts/reproduce_table2.py --out /tmp/t --quick              # minutes: the pipeline
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from scipy.stats import binomtest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reproduce_mnist import Reproduction, attack_counts, curve_panels  # noqa: E402

from ucan_smoothing.core.grid import largest_certifiable_radius  # noqa: E402
from ucan_smoothing.results import read_results  # noqa: E402
from ucan_smoothing.runs import load_trained  # noqa: E402

TABLE_RADII = tuple(0.25 * k for k in range(10))  # 0, 0.25, ..., 2.25
MNIST_SHAPE = (1, 28, 28)
LIPSCHITZ = 0.5
#: (row, run folder, grid or fixed n, `ucan train npg` options or None for the isotropic classifier):
#: the paper's methods first, then the sound adaptive modes
METHODS = (
    ("isotropic", "isotropic", "grid", None),
    ("pattern", "pattern_p2", "grid", ("--kind", "pattern", "--p", "2", "--joint")),
    ("universal", "universal", "grid", ("--kind", "universal")),
    ("paper mode", "input_dependent", "fixed", ("--kind", "input_dependent", "--joint")),
    ("noisy_shift", "noisy_shift", "grid", ("--kind", "noisy_shift")),
    ("lipschitz_shift", "lipschitz_shift", "grid", ("--kind", "lipschitz_shift", "--lipschitz", f"{LIPSCHITZ:g}")),
    ("elastic_sigma", "elastic_sigma", "fixed", ("--kind", "elastic_sigma", "--elasticity", "0.01")),
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/table2")
    parser.add_argument("--levels", type=float, nargs="+", default=[0.25, 0.5, 1.0])
    parser.add_argument("--images", type=int, default=500, help="test images of the grid-mode methods")
    parser.add_argument("--fixed-images", type=int, default=50,
                        help="the first this many of the same images get the paper mode at fixed n")
    parser.add_argument("--n", type=int, default=100_000, help="fixed n, and the grid's largest sample budget")
    parser.add_argument("--epochs", type=int, default=5, help="epochs of the isotropic classifiers")
    parser.add_argument("--npg-epochs", type=int, default=2)
    parser.add_argument("--attack-rows", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", nargs="+", choices=[folder for _, folder, _, _ in METHODS],
                        default=[folder for _, folder, _, _ in METHODS],
                        help="the methods to run and report, by run folder (default: all); the isotropic "
                             "classifier is trained whatever is chosen, as every NPG starts from it")
    parser.add_argument("--quick", action="store_true", help="tiny protocol to check the pipeline")
    parser.add_argument("--report-only", action="store_true",
                        help="write the tables from the finished files only: train, certify and attack nothing "
                             "(a method whose file is not finished gets a 'not run' row)")
    args = parser.parse_args(argv)
    if not 1 <= args.fixed_images <= args.images:
        parser.error("--fixed-images must be between 1 and --images (they are the first of the same images)")
    return args


def certifiable(run: Path, radii) -> list:
    """The radii the run's fixed noise can certify for some ``p_lower < 1`` (the grid refuses others;
    a lipschitz_shift run's radii are those of its noise over 1 + L)."""
    trained = load_trained(run)
    largest = largest_certifiable_radius(trained.noise(), 2, MNIST_SHAPE) / (1 + (trained.lipschitz() or 0.0))
    return [r for r in radii if r <= largest]


def certified_at(row: dict, column: str, radius: float) -> bool:
    return bool(row["correct"]) and row["predict"] != -1 and row[column] >= radius


PAIRED_RADII = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0)


def paired_row(label: str, rows: list, baseline_rows: list) -> str:
    """``a / b (p)`` per radius of :data:`PAIRED_RADII`: images only this method certifies, images
    only the isotropic baseline does, and the two-sided sign-test p of that split (a paired test)."""
    cells = []
    for radius in PAIRED_RADII:
        mine, theirs = ({row["idx"] for row in r if certified_at(row, "grid_radius", radius)}
                        for r in (rows, baseline_rows))
        a, b = len(mine - theirs), len(theirs - mine)
        cells.append(f"{a} / {b} (p {binomtest(a, a + b).pvalue if a + b else 1.0:.2g})")
    return f"| {label} | " + " | ".join(cells) + " |"


def certified_accuracy(rows: list, column: str) -> list:
    """The fraction of ``rows`` correct and certified at each radius of :data:`TABLE_RADII`."""
    return [sum(certified_at(row, column, r) for row in rows) / len(rows) for r in TABLE_RADII]


def table_row(label: str, guarantee: str, rows: list, column: str, attack: str) -> str:
    cells = " | ".join(f"{100 * accuracy:.1f}" for accuracy in certified_accuracy(rows, column))
    mean_samples = sum(row.get("samples_used", 0) or 0 for row in rows) / len(rows)
    samples = f"{mean_samples:,.0f}" if column == "grid_radius" else "fixed"
    return f"| {label} | {guarantee} | {len(rows)} | {samples} | {cells} | {attack} |"


def main(argv=None) -> int:
    args = parse_args(argv)
    reproduction = Reproduction(args)
    out, ucan, seed, train = reproduction.out, reproduction.ucan, reproduction.seed, reproduction.train
    n = "2000" if args.quick else str(args.n)
    images, fixed_images = (4, 2) if args.quick else (args.images, args.fixed_images)
    epochs = "1" if args.quick else str(args.epochs)
    npg_epochs = "1" if args.quick else str(args.npg_epochs)
    skip = str(10_000 // args.images)
    checks = ["--no-contract-check"] if args.quick else []  # 2,000 images, one epoch: near chance

    def attack(path: Path) -> str:
        attacked = path.with_suffix(".attack.tsv")
        if not attacked.with_suffix(".tsv.summary.json").is_file():
            ucan("attack", str(path), "--out", str(attacked), "--n", "2000",
                 "--max", "2" if args.quick else str(args.attack_rows), *seed)
        return attack_counts(attacked.with_suffix(".tsv.summary.json"))

    report = ["# The paper's MNIST Table 2 protocol", "",
              f"Written by `scripts/reproduce_table2.py` (commands in `<out>/commands.txt`). Certified accuracy (%) at "
              f"l2 radii; alpha = 0.001, n0 = 100, at most n = {n} samples; grid mode for the fixed-noise methods "
              f"({images} images, every {skip}th), fixed n = {n} for the per-input modes, elastic_sigma and the "
              f"paper mode (the first {fixed_images} of them). With noise of level lambda no radius above "
              "lambda * PhiInv(alpha^(1/n)) (3.8 lambda at n = 100,000) can be certified at this n; anisotropic "
              "noise reaches less in l2 (its smallest sigma sets the l2 radius). "
              "`mean samples`: model calls per image of the grid mode, selection included. Attack: violations among "
              "the attacked rows.", ""]
    curves = {}
    for level in args.levels:
        where = out / f"g{level:g}"
        noise = ["--noise", "gaussian", "--scale", f"{level:g}"]
        isotropic = where / "isotropic"
        if not args.report_only:
            train(isotropic, "classifier", "--dataset", "mnist", *noise, "--epochs", epochs)
        base = ["--base", str(isotropic / "final.pt"), *noise, "--epochs", npg_epochs]
        results = where / "results"
        common = ["--n0", "100", "--n", n, "--alpha", "0.001", "--skip", skip, *seed, *checks]
        report += [f"## lambda = {level:g}", "",
                   "| method | guarantee | images | mean samples | " + " | ".join(f"{r:g}" for r in TABLE_RADII)
                   + " | attack |", "|---|---|---|---|" + "---|" * (len(TABLE_RADII) + 1)]
        grids = {}
        # each method is trained just before it is certified and its row written at once, so an
        # interrupted run leaves the rows it finished (and resumes from there)
        for method, folder, mode, kind in METHODS:
            if folder not in args.methods:
                continue
            run = where / folder
            if kind is not None and not args.report_only:
                train(run, "npg", *kind, *base)
            if mode == "grid":
                path, count, column, guarantee = results / f"{folder}.grid.tsv", images, "grid_radius", "proven"
                if not args.report_only:
                    options = ["--radii", *(f"{r:g}" for r in certifiable(run, TABLE_RADII)), "--norm", "l2"]
            else:
                path, count, column = results / f"{folder}.fixed.tsv", fixed_images, "radius_l2"
                paper = method == "paper mode"
                guarantee, options = ("**NOT a certificate**", ["--paper-mode"]) if paper else ("proven", [])
            done = path.is_file() and len(read_results(path)) == count
            if args.report_only and not (done and path.with_suffix(".attack.tsv.summary.json").is_file()):
                report.append(f"| {method} | not run (no finished file and attack) |" + " |" * (len(TABLE_RADII) + 3))
                continue
            if not done:
                ucan("certify", str(run), "--out", str(path), *options, "--max", str(count), *common)
            rows = read_results(path)
            report.append(table_row(method, guarantee, rows, column, attack(path)))
            curves.setdefault((f"MNIST, Gaussian lambda = {level:g}", "l2 radius"), {})[method] = (
                TABLE_RADII, certified_accuracy(rows, column))
            if mode == "grid":
                grids[method] = rows
            (out / "table2.md").write_text("\n".join(report) + "\n")
        if "isotropic" in grids and len(grids) > 1:
            report += ["", "Paired with isotropic noise on the same images (grid mode): images only the method "
                       "certifies / images only isotropic noise certifies (two-sided sign-test p), at l2 radius:", "",
                       "| method | " + " | ".join(f"{r:g}" for r in PAIRED_RADII) + " |",
                       "|---|" + "---|" * len(PAIRED_RADII)]
            report += [paired_row(method, rows, grids["isotropic"]) for method, rows in grids.items()
                       if method != "isotropic"]
        report.append("")
        (out / "table2.md").write_text("\n".join(report) + "\n")
    if curves:
        curve_panels(curves, out / "table2.png")
    print((out / "table2.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())

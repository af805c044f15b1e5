"""The paper's universality experiment (its section 5.2, Figure 5) at a protocol this machine finishes.

For each noise family at a per-pixel variance ``v`` (``--variances``; the paper's setting, after
Yang et al. 2020, is v = 1, the variance of Gaussian lambda = 1.0), on MNIST (``--datasets``):

* isotropic        the CNN trained under the family's isotropic noise
* pattern          pattern-fixed NPG, p = 2 (geometric mean 1: the same variance scale), joint
* universal        universal NPG from the isotropic classifier (classifier frozen)
* paper mode       the paper's input-dependent NPG, certified in its mode: NOT a certificate

certified in every norm the family certifies natively (Laplace l1; uniform l1 and l_inf;
exp-l_inf l1 and l_inf; power-law l1; Gaussian l2 as the reference), on the same ``--images``
test images, n0 = 100, ``--n`` samples, alpha = 0.001; every file attacked (``ucan attack``)
in each of its family's norms on its first ``--attack-rows`` rows.

Scales giving variance v per pixel (d = 784): Gaussian sqrt(v); Laplace sqrt(v / 2); uniform
sqrt(3 v); exp-l_inf sqrt(3 v / ((d + 1)(d + 2))); power-law with a = d + 50:
sqrt(3 v (a - d - 1)(a - d - 2) / ((d + 1)(d + 2))) (each checked by sampling).

Writes ``<out>/universality.md`` (tables per family and norm: certified accuracy, ACR, and ALM
labelled as a volume figure, attack findings) and ``<out>/universality.png`` (Figure 5's shape:
one panel per family and norm, a curve per method). Resumable; commands in ``<out>/commands.txt``.

    python scripts/reproduce_universality.py --out runs/universality
    python scripts/reproduce_universality.py --out /tmp/u --quick        # minutes: the pipeline
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reproduce_mnist import Reproduction, attack_counts, curve_panels  # noqa: E402

from ucan_smoothing.core.noises import FAMILIES as NOISE_CLASSES  # noqa: E402
from ucan_smoothing.core.norms import norm_name  # noqa: E402
from ucan_smoothing.results import read_results  # noqa: E402

DIM = 784
POWER_A = DIM + 50
#: family -> (its certified norms, the scale giving per-pixel variance v)
FAMILIES = {
    "gaussian": (("l2",), lambda v: math.sqrt(v)),
    "laplace": (("l1",), lambda v: math.sqrt(v / 2)),
    "uniform": (("l1", "linf"), lambda v: math.sqrt(3 * v)),
    "expinf": (("l1", "linf"), lambda v: math.sqrt(3 * v / ((DIM + 1) * (DIM + 2)))),
    "powerlaw": (("l1",), lambda v: math.sqrt(3 * v * (POWER_A - DIM - 1) * (POWER_A - DIM - 2)
                                               / ((DIM + 1) * (DIM + 2)))),
}
#: radii of the tables, per norm, at variance 1 (scaled by sqrt(v) for other variances)
RADII = {"l1": (0, 0.5, 1, 1.5, 2, 3, 4), "l2": (0, 0.25, 0.5, 1, 1.5, 2, 2.5), "linf": (0, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.015)}
METHODS = ("isotropic", "pattern", "universal", "paper mode")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/universality")
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--variances", type=float, nargs="+", default=[1.0])
    parser.add_argument("--datasets", nargs="+", default=["mnist"], choices=("mnist", "fashion_mnist"))
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--epochs", type=int, default=2, help="epochs of the isotropic classifiers")
    parser.add_argument("--npg-epochs", type=int, default=1)
    parser.add_argument("--attack-rows", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true")
    return parser.parse_args(argv)


def alm_norm(family: str) -> str:
    """The norm whose ball the ALM column's volume figure refers to: the noise's primary norm
    (l_inf for exp-l_inf, although its tables list l1 first)."""
    return norm_name(NOISE_CLASSES[family].native_norms[0])


def certified_accuracy(rows, norm, radius) -> float:
    return sum(row["correct"] and row[f"radius_{norm}"] >= radius for row in rows) / len(rows)


def attack_text(path: Path, norm: str) -> str:
    return attack_counts(Path(f"{path.with_suffix('')}.attack-{norm}.tsv.summary.json"))


def main(argv=None) -> int:
    args = parse_args(argv)
    reproduction = Reproduction(args)
    out, ucan, seed, train = reproduction.out, reproduction.ucan, reproduction.seed, reproduction.train
    n, images = ("200", 4) if args.quick else (str(args.n), args.images)
    epochs, npg_epochs = ("1", "1") if args.quick else (str(args.epochs), str(args.npg_epochs))

    report = ["# Universality: anisotropic noise for every family, in the norms each certifies", "",
              f"Written by `scripts/reproduce_universality.py` (commands in `<out>/commands.txt`). {images} test images, "
              f"n = {n}, alpha = 0.001. Certified accuracy (%) at each radius; ACR = mean certified radius of the "
              "correct rows. **ALM is a volume figure, NOT a certified radius** (the radius of the isotropic ball "
              "with the region's volume). The paper mode is NOT a certificate.", ""]
    body, summary, curves = [], [], {}
    for dataset in args.datasets:
        for variance in args.variances:
            for family in args.families:
                norms, scale_of = FAMILIES[family]
                scale = scale_of(variance)
                where = out / dataset / f"{family}-v{variance:g}"
                noise = ["--noise", family, "--scale", repr(scale)] + (["--power-a", str(POWER_A)]
                                                                      if family == "powerlaw" else [])
                runs = {"isotropic": where / "isotropic"}
                train(runs["isotropic"], "classifier", "--dataset", dataset, *noise, "--epochs", epochs)
                base = str(runs["isotropic"] / "final.pt")
                runs["pattern"] = where / "pattern_p2"
                train(runs["pattern"], "npg", "--kind", "pattern", "--p", "2", "--joint", "--base", base, *noise,
                      "--epochs", npg_epochs)
                runs["universal"] = where / "universal"
                train(runs["universal"], "npg", "--kind", "universal", "--base", base, *noise, "--epochs", npg_epochs)
                runs["paper mode"] = where / "input_dependent"
                train(runs["paper mode"], "npg", "--kind", "input_dependent", "--joint", "--base", base, *noise,
                      "--epochs", npg_epochs)
                files = {}
                for method, run in runs.items():
                    path = where / "results" / f"{run.name}.tsv"
                    extra = (["--paper-mode"] if method == "paper mode" else []) + (
                        ["--no-contract-check"] if args.quick else [])  # 2,000 images, one epoch: near chance
                    if not (path.is_file() and len(read_results(path)) == images):
                        ucan("certify", str(run), "--out", str(path), "--n0", "100", "--n", n, "--alpha", "0.001",
                             "--skip", str(10_000 // images), "--max", str(images), *seed, *extra)
                    for norm in norms:
                        attacked = Path(f"{path.with_suffix('')}.attack-{norm}.tsv")
                        if not Path(f"{attacked}.summary.json").is_file():
                            ucan("attack", str(path), "--out", str(attacked), "--norm", norm, "--n", "2000",
                                 "--max", "2" if args.quick else str(args.attack_rows), *seed)
                    files[method] = path
                for norm in norms:
                    radii = [r * math.sqrt(variance) for r in RADII[norm]]
                    acrs = {}
                    has_alm = alm_norm(family) == norm  # the ALM column only where its norm is
                    body += [f"## {dataset}, {family} (scale {scale:.4g}, variance {variance:g}), {norm}", "",
                               "| method | guarantee | " + " | ".join(f"{r:g}" for r in radii) + f" | ACR ({norm}) | "
                               + (f"ALM mean ({norm} volume, NOT certified) | " if has_alm else "")
                               + f"attack ({norm} ball) |",
                               "|---|---|" + "---|" * (len(radii) + 2 + has_alm)]
                    for method, path in files.items():
                        rows = read_results(path)
                        cells = " | ".join(f"{100 * certified_accuracy(rows, norm, r):.0f}" for r in radii)
                        acr = sum(row[f"radius_{norm}"] * row["correct"] for row in rows) / len(rows)
                        alm = (f"{sum(row['alm'] * row['correct'] for row in rows) / len(rows):.4g} | "
                               if has_alm else "")
                        guarantee = "NOT a certificate" if method == "paper mode" else "proven"
                        body.append(f"| {method} | {guarantee} | {cells} | {acr:.4g} | {alm}"
                                    f"{attack_text(path, norm)} |")
                        acrs[method] = acr
                        grid = [radii[-1] * 1.2 * k / 100 for k in range(101)]
                        panel = (f"{dataset} {family} v={variance:g}: {norm}", f"{norm} radius")
                        curves.setdefault(panel, {})[method] = (
                            grid, [certified_accuracy(rows, norm, r) for r in grid])
                    body.append("")
                    best = max(("isotropic", "pattern", "universal"), key=acrs.get)
                    summary.append(f"| {dataset} | {family} | {variance:g} | {norm} | "
                                   + " | ".join(f"{acrs[m]:.4g}" for m in METHODS)
                                   + f" | {best} | {attack_text(files['paper mode'], norm)} |")
                (out / "universality.md").write_text("\n".join(report + summary_table(summary) + body) + "\n")
    curve_panels(curves, out / "universality.png")
    print((out / "universality.md").read_text())
    return 0


def summary_table(lines: list) -> list:
    """ACR of every method in every family's norm, the proven method with the largest ACR, and the
    attack on the paper mode: the whole experiment in one table."""
    return ["## Summary: ACR in each family's norms", "",
            "| data set | family | variance | norm | ACR isotropic | ACR pattern | ACR universal "
            "| ACR paper mode (NOT a certificate) | largest proven ACR | attack on the paper mode |",
            "|---|---|---|---|---|---|---|---|---|---|", *lines, ""]


if __name__ == "__main__":
    sys.exit(main())

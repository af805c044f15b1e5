"""Tables and plots from result files of ``ucan certify`` (and Cohen et al.'s).

``ucan analyze A.tsv B.tsv --label iso --label ucan --out report/`` prints
Markdown tables and writes ``summary.md``, ``summary.csv`` and
``certified_accuracy.png`` into ``--out``; ``--sigma RUN ...`` adds
``sigma_maps.png``, the sigma maps of NPG training runs side by side.
``analysis.json`` records what was used (command line, each input's SHA-256
and sidecar, labels, radii, versions). What every figure means:
:mod:`ucan_smoothing.analysis`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..analysis import (
    DEFAULT_RADII,
    DISPLAY,
    NORMS,
    analysis_record,
    load_methods,
    markdown_table,
    plot_certified_accuracy,
    plot_sigma_maps,
    sigma_file,
    summarize,
    write_csv,
)
from ..fileio import atomic_write_text


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("files", nargs="+", metavar="FILE.tsv", help="result files of `ucan certify` or Cohen et al.")
    parser.add_argument("--label", action="append", default=None,
                        help="name of a method, once per file in order (default: the file names)")
    parser.add_argument("--radii", type=float, nargs="+", default=None,
                        help="radii of the tables for every norm and ALM (overrides the defaults)")
    for norm in (*NORMS, "alm"):
        shown = ", ".join(f"{r:g}" for r in DEFAULT_RADII[norm])
        what = "ALM thresholds (not certified radii)" if norm == "alm" else f"{DISPLAY[norm]} radii"
        parser.add_argument(f"--radii-{norm}", type=float, nargs="+", default=None,
                            help=f"{what} (default {shown})")
    parser.add_argument("--cohen-norm", choices=NORMS, default="l2",
                        help="norm of the radius in Cohen-format files (default l2, Gaussian noise)")
    parser.add_argument("--sigma", nargs="+", default=None, metavar="RUN_DIR",
                        help="training run folders (or sigma .pt files) whose sigma maps go into sigma_maps.png")
    parser.add_argument("--no-image-band", action="store_true",
                        help="leave out the shaded 95%% band over the choice of test images")
    parser.add_argument("--out", default="analysis", help="folder for summary.md, summary.csv, the plots and "
                                                          "analysis.json (default ./analysis)")


def run(args) -> int:
    radii = {norm: getattr(args, f"radii_{norm}") or args.radii for norm in (*NORMS, "alm")}
    methods = load_methods(args.files, args.label, args.cohen_norm)
    summary = summarize(methods, radii=radii)
    table = markdown_table(summary)
    for source in args.sigma or ():
        sigma_file(source)  # a missing sigma map is refused before anything is written
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "summary.md", table)
    band_alpha = None if args.no_image_band else 0.05
    written = [out / "summary.md", write_csv(summary, out / "summary.csv"),
               plot_certified_accuracy(methods, out / "certified_accuracy.png", radii, band_alpha=band_alpha)]
    if args.sigma:
        written.append(plot_sigma_maps(args.sigma, out / "sigma_maps.png"))
    record = analysis_record(methods, radii, args.sigma, written)
    written.append(out / "analysis.json")
    atomic_write_text(out / "analysis.json", json.dumps(record, indent=2, sort_keys=True) + "\n")
    print(table)
    print("wrote " + ", ".join(str(p) for p in written), file=sys.stderr)
    return 0

"""Tables and plots from result files of ``ucan certify`` (and Cohen et al.'s).

The command is ``ucan analyze`` (:mod:`ucan_smoothing.commands.analyze`).

Per method (one result file):

* certified accuracy at radius ``r`` in l1, l2 and l_inf: the fraction of ALL
  images whose prediction is correct and whose certified radius is ``>= r``
  (Cohen et al.'s definition; abstentions count as failures);
* ACR, the average certified radius per norm: the mean over all images of the
  radius, counting 0 for wrong or abstained predictions;
* the same two figures for ALM, the paper's volume-equivalent radius. ALM is
  NOT a certified radius (DESIGN.md section 3): its columns, CSV headers and
  plot panel say so, and no ALM number is ever labelled "certified";
* abstention rate, mean time per image, mean samples per image (``n0 + n``,
  or ``samples_used`` for sequential files).

Files whose rows say ``is_certificate = false`` (the paper's input-dependent
mode) are marked "NOT a certificate" in every table and drawn dashed; a file
that mixes both kinds is refused. Cohen's six-column files carry only the
native ``radius``: it is read as a radius in ``cohen_norm`` (default l2, what
Cohen et al.'s Gaussian code certifies) and the other norms and ALM are n/a.

The plot has one panel per norm some file reports (and the ALM panel only
when some file has ALM). Each method's legend entry gives ``n``, ``alpha``
and the number of images; a dotted vertical line marks its Clopper-Pearson
cap (:func:`clopper_pearson_cap`: the radius at which its curve must drop to
0 whatever the model, because ``n`` samples cannot give a larger
``p_lower``), and a shaded band the uncertainty over the choice of test
images (:func:`image_band`; not a certificate).

Python API: :func:`load_methods`, :func:`summarize`, :func:`markdown_table`,
:func:`write_csv`, :func:`plot_certified_accuracy` (or
:func:`certified_accuracy_figure` for the figure itself),
:func:`plot_sigma_maps`, :func:`analysis_record` (what ``ucan analyze``
records in ``analysis.json``).
"""

from __future__ import annotations

import csv
import io
import math
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np

from .core.statistics import clopper_pearson_lower, clopper_pearson_upper
from .fileio import atomic_open, atomic_write_text, file_sha256
from .results import ResultFileError, read_results, read_sidecar, run_environment, sidecar_path

NORMS = ("l1", "l2", "linf")
#: what each norm is called in tables and plots
DISPLAY = {"l1": "l1", "l2": "l2", "linf": "l_inf"}
#: default radii: MNIST / CIFAR-10 scale (Cohen et al.'s l2 grid; l_inf about l2 / sqrt(d))
DEFAULT_RADII = {
    "l1": (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5),
    "l2": (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5),
    "linf": (0.0, 0.005, 0.01, 0.02, 0.03, 0.04),
    "alm": (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5),
}
ALM_NAME = "ALM (volume figure, not a certified radius)"
PROVEN = "proven"
NOT_CERTIFICATE = "NOT a certificate (paper mode)"
NOT_RECORDED = "not recorded (Cohen format)"


def accuracy_key(norm: str, radius: float) -> str:
    """The summary key (and CSV header) of the certified accuracy in ``norm`` (or ``"alm"``) at ``radius``."""
    if norm == "alm":
        return f"{ALM_NAME} >= {radius:g}"
    return f"certified accuracy {DISPLAY[norm]} >= {radius:g}"


def acr_key(norm: str) -> str:
    """The summary key of the average certified radius in ``norm`` (or the mean ALM for ``"alm"``)."""
    return f"mean {ALM_NAME}" if norm == "alm" else f"ACR {DISPLAY[norm]}"


# -- loading --------------------------------------------------------------------

@dataclass
class Method:
    """The rows of one result file and what they are."""

    label: str
    rows: list
    source: str  # the file, or "<rows>"
    kind: str  # "ucan", "sequential", "grid" or "cohen"
    is_certificate: bool | None  # None: the file does not say (Cohen format)
    cohen_norm: str = "l2"
    sha256: str | None = None  # of the file as it was read (None for rows)
    grid_norm: str | None = None  # grid files: the norm of their grid (from the sidecar)

    @property
    def guarantee(self) -> str:
        if self.is_certificate is None:
            return NOT_RECORDED
        return PROVEN if self.is_certificate else NOT_CERTIFICATE

    def radii(self, norm: str):
        """Per-row radii in ``norm`` (or ALM), 0 where the prediction is wrong; None if the file lacks them."""
        column = self._column(norm)
        if column is None:
            return None
        # A certified radius around a wrong prediction certifies nothing useful: count 0.
        return np.array([row[column] if row["correct"] == 1 else 0.0 for row in self.rows], dtype=float)

    def _column(self, norm: str) -> str | None:
        if self.kind == "cohen":
            return "radius" if norm == self.cohen_norm else None
        if self.kind == "grid" and norm == self.grid_norm:
            # the grid's own answer: certified at r exactly when some grid radius >= r is, so the
            # curve is a step function, exact at every grid radius
            return "grid_radius"
        return "alm" if norm == "alm" else f"radius_{norm}"

    def sampling(self) -> tuple | None:
        """``(n, alpha)`` when every row of a ``ucan certify`` file used the same; None otherwise
        (Cohen format: not recorded; sequential: ``n`` is a budget, each image stops on its own)."""
        if self.kind != "ucan" or not {"n", "alpha"} <= set(self.rows[0]):
            return None
        pairs = {(row["n"], row["alpha"]) for row in self.rows}
        return pairs.pop() if len(pairs) == 1 else None


def _check_rows(rows, where: str) -> None:
    if not rows:
        raise ResultFileError(f"{where} has no result rows")
    required = ("predict", "radius", "correct", "time")
    missing = [name for name in required if name not in rows[0]]
    if missing:
        raise ResultFileError(f"{where}: rows lack the columns {', '.join(missing)}")


def load_method(source, label: str | None = None, cohen_norm: str = "l2") -> Method:
    """A :class:`Method` from a result file path or a list of row dicts (as :func:`read_results` gives)."""
    if cohen_norm not in NORMS:
        raise ValueError(f"cohen_norm must be one of {', '.join(NORMS)}, got {cohen_norm!r}")
    if isinstance(source, (str, os.PathLike)):
        where = str(source)
        digest = file_sha256(source)  # just before reading: the record names what was analysed
        rows = read_results(source)
        label = label or Path(source).stem
    else:
        where, digest = "<rows>", None
        rows = list(source)
        label = label or "method"
    _check_rows(rows, where)
    if "radius_l2" not in rows[0]:
        return Method(label, rows, where, "cohen", None, cohen_norm, digest)
    flags = {row["is_certificate"] for row in rows}
    if len(flags) > 1:
        count = sum(1 for row in rows if not row["is_certificate"])
        raise ResultFileError(
            f"{where} mixes proven certificates with {count} rows that are NOT certificates "
            "(is_certificate false); analyse them as separate files so no figure blends the two"
        )
    if "grid_radius" in rows[0]:
        return Method(label, rows, where, "grid", flags.pop(), cohen_norm, digest, _grid_norm(source))
    kind = "sequential" if "samples_used" in rows[0] else "ucan"
    return Method(label, rows, where, kind, flags.pop(), cohen_norm, digest)


def _grid_norm(source) -> str | None:
    """The grid norm a grid file's sidecar records (None for rows given directly)."""
    if not isinstance(source, (str, os.PathLike)):
        return None
    try:
        return read_sidecar(source)["config"].get("norm")
    except ResultFileError:
        return None


def load_methods(sources, labels=None, cohen_norm: str = "l2") -> list:
    """Methods from paths or row lists; ``sources`` may also be a mapping label -> path or rows.

    Methods pass through unchanged. Default labels are the file names without
    extension (the paths as given where two names collide).
    """
    if isinstance(sources, Mapping):
        labels, sources = list(sources), list(sources.values())
    sources = list(sources)
    if labels is not None and len(labels) != len(sources):
        raise ValueError(f"{len(labels)} labels for {len(sources)} result files: give one label per file")
    if labels is None:
        stems = [Path(s).stem if isinstance(s, (str, os.PathLike)) else None for s in sources]
        labels = [
            (str(s) if stems.count(stem) > 1 else stem) if stem else
            (s.label if isinstance(s, Method) else f"method {i + 1}")
            for i, (s, stem) in enumerate(zip(sources, stems))
        ]
    return [s if isinstance(s, Method) else load_method(s, label, cohen_norm) for s, label in zip(sources, labels)]


def resolve_radii(radii=None) -> dict:
    """``{norm: sorted radii}`` for l1, l2, linf and alm: defaults, one list for all, or a partial dict."""
    if radii is None:
        chosen = dict(DEFAULT_RADII)
    elif isinstance(radii, Mapping):
        unknown = set(radii) - set(DEFAULT_RADII)
        if unknown:
            raise ValueError(f"unknown norms {sorted(unknown)} in radii; use {', '.join(DEFAULT_RADII)}")
        chosen = {**DEFAULT_RADII, **{k: v for k, v in radii.items() if v is not None}}
    else:
        chosen = {norm: radii for norm in DEFAULT_RADII}
    result = {}
    for norm, values in chosen.items():
        values = sorted({float(v) for v in values})
        if not values or any(not math.isfinite(v) or v < 0 for v in values):
            raise ValueError(f"radii for {norm} must be finite, >= 0 and at least one, got {values}")
        result[norm] = values
    return result


# -- summary ----------------------------------------------------------------------

def _unique(rows, column) -> str | None:
    if column not in rows[0]:
        return None
    return ",".join(sorted({str(row[column]) for row in rows}))


def _kind_text(method: Method) -> str:
    if method.kind == "cohen":
        return f"Cohen format (radius read as {DISPLAY[method.cohen_norm]})"
    if method.kind == "sequential":
        decided = _unique(method.rows, "decided_radius")
        return f"sequential ({_unique(method.rows, 'mode')}, decided at r = {decided})"
    if method.kind == "grid":
        return f"grid ({_unique(method.rows, 'mode')}, {method.grid_norm or 'norm not recorded'}: steps at the grid)"
    return "certify"


def summarize_method(method: Method, radii: dict) -> dict:
    """The summary row of one method (see :func:`summarize`)."""
    rows = method.rows
    count = len(rows)
    if method.kind in ("sequential", "grid"):
        samples = float(np.mean([row["samples_used"] for row in rows]))
    elif method.kind == "ucan":
        samples = float(np.mean([row["n0"] + row["n"] for row in rows]))
    else:
        samples = None
    summary = {
        "method": method.label,
        "guarantee": method.guarantee,
        "format": _kind_text(method),
        "file": method.source,
        "noise": _unique(rows, "noise"),
        "npg": _unique(rows, "npg"),
        "images": count,
        "abstention rate": sum(row["predict"] == -1 for row in rows) / count,
        "time per image (s)": float(np.mean([row["time"] for row in rows])),
        "samples per image": samples,
    }
    for norm in (*NORMS, "alm"):
        values = method.radii(norm)
        summary[acr_key(norm)] = None if values is None else float(values.mean())
    for norm in (*NORMS, "alm"):
        curve = certified_accuracy_curve(method, norm, radii[norm])
        for i, r in enumerate(radii[norm]):
            summary[accuracy_key(norm, r)] = None if curve is None else float(curve[i])
    return summary


def summarize(paths_or_rows, labels=None, radii=None, cohen_norm: str = "l2") -> list:
    """One dict per method: certified accuracies, ACRs, ALM figures, abstention, time, samples.

    ``paths_or_rows``: result file paths, row lists, :class:`Method` objects or
    a mapping label -> path/rows. ``radii``: None (defaults), one list for
    every norm, or a dict with keys among ``l1 l2 linf alm``. Keys of the
    result are the table headers: see :func:`accuracy_key` and :func:`acr_key`;
    fractions are in [0, 1]; a figure a file cannot give is None.
    """
    radii = resolve_radii(radii)
    return [summarize_method(m, radii) for m in load_methods(paths_or_rows, labels, cohen_norm)]


# -- tables -----------------------------------------------------------------------

def _cell(value, kind: str) -> str:
    if value is None:
        return "n/a"
    if kind == "percent":
        return f"{100 * value:.1f}%"
    if kind == "radius":
        return f"{value:.3f}"
    if kind == "seconds":
        return f"{value:.3g}"
    if kind == "count":
        return f"{value:,.0f}"
    return str(value)


def _markdown(headers, rows) -> str:
    escape = lambda text: str(text).replace("|", "\\|")  # noqa: E731 - a pipe would split a cell
    lines = ["| " + " | ".join(map(escape, headers)) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(map(escape, row)) + " |" for row in rows]
    return "\n".join(lines)


def _method_cell(row: dict) -> str:
    return row["method"] if row["guarantee"] != NOT_CERTIFICATE else f"{row['method']}: {NOT_CERTIFICATE}"


def _radii_in(summary, norm) -> list:
    prefix = accuracy_key(norm, 0.0).rsplit(">=", 1)[0]
    return sorted({float(key.rsplit(">= ", 1)[1]) for row in summary for key in row if key.startswith(prefix)})


def markdown_table(summary: list) -> str:
    """Markdown: an overview table, then certified accuracy (%) per norm and the ALM table."""
    overview = ["method", "guarantee", "format", "noise", "npg", "images", "abstention rate",
                "time per image (s)", "samples per image", *(acr_key(n) for n in NORMS), acr_key("alm")]
    kinds = {"abstention rate": "percent", "time per image (s)": "seconds", "samples per image": "count",
             **{acr_key(n): "radius" for n in (*NORMS, "alm")}}
    parts = ["## Overview", "",
             _markdown(overview, [[_cell(row[h], kinds.get(h, "text")) for h in overview] for row in summary])]
    for norm in (*NORMS, "alm"):
        radii = _radii_in(summary, norm)
        if norm == "alm":
            title = f"## {ALM_NAME}: % of images with a correct prediction and ALM >= r"
        else:
            title = f"## Certified accuracy, {DISPLAY[norm]} (% of all images certified correct at radius >= r)"
        keys = [accuracy_key(norm, r) for r in radii]
        # The title says "certified accuracy"; ALM headers keep their full warning.
        headers = ["method", *(k if norm == "alm" else k.removeprefix("certified accuracy ") for k in keys)]
        body = [[_method_cell(row), *(_cell(row.get(k), "percent") for k in keys)] for row in summary]
        parts += ["", title, "", _markdown(headers, body)]
    parts += ["", _NOTES]
    if any(row["format"].startswith("sequential") for row in summary):
        parts.append(_SEQUENTIAL_NOTE)
    return "\n".join(parts) + "\n"


_NOTES = """Notes.
- Certified accuracy at r: fraction of ALL images whose prediction is correct and whose certified radius is >= r
  (Cohen et al.'s definition; abstentions and wrong predictions count as failures). ACR: mean certified radius
  over all images, 0 for wrong or abstained ones.
- ALM is the radius of the isotropic ball with the same VOLUME as the certified region. It is NOT a certified
  radius: a perturbation of norm below ALM can change the prediction. Never read an ALM column as robustness.
- "NOT a certificate (paper mode)": the paper's input-dependent noise, whose radii are not proven
  (DESIGN.md section 4). Their numbers reproduce the paper; they guarantee nothing.
- n/a: the file does not hold this figure (Cohen-format files have only their native radius)."""
_SEQUENTIAL_NOTE = """- Sequential files stop sampling once the decided radius is shown, so their certified
  accuracy above that radius understates what a full certification would give; it is still sound."""


def write_csv(summary: list, path) -> Path:
    """``summary`` as CSV, one row per method, the keys as headers (empty cell: n/a)."""
    headers = list(dict.fromkeys(key for row in summary for key in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=headers, lineterminator="\n")
    writer.writeheader()
    for row in summary:
        writer.writerow({key: "" if row.get(key) is None else row[key] for key in headers})
    path = Path(path)
    atomic_write_text(path, buffer.getvalue())
    return path


# -- plots --------------------------------------------------------------------------

def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)  # files only: no display needed
    import matplotlib.pyplot as plt

    return plt


def certified_accuracy_curve(method: Method, norm: str, grid) -> np.ndarray | None:
    """Certified accuracy of ``method`` at every radius of ``grid`` (None if the file lacks ``norm``)."""
    values = method.radii(norm)
    if values is None:
        return None
    # Only correct rows count, also at r = 0 (where a wrong row's radius 0 would pass ">= r").
    correct = np.array([row["correct"] == 1 for row in method.rows])
    certified = values[correct]
    return np.array([(certified >= r).sum() for r in grid], dtype=float) / len(method.rows)


#: legend entry of the images band (:func:`image_band`); ``{level}`` is its confidence in percent
BAND_LABEL = "shaded: {level:g}% band over the choice of test images (pointwise Clopper-Pearson; not a certificate)"


def clopper_pearson_cap(method: Method, norm: str) -> float | None:
    """The largest radius in ``norm`` (or ALM) that ``method``'s ``n`` samples can certify.

    Even when all ``n`` noisy samples vote for one class, ``p_lower`` is only
    ``clopper_pearson_lower(n, n, alpha)`` (``= alpha^(1/n)``), so no image
    certifies beyond the radius at that ``p_lower`` and the certified accuracy
    falls to 0 there, however robust the model (1.23 in l2 for Gaussian noise
    of scale 0.5 at n = 1,000, alpha = 0.001). Read from the data: the largest
    radius among the rows that reached that ``p_lower``. For a fixed noise (an
    isotropic family, a universal or pattern NPG) they all share one radius, the
    exact cap; for input-dependent noise each image has its own cap and this is
    the largest one reached. None when the file has no single ``n`` and
    ``alpha`` (Cohen format, sequential files), no ``norm`` column, or no image
    reached the cap (then its curve shows no cliff there either).
    """
    sampling = method.sampling()
    column = method._column(norm)
    if sampling is None or column is None:
        return None
    p_cap = clopper_pearson_lower(sampling[0], sampling[0], sampling[1])
    at_cap = [row[column] for row in method.rows if math.isclose(row["p_lower"], p_cap, rel_tol=1e-10)]
    return max(at_cap) if at_cap else None


def image_band(curve, images: int, alpha: float = 0.05) -> tuple:
    """Pointwise two-sided ``1 - alpha`` Clopper-Pearson bounds on each certified accuracy of ``curve``.

    A certified accuracy is the fraction of ``images`` test images certified
    correct: a binomial proportion if the images are a random sample, so this
    band is the uncertainty from the choice of images about the accuracy on
    the whole distribution. It is not a certificate, and it ignores the
    (alpha-level) chance that a certification is wrong.
    """
    counts = np.rint(np.asarray(curve) * images).astype(int)
    bounds = {k: (clopper_pearson_lower(k, images, alpha / 2), clopper_pearson_upper(k, images, alpha / 2))
              for k in np.unique(counts).tolist()}  # a curve takes few distinct values
    lower = np.array([bounds[k][0] for k in counts.tolist()])
    upper = np.array([bounds[k][1] for k in counts.tolist()])
    return lower, upper


def _legend_label(method: Method, cap_drawn: bool) -> str:
    """The method's name, what it sampled and on how many images (and whether it is a certificate)."""
    images = f"{len(method.rows):,} images"
    sampling = method.sampling()
    if method.kind == "cohen":
        text = f"{method.label}: {images} (Cohen format: n, alpha not recorded; no CP cap)"
    elif method.kind in ("sequential", "grid"):
        alphas = _unique(method.rows, "alpha")
        most = max(row["samples_used"] for row in method.rows)
        what = "grid mode (steps at the grid radii)" if method.kind == "grid" else "sequential"
        text = (f"{method.label}: {what}, up to {most:,} samples, alpha = {alphas}, {images} "
                "(no single n: no CP cap drawn)")
    elif sampling is None:
        text = f"{method.label}: no single n and alpha in the rows, {images} (no CP cap drawn)"
    else:
        n, alpha = sampling
        text = f"{method.label}: n = {n:,}, alpha = {alpha:g}, {images}"
        if not cap_drawn:
            text += " (no image reached the CP cap)"
    if method.is_certificate is False:
        text += f": {NOT_CERTIFICATE}"
    return text


def plotted_panels(methods) -> list:
    """The panels of the plot: the norms some method reports, then ``"alm"`` if some method has ALM."""
    return [norm for norm in (*NORMS, "alm") if any(m.radii(norm) is not None for m in methods)]


def _label_axes(ax, norm: str) -> None:
    if norm == "alm":
        ax.set_title("ALM: volume-equivalent radius, NOT a certified radius\n"
                     "(a perturbation smaller than ALM may change the prediction)", color="darkred", fontsize=11)
        ax.set_xlabel("ALM threshold r (not a certified radius)")
        ax.set_ylabel("fraction correct with ALM >= r")
    else:
        ax.set_title(f"certified accuracy, {DISPLAY[norm]} norm", fontsize=11)
        ax.set_xlabel(f"{DISPLAY[norm]} radius r")
        ax.set_ylabel("certified accuracy (correct, radius >= r)")
    ax.set_ylim(0, 1.02)
    ax.set_xlim(left=0)
    ax.grid(alpha=0.3)


def _draw_method(ax, method: Method, norm: str, grid, label: str, colour, band_alpha, legend: dict) -> None:
    """One method's curve in one panel, its image band and its Clopper-Pearson cap line."""
    curve = certified_accuracy_curve(method, norm, grid)
    if curve is None:
        return
    dashed = method.is_certificate is False
    (line,) = ax.plot(grid, curve, linestyle="--" if dashed else "-", color=colour, label=label, linewidth=1.8)
    legend.setdefault(label, line)
    if band_alpha is not None:
        lower, upper = image_band(curve, len(method.rows), band_alpha)
        ax.fill_between(grid, lower, upper, color=colour, alpha=0.12, linewidth=0)
    cap = clopper_pearson_cap(method, norm)
    if cap is not None:
        cap_label = f"{method.label}: CP cap at n={method.sampling()[0]:,} (the most n samples can certify)"
        legend.setdefault(cap_label, ax.axvline(cap, linestyle=":", color=colour, linewidth=1.5, label=cap_label))


def certified_accuracy_figure(results_by_label, radii=None, cohen_norm: str = "l2", band_alpha: float | None = 0.05):
    """The matplotlib figure of :func:`plot_certified_accuracy` (close it with ``plt.close``)."""
    plt = _pyplot()
    from matplotlib.patches import Patch

    methods = load_methods(results_by_label, cohen_norm=cohen_norm)
    radii = resolve_radii(radii)
    panels = plotted_panels(methods)
    has_cap = [any(clopper_pearson_cap(m, norm) is not None for norm in panels) for m in methods]
    labels = [_legend_label(m, capped) for m, capped in zip(methods, has_cap)]
    columns = 1 if len(panels) == 1 else 2
    entries = len(methods) + sum(has_cap) + (band_alpha is not None)
    legend_columns = 1 if entries <= 6 else columns  # long labels: one column while it fits
    legend_inches = 0.2 * -(-entries // legend_columns) + 0.3
    rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(rows, columns, squeeze=False,
                             figsize=(12 if columns == 2 else 9, 4.5 * rows + legend_inches))
    for ax in axes.flat[len(panels):]:
        fig.delaxes(ax)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    legend = {}  # label -> handle: one legend for all panels, below them, so it hides no curve
    for ax, norm in zip(axes.flat, panels):
        largest = max([radii[norm][-1]] + [float(v.max()) for m in methods if (v := m.radii(norm)) is not None])
        grid = np.unique(np.concatenate([np.linspace(0, largest * 1.05 or 1.0, 600), radii[norm]]))
        for i, (method, label) in enumerate(zip(methods, labels)):
            _draw_method(ax, method, norm, grid, label, colours[i % len(colours)], band_alpha, legend)
        _label_axes(ax, norm)
    if band_alpha is not None:
        legend[BAND_LABEL.format(level=100 * (1 - band_alpha))] = Patch(color="grey", alpha=0.3)
    fig.legend(list(legend.values()), list(legend), loc="lower center", ncol=legend_columns, fontsize=9,
               frameon=False)
    dashed = any(m.is_certificate is False for m in methods)
    fig.suptitle("Certified accuracy against radius" + (" (dashed: not a certificate)" if dashed else ""), fontsize=13)
    fig.tight_layout(rect=(0, legend_inches / fig.get_figheight(), 1, 1))
    return fig


def plot_certified_accuracy(results_by_label, path, radii=None, cohen_norm: str = "l2",
                            band_alpha: float | None = 0.05) -> Path:
    """Certified accuracy against radius: one panel per norm (and ALM) some method reports, one curve per method.

    ``results_by_label``: a mapping label -> path or rows, or a list of paths,
    rows or :class:`Method` objects. Non-certificate methods are dashed and
    labelled. Each panel's x axis reaches the largest of its table radii and
    of the methods' radii, so no curve is cut off. A dotted line marks each
    method's Clopper-Pearson cap (:func:`clopper_pearson_cap`); the shaded
    band is :func:`image_band` at ``band_alpha`` (None: no band).
    """
    plt = _pyplot()
    fig = certified_accuracy_figure(results_by_label, radii, cohen_norm, band_alpha)
    path = Path(path)
    try:
        with atomic_open(path, "wb") as handle:
            fig.savefig(handle, format="png", dpi=100)
    finally:
        plt.close(fig)
    return path


def sigma_file(source: str | os.PathLike) -> Path:
    """The file a sigma map is drawn from: ``source`` itself, or in a run folder its
    ``sigma.png`` (already rendered by training), else ``sigma.pt``, else ``sigma_examples.pt``."""
    source = Path(source)
    if source.is_dir():
        for name in ("sigma.png", "sigma.pt", "sigma_examples.pt"):
            if (source / name).is_file():
                return source / name
        raise FileNotFoundError(
            f"{source} has no sigma.png, sigma.pt or sigma_examples.pt (an isotropic run has no sigma map)")
    if not source.is_file():
        raise FileNotFoundError(f"no sigma map at {source}")
    return source


def _sigma_png(source, workdir: Path, title: str) -> Path:
    """A sigma-map PNG for a run folder, a .pt file or a tensor (rendered by figures.save_sigma_png)."""
    if isinstance(source, (str, os.PathLike)):
        source = sigma_file(source)
        if source.suffix == ".png":
            return source
    import torch

    from .figures import save_sigma_png
    from .models import load_torch_file

    mu = images = None
    tensor = load_torch_file(source) if isinstance(source, Path) else source
    if isinstance(tensor, dict):  # sigma_examples.pt of an input-dependent NPG
        tensor, mu, images = tensor["sigma"], tensor.get("mu"), tensor.get("x")
    if isinstance(source, Path) and source.name == "sigma.pt" and (source.parent / "mu.pt").is_file():
        mu = load_torch_file(source.parent / "mu.pt")
    if not isinstance(tensor, torch.Tensor) or tensor.dim() not in (3, 4):
        raise ValueError(f"{title}: expected a sigma tensor of shape (C, H, W) or (B, C, H, W)")
    out = workdir / f"sigma_{len(list(workdir.iterdir()))}.png"
    save_sigma_png(out, tensor, mu, title, images=images if tensor.dim() == 4 else None)
    return out


def plot_sigma_maps(sources, path, labels=None) -> Path:
    """One figure with the sigma maps of several NPGs, one row each.

    ``sources``: run folders of ``ucan train`` (their ``sigma.png`` is reused),
    ``sigma.pt`` / ``sigma_examples.pt`` files, or sigma tensors (C, H, W);
    a mapping label -> source also works. Labels default to the folder or
    file names.
    """
    plt = _pyplot()
    if isinstance(sources, Mapping):
        labels, sources = list(sources), list(sources.values())
    sources = list(sources)
    if not sources:
        raise ValueError("no sigma maps to plot")
    if labels is None:
        labels = [Path(s).name if isinstance(s, (str, os.PathLike)) else f"sigma {i + 1}"
                  for i, s in enumerate(sources)]
    if len(labels) != len(sources):
        raise ValueError(f"{len(labels)} labels for {len(sources)} sigma maps")
    with tempfile.TemporaryDirectory() as workdir:
        pictures = [plt.imread(_sigma_png(s, Path(workdir), label)) for s, label in zip(sources, labels)]
    # Size the figure so each picture keeps its pixels at 100 dpi.
    width = max(p.shape[1] for p in pictures) / 100
    heights = [p.shape[0] / 100 + 0.4 for p in pictures]
    fig, axes = plt.subplots(len(pictures), 1, squeeze=False, figsize=(width, sum(heights)),
                             gridspec_kw={"height_ratios": heights})
    for ax, picture, label in zip(axes[:, 0], pictures, labels):
        ax.imshow(picture)
        ax.set_title(label, fontsize=12, fontweight="bold")
        ax.axis("off")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# -- record -------------------------------------------------------------------------

RECORD_FORMAT = "ucan-analysis-v1"


def _input_record(method: Method) -> dict:
    sidecar = None
    if method.source != "<rows>" and sidecar_path(method.source).is_file():
        try:
            sidecar = read_sidecar(method.source)
        except ResultFileError as error:  # the tables do not need it: say so rather than stop
            sidecar = {"unreadable": str(error)}
    return {"label": method.label, "path": method.source, "sha256": method.sha256, "format": _kind_text(method),
            "images": len(method.rows), "sidecar": sidecar}


def _sigma_record(source) -> dict:
    if not isinstance(source, (str, os.PathLike)):
        return {"path": "<tensor>", "sha256": None}
    used = sigma_file(source)
    record = {"path": str(source), "file": str(used), "sha256": file_sha256(used)}
    if used.name == "sigma.pt" and (used.parent / "mu.pt").is_file():
        record["mu_sha256"] = file_sha256(used.parent / "mu.pt")
    return record


def analysis_record(methods, radii=None, sigma=None, outputs=()) -> dict:
    """What an analysis used, for ``analysis.json``: the command line, each input file's
    path, SHA-256 and sidecar (config and the runs that wrote it), the labels and radii,
    the sigma maps and the library versions.

    ``methods``: :class:`Method` objects (their hashes were taken when they were read).
    """
    environment = run_environment()
    try:
        environment["matplotlib"] = metadata.version("matplotlib")
    except metadata.PackageNotFoundError:  # pragma: no cover - a dependency
        environment["matplotlib"] = None
    return {
        "format": RECORD_FORMAT,
        "command": environment.pop("command"),
        "environment": environment,
        "inputs": [_input_record(m) for m in methods],
        "labels": [m.label for m in methods],
        "radii": resolve_radii(radii),
        "sigma": [_sigma_record(s) for s in sigma or ()],
        "outputs": [str(p) for p in outputs],
    }

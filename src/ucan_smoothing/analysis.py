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

Python API: :func:`load_methods`, :func:`summarize`, :func:`markdown_table`,
:func:`write_csv`, :func:`plot_certified_accuracy`, :func:`plot_sigma_maps`.
"""

from __future__ import annotations

import csv
import io
import math
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .results import ResultFileError, read_results

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
    kind: str  # "ucan", "sequential" or "cohen"
    is_certificate: bool | None  # None: the file does not say (Cohen format)
    cohen_norm: str = "l2"

    @property
    def guarantee(self) -> str:
        if self.is_certificate is None:
            return NOT_RECORDED
        return PROVEN if self.is_certificate else NOT_CERTIFICATE

    def radii(self, norm: str):
        """Per-row radii in ``norm`` (or ALM), 0 where the prediction is wrong; None if the file lacks them."""
        if self.kind == "cohen":
            column = "radius" if norm == self.cohen_norm else None
        else:
            column = "alm" if norm == "alm" else f"radius_{norm}"
        if column is None:
            return None
        # A certified radius around a wrong prediction certifies nothing useful: count 0.
        return np.array([row[column] if row["correct"] == 1 else 0.0 for row in self.rows], dtype=float)


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
        rows = read_results(source)
        label = label or Path(source).stem
    else:
        where = "<rows>"
        rows = list(source)
        label = label or "method"
    _check_rows(rows, where)
    if "radius_l2" not in rows[0]:
        return Method(label, rows, where, "cohen", None, cohen_norm)
    flags = {row["is_certificate"] for row in rows}
    if len(flags) > 1:
        count = sum(1 for row in rows if not row["is_certificate"])
        raise ResultFileError(
            f"{where} mixes proven certificates with {count} rows that are NOT certificates "
            "(is_certificate false); analyse them as separate files so no figure blends the two"
        )
    kind = "sequential" if "samples_used" in rows[0] else "ucan"
    return Method(label, rows, where, kind, flags.pop(), cohen_norm)


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
    return "certify"


def summarize_method(method: Method, radii: dict) -> dict:
    """The summary row of one method (see :func:`summarize`)."""
    rows = method.rows
    count = len(rows)
    if method.kind == "sequential":
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
    path.write_text(buffer.getvalue(), encoding="utf-8")
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


def plot_certified_accuracy(results_by_label, path, radii=None, cohen_norm: str = "l2") -> Path:
    """Certified accuracy against radius: one panel per norm and one for ALM, one curve per method.

    ``results_by_label``: a mapping label -> path or rows, or a list of paths,
    rows or :class:`Method` objects. Non-certificate methods are dashed and
    labelled. Each panel's x axis reaches the largest of its table radii and
    of the methods' radii, so no curve is cut off.
    """
    plt = _pyplot()
    methods = load_methods(results_by_label, cohen_norm=cohen_norm)
    radii = resolve_radii(radii)
    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    legend = {}  # label -> line: one legend for all panels, below them, so it hides no curve
    for ax, norm in zip(axes.flat, (*NORMS, "alm")):
        largest = max([radii[norm][-1]] + [float(v.max()) for m in methods if (v := m.radii(norm)) is not None])
        grid = np.unique(np.concatenate([np.linspace(0, largest * 1.05 or 1.0, 600), radii[norm]]))
        drawn = 0
        for i, method in enumerate(methods):
            curve = certified_accuracy_curve(method, norm, grid)
            if curve is None:
                continue
            dashed = method.is_certificate is False
            label = method.label + (f": {NOT_CERTIFICATE}" if dashed else "")
            (line,) = ax.plot(grid, curve, linestyle="--" if dashed else "-", color=colours[i % len(colours)],
                              label=label, linewidth=1.8)
            legend.setdefault(label, line)
            drawn += 1
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
        if not drawn:
            ax.text(0.5, 0.5, "no method reports this norm", ha="center", va="center", transform=ax.transAxes)
    rows = -(-len(legend) // 2)
    fig.legend(list(legend.values()), list(legend), loc="lower center", ncol=2, fontsize=9, frameon=False)
    fig.suptitle("Certified accuracy against radius (dashed: not a certificate)", fontsize=13)
    fig.tight_layout(rect=(0, min(0.3, 0.025 * rows + 0.01), 1, 1))
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _sigma_png(source, workdir: Path, title: str) -> Path:
    """A sigma-map PNG for a run folder, a .pt file or a tensor (rendered by figures.save_sigma_png)."""
    if isinstance(source, (str, os.PathLike)):
        source = Path(source)
        if source.is_dir():
            if (source / "sigma.png").is_file():  # training already rendered it
                return source / "sigma.png"
            for name in ("sigma.pt", "sigma_examples.pt"):
                if (source / name).is_file():
                    source = source / name
                    break
            else:
                raise FileNotFoundError(
                    f"{source} has no sigma.png, sigma.pt or sigma_examples.pt (an isotropic run has no sigma map)")
        elif not source.is_file():
            raise FileNotFoundError(f"no sigma map at {source}")
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

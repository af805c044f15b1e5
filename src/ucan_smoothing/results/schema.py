"""The columns of a result file and how its rows are written and read back exactly.

One TSV row per image. The first six columns are Cohen et al.'s
(``idx label predict radius correct time``), so their analysis scripts read
our files; ours follow (``radius_l1 radius_l2 radius_linf alm p_lower n0 n
alpha noise npg is_certificate``). ``radius`` is in the noise's native norm,
``predict`` is -1 on abstention, ``time`` is in seconds. ``alm`` is the
paper's volume figure and NOT a certified radius.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


class ResultFileError(ValueError):
    """A result file or its sidecar is unreadable, malformed or does not match the run."""


# -- columns ------------------------------------------------------------------

# Each kind is a (format, parse) pair; values are written so they read back exactly.
def _format_int(value) -> str:
    if isinstance(value, float) and not value.is_integer():
        raise ValueError(f"{value!r} is not an integer")
    return str(int(value))


def _format_float(value) -> str:
    return repr(float(value))  # shortest text that reads back to the same float


def _format_bool(value) -> str:
    if value not in (True, False):
        raise ValueError(f"{value!r} is not a boolean")
    return "true" if value else "false"


def _format_str(value) -> str:
    if not isinstance(value, str) or any(c in value for c in "\t\r\n"):
        raise ValueError(f"{value!r} is not a string without tabs and newlines")
    return value


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered not in ("true", "false"):
        raise ValueError(f"expected true or false, got {text!r}")
    return lowered == "true"


def _parse_seconds(text: str) -> float:
    """Seconds, or Cohen's ``str(timedelta)`` form ``[D day[s], ]H:MM:SS[.ffffff]``."""
    if ":" not in text:
        return float(text)
    days = 0
    if "day" in text:
        day_part, text = text.split(",")
        days = int(day_part.split()[0])
    hours, minutes, seconds = text.strip().split(":")
    return days * 86400 + int(hours) * 3600 + int(minutes) * 60 + float(seconds)


KINDS = {
    "int": (_format_int, int),
    "float": (_format_float, float),
    "seconds": (_format_float, _parse_seconds),
    "bool": (_format_bool, _parse_bool),
    "str": (_format_str, str),
}


@dataclass(frozen=True)
class Column:
    name: str
    kind: str  # a key of KINDS

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"column {self.name!r}: unknown kind {self.kind!r}, use one of {sorted(KINDS)}")
        _format_str(self.name)


COHEN_COLUMNS = (
    Column("idx", "int"),
    Column("label", "int"),
    Column("predict", "int"),
    Column("radius", "float"),
    Column("correct", "int"),
    Column("time", "seconds"),
)
UCAN_COLUMNS = (
    Column("radius_l1", "float"),
    Column("radius_l2", "float"),
    Column("radius_linf", "float"),
    Column("alm", "float"),
    Column("p_lower", "float"),
    Column("n0", "int"),
    Column("n", "int"),
    Column("alpha", "float"),
    Column("noise", "str"),
    Column("npg", "str"),
    Column("is_certificate", "bool"),
)
#: for a sequential certification mode: ``RESULT_SCHEMA.with_columns(*SEQUENTIAL_COLUMNS)``
SEQUENTIAL_COLUMNS = (
    Column("mode", "str"),
    Column("decided_radius", "float"),
    Column("certified", "bool"),  # decided: certified at decided_radius (the sequential test's answer)
    Column("samples_used", "int"),
)
#: for the grid mode (a whole certified-accuracy table): ``grid_radius`` is the largest radius of the
#: grid, in the file's grid norm, at which the image is certified (0 when none is; with ``correct``
#: 0 when it abstains), so the certified accuracy at a grid radius r is the fraction of rows with
#: ``correct == 1`` and ``grid_radius >= r``
GRID_COLUMNS = (
    Column("mode", "str"),
    Column("grid_radius", "float"),
    Column("samples_used", "int"),
)
#: for a dual-smoothing run (npg/dual.py): the expert the smoothed selector chose (-1: it abstained), the
#: selector's lower bound and its l2 radius, which caps the row's radii
DUAL_COLUMNS = (
    Column("expert", "int"),
    Column("selector_p_lower", "float"),
    Column("selector_radius_l2", "float"),
)
#: for an elastic_sigma run (npg/elastic_sigma.py): the Gaussian level used at the image, scale * sigma(x)
ELASTIC_COLUMNS = (Column("level", "float"),)
#: for ``ucan certify --paper-mode --memory`` (npg/memory.py): what the memory did to the row (ok, conflict:
#: abstained because the image lies in an earlier region of another class, shrunk: the region was cut to keep
#: an earlier answer of another class outside)
MEMORY_COLUMNS = (Column("memory", "str"),)
#: every row of ``ucan certify``: whether the float-sound mode (core/float_sound.py) was on, i.e. whether the
#: certificate holds for the floating-point arithmetic actually executed, not only in exact arithmetic
FLOAT_SOUND_COLUMN = Column("float_sound", "bool")
#: Cohen et al.'s PREDICT output (``predict.py``): ``idx label predict correct time``
COHEN_PREDICT_COLUMNS = (
    Column("idx", "int"),
    Column("label", "int"),
    Column("predict", "int"),
    Column("correct", "int"),
    Column("time", "seconds"),
)
#: ours after them: the votes of the top class and of the runner-up among the n samples
PREDICT_COLUMNS = (
    Column("top_count", "int"),
    Column("runner_up_count", "int"),
    Column("n", "int"),
    Column("alpha", "float"),
    Column("noise", "str"),
    Column("npg", "str"),
    Column("is_certificate", "bool"),
)
#: the leading columns a result file may start with: Cohen's CERTIFY or PREDICT layout
LEADS = (COHEN_COLUMNS, COHEN_PREDICT_COLUMNS)
#: kinds the reader uses for columns it meets; other columns get the narrowest kind that fits
KNOWN_COLUMNS = {column.name: column for column in
                 COHEN_COLUMNS + UCAN_COLUMNS + SEQUENTIAL_COLUMNS + GRID_COLUMNS + DUAL_COLUMNS + ELASTIC_COLUMNS + MEMORY_COLUMNS + PREDICT_COLUMNS
                 + (FLOAT_SOUND_COLUMN,)}


def _lead_of(names) -> tuple | None:
    """The Cohen layout ``names`` starts with (CERTIFY's six, or PREDICT's five), or None."""
    for lead in LEADS:
        if tuple(names[:len(lead)]) == tuple(c.name for c in lead):
            return lead
    return None


@dataclass(frozen=True)
class Schema:
    """The ordered columns of a result file; always starts with Cohen's six (CERTIFY) or five (PREDICT)."""

    columns: tuple

    def __post_init__(self):
        names = [column.name for column in self.columns]
        if _lead_of(names) is None:
            raise ValueError(f"a result schema must start with Cohen's columns, got {names[:6]}")
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate column names in {names}")

    @property
    def names(self) -> tuple:
        return tuple(column.name for column in self.columns)

    def with_columns(self, *columns: Column) -> "Schema":
        """This schema with ``columns`` appended."""
        return Schema(self.columns + tuple(columns))

    def header(self) -> str:
        return "\t".join(self.names) + "\n"

    def format_row(self, row: dict) -> str:
        """One TSV line (with its newline) for ``row``, which must have exactly our columns."""
        missing = [name for name in self.names if name not in row]
        unknown = [name for name in row if name not in self.names]
        if missing or unknown:
            raise ValueError(f"row does not match the result columns: missing {missing}, unknown {unknown}")
        fields = []
        for column in self.columns:
            try:
                fields.append(KINDS[column.kind][0](row[column.name]))
            except (TypeError, ValueError) as error:
                raise ValueError(f"column {column.name!r}: {error}") from None
        return "\t".join(fields) + "\n"


COHEN_SCHEMA = Schema(COHEN_COLUMNS)
RESULT_SCHEMA = Schema(COHEN_COLUMNS + UCAN_COLUMNS)
PREDICT_SCHEMA = Schema(COHEN_PREDICT_COLUMNS + PREDICT_COLUMNS)


def row_from_certificate(idx, label, certificate, seconds, noise_desc, npg_desc) -> dict:
    """The result row of one image, every number taken from the certificate itself."""
    radii = certificate.radii()
    return {
        "idx": idx,
        "label": label,
        "predict": certificate.prediction,
        "radius": certificate.radius(),
        "correct": int(not certificate.abstained and certificate.prediction == label),
        "time": seconds,
        "radius_l1": radii["l1"],
        "radius_l2": radii["l2"],
        "radius_linf": radii["linf"],
        "alm": certificate.alm,
        "p_lower": certificate.p_lower,
        "n0": certificate.n0,
        "n": certificate.n,
        "alpha": certificate.alpha,
        "noise": noise_desc,
        "npg": npg_desc,
        "is_certificate": certificate.is_certificate,
    }


def describe_noise(noise) -> str:
    """Short text for the ``noise`` column, e.g. ``gaussian:0.25`` or ``powerlaw:0.5:a=800``."""
    info = noise.describe()
    text = f"{info['family']}:{info['scale']:g}"
    if "a" in info:
        text += f":a={info['a']:g}"
    return text


# -- reading ------------------------------------------------------------------

def _guess_kind(values) -> str:
    for kind in ("int", "float", "bool"):
        try:
            for value in values:
                KINDS[kind][1](value)
            return kind
        except ValueError:
            continue
    return "str"


def read_table(path, schema=None):
    """``(header names, typed rows, raw lines)`` of a result file; raises ResultFileError."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as error:
        raise ResultFileError(f"cannot read result file {path}: {error}") from None
    except UnicodeDecodeError:
        raise ResultFileError(f"{path} is not a UTF-8 text result file") from None
    if not text:
        raise ResultFileError(f"{path} is empty: expected a header line")
    lines = text.split("\n")
    if lines[-1]:
        raise ResultFileError(
            f"{path}, line {len(lines)}: no newline at the end, a half-written row of an "
            "interrupted run (rerun the same command to resume and repair the file)"
        )
    lines = [line.removesuffix("\r") for line in lines[:-1]]
    header = lines[0].split("\t")
    if _lead_of(header) is None or len(set(header)) != len(header):
        layouts = " or ".join(" ".join(c.name for c in lead) for lead in LEADS)
        raise ResultFileError(
            f"{path}, line 1: expected a header of distinct names starting with {layouts}, got {lines[0][:200]!r}"
        )
    split = []
    for number, line in enumerate(lines[1:], start=2):
        fields = line.split("\t")
        if len(fields) != len(header):
            raise ResultFileError(f"{path}, line {number}: {len(fields)} fields, the header has {len(header)}")
        split.append(fields)
    known = {**KNOWN_COLUMNS, **({c.name: c for c in schema.columns} if schema else {})}
    kinds = [
        known[name].kind if name in known else _guess_kind([fields[i] for fields in split])
        for i, name in enumerate(header)
    ]
    rows = []
    for number, fields in enumerate(split, start=2):
        row = {}
        for name, kind, text_value in zip(header, kinds, fields):
            try:
                row[name] = KINDS[kind][1](text_value)
            except ValueError:
                raise ResultFileError(
                    f"{path}, line {number}, column {name}: cannot read {text_value!r} as {kind}"
                ) from None
        rows.append(row)
    return header, rows, lines[1:]


def read_results(path, schema: Schema | None = None) -> list:
    """The rows of a result file (ours or Cohen et al.'s) as dicts of typed values.

    Known columns get their kind (int, float, bool, str; ``time`` in seconds,
    also from Cohen's ``H:MM:SS.ffffff``); extra columns get the narrowest kind
    that reads all their values, or the kind ``schema`` gives them.
    """
    return read_table(path, schema)[1]

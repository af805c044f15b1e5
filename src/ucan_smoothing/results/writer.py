"""Result files of ``ucan certify``: append-only, resumable TSV plus a JSON sidecar.

One TSV row per image. The first six columns are Cohen et al.'s
(``idx label predict radius correct time``), so their analysis scripts read
our files; ours follow (``radius_l1 radius_l2 radius_linf alm p_lower n0 n
alpha noise npg is_certificate``). ``radius`` is in the noise's native norm,
``predict`` is -1 on abstention, ``time`` is in seconds. ``alm`` is the
paper's volume figure and NOT a certified radius.

``<file>.json`` (the sidecar) holds the run's config, the columns and, for
every start or resume, the command line and library versions. It is always
replaced atomically (temporary file + ``os.replace``).

Crash safety: every row is one ``write`` followed by ``fsync``, so a kill
leaves at most one half-written last line. ``ResultWriter`` removes it when
it reopens the file, refuses a config that differs from the sidecar's, and
reports the finished indices (``done_indices``) so the caller skips them.
Rerunning a killed command therefore loses, duplicates and corrupts nothing.

Multi-process runs: rank ``r`` of ``w`` certifies ``split_indices(indices, r,
w)`` into ``shard_path(out, r, w)``; ``merge_shards(out, w)`` then writes the
main file in image order.

This module deliberately imports nothing from the rest of the package (and
not torch): it duck-types certificates and stays cheap to import.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

try:  # advisory lock against two writers on one file; not available on Windows
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

FORMAT = "ucan-results-v1"

#: config keys that do not change the results, so a resume may change them
NON_IDENTITY_KEYS = ("out", "output", "progress", "resume", "log_every", "num_workers")
# For per-image result files (certify, attack): a row depends only on the config and its image
# (each image draws its noise from a generator seeded by (seed, idx)), so the device and how
# many images are asked for (``max``) may change on resume; a larger --max extends a file. The
# device and the weights' memory layout (channels_last) change the logits by rounding only.
PER_IMAGE_NON_IDENTITY_KEYS = ("out", "progress", "device", "channels_last", "max")


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
    Column("samples_used", "int"),
)
#: kinds the reader uses for columns it meets; other columns get the narrowest kind that fits
KNOWN_COLUMNS = {column.name: column for column in COHEN_COLUMNS + UCAN_COLUMNS + SEQUENTIAL_COLUMNS}


@dataclass(frozen=True)
class Schema:
    """The ordered columns of a result file; always starts with Cohen's six."""

    columns: tuple

    def __post_init__(self):
        names = [column.name for column in self.columns]
        if tuple(names[:6]) != tuple(c.name for c in COHEN_COLUMNS):
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


def _read_table(path, schema=None):
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
    cohen = [c.name for c in COHEN_COLUMNS]
    if header[:6] != cohen or len(set(header)) != len(header):
        raise ResultFileError(
            f"{path}, line 1: expected a header of distinct names starting with "
            f"{' '.join(cohen)}, got {lines[0][:200]!r}"
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
    return _read_table(path, schema)[1]


# -- files, sidecar and provenance --------------------------------------------

def sidecar_path(path) -> Path:
    return Path(f"{path}.json")


def shard_path(path, rank: int, world_size: int) -> Path:
    """The part written by ``rank`` of ``world_size``: ``<path>.part<rank>of<world_size>``."""
    _check_rank(rank, world_size)
    return Path(f"{path}.part{rank}of{world_size}")


def _check_rank(rank, world_size):
    if not (isinstance(world_size, int) and world_size >= 1 and isinstance(rank, int) and 0 <= rank < world_size):
        raise ValueError(f"need integers 0 <= rank < world_size, got rank={rank!r}, world_size={world_size!r}")


def _fsync_directory(directory: Path) -> None:
    # Makes a rename or a new file durable; directories cannot be opened on Windows.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    # os.write may write less than asked; loop so the line is complete.
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def atomic_write(path, text: str) -> None:
    """Replace ``path`` with ``text`` so that readers see the old or the new file, never a mix."""
    path = Path(path)
    temporary = Path(f"{path}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        _write_all(fd, text.encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temporary, path)
    _fsync_directory(path.parent.resolve())


def _version(distribution: str):
    # From the installed metadata: importing torch only to read its version costs seconds.
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def run_environment() -> dict:
    """Command line, time and versions, recorded in the sidecar at every start or resume."""
    return {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": shlex.join(sys.argv),
        "python": platform.python_version(),
        "torch": _version("torch"),
        "numpy": _version("numpy"),
        "scipy": _version("scipy"),
        "ucan_smoothing": _version("ucan-smoothing"),
        "platform": platform.platform(),
        "host": platform.node(),
    }


def _normalise(config: dict) -> dict:
    """``config`` as it reads back from JSON, so a stored and a new config compare equal."""
    if not isinstance(config, dict):
        raise TypeError(f"config must be a dict, got {type(config).__name__}")
    return json.loads(json.dumps(config, default=str, sort_keys=True))


def config_differences(old: dict, new: dict, ignore=NON_IDENTITY_KEYS, prefix: str = "") -> list:
    """Dotted names of the keys whose values differ (top-level ``ignore`` keys skipped)."""
    differing = []
    for key in sorted(set(old) | set(new)):
        if key in ignore:
            continue
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            differing += config_differences(a, b, (), f"{prefix}{key}.")
        elif a != b:
            differing.append(f"{prefix}{key}")
    return differing


def _describe_differences(old: dict, new: dict, keys: list) -> str:
    def lookup(config, dotted):
        for part in dotted.split("."):
            config = config.get(part, "<absent>") if isinstance(config, dict) else "<absent>"
        return config

    return "; ".join(f"{key}: {lookup(old, key)!r} -> {lookup(new, key)!r}" for key in keys)


def read_sidecar(path) -> dict:
    """The sidecar of result file ``path``."""
    side = sidecar_path(path)
    try:
        sidecar = json.loads(side.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ResultFileError(
            f"{path} has no sidecar {side.name}; it was not written by `ucan certify` "
            "(move it away or choose another output file)"
        ) from None
    except (OSError, ValueError) as error:
        raise ResultFileError(f"cannot read sidecar {side}: {error}") from None
    if not isinstance(sidecar, dict) or sidecar.get("format") != FORMAT:
        raise ResultFileError(f"{side} is not a {FORMAT} sidecar")
    return sidecar


def _write_sidecar(path, sidecar: dict) -> None:
    atomic_write(sidecar_path(path), json.dumps(sidecar, indent=2, sort_keys=True) + "\n")


# -- the writer -----------------------------------------------------------------

class ResultWriter:
    """Append-only, resumable writer of one result file.

    On a fresh file it writes the sidecar and the header. On an existing one
    it refuses a different config (keys in ``non_identity`` may differ), or
    different columns, removes a half-written last line and loads the
    finished indices. ``write(row)`` appends one durable row.

    Use as a context manager, or call ``close()``.
    """

    def __init__(self, path, config: dict, *, schema: Schema = RESULT_SCHEMA, non_identity=NON_IDENTITY_KEYS):
        self.path = Path(path)
        self.schema = schema
        self.config = _normalise(config)
        self.non_identity = tuple(non_identity)
        run = run_environment()
        resuming = self.path.exists()
        if resuming:
            sidecar = self._check_matches_sidecar()
        else:
            sidecar = {
                "format": FORMAT,
                "columns": [[c.name, c.kind] for c in schema.columns],
                "config": self.config,
                "non_identity_keys": list(self.non_identity),
                "runs": [],
            }
            # Sidecar before data: a result file never exists without its sidecar.
            _write_sidecar(self.path, sidecar)
            atomic_write(self.path, schema.header())
        self._fd = os.open(self.path, os.O_RDWR | os.O_APPEND)
        try:
            self._lock()
            self._done = self._repair_and_load()
            sidecar["runs"].append(run)
            _write_sidecar(self.path, sidecar)
        except BaseException:
            os.close(self._fd)
            raise

    def _check_matches_sidecar(self) -> dict:
        sidecar = read_sidecar(self.path)
        ignore = set(self.non_identity) | set(sidecar.get("non_identity_keys", ()))
        differing = config_differences(sidecar["config"], self.config, ignore)
        if differing:
            raise ResultFileError(
                f"{self.path} was written with another config; differing keys: {', '.join(differing)} "
                f"({_describe_differences(sidecar['config'], self.config, differing)}). "
                "Use another output file, or rerun with the original settings to resume."
            )
        stored = [name for name, _ in sidecar["columns"]]
        if stored != list(self.schema.names):
            raise ResultFileError(
                f"{self.path} has columns {' '.join(stored)} but this run writes {' '.join(self.schema.names)}"
            )
        return sidecar

    def _lock(self) -> None:
        if fcntl is None:  # pragma: no cover
            return
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ResultFileError(f"another process is writing {self.path}") from None

    def _repair_and_load(self) -> set:
        # A kill during a write leaves one line without its newline: cut it off.
        data = self.path.read_bytes()
        if not data.endswith(b"\n"):
            os.truncate(self.path, data.rfind(b"\n") + 1)
            os.fsync(self._fd)
        header, rows, _ = _read_table(self.path, self.schema)
        if tuple(header) != self.schema.names:
            raise ResultFileError(f"{self.path}: header {' '.join(header)} does not match the sidecar's columns")
        done = set()
        for row in rows:
            if row["idx"] in done:
                raise ResultFileError(f"{self.path}: image index {row['idx']} appears twice")
            done.add(row["idx"])
        return done

    def done_indices(self) -> frozenset:
        """Image indices already in the file: skip them."""
        return frozenset(self._done)

    def write(self, row: dict) -> None:
        """Append ``row`` durably: one write, then fsync."""
        if self._fd is None:
            raise ResultFileError(f"{self.path} is closed")
        line = self.schema.format_row(row)
        idx = int(row["idx"])
        if idx in self._done:
            raise ResultFileError(f"{self.path} already has a row for image {idx}")
        _write_all(self._fd, line.encode("utf-8"))
        os.fsync(self._fd)
        self._done.add(idx)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # also releases the lock
            self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


# -- shards ---------------------------------------------------------------------

def split_indices(indices, rank: int, world_size: int) -> list:
    """The image indices of ``rank``: round-robin, so every rank gets a similar mix."""
    _check_rank(rank, world_size)
    return list(indices)[rank::world_size]


def merge_shards(path, world_size: int, *, expected_indices=None, non_identity=NON_IDENTITY_KEYS) -> Path:
    """Merge the parts of ``world_size`` ranks into ``path`` in image-index order.

    Checks that every part exists and is complete, that all configs and
    columns agree, that no index appears twice and, if ``expected_indices`` is
    given, that each of them is present. The main file and its sidecar are
    replaced atomically; the parts are kept (a rerun resumes from them). An
    existing main file with another config is refused.
    """
    path = Path(path)
    parts = [shard_path(path, rank, world_size) for rank in range(world_size)]
    missing = [part.name for part in parts if not part.exists()]
    if missing:
        raise ResultFileError(f"cannot merge {path}: missing parts {', '.join(missing)}")
    sidecars = [read_sidecar(part) for part in parts]
    ignore = set(non_identity).union(*(s.get("non_identity_keys", ()) for s in sidecars))
    first = sidecars[0]
    for part, sidecar in zip(parts[1:], sidecars[1:]):
        differing = config_differences(first["config"], sidecar["config"], ignore)
        if differing:
            raise ResultFileError(f"{part.name} and {parts[0].name} have different configs: {', '.join(differing)}")
        if sidecar["columns"] != first["columns"]:
            raise ResultFileError(f"{part.name} and {parts[0].name} have different columns")
    if path.exists() or sidecar_path(path).exists():
        differing = config_differences(read_sidecar(path)["config"], first["config"], ignore)
        if differing:
            raise ResultFileError(f"{path} exists with another config ({', '.join(differing)}); not replacing it")

    schema = Schema(tuple(Column(name, kind) for name, kind in first["columns"]))
    owner, lines = {}, []
    for part in parts:
        _, rows, raw = _read_table(part, schema)
        for row, line in zip(rows, raw):
            if row["idx"] in owner:
                raise ResultFileError(f"image {row['idx']} is in both {owner[row['idx']]} and {part.name}")
            owner[row["idx"]] = part.name
            lines.append((row["idx"], line))
    if expected_indices is not None:
        absent = sorted(set(expected_indices) - set(owner))
        if absent:
            raise ResultFileError(
                f"cannot merge {path}: {len(absent)} images have no row yet (first: {absent[:10]})"
            )
    lines.sort()  # raw lines are kept as written, so merging is lossless
    merged = {
        **first,
        "runs": [],
        "parts": [{"file": part.name, "runs": s["runs"]} for part, s in zip(parts, sidecars)],
        "merged": run_environment(),
    }
    _write_sidecar(path, merged)
    atomic_write(path, schema.header() + "".join(line + "\n" for _, line in lines))
    return path

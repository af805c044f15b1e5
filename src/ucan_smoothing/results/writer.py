"""Append-only, resumable writing of one result file (``ResultWriter``).

Crash safety: every row is one ``write`` followed by ``fsync``, so a kill
leaves at most one half-written last line. ``ResultWriter`` removes it when
it reopens the file, refuses a config that differs from the sidecar's, and
reports the finished indices (``done_indices``) so the caller skips them.
Rerunning a killed command therefore loses, duplicates and corrupts nothing.
One writer at a time: a second process on the same file (or a merge into
it) is refused with ``another process is writing FILE`` (see :mod:`.lock`).

This package imports nothing of the rest of ``ucan_smoothing`` but
:mod:`ucan_smoothing.fileio` (and not torch): it duck-types certificates and
stays cheap to import.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..fileio import atomic_write_text
from .lock import WriterLock
from .schema import RESULT_SCHEMA, ResultFileError, Schema, read_table
from .sidecar import (
    FORMAT,
    NON_IDENTITY_KEYS,
    config_differences,
    describe_differences,
    normalise_config,
    read_sidecar,
    run_environment,
    write_sidecar,
)


def _write_all(fd: int, data: bytes) -> None:
    # os.write may write less than asked; loop so the line is complete.
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


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
        self.config = normalise_config(config)
        self.non_identity = tuple(non_identity)
        run = run_environment()
        self._fd = None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # The lock comes first: looking whether the file exists, creating it, checking the
        # sidecar, repairing and appending all happen under it, so of two processes started
        # together exactly one proceeds. Everything that replaces the data file (creation here,
        # merge_shards) holds this lock too, so while we hold it our descriptor stays the file
        # at self.path: no row can go to a file that was replaced (unlinked) under us.
        self._lock = WriterLock(self.path)
        try:
            sidecar = self._check_matches_sidecar() if self.path.exists() else self._create()
            self._fd = os.open(self.path, os.O_RDWR | os.O_APPEND)
            self._done = self._repair_and_load()
            sidecar["runs"].append(run)
            write_sidecar(self.path, sidecar)
        except BaseException:
            self.close()
            raise

    def _create(self) -> dict:
        sidecar = {
            "format": FORMAT,
            "columns": [[c.name, c.kind] for c in self.schema.columns],
            "config": self.config,
            "non_identity_keys": list(self.non_identity),
            "runs": [],
        }
        # Sidecar before data: a result file never exists without its sidecar.
        write_sidecar(self.path, sidecar)
        atomic_write_text(self.path, self.schema.header())
        return sidecar

    def _check_matches_sidecar(self) -> dict:
        sidecar = read_sidecar(self.path)
        ignore = set(self.non_identity) | set(sidecar.get("non_identity_keys", ()))
        differing = config_differences(sidecar["config"], self.config, ignore)
        if differing:
            raise ResultFileError(
                f"{self.path} was written with another config; differing keys: {', '.join(differing)} "
                f"({describe_differences(sidecar['config'], self.config, differing)}). "
                "Use another output file, or rerun with the original settings to resume."
            )
        stored = [name for name, _ in sidecar["columns"]]
        if stored != list(self.schema.names):
            raise ResultFileError(
                f"{self.path} has columns {' '.join(stored)} but this run writes {' '.join(self.schema.names)}"
            )
        return sidecar

    def _repair_and_load(self) -> set:
        # A kill during a write leaves one line without its newline: cut it off.
        data = self.path.read_bytes()
        if not data.endswith(b"\n"):
            os.truncate(self.path, data.rfind(b"\n") + 1)
            os.fsync(self._fd)
        header, rows, _ = read_table(self.path, self.schema)
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

    def sort_rows(self) -> None:
        """Rewrite the file with its rows in image-index order (atomically, under the lock), then close.
        Rows are written as images finish, in any order; a finished run reads in index order."""
        if self._fd is None:
            raise ResultFileError(f"{self.path} is closed")
        os.close(self._fd)
        self._fd = None
        header, *lines = self.path.read_text().splitlines(keepends=True)
        lines.sort(key=lambda line: int(line.split("\t", 1)[0]))
        atomic_write_text(self.path, header + "".join(lines))
        self.close()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._lock.release()  # last: the file is complete before another writer may open it

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

"""Multi-process runs: rank ``r`` of ``w`` certifies ``split_indices(indices, r, w)`` into
``shard_path(out, r, w)``; ``merge_shards(out, w)`` then writes the main file in image order
and removes the parts."""

from __future__ import annotations

import contextlib
from pathlib import Path

from ..fileio import atomic_write_text
from .lock import WriterLock
from .schema import Column, ResultFileError, Schema, read_table
from .sidecar import (
    NON_IDENTITY_KEYS,
    config_differences,
    read_sidecar,
    run_environment,
    sidecar_path,
    write_sidecar,
)


def shard_path(path, rank: int, world_size: int) -> Path:
    """The part written by ``rank`` of ``world_size``: ``<path>.part<rank>of<world_size>``."""
    _check_rank(rank, world_size)
    return Path(f"{path}.part{rank}of{world_size}")


def _check_rank(rank, world_size):
    if not (isinstance(world_size, int) and world_size >= 1 and isinstance(rank, int) and 0 <= rank < world_size):
        raise ValueError(f"need integers 0 <= rank < world_size, got rank={rank!r}, world_size={world_size!r}")


def split_indices(indices, rank: int, world_size: int) -> list:
    """The image indices of ``rank``: round-robin, so every rank gets a similar mix."""
    _check_rank(rank, world_size)
    return list(indices)[rank::world_size]


def merge_shards(path, world_size: int, *, expected_indices=None, non_identity=NON_IDENTITY_KEYS) -> Path:
    """Merge the parts of ``world_size`` ranks into ``path`` in image-index order, then remove the parts.

    Checks that every part exists and is complete, that all configs and
    columns agree, that no index appears twice and, if ``expected_indices`` is
    given, that each of them is present. An existing main file with another
    config is refused; one with the same config keeps its rows (for an image
    in it and in a part, its row stays, as a resumed run never rewrites a
    row), so a rerun with a smaller ``--max`` loses nothing. The main file and
    its sidecar are replaced atomically and read back; only then are the
    parts removed. A failed merge changes nothing and keeps the parts.

    The main file and every part are locked for the whole merge, like a
    ``ResultWriter``'s: a merge while a rank still writes is refused, and no
    writer can append to the main file while it is replaced.
    """
    path = Path(path)
    parts = [shard_path(path, rank, world_size) for rank in range(world_size)]
    missing = [part.name for part in parts if not part.exists()]
    if missing:
        raise ResultFileError(f"cannot merge {path}: missing parts {', '.join(missing)}")
    with contextlib.ExitStack() as locks:
        for file in (path, *parts):
            locks.enter_context(WriterLock(file))
        _merge_locked(path, parts, expected_indices, non_identity)
    return path


def _merge_locked(path: Path, parts: list, expected_indices, non_identity) -> None:
    sidecars = [read_sidecar(part) for part in parts]
    ignore = set(non_identity).union(*(s.get("non_identity_keys", ()) for s in sidecars))
    first = sidecars[0]
    for part, sidecar in zip(parts[1:], sidecars[1:]):
        differing = config_differences(first["config"], sidecar["config"], ignore)
        if differing:
            raise ResultFileError(f"{part.name} and {parts[0].name} have different configs: {', '.join(differing)}")
        if sidecar["columns"] != first["columns"]:
            raise ResultFileError(f"{part.name} and {parts[0].name} have different columns")
    previous = None
    if path.exists() or sidecar_path(path).exists():
        previous = read_sidecar(path)
        differing = config_differences(previous["config"], first["config"], ignore)
        if differing:
            raise ResultFileError(f"{path} exists with another config ({', '.join(differing)}); not replacing it")
        if previous["columns"] != first["columns"]:
            raise ResultFileError(f"{path} exists with other columns; not replacing it")

    schema = Schema(tuple(Column(name, kind) for name, kind in first["columns"]))
    lines, owner = {}, {}
    for part in parts:
        for idx, line in _lines_by_index(part, schema).items():
            if idx in owner:
                raise ResultFileError(f"image {idx} is in both {owner[idx]} and {part.name}")
            owner[idx] = part.name
            lines[idx] = line
    if path.exists():
        lines.update(_lines_by_index(path, schema))  # rows already in the main file stay as they are
    if expected_indices is not None:
        absent = sorted(set(expected_indices) - set(lines))
        if absent:
            raise ResultFileError(
                f"cannot merge {path}: {len(absent)} images have no row yet (first: {absent[:10]})"
            )
    earlier = previous or {}
    merged = {
        **first,
        "runs": earlier.get("runs", []),
        "parts": earlier.get("parts", []) + [{"file": p.name, "runs": s["runs"]} for p, s in zip(parts, sidecars)],
        "merged": run_environment(),
    }
    # Raw lines are kept as written, so merging is lossless.
    text = schema.header() + "".join(lines[idx] + "\n" for idx in sorted(lines))
    write_sidecar(path, merged)
    atomic_write_text(path, text)
    if path.read_bytes() != text.encode("utf-8"):
        raise ResultFileError(f"{path} does not read back as written; the parts are kept")
    for part in parts:  # data before sidecar: a result file never exists without its sidecar
        part.unlink()
        sidecar_path(part).unlink(missing_ok=True)


def _lines_by_index(file: Path, schema: Schema) -> dict:
    header, rows, raw = read_table(file, schema)
    if tuple(header) != schema.names:
        raise ResultFileError(f"{file}: header {' '.join(header)} does not match the sidecar's columns")
    lines = {}
    for row, line in zip(rows, raw):
        if row["idx"] in lines:
            raise ResultFileError(f"{file}: image index {row['idx']} appears twice")
        lines[row["idx"]] = line
    return lines

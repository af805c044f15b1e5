"""Multi-process runs: rank ``r`` of ``w`` certifies ``split_indices(indices, r, w)`` into
``shard_path(out, r, w)``; ``merge_shards(out, w)`` then writes the main file in image order."""

from __future__ import annotations

from pathlib import Path

from ..fileio import atomic_write_text
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
        _, rows, raw = read_table(part, schema)
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
    write_sidecar(path, merged)
    atomic_write_text(path, schema.header() + "".join(line + "\n" for _, line in lines))
    return path

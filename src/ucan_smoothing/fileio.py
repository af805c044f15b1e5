"""Atomic file writes: a reader (or a resumed run) never sees a half-written file.

The data goes to a temporary file in the same folder, is flushed to disk,
and then replaces the target in one ``os.replace``; the folder is synced so
the rename survives a power cut. Temporary names are unique, so two writers
never share one, and a failed write removes its temporary file. This module
imports nothing heavy (no torch): result files use it too.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile


@contextlib.contextmanager
def atomic_open(path, mode: str = "wb"):
    """Open a temporary file to write; on success it becomes ``path`` atomically."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp, path)
    except BaseException as error:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(error, OSError) and error.errno is not None and error.filename is None:
            error.filename = path  # a failed write() or fsync() (a full disk) names no file
        raise
    fsync_directory(folder)


def atomic_write_bytes(path, data: bytes) -> None:
    """Replace ``path`` with ``data``: readers see the old or the new file, never a mix."""
    with atomic_open(path, "wb") as handle:
        handle.write(data)


def atomic_write_text(path, text: str) -> None:
    """Replace ``path`` with ``text`` (UTF-8), atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def fsync_directory(directory) -> None:
    """Make a rename or a new file in ``directory`` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def file_sha256(path) -> str:
    """SHA-256 of a file, read in 1 MiB blocks (checkpoints can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()

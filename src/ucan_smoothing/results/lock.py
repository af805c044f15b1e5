"""One writer per result file: an exclusive lock on ``<file>.lock``.

Whoever creates, repairs, appends to or replaces a result file (``ResultWriter``,
``merge_shards``) takes this lock first, before it even looks whether the file
exists; a second process is refused at once with one clear line. The lock file
is removed on release; a crashed holder leaves it behind, and the kernel has
already dropped its lock, so the next writer simply takes it.
"""

from __future__ import annotations

import os
from pathlib import Path

try:  # advisory locks; not available on Windows, where there is no protection
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

from .schema import ResultFileError


def lock_path(path) -> Path:
    return Path(f"{path}.lock")


class WriterLock:
    """Hold the exclusive lock of result file ``path`` until ``release()``."""

    def __init__(self, path):
        self.target = Path(path)
        self.path = lock_path(path)
        self._fd = self._acquire() if fcntl is not None else None

    def _acquire(self) -> int:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise ResultFileError(f"another process is writing {self.target}") from None
            except BaseException:
                os.close(fd)
                raise
            # A holder unlinks the lock file before it lets go. If it did so between our
            # open and our flock, we hold the lock of a file nobody else will see: try again.
            if self._is_current(fd):
                return fd
            os.close(fd)

    def _is_current(self, fd: int) -> bool:
        try:
            return os.path.samestat(os.fstat(fd), os.stat(self.path))
        except FileNotFoundError:
            return False

    def release(self) -> None:
        if self._fd is None:
            return
        # Unlink while still holding the lock, so nobody can take the lock of the removed file
        # and think it is the current one (``_is_current`` sends them to a fresh file).
        try:
            os.unlink(self.path)
        except FileNotFoundError:  # pragma: no cover - someone removed it by hand
            pass
        os.close(self._fd)
        self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.release()

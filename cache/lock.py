"""An exclusive build lock on a cache directory: ``fcntl.flock`` on ``<cache>/.lock``.

The lock is held for the whole build and released by the kernel when the process exits (even on
SIGKILL), so a stale lock file never blocks a later build. The holder writes its PID into the file
so that a refused builder can say who holds it. Under torchrun each rank locks its own file
(``.lock`` for rank 0, ``.lock.rank<r>`` for the others), so the ranks of one job do not refuse
each other while a second job on the same directory is refused.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from types import TracebackType

from kdcache.cache.errors import CacheError


def lock_path(cache_dir: str | os.PathLike, rank: int = 0) -> Path:
    name = ".lock" if rank == 0 else f".lock.rank{rank}"
    return Path(cache_dir) / name


class BuildLock:
    """Context manager holding an exclusive, non-blocking ``flock`` on the cache directory."""

    def __init__(self, cache_dir: str | os.PathLike, rank: int = 0) -> None:
        self.path = lock_path(cache_dir, rank)
        self._fd: int | None = None

    def acquire(self) -> BuildLock:
        """Take the lock or raise CacheError naming the PID that holds it."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise CacheError(
                f"{self.path.parent} is being built by another process (PID {holder}); wait for "
                "it to finish or stop it, then re-run to resume"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> BuildLock:
        return self.acquire()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.release()

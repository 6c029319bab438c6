"""One builder per remote prefix: a lock object ``<url>/.lock`` created with a conditional put.

The object is created with fsspec's ``pipe_file(..., mode="create")``, which s3fs sends as a PUT
with ``If-None-Match: *``: S3 (and S3-compatible stores that implement conditional writes) create
it only when it does not exist, atomically, so of two builders racing for one prefix exactly one
wins. Filesystems without an exclusive create get check-then-put, which leaves a short race
window (docs/FORMAT.md says so). The holder writes ``{host, pid, heartbeat}`` and refreshes the
heartbeat every ``HEARTBEAT_S`` seconds; the object is deleted on release.

A builder killed with SIGKILL leaves the object behind. It is taken over when its holder is
provably gone: the same host and a PID that no longer runs, or no heartbeat for ``STALE_AFTER_S``
seconds (another host). Under torchrun each rank locks ``.lock.rank<r>`` (rank 0: ``.lock``).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from types import TracebackType
from typing import Any

from kdcache.cache.errors import CacheError
from kdcache.cache.storage.location import Location, remote_errors

HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0


class RemoteLock:
    """Context manager holding the lock object of ``location`` for ``rank``."""

    def __init__(self, location: Location, rank: int = 0) -> None:
        self.location = location
        self.path = location.child(".lock" if rank == 0 else f".lock.rank{rank}")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._body = b""

    def acquire(self) -> RemoteLock:
        """Create the lock object, or take over a stale one; CacheError naming a live holder."""
        fs = self.location.filesystem()
        with remote_errors(self.location, "taking the build lock"):
            for _ in range(3):
                self._body = _holder_body()
                if _create_exclusive(fs, self.path, self._body):
                    break
                holder = _read_holder(fs, self.path)
                if holder is not None and not _is_stale(holder):
                    age = time.time() - float(holder.get("heartbeat", 0))
                    raise CacheError(
                        f"{self.location.url} is being built by PID {holder.get('pid')} on host "
                        f"{holder.get('host')} (lock {self.location.url}/{self.path.rsplit('/')[-1]}"
                        f", heartbeat {age:.0f}s ago); wait for it to finish or stop it, then "
                        "re-run to resume"
                    )
                if holder is not None:
                    fs.rm_file(self.path)  # stale: its builder is gone
            else:
                raise CacheError(f"{self.location.url}: could not take the build lock; re-run")
        self._thread = threading.Thread(target=self._beat, name="kdcache-lock", daemon=True)
        self._thread.start()
        return self

    def release(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        fs = self.location.filesystem()
        holder = _read_holder(fs, self.path)
        if holder is not None and holder.get("token") == json.loads(self._body)["token"]:
            fs.rm_file(self.path)

    def _beat(self) -> None:
        fs = self.location.filesystem()
        while not self._stop.wait(HEARTBEAT_S):
            body = json.loads(self._body)
            body["heartbeat"] = time.time()
            self._body = json.dumps(body).encode()
            try:
                fs.pipe_file(self.path, self._body)
            except Exception:  # a missed heartbeat only makes the lock look older
                continue

    def __enter__(self) -> RemoteLock:
        return self.acquire()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.release()


def _holder_body() -> bytes:
    now = time.time()
    token = f"{socket.gethostname()}-{os.getpid()}-{now}"
    body = {"host": socket.gethostname(), "pid": os.getpid(), "heartbeat": now, "token": token}
    return json.dumps(body).encode()


def _create_exclusive(fs: Any, path: str, body: bytes) -> bool:
    """True when this call created ``path``; False when it already existed."""
    try:
        fs.pipe_file(path, body, mode="create")
        return True
    except FileExistsError:
        return False
    except TypeError:  # an fsspec filesystem without mode=: check, then put (a race window)
        if fs.exists(path):
            return False
        fs.pipe_file(path, body)
        return True


def _read_holder(fs: Any, path: str) -> dict[str, Any] | None:
    try:
        holder = json.loads(fs.cat_file(path))
    except FileNotFoundError:
        return None
    except ValueError:
        return {}  # unreadable: treated as stale below
    return holder if isinstance(holder, dict) else {}


def _is_stale(holder: dict[str, Any]) -> bool:
    """The holder is provably gone: a dead PID on this host, or no heartbeat for a while."""
    try:
        heartbeat, pid = float(holder["heartbeat"]), int(holder["pid"])
    except (KeyError, TypeError, ValueError):
        return True
    if holder.get("host") == socket.gethostname():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False
    return time.time() - heartbeat > STALE_AFTER_S

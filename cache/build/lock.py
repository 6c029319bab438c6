"""Who may write a cache directory, and what a build finds in it: the lock and the build state.

The lock is an exclusive ``fcntl.flock`` on ``<cache>/.lock``.

The lock is held for the whole build and released by the kernel when the process exits (even on
SIGKILL), so a stale lock file never blocks a later build. The holder writes its PID into the file
so that a refused builder can say who holds it. Under torchrun each rank locks its own file
(``.lock`` for rank 0, ``.lock.rank<r>`` for the others), so the ranks of one job do not refuse
each other while a second job on the same directory is refused.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from pathlib import Path
from types import TracebackType
from typing import Any

from kdcache.cache.build.fingerprint import differences
from kdcache.cache.build.slices import PARTS_DIR
from kdcache.cache.errors import CacheError, ConfigError
from kdcache.cache.format.manifest import BUILD_STATE_NAME as STATE_NAME
from kdcache.cache.format.manifest import manifest_path, read_manifest
from kdcache.cache.format.shards import SHARDS_DIR, atomic_write_bytes

TOKENIZER_DIR = "tokenizer"  # the teacher's tokenizer, saved with the cache


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


FINGERPRINT_KEYS = ("teacher", "tokenizer", "data", "settings")


def prepare_directory(
    out: Path,
    state: dict[str, Any],
    overwrite: bool,
    write_state: bool = True,
    exclusive: bool = False,
) -> str:
    """Compare the build ``state`` (fingerprints + partition) with ``out``: "complete", "resume"
    or "fresh".

    A manifest with the same fingerprints: complete. A build state with the same fingerprints:
    resume, with any number of processes (the work is cut into row groups, not ranks), unless the
    state was written by independent slices of another ``num_shards`` or by a kdcache that cut
    the work by rank. Anything different: ConfigError naming the differences, unless
    ``overwrite`` (then kdcache's own files are removed). Fresh builds write the build state;
    ``exclusive``: only if none exists yet (independent slices start in any order: the first
    writes it, the others compare with it).
    """
    fingerprints = {key: state[key] for key in FINGERPRINT_KEYS if key in state}
    state_path = out / STATE_NAME
    existing, where = None, None
    if manifest_path(out).is_file():
        existing, where = read_manifest(out).get("fingerprints"), "the cache in"
    elif state_path.is_file():
        existing = json.loads(state_path.read_text(encoding="utf-8"))
        where = "the unfinished build in"
    elif (out / SHARDS_DIR).is_dir() and any((out / SHARDS_DIR).iterdir()):
        where = "the shards in"
    if where is not None and not isinstance(existing, dict):
        if not overwrite:
            raise ConfigError(
                f"{where} {out} carry no build fingerprints, so this build cannot resume them; "
                "use another --out or pass --overwrite to replace them"
            )
        remove_cache_files(out)
    elif existing is not None:
        previous = {k: v for k, v in existing.items() if k in FINGERPRINT_KEYS}
        changed = differences(previous, fingerprints)
        if changed and not overwrite:
            raise ConfigError(
                f"{where} {out} was built differently ({'; '.join(changed)}); use another --out "
                "or pass --overwrite to replace it"
            )
        if not changed and manifest_path(out).is_file():
            return "complete"
        if not changed:
            check_resumable(out, existing, state, overwrite)
            if existing.get("partition") == state.get("partition") or not overwrite:
                return "resume"
        remove_cache_files(out)
    if write_state:
        if exclusive and not write_json_exclusive(state_path, state):
            return prepare_directory(out, state, overwrite, write_state=False)
        if not exclusive:
            write_json(state_path, state)
    return "fresh"


def check_resumable(
    out: Path | str, existing: dict[str, Any], state: dict[str, Any], overwrite: bool
) -> None:
    """ConfigError when an unfinished build with the same fingerprints cannot be resumed by this
    run: one started by a kdcache that cut the work by rank (no partition), one cut into other
    row groups, or slices of another count. ``overwrite`` restarts instead."""
    if overwrite:
        return
    if existing.get("partition") is None:
        raise ConfigError(
            f"the unfinished build in {out} was started by an older kdcache (shards by rank, "
            f"{existing.get('world_size', 1)} processes), whose shards this one cannot continue; "
            "pass --overwrite to rebuild it"
        )
    theirs, ours = existing["partition"], state.get("partition") or {}
    if theirs.get("group_rows") != ours.get("group_rows"):
        raise ConfigError(
            f"the unfinished build in {out} cuts the rows into groups of "
            f"{theirs.get('group_rows')} (this run: {ours.get('group_rows')}); pass --group-rows "
            f"{theirs.get('group_rows')} to resume it, or --overwrite"
        )
    theirs, ours = existing.get("num_shards"), state.get("num_shards")
    if theirs is not None and ours is not None and theirs != ours:
        raise ConfigError(
            f"{out} is being built in {theirs} independent slices; this run says --num-shards "
            f"{ours}: run the slices with --num-shards {theirs} (or pass --overwrite to restart)"
        )


def remove_cache_files(out: Path) -> None:
    """Delete kdcache's own files in ``out`` (manifest, state, shards, tokenizer); nothing else."""
    manifest_path(out).unlink(missing_ok=True)  # the commit point goes first
    shards = out / SHARDS_DIR
    if shards.is_dir():
        for path in shards.iterdir():
            if (
                path.is_file() and path.suffix in (".arrow", ".json", ".tmp")
            ) or path.name.startswith(".tmp-"):
                path.unlink()
        if not any(shards.iterdir()):
            shards.rmdir()
    for tree in (TOKENIZER_DIR, PARTS_DIR):
        if (out / tree).is_dir():
            shutil.rmtree(out / tree)
    (out / STATE_NAME).unlink(missing_ok=True)


def write_json_exclusive(path: Path, value: dict[str, Any]) -> bool:
    """Write ``value`` as JSON at ``path`` only if no file is there (atomic: temp file + link).

    Returns False when ``path`` already existed (it is left as it was).
    """
    temp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    atomic_write_bytes(temp, (json.dumps(value, indent=2, sort_keys=True) + "\n").encode())
    try:
        os.link(temp, path)  # fails if path exists: exactly one writer wins
        return True
    except FileExistsError:
        return False
    finally:
        temp.unlink(missing_ok=True)


def write_json(path: Path, value: dict[str, Any]) -> None:
    """Write ``value`` as JSON atomically (temp file, fsync, rename)."""
    atomic_write_bytes(path, (json.dumps(value, indent=2, sort_keys=True) + "\n").encode())

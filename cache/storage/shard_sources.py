"""Where ``Cache`` gets a shard's bytes: a local directory, or a remote one through a local cache.

``LocalShards`` memory-maps the files of a local cache directory. ``RemoteShards`` reads a cache
in object storage through a bounded read-through directory (``--cache-dir``)::

    <cache-dir>/shards/<sha256>.arrow     verified shard copies, named by their checksum
    <cache-dir>/locks/<sha256>.lock       one flock per shard: one download per shard per machine
    <cache-dir>/caches/<id>/              manifest.json + tokenizer/ of one remote cache version

A shard is downloaded to a temp file, its size and sha256 compared with the manifest while it
streams in, and only then renamed into place, so a file under its checksum name is always sound
and several processes (student runs, DataLoader workers) share the directory safely: the first
takes the shard's lock and downloads, the others wait on the lock and find the file. A download
that fails the check is retried, then refused naming the shard. After each download the least
recently used shards (by mtime, touched on every use) are deleted until the directory is under its
size limit; the shard just fetched is kept even when it alone exceeds the limit. Readers hold an
open memory map, so a shard evicted by another process stays readable until they are done.
``load_many`` fetches the next ``prefetch`` shards on background threads in the reader's order.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import mmap
import os
import re
import tempfile
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from kdcache.cache.errors import CacheError, ConfigError
from kdcache.cache.format.manifest import TEMP_PREFIX, ShardInfo, fsync_dir
from kdcache.cache.format.shards import SHARDS_DIR, shard_path
from kdcache.cache.storage.location import Location, remote_errors

DEFAULT_PREFETCH = 2
DOWNLOAD_ATTEMPTS = 3
_CHUNK = 1 << 22
_UNITS = {"": 1, "B": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
_UNITS |= {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS |= {"KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "TIB": 1 << 40}
ADVICE = "run `kdcache verify` and rebuild the cache"


def parse_size(text: str | int) -> int:
    """``"64MiB"``, ``"2GB"``, ``"1.5G"`` or a number of bytes -> bytes (> 0)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(text))
    unit = match[2].upper() if match else None
    if match is None or unit not in _UNITS or float(match[1]) * _UNITS[unit] < 1:
        raise ConfigError(
            f"size {text!r} is not understood: give a positive number of bytes or e.g. 500MB, 20GiB"
        )
    return int(float(match[1]) * _UNITS[unit])


class BadShard(CacheError):
    """A shard that fails a check; ``problem`` is the short reason (for ``kdcache verify``)."""

    def __init__(self, info: ShardInfo, problem: str) -> None:
        super().__init__(f"shard {info.name} {problem}: {ADVICE}")
        self.problem = problem


def check_bytes(data: Any, info: ShardInfo) -> None:
    """BadShard unless ``data`` (bytes or mmap) has the manifest's sha256."""
    algorithm, _, expected = info.checksum.partition(":")
    if algorithm != "sha256":
        raise BadShard(info, f"has an unknown checksum type {algorithm!r}")
    if hashlib.sha256(data).hexdigest() != expected:
        raise BadShard(info, "fails its sha256 checksum (corrupt)")


def map_checked(path: Path, info: ShardInfo, verify: bool) -> mmap.mmap:
    """The file's bytes, memory-mapped (page cache, shared between DataLoader workers), with its
    size (and with ``verify`` its sha256) checked against ``info``."""
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if size != info.bytes:
                raise BadShard(
                    info, f"is {size} bytes, the manifest says {info.bytes} (truncated or replaced)"
                )
            data = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    except FileNotFoundError:
        raise BadShard(info, f"is missing from {path.parent}") from None
    except (OSError, ValueError) as error:
        raise BadShard(info, f"cannot be read ({error})") from None
    if verify:
        check_bytes(data, info)
    return data


class LocalShards:
    """The shard files of a local cache directory."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def load(self, info: ShardInfo, verify: bool = True) -> mmap.mmap:
        return map_checked(shard_path(self.root, info.name), info, verify)

    def load_many(
        self, infos: Iterable[ShardInfo], verify: bool = True
    ) -> Iterator[tuple[ShardInfo, mmap.mmap]]:
        for info in infos:
            yield info, self.load(info, verify)

    def check(self, info: ShardInfo) -> str | None:
        try:
            self.load(info, verify=True)
        except BadShard as error:
            return error.problem
        return None


class RemoteShards:
    """Shards of a remote cache, fetched through the read-through directory ``cache_dir``."""

    def __init__(
        self,
        location: Location,
        cache_dir: Path,
        limit_bytes: int,
        prefetch: int = DEFAULT_PREFETCH,
    ) -> None:
        if prefetch < 0:
            raise ConfigError(f"prefetch must be >= 0 shards, got {prefetch}")
        self.location, self.cache_dir = location, cache_dir
        self.limit_bytes, self.prefetch = limit_bytes, prefetch
        self.downloads = 0  # shards this object downloaded (for tests and benchmarks)
        self.evicted: list[str] = []  # checksum names this object deleted from the cache dir

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers get their own counters
        return {**self.__dict__, "downloads": 0, "evicted": []}

    def local_file(self, info: ShardInfo) -> Path:
        return self.cache_dir / "shards" / f"{_digest(info)}.arrow"

    def load(self, info: ShardInfo, verify: bool = True) -> mmap.mmap:
        """The verified shard, memory-mapped; downloaded first when not in the cache directory."""
        final = self.local_file(info)
        for sub in ("shards", "locks"):
            (self.cache_dir / sub).mkdir(parents=True, exist_ok=True)
        with file_lock(self.cache_dir / "locks" / f"{_digest(info)}.lock"):
            downloaded = not (final.is_file() and final.stat().st_size == info.bytes)
            if downloaded:
                self.download(info, final)  # checked while it streams in
            with contextlib.suppress(OSError):
                os.utime(final)  # most recently used
            data = map_checked(final, info, verify=verify and not downloaded)
        if downloaded:
            self._evict(keep=final)
        return data

    def load_many(
        self, infos: Iterable[ShardInfo], verify: bool = True
    ) -> Iterator[tuple[ShardInfo, mmap.mmap]]:
        """``(info, bytes)`` in the given order; the next ``prefetch`` shards download meanwhile."""
        infos = list(infos)
        if not infos:
            return
        pool = ThreadPoolExecutor(max_workers=max(1, self.prefetch), thread_name_prefix="kdcache")
        pending: deque[Future] = deque()
        submitted = 0
        try:
            for position, info in enumerate(infos):
                while submitted < len(infos) and submitted <= position + self.prefetch:
                    pending.append(pool.submit(self.load, infos[submitted], verify))
                    submitted += 1
                yield info, pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()
            pool.shutdown(wait=False, cancel_futures=True)

    def check(self, info: ShardInfo) -> str | None:
        """Stream the remote object and compare its size and sha256 (nothing is kept)."""
        try:
            return _mismatch(info, *self._stream(info)) or None
        except CacheError as error:
            return f"cannot be read ({error})"

    # ------------------------------------------------------------------ internals
    def _stream(self, info: ShardInfo, sink: Any = None) -> tuple[int, str]:
        """Read the remote shard (into ``sink`` if given): (bytes read, ``sha256:<hex>``)."""
        digest, size = hashlib.sha256(), 0
        fs = self.location.filesystem()
        remote = self.location.child(SHARDS_DIR, info.name)
        with remote_errors(self.location, f"reading shard {info.name}"), fs.open(remote) as handle:
            while chunk := handle.read(_CHUNK):
                if sink is not None:
                    sink.write(chunk)
                digest.update(chunk)
                size += len(chunk)
        return size, f"sha256:{digest.hexdigest()}"

    def download(self, info: ShardInfo, final: Path) -> None:
        """Download the shard to ``final`` (temp file in its directory, checked while it streams
        in, renamed when sound); retried, then CacheError naming the shard."""
        problem = ""
        for _ in range(DOWNLOAD_ATTEMPTS):
            problem = self._download_once(info, final)
            if not problem:
                self.downloads += 1
                return
        raise CacheError(
            f"shard {info.name} downloaded from {self.location.url} {problem} "
            f"({DOWNLOAD_ATTEMPTS} attempts): the remote copy is damaged; run `kdcache verify "
            f"{self.location.url}` and rebuild or re-push the cache"
        )

    def _download_once(self, info: ShardInfo, final: Path) -> str:
        """Stream the shard into a temp file while hashing it; rename into place when sound.

        Returns "" on success, else what was wrong (size or checksum)."""
        fd, temp = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=final.parent)
        try:
            with os.fdopen(fd, "wb") as out:
                problem = _mismatch(info, *self._stream(info, out))
                out.flush()
                os.fsync(out.fileno())
            if problem:
                return problem
            os.replace(temp, final)
            temp = ""
            fsync_dir(final.parent)
            return ""
        finally:
            if temp:
                with contextlib.suppress(OSError):
                    os.unlink(temp)

    def _evict(self, keep: Path) -> None:
        """Delete least recently used shards until the directory fits ``limit_bytes``."""
        with file_lock(self.cache_dir / "locks" / "evict.lock"):
            files = []
            for path in (self.cache_dir / "shards").glob("*.arrow"):
                with contextlib.suppress(FileNotFoundError):
                    stat = path.stat()
                    files.append((stat.st_mtime_ns, stat.st_size, path))
            total = sum(size for _, size, _ in files)
            for _, size, path in sorted(files, key=lambda item: item[0]):
                if total <= self.limit_bytes:
                    break
                if path == keep:
                    continue
                lock = self.cache_dir / "locks" / f"{path.stem}.lock"
                with file_lock(lock, blocking=False) as taken:
                    if not taken:
                        continue  # being downloaded or checked right now by another process
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()
                        total -= size
                        self.evicted.append(path.stem)


def _mismatch(info: ShardInfo, size: int, checksum: str) -> str:
    """What is wrong with bytes of ``size`` and ``checksum`` as ``info``'s shard ("" if none)."""
    if size != info.bytes:
        return f"is {size} bytes, the manifest says {info.bytes} (truncated or replaced)"
    if checksum != info.checksum:
        return "fails its sha256 checksum (corrupt)"
    return ""


def _digest(info: ShardInfo) -> str:
    algorithm, _, hexdigest = info.checksum.partition(":")
    if algorithm != "sha256" or not re.fullmatch(r"[0-9a-f]{64}", hexdigest):
        raise BadShard(info, f"has an unknown checksum {info.checksum!r}")
    return hexdigest


@contextlib.contextmanager
def file_lock(path: Path, blocking: bool = True) -> Iterator[bool]:
    """An exclusive flock on ``path`` (created if needed); yields False when not ``blocking`` and
    another process holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)

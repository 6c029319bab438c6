"""The manifest: ``manifest.json``, written last and atomically, is a cache's commit point.

The builder fills in fingerprints and settings; this module writes and reads the file, checks the
keys every reader relies on, and summarizes shards into the ``splits`` / ``shards`` entries. It
also holds what shards and manifest share: ``ShardInfo`` (a journal / manifest shard entry) and the
atomic-write helpers (temp file + fsync + rename + directory fsync).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kdcache.cache.errors import CacheError
from kdcache.cache.format.blocks import FORMAT_VERSION, SUPPORTED_FORMAT_VERSIONS
from kdcache.cache.format.codecs import MODES

MANIFEST_NAME = "manifest.json"
BUILD_STATE_NAME = "build_state.json"  # fingerprints of an unfinished build, written before shards
SHARDS_DIR = "shards"
TEMP_PREFIX = ".tmp-"
_CHUNK = 1 << 22
REQUIRED_KEYS = (
    "format_version",
    "teacher",
    "vocab_size",
    "top_k",
    "temperature",
    "tokenizer_fingerprint",
    "num_sequences",
    "num_tokens",
    "splits",
    "shards",
)


@dataclass(frozen=True)
class ShardInfo:
    """One complete shard, as its journal entry and the manifest describe it."""

    name: str  # file name inside shards/, e.g. "train-r00000-00012.arrow"
    split: str
    rank: int
    index: int
    num_sequences: int
    num_tokens: int
    num_positions: int
    first_sequence_id: int
    bytes: int
    checksum: str  # "sha256:<hex>" of the whole file
    mode: str = "exact"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, entry: dict[str, Any]) -> ShardInfo:
        try:
            return cls(**{name: entry[name] for name in cls.__dataclass_fields__})
        except (KeyError, TypeError) as error:
            raise CacheError(f"malformed shard entry {entry!r}: {error}") from None


def file_checksum(path: str | os.PathLike) -> str:
    """``sha256:<hex>`` of a file, read in chunks (about 1 GB/s on one core)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return f"sha256:{digest.hexdigest()}"


def fsync_dir(directory: str | os.PathLike) -> None:
    """Persist a rename: fsync the directory entry (no-op where the OS does not allow it)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` via temp file + fsync + rename + directory fsync."""
    path = Path(path)
    fd, temp = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    fsync_dir(path.parent)


def manifest_path(cache_dir: str | os.PathLike) -> Path:
    return Path(cache_dir) / MANIFEST_NAME


def shard_summary(shards: Iterable[ShardInfo], splits: Iterable[str] = ()) -> dict[str, Any]:
    """The manifest entries derived from complete shards.

    ``splits`` names splits to list even when they have no shard (e.g. an empty holdout).

    Returns ``{"format_version", "mode", "splits": {split: {num_sequences, num_tokens,
    num_positions, num_shards, bytes}}, "shards": [ShardInfo dicts in (split, rank, index) order],
    "num_sequences", "num_tokens", "num_positions", "bytes"}`` (totals over all splits).
    """
    ordered = sorted(shards, key=lambda info: (info.split, info.rank, info.index))
    empty = {"num_sequences": 0, "num_tokens": 0, "num_positions": 0, "num_shards": 0, "bytes": 0}
    totals: dict[str, dict[str, int]] = {name: dict(empty) for name in splits}
    for info in ordered:
        entry = totals.setdefault(info.split, dict(empty))
        entry["num_sequences"] += info.num_sequences
        entry["num_tokens"] += info.num_tokens
        entry["num_positions"] += info.num_positions
        entry["num_shards"] += 1
        entry["bytes"] += info.bytes
    modes = sorted({info.mode for info in ordered})
    if len(modes) > 1:
        raise CacheError(f"shards mix storage modes {modes}: rebuild the cache with one --mode")
    return {
        "format_version": FORMAT_VERSION,
        "mode": modes[0] if modes else "exact",
        "splits": totals,
        "shards": [info.to_dict() for info in ordered],
        "num_sequences": sum(e["num_sequences"] for e in totals.values()),
        "num_tokens": sum(e["num_tokens"] for e in totals.values()),
        "num_positions": sum(e["num_positions"] for e in totals.values()),
        "bytes": sum(e["bytes"] for e in totals.values()),
    }


def validate_manifest(manifest: Any, where: str = "manifest.json") -> dict[str, Any]:
    """Check the keys and types readers rely on; CacheError naming every problem."""
    if not isinstance(manifest, dict):
        raise CacheError(f"{where} is not a JSON object: rebuild the cache")
    version = manifest.get("format_version")
    if version not in SUPPORTED_FORMAT_VERSIONS:
        raise CacheError(
            f"{where} has format_version {version!r}, this kdcache reads "
            f"{list(SUPPORTED_FORMAT_VERSIONS)}: upgrade kdcache or rebuild the cache"
        )
    problems = [f"missing key {key!r}" for key in REQUIRED_KEYS if key not in manifest]
    if not problems:
        for key in ("vocab_size", "top_k", "num_sequences", "num_tokens"):
            if not isinstance(manifest[key], int) or manifest[key] < 0:
                problems.append(f"{key} must be a non-negative integer")
        if not isinstance(manifest["temperature"], int | float) or manifest["temperature"] <= 0:
            problems.append("temperature must be a positive number")
        if not isinstance(manifest["splits"], dict):
            problems.append("splits must be an object {split: counts}")
        if not isinstance(manifest["shards"], list):
            problems.append("shards must be a list of shard entries")
        if manifest.get("mode", "exact") not in MODES:
            problems.append(
                f"storage mode {manifest.get('mode')!r} is unknown (this kdcache knows "
                f"{', '.join(MODES)}): upgrade kdcache or rebuild"
            )
    if problems:
        raise CacheError(f"{where} is invalid: {'; '.join(problems)}; rebuild the cache")
    shards = [ShardInfo.from_dict(entry) for entry in manifest["shards"]]
    unknown = sorted({info.split for info in shards} - set(manifest["splits"]))
    if unknown:
        raise CacheError(f"{where} lists shards of splits {unknown} that are not in 'splits'")
    return manifest


def write_manifest(cache_dir: str | os.PathLike, manifest: dict[str, Any]) -> Path:
    """Validate and write ``manifest.json`` atomically (temp + fsync + rename + dir fsync)."""
    validate_manifest(manifest, "the manifest to write")
    path = manifest_path(cache_dir)
    atomic_write_bytes(path, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
    return path


def _no_manifest_message(directory: Path) -> str:
    """Why ``directory`` has no manifest: an unfinished build, or no cache at all."""
    traces = [directory / BUILD_STATE_NAME, directory / SHARDS_DIR, *directory.glob(".lock*")]
    if any(trace.exists() for trace in traces):
        return (
            f"{directory} has no manifest.json: the build did not finish; "
            "re-run the same `kdcache build` to resume"
        )
    if not any(directory.iterdir()):
        return (
            f"{directory} is an empty directory, not a cache: no `kdcache build` ran there; "
            f"write one with `kdcache build --out {directory}` or pass a cache directory"
        )
    return (
        f"{directory} is not a kdcache cache (no manifest.json and no trace of a build); "
        "pass the directory that `kdcache build --out` wrote"
    )


def read_manifest(cache_dir: str | os.PathLike) -> dict[str, Any]:
    """Read and validate ``manifest.json``; CacheError when missing, unreadable or unknown."""
    directory = Path(cache_dir)
    if not directory.exists():
        raise CacheError(f"cache directory {directory} does not exist: run `kdcache build` first")
    if not directory.is_dir():
        raise CacheError(f"{directory} is a file, not a cache directory")
    path = manifest_path(directory)
    if not path.is_file():
        raise CacheError(_no_manifest_message(directory))
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CacheError(f"{path} cannot be read ({error}): rebuild the cache") from None
    return validate_manifest(manifest, str(path))

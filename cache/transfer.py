"""``push_cache`` / ``pull_cache``: copy a finished cache to or from object storage.

Both copy the same layout a build writes (shards with their journal entries, tokenizer/, and
manifest.json last: the commit point), verify every shard's sha256 on arrival, and skip shards
already at the destination with the right checksum, so an interrupted copy is resumed by running
it again. A destination holding a different cache is refused unless ``overwrite``.

* push: every local shard is checked against the manifest before it is sent, and the uploaded
  object is read back and hashed (one extra read per shard: a publish happens once).
* pull: each shard is downloaded into a temp file, hashed while it streams in, and renamed into
  place only when it matches (retried, then refused naming the shard).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdcache.cache.build.lock import TOKENIZER_DIR, remove_cache_files
from kdcache.cache.errors import CacheError, ConfigError
from kdcache.cache.format.manifest import MANIFEST_NAME, atomic_write_bytes, manifest_path
from kdcache.cache.format.shards import SHARDS_DIR, shard_path
from kdcache.cache.read.reader import Cache, open_cache
from kdcache.cache.storage.location import (
    Location,
    check_bucket,
    download_tree,
    remote_errors,
    resolve_location,
    upload_tree,
)
from kdcache.cache.storage.remote_cache import read_remote_manifest
from kdcache.cache.storage.remote_lock import RemoteLock
from kdcache.cache.storage.shard_sources import LocalShards, RemoteShards

Report = Callable[[str], None]


@dataclass
class TransferSummary:
    """What a push or pull did: shards copied, shards already there, bytes copied."""

    source: str
    destination: str
    copied: int
    skipped: int
    bytes: int

    def line(self) -> str:
        return (
            f"{self.source} -> {self.destination}: {self.copied} shards copied "
            f"({self.bytes:,} bytes), {self.skipped} already there; manifest written last"
        )


def _remote(url: str, storage_options: dict[str, Any] | None, flag: str) -> Location:
    location = resolve_location(url, storage_options)
    if not location.is_remote:
        raise ConfigError(f"{flag} {url} is a local path: give a URL such as s3://bucket/prefix")
    return location


def push_cache(
    local: str | os.PathLike,
    url: str,
    *,
    storage_options: dict[str, Any] | None = None,
    overwrite: bool = False,
    report: Report | None = None,
) -> TransferSummary:
    """Upload the finished cache in ``local`` to ``url``; manifest last, every shard verified."""
    source = resolve_location(local)
    if source.is_remote:
        raise ConfigError(f"push copies a local cache; {local} is a URL (use pull to download)")
    location = _remote(url, storage_options, "push destination")
    cache = open_cache(source.local_path)
    check_bucket(location, "pushing the cache")
    fs = location.filesystem()
    remote = RemoteShards(location, Path(), 1)
    copied = skipped = size = 0
    with RemoteLock(location):
        _check_destination(location, cache.manifest, overwrite)
        for info in (info for split in cache.splits for info in cache.shards(split)):
            if remote.check(info) is None:
                skipped += 1
                continue
            if (problem := LocalShards(cache.path).check(info)) is not None:
                raise CacheError(f"local shard {info.name} {problem}: rebuild the cache first")
            journal = location.child(SHARDS_DIR, info.name.removesuffix(".arrow") + ".json")
            with remote_errors(location, f"uploading shard {info.name}"):
                fs.put_file(
                    str(shard_path(cache.path, info.name)), location.child(SHARDS_DIR, info.name)
                )
                if (problem := remote.check(info)) is not None:
                    raise CacheError(f"shard {info.name} uploaded to {url} {problem}: re-run push")
                fs.pipe_file(journal, json.dumps(info.to_dict(), indent=1).encode())
            copied, size = copied + 1, size + info.bytes
            if report is not None:
                report(f"pushed {info.name}")
        upload_tree(location, cache.path / TOKENIZER_DIR, TOKENIZER_DIR)
        with remote_errors(location, "uploading manifest.json"):
            fs.put_file(str(manifest_path(cache.path)), location.child(MANIFEST_NAME))
    return TransferSummary(str(local), location.url, copied, skipped, size)


def _check_destination(location: Location, manifest: dict[str, Any], overwrite: bool) -> None:
    """Refuse a destination holding another cache (unless ``overwrite``, which removes it)."""
    fs = location.filesystem()
    with remote_errors(location, "reading the destination's manifest"):
        if not fs.exists(location.child(MANIFEST_NAME)):
            return
        existing = json.loads(fs.cat_file(location.child(MANIFEST_NAME)))
        if existing.get("shards") == manifest["shards"]:
            return  # the same cache (an earlier push): resume / no-op
        if not overwrite:
            raise ConfigError(
                f"{location.url} already holds a different cache; push to another URL or pass "
                "--overwrite to replace it"
            )
        fs.rm_file(location.child(MANIFEST_NAME))  # the commit point goes first


def pull_cache(
    url: str,
    local: str | os.PathLike,
    *,
    storage_options: dict[str, Any] | None = None,
    overwrite: bool = False,
    report: Report | None = None,
) -> TransferSummary:
    """Download the finished cache at ``url`` into ``local``; manifest last, shards verified."""
    location = _remote(url, storage_options, "pull source")
    destination = resolve_location(local)
    if destination.is_remote:
        raise ConfigError(f"pull writes a local directory; {local} is a URL")
    out = destination.local_path
    manifest, raw = read_remote_manifest(location)
    if manifest_path(out).is_file():
        existing = json.loads(manifest_path(out).read_text(encoding="utf-8"))
        if existing.get("shards") != manifest["shards"]:
            if not overwrite:
                raise ConfigError(
                    f"{out} already holds a different cache; pull into another directory or "
                    "pass --overwrite to replace it"
                )
            remove_cache_files(out)
    (out / SHARDS_DIR).mkdir(parents=True, exist_ok=True)
    remote = RemoteShards(location, out, 1)
    local_shards = LocalShards(out)
    copied = skipped = size = 0
    cache = Cache(out, manifest, source=remote, location=location.url)
    for info in (info for split in cache.splits for info in cache.shards(split)):
        final = shard_path(out, info.name)
        if final.is_file() and local_shards.check(info) is None:
            skipped += 1
        else:
            remote.download(info, final)
            copied, size = copied + 1, size + info.bytes
            if report is not None:
                report(f"pulled {info.name}")
        atomic_write_bytes(
            final.with_suffix(".json"), json.dumps(info.to_dict(), indent=1).encode()
        )
    download_tree(location, out / TOKENIZER_DIR, TOKENIZER_DIR)
    atomic_write_bytes(manifest_path(out), raw)
    return TransferSummary(location.url, str(out), copied, skipped, size)

"""Opening a cache in object storage: its manifest, its tokenizer and a read-through shard source.

The manifest is read from the remote on every open (it is small and is the commit point: a cache
rebuilt in place is seen at once). The manifest and the tokenizer are kept in the read-through
directory under ``caches/<id>/`` (``id`` hashes the URL and the manifest bytes, so a rebuilt cache
gets a fresh copy); the trainer and ``kdcache eval`` read the tokenizer there.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from kdcache.cache.errors import CacheError
from kdcache.cache.format.manifest import MANIFEST_NAME, TEMP_PREFIX, validate_manifest
from kdcache.cache.storage.location import (
    DEFAULT_CACHE_LIMIT,
    Location,
    cache_home,
    check_bucket,
    download_tree,
    remote_errors,
)
from kdcache.cache.storage.shard_sources import RemoteShards, file_lock, parse_size

STATE_NAME = "build_state.json"  # the same name as cache.lock.STATE_NAME (that module needs fcntl)
TOKENIZER_DIR = "tokenizer"


def default_read_cache_dir() -> Path:
    """``<cache home>/remote``: the default ``--cache-dir`` of commands reading a remote cache."""
    return cache_home() / "remote"


def read_remote_manifest(location: Location) -> tuple[dict[str, Any], bytes]:
    """The validated manifest of a remote cache and its bytes; CacheError naming the problem."""
    check_bucket(location, "opening the cache")
    fs = location.filesystem()
    with remote_errors(location, "reading manifest.json"):
        try:
            raw = fs.cat_file(location.child(MANIFEST_NAME))
        except FileNotFoundError:
            unfinished = fs.exists(location.child(STATE_NAME))
            raw = None
    if raw is None:
        if unfinished:
            raise CacheError(
                f"{location.url} has no manifest.json: its build did not finish; re-run the same "
                f"`kdcache build --out {location.url}` to resume"
            )
        raise CacheError(
            f"{location.url} holds no kdcache cache (no manifest.json, no unfinished build): "
            "check the URL, or build one with `kdcache build --out URL`"
        )
    where = location.child_url(MANIFEST_NAME)
    try:
        manifest = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CacheError(f"{where} cannot be read ({error}): rebuild the cache") from None
    return validate_manifest(manifest, where), raw


def prepare_remote(
    location: Location,
    cache_dir: str | os.PathLike | None,
    cache_limit: str | int | None,
    prefetch: int,
) -> tuple[Path, dict, RemoteShards]:
    """What a ``Cache`` over a remote location needs: ``(local copy of manifest + tokenizer,
    manifest, shard source reading through cache_dir)``. The reader builds the ``Cache``."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_read_cache_dir()
    limit = parse_size(cache_limit if cache_limit is not None else DEFAULT_CACHE_LIMIT)
    manifest, raw = read_remote_manifest(location)
    source = RemoteShards(location, root, limit, prefetch)  # creates root/shards, root/locks
    version = hashlib.sha256(location.url.encode() + b"\0" + raw).hexdigest()[:24]
    local = root / "caches" / version
    (root / "locks").mkdir(parents=True, exist_ok=True)
    with file_lock(root / "locks" / f"cache-{version}.lock"):
        if not (local / MANIFEST_NAME).is_file():
            _fetch_metadata(location, raw, local)
    return local, manifest, source


def _fetch_metadata(location: Location, raw: bytes, local: Path) -> None:
    """Write the manifest and download the tokenizer into ``local`` (via a temp dir + rename)."""
    local.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=local.parent))
    try:
        download_tree(location, temp / TOKENIZER_DIR, TOKENIZER_DIR)
        (temp / MANIFEST_NAME).write_bytes(raw)
        os.replace(temp, local)
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(temp)

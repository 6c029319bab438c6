"""``verify_cache``: recompute every shard's size and checksum against the manifest."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from kdcache.cache.read.reader import open_cache


def verify_cache(
    path: str | os.PathLike,
    report: Callable[[str, str | None], None] | None = None,
    storage_options: dict[str, Any] | None = None,
) -> list[str]:
    """Names of the bad shards of a cache (missing, wrong size, wrong checksum); [] when sound.

    ``path`` is a directory or a URL (the remote objects are streamed and hashed, nothing is kept).
    Raises CacheError when ``path`` is not a finished cache (no or invalid manifest).
    ``report(name, problem_or_None)`` is called once per shard, in manifest order.
    """
    cache = open_cache(path, storage_options=storage_options)
    bad = []
    for split in cache.splits:
        for info in cache.shards(split):
            problem = cache.check_shard(info)
            if report is not None:
                report(info.name, problem)
            if problem is not None:
                bad.append(info.name)
    return bad

"""Options shared by the commands that take a cache path or URL (one definition each)."""

from __future__ import annotations

from typing import Any

import typer

from kdcache.cache.storage.location import DEFAULT_CACHE_LIMIT
from kdcache.cli._defaults import resolved

CACHE_HOME_TEXT = "$KDCACHE_CACHE_HOME, else $XDG_CACHE_HOME/kdcache, else ~/.cache/kdcache"
STORAGE_OPTION_HELP = resolved(
    "fsspec option for a URL, key=value, repeatable (e.g. endpoint_url=http://host:9000, "
    "key=..., secret=..., profile=...); credentials also come from the environment and profiles",
    "none",
)


def storage_option() -> Any:
    return typer.Option([], "--storage-option", help=STORAGE_OPTION_HELP, show_default=False)


def cache_dir_option() -> Any:
    return typer.Option(
        None,
        help=resolved(
            "Local read-through cache of a URL cache's shards", f"{CACHE_HOME_TEXT}/remote"
        ),
    )


def cache_limit_option() -> Any:
    return typer.Option(
        DEFAULT_CACHE_LIMIT,
        help="Size limit of --cache-dir (e.g. 500MB, 20GiB); least recently used shards go first.",
    )


def reader_settings(
    storage_options: list[str], cache_dir: str | None, cache_limit: str
) -> dict[str, Any]:
    """TrainConfig / EvalConfig keywords from the three options above (validated)."""
    from kdcache.cache.storage.location import parse_storage_options
    from kdcache.cache.storage.shard_sources import parse_size

    parse_size(cache_limit)  # refuse a bad size before anything runs
    return {
        "storage_options": parse_storage_options(storage_options),
        "cache_dir": cache_dir,
        "cache_limit": cache_limit,
    }

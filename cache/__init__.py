"""Stage one: run the teacher once and store its top-k + tail-mass distributions in shards.

The names below are imported lazily (PEP 562), so reading a cache, ``kdcache verify`` and
``kdcache --help`` do not pay for importing torch and transformers; the teacher-side modules
(build, estimate, heads) load them on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kdcache.cache._lazy import lazy_exports
from kdcache.cache.errors import CacheError, ConfigError, KdcacheError

_LAZY = {
    "BuildConfig": "build",
    "BuildSummary": "build",
    "build_cache": "build",
    "EstimateReport": "estimate",
    "estimate_build": "estimate",
    "FORMAT_VERSION": "format",
    "canonical_order": "format",
    "OutputHead": "heads",
    "CacheReport": "inspect",
    "inspect_cache": "inspect",
    "resolve_head": "heads",
    "read_manifest": "manifest",
    "shard_summary": "manifest",
    "write_manifest": "manifest",
    "Cache": "reader",
    "open_cache": "reader",
    "SequenceRecord": "records",
    "ShardInfo": "shards",
    "ShardWriter": "shards",
    "list_complete_shards": "shards",
    "verify_cache": "verify",
}

if TYPE_CHECKING:
    from kdcache.cache.build import BuildConfig, BuildSummary, build_cache
    from kdcache.cache.estimate import EstimateReport, estimate_build
    from kdcache.cache.format import FORMAT_VERSION, canonical_order
    from kdcache.cache.heads import OutputHead, resolve_head
    from kdcache.cache.inspect import CacheReport, inspect_cache
    from kdcache.cache.manifest import read_manifest, shard_summary, write_manifest
    from kdcache.cache.reader import Cache, open_cache
    from kdcache.cache.records import SequenceRecord
    from kdcache.cache.shards import ShardInfo, ShardWriter, list_complete_shards
    from kdcache.cache.verify import verify_cache


__getattr__, __dir__ = lazy_exports("kdcache.cache", _LAZY, globals())

__all__ = [
    "FORMAT_VERSION",
    "BuildConfig",
    "BuildSummary",
    "Cache",
    "CacheError",
    "CacheReport",
    "ConfigError",
    "EstimateReport",
    "KdcacheError",
    "OutputHead",
    "SequenceRecord",
    "ShardInfo",
    "ShardWriter",
    "build_cache",
    "canonical_order",
    "estimate_build",
    "inspect_cache",
    "list_complete_shards",
    "open_cache",
    "read_manifest",
    "resolve_head",
    "shard_summary",
    "verify_cache",
    "write_manifest",
]

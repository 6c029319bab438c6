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
    "BuildConfig": "build.pipeline",
    "BuildSummary": "build.pipeline",
    "build_cache": "build.pipeline",
    "EstimateReport": "build.estimate",
    "estimate_build": "build.estimate",
    "FORMAT_VERSION": "format.blocks",
    "canonical_order": "format.blocks",
    "OutputHead": "extraction.heads",
    "CacheReport": "read.inspect",
    "inspect_cache": "read.inspect",
    "resolve_head": "extraction.heads",
    "read_manifest": "format.manifest",
    "shard_summary": "format.manifest",
    "write_manifest": "format.manifest",
    "Cache": "read.reader",
    "open_cache": "read.reader",
    "SequenceRecord": "records",
    "ShardInfo": "format.shards",
    "ShardWriter": "format.shards",
    "list_complete_shards": "format.shards",
    "verify_cache": "read.verify",
}

if TYPE_CHECKING:
    from kdcache.cache.build.estimate import EstimateReport, estimate_build
    from kdcache.cache.build.pipeline import BuildConfig, BuildSummary, build_cache
    from kdcache.cache.extraction.heads import OutputHead, resolve_head
    from kdcache.cache.format.blocks import FORMAT_VERSION, canonical_order
    from kdcache.cache.format.manifest import read_manifest, shard_summary, write_manifest
    from kdcache.cache.format.shards import ShardInfo, ShardWriter, list_complete_shards
    from kdcache.cache.read.inspect import CacheReport, inspect_cache
    from kdcache.cache.read.reader import Cache, open_cache
    from kdcache.cache.read.verify import verify_cache
    from kdcache.cache.records import SequenceRecord


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

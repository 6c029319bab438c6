"""Stage one: run the teacher once and store its top-k + tail-mass distributions in shards."""

from kdcache.cache.build import BuildConfig, BuildSummary, build_cache
from kdcache.cache.errors import CacheError, ConfigError, KdcacheError
from kdcache.cache.estimate import EstimateReport, estimate_build
from kdcache.cache.format import FORMAT_VERSION, canonical_order
from kdcache.cache.heads import OutputHead, resolve_head
from kdcache.cache.manifest import read_manifest, shard_summary, write_manifest
from kdcache.cache.reader import Cache, open_cache
from kdcache.cache.records import SequenceRecord
from kdcache.cache.shards import ShardInfo, ShardWriter, list_complete_shards
from kdcache.cache.verify import verify_cache

__all__ = [
    "FORMAT_VERSION",
    "BuildConfig",
    "BuildSummary",
    "Cache",
    "CacheError",
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
    "list_complete_shards",
    "open_cache",
    "read_manifest",
    "resolve_head",
    "shard_summary",
    "verify_cache",
    "write_manifest",
]

"""Stage one: run the teacher once and store its top-k + tail-mass distributions in shards."""

from kdcache.cache.errors import CacheError, ConfigError, KdcacheError
from kdcache.cache.heads import OutputHead, resolve_head
from kdcache.cache.records import SequenceRecord

__all__ = [
    "CacheError",
    "ConfigError",
    "KdcacheError",
    "OutputHead",
    "SequenceRecord",
    "resolve_head",
]

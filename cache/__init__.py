"""Stage one: run the teacher once and store its top-k + tail-mass distributions in shards."""

from kdcache.cache.errors import CacheError, ConfigError, KdcacheError

__all__ = ["CacheError", "ConfigError", "KdcacheError"]

"""Where a cache lives: local paths and fsspec URLs, remote locks, shard sources, read-through cache.

``location`` (``Location``, ``resolve_location``, uploads/downloads of trees), ``remote_lock``
(the build lock on object storage), ``shard_sources`` (local shards, or remote shards through a
bounded local read-through cache with prefetch), ``remote_cache`` (the manifest and tokenizer of
a remote cache copied next to that read-through cache).
"""

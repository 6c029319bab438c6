"""The shard format: records as Arrow blocks (one codec per column group), shard files, manifest.

``blocks`` (``BlockCodec``, ``FORMAT_VERSION``), ``codecs/`` (one registered codec per column
group), ``modes`` (the storage mode a manifest describes), ``shards`` (``ShardWriter`` and the
per-shard journal), ``manifest`` (the commit point). Nothing here runs a model or touches a network.
"""

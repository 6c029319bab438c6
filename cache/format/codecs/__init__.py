"""The column-group codecs of a shard block, registered by name (docs/FORMAT.md).

``CODECS`` maps a group's name to its codec class, in the order of the block's columns; a
shard's settings (its schema metadata, or the manifest) decide which groups it holds: each class's
``from_settings`` returns its codec, or None when such a shard has no such group. The top-k group
stores its log-probs and tail mass in one of ``ENCODINGS`` (``MODES``: the shard's ``mode``).

A new storage mode is a new group: one module here with a ``ColumnCodec`` subclass, added to
``CODECS`` below (a new top-k encoding: a ``TopkEncoding`` added to ``ENCODINGS``).
"""

from __future__ import annotations

from kdcache.cache.format.codecs import (
    topk_compact,  # noqa: F401 (registers the compact encoding)
    topk_q8,  # noqa: F401 (registers the q8 encoding)
    topk_unique,  # noqa: F401 (registers the unique encoding)
)
from kdcache.cache.format.codecs.base import BlockColumns, ColumnCodec, ShardSettings
from kdcache.cache.format.codecs.observed import ObservedCodec
from kdcache.cache.format.codecs.tail_counts import TailCountsCodec
from kdcache.cache.format.codecs.tail_samples import TailSamplesCodec
from kdcache.cache.format.codecs.tokens import TokensCodec
from kdcache.cache.format.codecs.topk import ENCODINGS, TopkCodec, TopkEncoding

__all__ = [
    "CODECS",
    "ENCODINGS",
    "MODES",
    "BlockColumns",
    "ColumnCodec",
    "ShardSettings",
    "TopkEncoding",
    "codecs_for",
    "describe_encoding",
]

CODECS: dict[str, type[ColumnCodec]] = {
    codec.name: codec
    for codec in (TokensCodec, TopkCodec, TailSamplesCodec, TailCountsCodec, ObservedCodec)
}
MODES: tuple[str, ...] = tuple(ENCODINGS)  # the top-k encodings, the shards' ``mode``


def codecs_for(settings: ShardSettings) -> list[ColumnCodec]:
    """The column groups of a shard with ``settings``, in block order (ConfigError / CacheError
    from a group that cannot store or read them)."""
    groups = [codec.from_settings(settings) for codec in CODECS.values()]
    return [group for group in groups if group is not None]


def describe_encoding(mode: str) -> str:
    """``mode`` and what it stores, in one line (``q8: 8-bit log-prob levels ...``)."""
    encoding = ENCODINGS.get(mode)
    return f"{mode}: {encoding.description}" if encoding is not None else str(mode)

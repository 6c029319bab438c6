"""The column-group codec protocol, and the byte-level helpers every group shares.

A shard block (one Arrow row, docs/FORMAT.md) is the concatenation of column groups. Each group
is one ``ColumnCodec``: it names its Arrow columns, the schema metadata and manifest settings it
stands for, checks the records the writer is given, and encodes / decodes its own columns. The
block codec (``kdcache.cache.format.blocks.BlockCodec``) only composes the groups that the registry
(``kdcache.cache.format.codecs``) says a shard's settings need; it never branches on a storage mode.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa

from kdcache.cache.records import SequenceRecord

__all__ = ["SEQUENCE_FIELDS", "TOKEN_FIELDS", "BlockColumns", "ColumnCodec", "ShardSettings"]

SEQUENCE_FIELDS = ("sequence_id", "num_tokens", "num_positions")  # one value per sequence
TOKEN_FIELDS = ("input_ids",)  # one value per token


@dataclass(frozen=True)
class ShardSettings:
    """The settings a shard is written with, as its schema metadata (and the manifest) hold them.

    ``metadata`` is the shard's full schema metadata when the settings were read from a shard
    (a group may check its own extra keys there), None when they come from a writer's arguments.
    """

    mode: str  # top-k encoding: a registered top-k codec's ``encoding`` (exact, compact)
    top_k: int  # entries stored per position (0: no top-k entries, a sampled cache)
    vocab_size: int
    tail_samples: int = 0  # sampled ids stored per position (0: no tail-sample group)
    metadata: Mapping[str, str] | None = None
    observed_logprobs: bool = False  # the observed next token's teacher log-prob per position

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], metadata: bool = False) -> ShardSettings:
        """From shard schema metadata (strings) or a manifest (ints); absent keys take defaults."""
        return cls(
            mode=str(values.get("mode", "exact")),
            top_k=int(values["top_k"]),
            vocab_size=int(values["vocab_size"]),
            tail_samples=int(values.get("tail_samples") or 0),
            metadata=dict(values) if metadata else None,
            observed_logprobs=str(values.get("observed_logprobs", "")).lower() in ("1", "true"),
        )


class BlockColumns:
    """The columns of one block row, for decoding: zstd payloads decompressed on first use."""

    def __init__(self, batch: pa.RecordBatch, row: int, decompress) -> None:
        self._batch, self._row, self._decompress = batch, row, decompress

    def payload(self, name: str) -> bytes:
        """The decompressed bytes of binary column ``name``."""
        return self._decompress(self._batch.column(name)[self._row].as_buffer())

    def values(self, name: str, dtype: type) -> np.ndarray:
        """Values of this row of list<int> column ``name``, read from its buffers (``to_numpy``
        would import pandas, seconds of start-up in every DataLoader worker)."""
        array = self._batch.column(name)
        offsets = np.frombuffer(array.buffers()[1], np.int32)[array.offset :]
        child = array.values
        values = np.frombuffer(child.buffers()[1], dtype)[child.offset :]
        return values[offsets[self._row] : offsets[self._row + 1]]


class ColumnCodec(ABC):
    """One column group of a shard block (registered by ``name`` in ``kdcache.cache.format.codecs``).

    ``encode`` returns, per column of ``fields``, either the uncompressed bytes of a binary column
    (the block codec compresses them) or a 1-D array for a list column. ``decode`` returns
    ``SequenceRecord`` field name -> array: one value per sequence (``SEQUENCE_FIELDS``), per
    token (``TOKEN_FIELDS``: first dimension T summed over the block's sequences) or per stored
    position (any other field: first dimension M summed).
    """

    name: ClassVar[str]  # registry name
    fields: ClassVar[tuple[tuple[str, pa.DataType], ...]]  # Arrow columns, in block order
    record_fields: ClassVar[tuple[str, ...]]  # the SequenceRecord fields ``decode`` returns
    # for a group that a shard may lack: how to open a writer whose shards store it
    enable_hint: ClassVar[str] = ""

    @classmethod
    @abstractmethod
    def from_settings(cls, settings: ShardSettings) -> ColumnCodec | None:
        """This group's codec for ``settings``; None when such a shard has no such group.

        Raises ConfigError (CacheError for settings read from a shard) for settings the group
        cannot store or read.
        """

    def metadata(self) -> dict[str, str]:
        """Schema metadata keys this group writes into each shard (beside the common ones)."""
        return {}

    def settings(self) -> dict[str, Any]:
        """The manifest settings this group stands for; checked against the manifest on read."""
        return {}

    def check(self, record: SequenceRecord) -> None:  # noqa: B027 (optional hook)
        """ConfigError when ``record`` breaks this group's conventions (called by the writer)."""

    @abstractmethod
    def encode(self, records: list[SequenceRecord]) -> list[bytes | np.ndarray]:
        """This group's columns of one block of whole sequences, in ``fields`` order."""

    @abstractmethod
    def decode(self, columns: BlockColumns) -> dict[str, np.ndarray]:
        """This group's record arrays of one block row (ValueError for inconsistent columns)."""


# ---------------------------------------------------------------------- byte-level helpers
def planes(values: np.ndarray, num_planes: int) -> bytes:
    """Little-endian byte planes: all byte-0s, then all byte-1s ... (first num_planes bytes)."""
    values = np.ascontiguousarray(values)
    as_bytes = values.view(np.uint8).reshape(values.shape[0], values.dtype.itemsize)
    return np.ascontiguousarray(as_bytes[:, :num_planes].T).tobytes()


def unplanes(raw: bytes, num_planes: int, dtype: str) -> np.ndarray:
    """Inverse of ``planes``: little-endian integers of ``dtype`` from their byte planes."""
    byte_planes = np.frombuffer(raw, np.uint8)
    if byte_planes.shape[0] % num_planes:
        raise ValueError("byte-plane blob length is not a multiple of the plane count")
    byte_planes = byte_planes.reshape(num_planes, -1)
    out = byte_planes[0].astype(dtype)
    for index in range(1, num_planes):
        out |= byte_planes[index].astype(dtype) << (8 * index)
    return out


def id_planes(vocab_size: int) -> int:
    """Bytes needed for an id delta (at most vocab_size - 1)."""
    return max(1, (int(vocab_size - 1).bit_length() + 7) // 8)


def sorted_id_deltas(ids: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Flat ids (E,) of rows sorted ascending -> deltas, the first of each non-empty row absolute.

    ``counts`` (P,): entries per row.
    """
    deltas = np.diff(ids, prepend=0)
    starts = (np.cumsum(counts) - counts)[counts > 0]
    deltas[starts] = ids[starts]
    return deltas

"""The shard encoding: blocks of sequences <-> one Arrow row of zstd-compressed byte blobs.

A shard is an Arrow IPC file. Each row is a *block* of whole sequences (a few thousand positions)
whose columns are grouped by what they store; each group is one codec, registered by name in
``kdcache.cache.format.codecs``:

* ``tokens`` (``codecs/tokens.py``): sequence ids, lengths, input ids, stored positions;
* ``topk`` (``codecs/topk.py``): the top-k ids (sorted, delta-coded, byte planes), their
  log-probs and the tail mass, in the encoding the shard's ``mode`` names (``exact``: fp16 /
  float32; ``compact``, ``codecs/topk_compact.py``: quantized levels / fp16);
* ``tail_samples`` (``codecs/tail_samples.py``): s sampled ids per position and their log-probs,
  present when the shard's ``tail_samples`` > 0;
* ``observed`` (``codecs/observed.py``): the teacher's log-prob of the observed next token per
  position, present when the shard's ``observed_logprobs`` is set (format version 2).

``BlockCodec`` composes the groups the registry gives for a shard's settings; it compresses their
blobs, builds the Arrow row, and on read assembles ``SequenceRecord``s from what the groups
decode. It never branches on a storage mode. Rows returned by the reader are in *canonical
order*: log-prob descending, ties by ascending id. docs/FORMAT.md is the specification; the
codecs are its reference implementation.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import zstandard

from kdcache.cache.errors import CacheError, ConfigError, KdcacheError
from kdcache.cache.format.codecs import CODECS, MODES, ColumnCodec, ShardSettings, codecs_for
from kdcache.cache.format.codecs.base import SEQUENCE_FIELDS, TOKEN_FIELDS, BlockColumns, id_planes
from kdcache.cache.format.codecs.topk_compact import (  # noqa: F401 (re-exported)
    COMPACT_GROWTH,
    COMPACT_KEEP_MASS,
    COMPACT_LEVELS,
    COMPACT_MAX_BELOW,
    COMPACT_SCHEME,
    COMPACT_STEP,
)
from kdcache.cache.format.modes import storage_mode
from kdcache.cache.records import SequenceRecord

__all__ = [
    "FORMAT_VERSION",
    "MODES",
    "SUPPORTED_FORMAT_VERSIONS",
    "BlockCodec",
    "canonical_order",
    "stored_logprobs",
    "synthetic_records",
]

FORMAT_VERSION = 2
SUPPORTED_FORMAT_VERSIONS = (1, 2)
ZSTD_LEVEL = 3


@dataclass(frozen=True)
class BlockCodec:
    """Encodes / decodes one block for a shard's settings (mode, top_k, vocab_size, tail_samples).

    ``groups`` are the column-group codecs the registry gives for these settings, in column order.
    """

    mode: str
    top_k: int
    vocab_size: int
    level: int = ZSTD_LEVEL
    tail_samples: int = 0  # sampled ids stored per position (0 = none)
    observed_logprobs: bool = False  # the ``observed`` group (codecs/observed.py)
    groups: tuple[ColumnCodec, ...] = field(init=False, repr=False, compare=False)
    _metadata: Mapping[str, str] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        settings = ShardSettings(
            self.mode, self.top_k, self.vocab_size, self.tail_samples, self._metadata,
            observed_logprobs=self.observed_logprobs,
        )  # fmt: skip
        try:  # the storage mode: what a cache with these settings stores at all
            storage_mode({"top_k": self.top_k, "tail_samples": self.tail_samples})
        except CacheError:
            raise ConfigError(
                f"top_k must be >= 1 (or 0 with tail samples: a sampled cache), got {self.top_k}"
            ) from None
        object.__setattr__(self, "groups", tuple(codecs_for(settings)))

    @property
    def id_planes(self) -> int:
        """Bytes per id delta, the same in every group (shard metadata ``id_planes``)."""
        return id_planes(self.vocab_size)

    @property
    def schema(self) -> pa.Schema:
        """The Arrow schema of this codec's blocks: every group's columns, in order."""
        return pa.schema([column for group in self.groups for column in group.fields])

    def settings(self) -> dict[str, Any]:
        """The manifest settings the shard stands for: every group's, merged."""
        merged: dict[str, Any] = {}
        for group in self.groups:
            merged.update(group.settings())
        return merged

    def schema_metadata(self) -> dict[bytes, bytes]:
        """Key/value metadata stored in each shard's Arrow schema."""
        meta = {
            "format_version": str(FORMAT_VERSION),
            "mode": self.mode,
            "top_k": str(self.top_k),
            "vocab_size": str(self.vocab_size),
            "id_planes": str(self.id_planes),
            "codec": "zstd",
        }
        for group in self.groups:
            meta.update(group.metadata())
        return {key.encode(): value.encode() for key, value in meta.items()}

    @classmethod
    def from_schema_metadata(cls, metadata: dict[bytes, bytes] | None, shard: str) -> BlockCodec:
        """The codec of a shard; CacheError naming the shard for settings it cannot read."""
        meta = {k.decode(): v.decode() for k, v in (metadata or {}).items()}
        version = meta.get("format_version")
        if version is None or int(version) not in SUPPORTED_FORMAT_VERSIONS:
            raise CacheError(
                f"shard {shard} has format_version {version}, this kdcache reads "
                f"{SUPPORTED_FORMAT_VERSIONS}: upgrade kdcache or rebuild the cache"
            )
        if meta.get("mode") not in MODES:
            raise CacheError(
                f"shard {shard} uses storage mode {meta.get('mode')!r}, this kdcache knows "
                f"{', '.join(MODES)}: upgrade kdcache or rebuild the cache"
            )
        try:
            settings = ShardSettings.from_mapping(meta)
            return cls(
                mode=settings.mode,
                top_k=settings.top_k,
                vocab_size=settings.vocab_size,
                tail_samples=settings.tail_samples,
                observed_logprobs=settings.observed_logprobs,
                _metadata=meta,
            )
        except (KdcacheError, KeyError, ValueError) as error:
            raise CacheError(f"shard {shard} {_reason(error)}") from None

    @classmethod
    def from_manifest(cls, manifest: Mapping[str, Any]) -> BlockCodec:
        """The codec the manifest's settings describe (what every shard must match); CacheError
        for settings this kdcache cannot read."""
        settings = ShardSettings.from_mapping(manifest)
        try:
            return cls(
                settings.mode,
                settings.top_k,
                settings.vocab_size,
                tail_samples=settings.tail_samples,
                observed_logprobs=settings.observed_logprobs,
            )
        except KdcacheError as error:
            raise CacheError(f"the manifest's settings cannot be read: {error}") from None

    def check(self, record: SequenceRecord) -> None:
        """ConfigError when ``record`` does not fit these settings (the writer calls it)."""
        for group in self.groups:
            group.check(record)
        active = {type(group) for group in self.groups}
        stored = {name for group in self.groups for name in group.record_fields}
        for codec in CODECS.values():
            if codec not in active and any(
                getattr(record, name, None) is not None
                for name in codec.record_fields
                if name not in stored
            ):
                raise ConfigError(
                    f"record {record.sequence_id} has {codec.name.replace('_', ' ')} but the "
                    f"writer stores none; {codec.enable_hint}"
                )

    # ------------------------------------------------------------------ encode
    def encode(self, records: list[SequenceRecord]) -> pa.RecordBatch:
        """Encode whole sequences into one Arrow row (a block)."""
        pack = zstandard.ZstdCompressor(level=self.level, write_checksum=True).compress
        arrays = []
        for group in self.groups:
            for (_, value_type), value in zip(group.fields, group.encode(records), strict=True):
                if isinstance(value, bytes):
                    arrays.append(_binary_row(pack(value)))
                else:
                    arrays.append(_list_row(value, value_type.value_type))
        return pa.RecordBatch.from_arrays(arrays, schema=self.schema)

    # ------------------------------------------------------------------ decode
    def decode(self, batch: pa.RecordBatch, row: int = 0) -> list[SequenceRecord]:
        """Decode one block row back into records (vectorized; no per-position Python loop)."""
        columns = BlockColumns(batch, row, zstandard.ZstdDecompressor().decompress)
        arrays: dict[str, np.ndarray] = {}
        for group in self.groups:
            arrays.update(group.decode(columns))
        num_tokens, num_positions = arrays["num_tokens"], arrays["num_positions"]
        token_ends, row_ends = np.cumsum(num_tokens), np.cumsum(num_positions)
        per_row = [name for name in arrays if name not in (*SEQUENCE_FIELDS, *TOKEN_FIELDS)]
        lengths = {arrays[name].shape[0] for name in per_row}
        if lengths != {int(num_positions.sum())} or arrays["input_ids"].shape[0] != int(
            num_tokens.sum()
        ):
            raise ValueError("block column lengths disagree")
        records = []
        for index, sequence_id in enumerate(arrays["sequence_id"].tolist()):
            tokens = slice(token_ends[index] - num_tokens[index], token_ends[index])
            rows = slice(row_ends[index] - num_positions[index], row_ends[index])
            # copies: writable, and a record kept in a shuffle buffer does not pin its block
            values = {name: arrays[name][rows].copy() for name in per_row}
            values.update({name: arrays[name][tokens].copy() for name in TOKEN_FIELDS})
            records.append(SequenceRecord(sequence_id=int(sequence_id), **values))
        return records


def _reason(error: Exception) -> str:
    """A codec error as the end of a sentence that starts with ``shard <name>``."""
    if isinstance(error, KeyError):
        return f"has no {error} in its schema metadata: rebuild the cache"
    text = str(error)
    return text if text.startswith(("uses ", "has ")) else f"cannot be read: {text}"


def canonical_order(topk_ids: np.ndarray, topk_logprobs: np.ndarray) -> np.ndarray:
    """(M, k) permutation that puts each row in the reader's order: log-prob desc, ties by id asc.

    Use it to compare a written record with what the reader returns when log-probs tie.
    """
    by_id = np.argsort(topk_ids, axis=1, kind="stable")
    lp_by_id = np.take_along_axis(topk_logprobs, by_id, axis=1)
    by_lp = np.argsort(-lp_by_id, axis=1, kind="stable")
    return np.take_along_axis(by_id, by_lp, axis=1)


def stored_logprobs(topk_logprobs: np.ndarray, mode: str = "exact") -> np.ndarray:
    """(M, k) float32 log-probs as the ``exact`` reader returns them: fp16-rounded."""
    if mode != "exact":
        raise ConfigError("stored_logprobs reproduces the exact mode only")
    return topk_logprobs.astype(np.float16).astype(np.float32)


def synthetic_records(
    num_records: int,
    *,
    top_k: int,
    vocab_size: int,
    seed: int = 0,
    max_tokens: int = 64,
    chat_every: int = 3,
    pad_fraction: float = 0.3,
) -> list[SequenceRecord]:
    """Random but valid records for tests and benchmarks (not realistic distributions).

    Lengths vary in [1, max_tokens]; every ``chat_every``-th record stores only some positions
    (M < T, possibly 0); a ``pad_fraction`` of rows keeps fewer than ``top_k`` entries (padding
    convention: id 0, log-prob -inf at the end of the row). Rows are sorted by log-prob, descending.
    """
    rng = np.random.default_rng(seed)
    records = []
    for index in range(num_records):
        num_tokens = int(rng.integers(1, max_tokens + 1))
        if chat_every and index % chat_every == chat_every - 1:
            count = int(rng.integers(0, num_tokens + 1))
            positions = np.sort(rng.choice(num_tokens, count, replace=False))
        else:
            positions = np.arange(num_tokens)
        rows = positions.shape[0]
        scores = rng.random((rows, vocab_size)).argsort(axis=1)[:, :top_k] if rows else None
        ids = np.zeros((rows, top_k), np.int64) if scores is None else scores
        probs = (
            rng.dirichlet(np.full(top_k + 1, 0.3), size=rows) if rows else np.zeros((0, top_k + 1))
        )
        head = -np.sort(-probs[:, :top_k], axis=1)
        logprobs = np.log(np.maximum(head, 1e-30)).astype(np.float32)
        kept = np.where(rng.random(rows) < pad_fraction, rng.integers(1, top_k + 1, rows), top_k)
        pad = np.arange(top_k)[None, :] >= kept[:, None]
        ids = np.where(pad, 0, ids)
        logprobs = np.where(pad, -np.inf, logprobs).astype(np.float32)
        tail = np.clip(1.0 - np.exp(logprobs.astype(np.float64)).sum(axis=1), 0.0, 1.0)
        records.append(
            SequenceRecord(
                sequence_id=index,
                input_ids=rng.integers(0, vocab_size, num_tokens).astype(np.int32),
                topk_ids=ids.astype(np.int32),
                topk_logprobs=logprobs,
                tail_mass=tail.astype(np.float32),
                positions=positions.astype(np.int32),
            )
        )
    return records


def _binary_row(blob: bytes) -> pa.Array:
    """A one-element binary array, built from buffers (``pa.array`` would import pandas)."""
    offsets = pa.py_buffer(np.array([0, len(blob)], np.int32))
    return pa.Array.from_buffers(pa.binary(), 1, [None, offsets, pa.py_buffer(blob)])


def _list_row(values: np.ndarray, value_type: pa.DataType) -> pa.Array:
    """A one-element list<value_type> array holding ``values`` (built from buffers)."""
    child = pa.Array.from_buffers(value_type, len(values), [None, pa.py_buffer(values)])
    offsets = pa.py_buffer(np.array([0, len(values)], np.int32))
    return pa.Array.from_buffers(pa.list_(value_type), 1, [None, offsets], children=[child])

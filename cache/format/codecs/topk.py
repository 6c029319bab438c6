"""The ``topk`` column group: the teacher's top-k entries and its tail mass, per position.

Columns: ``k`` (stored entries per position: uint8, or uint16 LE if top_k > 255), ``topk_ids``
(byte planes of uint32 id deltas: each row's ids sorted ascending, the first absolute),
``topk_logprobs`` and ``tail_mass`` in the encoding the shard's ``mode`` names (``ENCODINGS``:
``exact`` in this module, ``compact`` in ``topk_compact.py``). Only valid entries are stored
(padding ``id 0, logprob -inf`` is dropped); the log-probs are in the same id order, so the
reader recovers the probability order by a stable sort on the log-prob, descending (*canonical
order*: log-prob descending, ties by ascending id). Present in every shard (a sampled cache has
top_k = 0: empty entry columns, tail mass 1).
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import pyarrow as pa

from kdcache.cache.errors import ConfigError
from kdcache.cache.format.codecs.base import (
    BlockColumns,
    ColumnCodec,
    ShardSettings,
    id_planes,
    planes,
    sorted_id_deltas,
    unplanes,
)
from kdcache.cache.records import SequenceRecord


class TopkEncoding:
    """How one ``mode`` stores the log-probs and the tail mass (the ids are common).

    A new top-k encoding is a subclass registered in ``ENCODINGS`` by its ``mode`` name.
    """

    mode: ClassVar[str]
    # how the shard's tail samples are stored (``codecs/__init__.py`` picks the group by it):
    # "repeated" (``tail_samples.py``: s ids per row) or "counts" (``tail_counts.py``: each
    # distinct id once with its multiplicity), and the bits of their log-probs (16: fp16, 8)
    sample_layout: ClassVar[str] = "repeated"
    sample_logprob_bits: ClassVar[int] = 16
    description: ClassVar[str] = ""  # one line for `kdcache inspect` / `build --estimate`

    def check_settings(self, settings: ShardSettings) -> None:
        """ConfigError (CacheError when read from a shard) for settings this encoding refuses."""

    def metadata(self) -> dict[str, str]:
        """Extra schema metadata of this encoding."""
        return {}

    def prepare(self, ids: np.ndarray, logprobs: np.ndarray, tail: np.ndarray):
        """(P, k) ids, (P, k) log-probs, (P,) tail mass as they will be stored (default: as is)."""
        return ids, logprobs, tail

    def encode_logprobs(self, counts: np.ndarray, flat_logprobs: np.ndarray) -> bytes:
        raise NotImplementedError

    def decode_logprobs(self, raw: bytes, counts: np.ndarray, num_entries: int):
        """Flat float32 log-probs (E,) and an integer order key (E,): ascending = less likely."""
        raise NotImplementedError

    def encode_tail(self, tail: np.ndarray) -> bytes:
        raise NotImplementedError

    def decode_tail(self, raw: bytes) -> np.ndarray:
        raise NotImplementedError


class ExactEncoding(TopkEncoding):
    """fp16 log-prob bit patterns (2 byte planes) and float32 tail mass (4 planes): bit-exact."""

    mode = "exact"
    description = "fp16 log-probs, float32 tail mass, tail samples repeated (fp16 log-probs)"

    def encode_logprobs(self, counts: np.ndarray, flat_logprobs: np.ndarray) -> bytes:
        return planes(flat_logprobs.astype(np.float16).view("<u2"), 2)

    def decode_logprobs(self, raw: bytes, counts: np.ndarray, num_entries: int):
        bits = unplanes(raw, 2, "<u2")
        # order key: ascending key = descending fp16 value (+0 and -0 tie)
        order_key = np.where(bits >= 0x8000, bits, 0x7FFF - bits.astype(np.int32))
        order_key[bits == 0x8000] = 0x7FFF
        return bits.view(np.float16).astype(np.float32), order_key

    def encode_tail(self, tail: np.ndarray) -> bytes:
        return planes(tail.astype("<f4").view("<u4"), 4)

    def decode_tail(self, raw: bytes) -> np.ndarray:
        return unplanes(raw, 4, "<u4").view("<f4")


# mode name -> encoding, filled by the encodings' modules (kdcache.cache.format.codecs imports them)
ENCODINGS: dict[str, TopkEncoding] = {"exact": ExactEncoding()}


class TopkCodec(ColumnCodec):
    """Top-k ids, log-probs and tail mass, in the encoding of the shard's ``mode``."""

    name = "topk"
    fields = (
        ("k", pa.binary()),
        ("topk_ids", pa.binary()),
        ("topk_logprobs", pa.binary()),
        ("tail_mass", pa.binary()),
    )
    record_fields = ("topk_ids", "topk_logprobs", "tail_mass")

    def __init__(self, encoding: TopkEncoding, top_k: int, vocab_size: int) -> None:
        self.encoding, self.top_k, self.vocab_size = encoding, top_k, vocab_size
        self.id_planes = id_planes(vocab_size)
        self.count_dtype = np.dtype(np.uint8 if top_k <= 255 else np.uint16)

    @classmethod
    def from_settings(cls, settings: ShardSettings) -> TopkCodec:
        encoding = ENCODINGS.get(settings.mode)
        problems = []
        if encoding is None:
            problems.append(f"mode {settings.mode!r} is not one of {', '.join(ENCODINGS)}")
        if settings.top_k < 0:
            problems.append(f"top_k must be >= 0, got {settings.top_k}")
        if settings.vocab_size < 1 or settings.top_k > settings.vocab_size:
            problems.append(f"vocab_size {settings.vocab_size} must be >= top_k {settings.top_k}")
        if problems:
            raise ConfigError("; ".join(problems))
        encoding.check_settings(settings)
        return cls(encoding, settings.top_k, settings.vocab_size)

    def metadata(self) -> dict[str, str]:
        return self.encoding.metadata()

    def settings(self) -> dict[str, Any]:
        return {"mode": self.encoding.mode, "top_k": self.top_k, "vocab_size": self.vocab_size}

    def check(self, record: SequenceRecord) -> None:
        m, k = record.topk_ids.shape if record.topk_ids.ndim == 2 else (-1, -1)
        if (
            k != self.top_k
            or record.topk_logprobs.shape != (m, k)
            or record.tail_mass.shape != (m,)
            or record.positions.shape != (m,)
        ):
            raise ConfigError(
                f"record {record.sequence_id}: expected topk arrays (M, {self.top_k}), "
                f"tail_mass and positions (M,), input_ids (T,); got "
                f"{record.topk_ids.shape}, {record.topk_logprobs.shape}, "
                f"{record.tail_mass.shape}, {record.positions.shape}, {record.input_ids.shape}"
            )
        if record.topk_ids.size and (
            record.topk_ids.min() < 0 or record.topk_ids.max() >= self.vocab_size
        ):
            raise ConfigError(
                f"record {record.sequence_id}: top-k ids must lie in [0, {self.vocab_size})"
            )
        if np.isnan(record.topk_logprobs).any() or np.isnan(record.tail_mass).any():
            raise ConfigError(
                f"record {record.sequence_id}: log-probs and tail mass must not be NaN"
            )
        if k > 1 and m and np.any(record.topk_logprobs[:, 1:] > record.topk_logprobs[:, :-1]):
            raise ConfigError(
                f"record {record.sequence_id}: top-k rows must be sorted by log-prob, descending "
                "(absent entries last as id 0, log-prob -inf)"
            )

    def encode(self, records: list[SequenceRecord]) -> list[bytes | np.ndarray]:
        ids = np.concatenate([r.topk_ids for r in records])  # (P, k)
        logprobs = np.concatenate([r.topk_logprobs for r in records]).astype(np.float32)
        tail = np.concatenate([r.tail_mass for r in records]).astype(np.float32)  # (P,)
        ids, logprobs, tail = self.encoding.prepare(ids, logprobs, tail)
        counts, flat_ids, flat_lp = _to_id_order(ids, logprobs)
        deltas = sorted_id_deltas(flat_ids, counts)
        return [
            counts.astype(self.count_dtype).tobytes(),
            planes(deltas.astype("<u4"), self.id_planes),
            self.encoding.encode_logprobs(counts, flat_lp),
            self.encoding.encode_tail(tail),
        ]

    def decode(self, columns: BlockColumns) -> dict[str, np.ndarray]:
        counts = np.frombuffer(columns.payload("k"), self.count_dtype)
        num_rows, num_entries = counts.shape[0], int(counts.sum(dtype=np.int64))
        deltas = unplanes(columns.payload("topk_ids"), self.id_planes, "<u4")
        if deltas.shape[0] != num_entries:
            raise ValueError("block column lengths disagree")
        # ids: per-row cumulative sum of the deltas (first delta of a row is absolute)
        running = np.cumsum(deltas, dtype=np.int64)
        row_of = np.repeat(np.arange(num_rows), counts)
        starts = np.cumsum(counts, dtype=np.int64) - counts
        nonempty = counts > 0
        base = np.zeros(num_rows, np.int64)
        base[nonempty] = running[starts[nonempty]] - deltas[starts[nonempty]]
        flat_ids = (running - base[row_of]).astype(np.int32)
        raw_lp = columns.payload("topk_logprobs")
        flat_lp, order_key = self.encoding.decode_logprobs(raw_lp, counts, num_entries)
        tail = self.encoding.decode_tail(columns.payload("tail_mass"))

        # each row sorted by (key, column in id order): log-prob descending, ties by id ascending
        column_of = np.arange(num_entries, dtype=np.int64) - starts[row_of]
        entry_keys = (order_key.astype(np.uint32) << 16) | column_of.astype(np.uint32)
        if num_entries == num_rows * self.top_k:  # no padding: rows are already dense
            keys = entry_keys.reshape(num_rows, self.top_k)
        else:
            keys = np.full((num_rows, self.top_k), 0xFFFFFFFF, np.uint32)  # padding sorts last
            keys[row_of, column_of] = entry_keys
        keys.sort(axis=1)
        valid = keys != 0xFFFFFFFF
        source = np.where(valid, starts[:, None] + (keys & 0xFFFF), 0)
        if num_entries:
            dense_ids = np.where(valid, flat_ids[source], 0).astype(np.int32)
            dense_lp = np.where(valid, flat_lp[source], -np.inf).astype(np.float32)
        else:
            dense_ids = np.zeros((num_rows, self.top_k), np.int32)
            dense_lp = np.full((num_rows, self.top_k), -np.inf, np.float32)
        return {"topk_ids": dense_ids, "topk_logprobs": dense_lp, "tail_mass": tail}


def _to_id_order(ids: np.ndarray, logprobs: np.ndarray):
    """Valid entries of each row sorted by id: counts (P,), flat ids (E,), flat log-probs (E,)."""
    valid = logprobs.astype(np.float16) > -np.inf  # -inf (also after fp16 rounding) = absent
    columns = np.arange(ids.shape[1], dtype=np.int64)
    keys = np.where(valid, ids.astype(np.int64) << 16, np.int64(1) << 62) | columns  # (P, k)
    keys.sort(axis=1)  # by id, then by original column (a stable order, duplicates included)
    order = keys & 0xFFFF
    kept = keys < (np.int64(1) << 62)
    flat_ids = (keys[kept] >> 16).astype(np.int64)
    flat_lp = np.take_along_axis(logprobs, order, axis=1)[kept]
    return kept.sum(axis=1), flat_ids, flat_lp

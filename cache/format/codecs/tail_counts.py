"""The ``tail_counts`` column group: the tail samples stored once per distinct id, with counts.

Used instead of ``tail_samples`` when the shard's encoding (``mode``) has ``sample_layout =
"counts"`` (``unique``, ``q8``). A teacher that is sure of a position draws the same id again
and again: s draws of one id cost one entry here, so the bytes follow the teacher's entropy.
Columns (per block; P rows, U distinct entries in all):

* ``tail_unique``: uint8 per row, its number of distinct (id, log-prob) entries (0: no draw);
* ``tail_unique_ids``: byte planes of uint32 id deltas, each row's ids ascending, first absolute;
* ``tail_counts``: uint8 per entry, how many of the row's s draws it stands for;
* ``tail_unique_logprobs``: per entry, fp16 bits (2 byte planes; ``sample_logprob_bits`` 16) or
  a uint8 ``round(-log p / SAMPLE_Q8_STEP)`` (8; at most 254: log p >= -31.75 nats).

The schema metadata holds ``tail_samples`` = s, as for ``tail_samples``. The reader returns the
same ``SequenceRecord.tail_ids`` / ``tail_logprobs`` (M, s) as that group: each entry repeated by
its count, ids ascending, then ``(0, -inf)`` for absent draws; so the trainer's estimators, which
average over the s draws, are exactly those over the repeated ids.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from kdcache.cache.format.codecs.base import (
    BlockColumns,
    ColumnCodec,
    ShardSettings,
    id_planes,
    planes,
    sorted_id_deltas,
    unplanes,
)
from kdcache.cache.format.codecs.tail_samples import TailSamplesCodec
from kdcache.cache.format.codecs.topk import ENCODINGS
from kdcache.cache.records import SequenceRecord

__all__ = ["SAMPLE_Q8_STEP", "TailCountsCodec", "quantize_sample_logprobs", "unique_with_counts"]

SAMPLE_Q8_STEP = 1.0 / 8.0  # nats per level of an 8-bit sample log-prob
_ABSENT = np.int64(1) << 62  # sort key of an absent draw: after every present one


def quantize_sample_logprobs(logprobs: np.ndarray, bits: int) -> np.ndarray:
    """The integer code of each (finite) sample log-prob: fp16 bits (16) or the uint8 level (8)."""
    if bits == 16:
        return logprobs.astype(np.float16).view(np.uint16).astype(np.int64)
    return np.clip(np.rint(-logprobs.astype(np.float64) / SAMPLE_Q8_STEP), 0, 254).astype(np.int64)


def dequantize_sample_logprobs(codes: np.ndarray, bits: int) -> np.ndarray:
    """float32 log-probs of ``quantize_sample_logprobs`` codes."""
    if bits == 16:
        return codes.astype(np.uint16).view(np.float16).astype(np.float32)
    return (-codes.astype(np.float32) * np.float32(SAMPLE_Q8_STEP)).astype(np.float32)


def unique_with_counts(
    ids: np.ndarray, codes: np.ndarray, present: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Each row's distinct (id, code) pairs, ascending, with their multiplicity.

    ``ids``, ``codes`` (P, s) int64, ``present`` (P, s) bool. Returns ``per_row`` (P,) distinct
    entries per row, then flat (U,) ``ids``, ``codes``, ``counts`` in row order.
    """
    keys = np.where(present, (ids << 16) | codes, _ABSENT)  # (P, s); codes < 2^16
    keys.sort(axis=1)
    valid = keys != _ABSENT
    first = valid.copy()
    first[:, 1:] &= keys[:, 1:] != keys[:, :-1]
    entry = np.cumsum(first.reshape(-1)) - 1  # (P * s,) entry index of each draw
    counts = np.bincount(entry[valid.reshape(-1)], minlength=int(first.sum()))
    unique = keys[first]
    return first.sum(axis=1), unique >> 16, unique & 0xFFFF, counts


class TailCountsCodec(ColumnCodec):
    """s tail draws per position as distinct ids with counts (and their log-probs)."""

    name = "tail_counts"
    fields = (
        ("tail_unique", pa.binary()),
        ("tail_unique_ids", pa.binary()),
        ("tail_counts", pa.binary()),
        ("tail_unique_logprobs", pa.binary()),
    )
    record_fields = ("tail_ids", "tail_logprobs")
    enable_hint = TailSamplesCodec.enable_hint

    def __init__(self, tail_samples: int, vocab_size: int, logprob_bits: int) -> None:
        self.tail_samples, self.vocab_size = tail_samples, vocab_size
        self.logprob_bits = logprob_bits
        self.id_planes = id_planes(vocab_size)
        self._check = TailSamplesCodec(tail_samples, vocab_size).check  # the same conventions

    @classmethod
    def from_settings(cls, settings: ShardSettings) -> TailCountsCodec | None:
        encoding = ENCODINGS.get(settings.mode)
        if encoding is None or encoding.sample_layout != "counts":
            return None
        # the range check of s is TailSamplesCodec's (it also runs for these settings)
        TailSamplesCodec.from_settings(ShardSettings("exact", 0, 1, settings.tail_samples))
        if settings.tail_samples == 0:
            return None
        return cls(settings.tail_samples, settings.vocab_size, encoding.sample_logprob_bits)

    def metadata(self) -> dict[str, str]:
        return {"tail_samples": str(self.tail_samples)}

    def settings(self) -> dict[str, Any]:
        return {"tail_samples": self.tail_samples}

    def check(self, record: SequenceRecord) -> None:
        self._check(record)

    def encode(self, records: list[SequenceRecord]) -> list[bytes | np.ndarray]:
        ids = np.concatenate([r.tail_ids for r in records]).astype(np.int64)  # (P, s)
        logprobs = np.concatenate([r.tail_logprobs for r in records]).astype(np.float32)
        present = logprobs.astype(np.float16) > -np.inf  # as the repeated group keeps them
        codes = quantize_sample_logprobs(np.where(present, logprobs, 0.0), self.logprob_bits)
        per_row, unique_ids, unique_codes, counts = unique_with_counts(ids, codes, present)
        deltas = sorted_id_deltas(unique_ids, per_row)
        if self.logprob_bits == 16:
            logprob_blob = planes(unique_codes.astype("<u2"), 2)
        else:
            logprob_blob = unique_codes.astype(np.uint8).tobytes()
        return [
            per_row.astype(np.uint8).tobytes(),
            planes(deltas.astype("<u4"), self.id_planes),
            counts.astype(np.uint8).tobytes(),
            logprob_blob,
        ]

    def decode(self, columns: BlockColumns) -> dict[str, np.ndarray]:
        per_row = np.frombuffer(columns.payload("tail_unique"), np.uint8).astype(np.int64)
        deltas = unplanes(columns.payload("tail_unique_ids"), self.id_planes, "<u4")
        counts = np.frombuffer(columns.payload("tail_counts"), np.uint8).astype(np.int64)
        raw = columns.payload("tail_unique_logprobs")
        wide = self.logprob_bits == 16
        codes = unplanes(raw, 2, "<u2") if wide else np.frombuffer(raw, np.uint8)
        num_rows, num_entries = per_row.shape[0], int(per_row.sum())
        if (
            deltas.shape[0] != num_entries
            or counts.shape[0] != num_entries
            or codes.shape[0] != (num_entries)
        ):
            raise ValueError("tail count columns disagree with the block's rows")
        row_of = np.repeat(np.arange(num_rows), per_row)  # (U,)
        draws = np.bincount(row_of, weights=counts, minlength=num_rows).astype(np.int64)  # (P,)
        if num_rows and int(draws.max(initial=0)) > self.tail_samples:
            raise ValueError("a row of the tail count columns holds more than s draws")
        # ids: per-row cumulative sums of the deltas (the first delta of a row is absolute)
        running = np.cumsum(deltas, dtype=np.int64)
        starts = np.cumsum(per_row) - per_row
        base = np.zeros(num_rows, np.int64)
        nonempty = per_row > 0
        base[nonempty] = running[starts[nonempty]] - deltas[starts[nonempty]]
        unique_ids = running - base[row_of]
        logprobs = dequantize_sample_logprobs(codes, self.logprob_bits)
        # repeat each entry by its count, at the start of its row; absent draws after them
        column = np.arange(int(counts.sum())) - np.repeat(np.cumsum(draws) - draws, draws)
        row = np.repeat(np.arange(num_rows), draws)
        tail_ids = np.zeros((num_rows, self.tail_samples), np.int32)
        tail_logprobs = np.full((num_rows, self.tail_samples), -np.inf, np.float32)
        tail_ids[row, column] = np.repeat(unique_ids, counts)
        tail_logprobs[row, column] = np.repeat(logprobs, counts)
        return {"tail_ids": tail_ids, "tail_logprobs": tail_logprobs}

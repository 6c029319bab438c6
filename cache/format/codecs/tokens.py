"""The ``tokens`` column group: which sequences a block holds, their input ids and positions.

Present in every shard. Columns: ``sequence_id``, ``num_tokens``, ``num_positions`` (list
columns, one value per sequence), ``input_ids`` (int32 LE of all tokens) and ``positions``
(int32 LE deltas per sequence: first = position + 1, then differences; all ones for text).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from kdcache.cache.errors import ConfigError
from kdcache.cache.format.codecs.base import BlockColumns, ColumnCodec, ShardSettings
from kdcache.cache.records import SequenceRecord


class TokensCodec(ColumnCodec):
    """Sequence ids, lengths, input ids and stored positions (every storage mode)."""

    name = "tokens"
    fields = (
        ("sequence_id", pa.list_(pa.int64())),
        ("num_tokens", pa.list_(pa.int32())),
        ("num_positions", pa.list_(pa.int32())),
        ("input_ids", pa.binary()),
        ("positions", pa.binary()),
    )
    record_fields = ("sequence_id", "num_tokens", "num_positions", "input_ids", "positions")

    @classmethod
    def from_settings(cls, settings: ShardSettings) -> TokensCodec:
        return cls()

    def check(self, record: SequenceRecord) -> None:
        m = record.positions.shape[0] if record.positions.ndim == 1 else -1
        if record.input_ids.ndim != 1 or m < 0:
            raise ConfigError(
                f"record {record.sequence_id}: expected input_ids (T,) and positions (M,); got "
                f"{record.input_ids.shape}, {record.positions.shape}"
            )
        if m and (
            record.positions[0] < 0
            or record.positions[-1] >= record.num_tokens
            or (m > 1 and np.any(np.diff(record.positions) <= 0))
        ):
            raise ConfigError(
                f"record {record.sequence_id}: positions must increase strictly within [0, T)"
            )

    def encode(self, records: list[SequenceRecord]) -> list[bytes | np.ndarray]:
        input_ids = np.concatenate([r.input_ids for r in records]).astype("<i4", copy=False)
        position_deltas = np.concatenate(
            [np.diff(r.positions.astype(np.int64), prepend=-1) for r in records]
        ).astype("<i4")
        return [
            np.array([r.sequence_id for r in records], np.int64),
            np.array([r.num_tokens for r in records], np.int32),
            np.array([r.num_positions for r in records], np.int32),
            input_ids.tobytes(),
            position_deltas.tobytes(),
        ]

    def decode(self, columns: BlockColumns) -> dict[str, np.ndarray]:
        num_positions = columns.values("num_positions", np.int32).astype(np.int64)
        position_deltas = np.frombuffer(columns.payload("positions"), "<i4")
        if position_deltas.shape[0] != num_positions.sum():
            raise ValueError("block column lengths disagree")
        return {
            "sequence_id": columns.values("sequence_id", np.int64),
            "num_tokens": columns.values("num_tokens", np.int32).astype(np.int64),
            "num_positions": num_positions,
            "input_ids": np.frombuffer(columns.payload("input_ids"), "<i4"),
            "positions": _per_sequence_cumsum(position_deltas, num_positions),
        }


def _per_sequence_cumsum(deltas: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Cumulative sum restarting at every sequence (first delta is relative to -1)."""
    running = np.cumsum(deltas, dtype=np.int64)
    previous_end = np.cumsum(lengths) - lengths
    offsets = np.zeros(lengths.shape[0], np.int64)
    has_previous = previous_end > 0
    offsets[has_previous] = running[previous_end[has_previous] - 1]
    return (running - np.repeat(offsets, lengths) - 1).astype(np.int32)

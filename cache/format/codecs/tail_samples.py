"""The ``tail_samples`` column group: s token ids drawn per position, and their log-probs.

Present when the shard settings have ``tail_samples`` = s > 0 (top-k + tail samples, or a sampled
cache with top_k = 0); the schema metadata then holds ``tail_samples`` = s. Columns: ``tail_ids``
(byte planes of uint32 deltas: each row's s ids sorted ascending, the first absolute) and
``tail_logprobs`` (2 byte planes of the fp16 bits of their full-distribution log-probs, in the
same order). Every row has exactly s entries; an absent sample is ``(id 0, logprob -inf)``. How
the samples are drawn is in ``cache/extraction/tail_sampling.py``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from kdcache.cache.errors import ConfigError
from kdcache.cache.format.codecs.base import (
    BlockColumns,
    ColumnCodec,
    ShardSettings,
    id_planes,
    planes,
    unplanes,
)
from kdcache.cache.format.codecs.topk import ENCODINGS
from kdcache.cache.records import SequenceRecord

MAX_TAIL_SAMPLES = 255


class TailSamplesCodec(ColumnCodec):
    """s sampled ids per position with their teacher log-probs."""

    name = "tail_samples"
    fields = (("tail_ids", pa.binary()), ("tail_logprobs", pa.binary()))
    record_fields = ("tail_ids", "tail_logprobs")
    enable_hint = "open the ShardWriter with tail_samples=s"

    def __init__(self, tail_samples: int, vocab_size: int) -> None:
        self.tail_samples, self.vocab_size = tail_samples, vocab_size
        self.id_planes = id_planes(vocab_size)

    @classmethod
    def from_settings(cls, settings: ShardSettings) -> TailSamplesCodec | None:
        if not 0 <= settings.tail_samples <= MAX_TAIL_SAMPLES:
            raise ConfigError(
                f"tail_samples must be in [0, {MAX_TAIL_SAMPLES}], got {settings.tail_samples}"
            )
        if settings.tail_samples == 0:
            return None
        encoding = ENCODINGS.get(settings.mode)
        if encoding is not None and encoding.sample_layout != "repeated":
            return None  # stored by another group (``tail_counts.py``)
        return cls(settings.tail_samples, settings.vocab_size)

    def metadata(self) -> dict[str, str]:
        return {"tail_samples": str(self.tail_samples)}

    def settings(self) -> dict[str, Any]:
        return {"tail_samples": self.tail_samples}

    def check(self, record: SequenceRecord) -> None:
        s, m = self.tail_samples, record.positions.shape[0]
        ids, logprobs = record.tail_ids, record.tail_logprobs
        if ids is None or logprobs is None or ids.shape != (m, s) or logprobs.shape != (m, s):
            raise ConfigError(
                f"record {record.sequence_id}: expected tail_ids and tail_logprobs (M, {s}), got "
                f"{None if ids is None else ids.shape}, "
                f"{None if logprobs is None else logprobs.shape}"
            )
        if m and (ids.min() < 0 or ids.max() >= self.vocab_size or np.isnan(logprobs).any()):
            raise ConfigError(
                f"record {record.sequence_id}: tail ids must lie in [0, {self.vocab_size}) "
                "and their log-probs must not be NaN"
            )

    def encode(self, records: list[SequenceRecord]) -> list[bytes | np.ndarray]:
        """Samples of every row sorted by id, delta-coded (first absolute); fp16 log-probs."""
        ids = np.concatenate([r.tail_ids for r in records]).astype(np.int64)  # (P, s)
        logprobs = np.concatenate([r.tail_logprobs for r in records]).astype(np.float32)
        order = np.argsort(ids, axis=1, kind="stable")
        ids = np.take_along_axis(ids, order, axis=1)
        logprobs = np.take_along_axis(logprobs, order, axis=1)
        deltas = np.diff(ids, axis=1, prepend=0).reshape(-1)  # row starts stay absolute
        return [
            planes(deltas.astype("<u4"), self.id_planes),
            planes(logprobs.reshape(-1).astype(np.float16).view("<u2"), 2),
        ]

    def decode(self, columns: BlockColumns) -> dict[str, np.ndarray]:
        deltas = unplanes(columns.payload("tail_ids"), self.id_planes, "<u4").astype(np.int64)
        bits = unplanes(columns.payload("tail_logprobs"), 2, "<u2")
        if deltas.shape[0] % self.tail_samples or bits.shape[0] != deltas.shape[0]:
            raise ValueError("tail sample columns disagree with the block's rows")
        shape = (-1, self.tail_samples)
        ids = np.cumsum(deltas.reshape(shape), axis=1).astype(np.int32)
        return {
            "tail_ids": ids,
            "tail_logprobs": bits.view(np.float16).astype(np.float32).reshape(shape),
        }

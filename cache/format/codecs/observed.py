"""The ``observed`` column group: the teacher's log-probability of the token that follows.

Present when the shard settings have ``observed_logprobs`` (the build default since format
version 2; schema metadata ``observed_logprobs`` = ``1``). One column, ``observed_logprobs``: per
stored position, ``log p_teacher(next token)`` at the cache temperature, computed in float32 from
the full distribution, stored as the 2 byte planes of its fp16 bits (zstd-compressed like every
blob). A stored position whose next token is not in the sequence (the last one) holds NaN.

Cross-tokenizer chunk-likelihood distillation (``--xtok-loss alm``) needs it: it is the
teacher's likelihood of the text itself, which the top-k holds only when the observed token is
in the top-k. ``kdcache inspect`` reads the teacher's own held-out perplexity from it.
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
    planes,
    unplanes,
)
from kdcache.cache.records import SequenceRecord


class ObservedCodec(ColumnCodec):
    """log p_teacher of the observed next token per stored position (fp16; NaN: none)."""

    name = "observed"
    fields = (("observed_logprobs", pa.binary()),)
    record_fields = ("observed_logprobs",)
    enable_hint = "open the ShardWriter with observed_logprobs=True"

    @classmethod
    def from_settings(cls, settings: ShardSettings) -> ObservedCodec | None:
        return cls() if settings.observed_logprobs else None

    def metadata(self) -> dict[str, str]:
        return {"observed_logprobs": "1"}

    def settings(self) -> dict[str, Any]:
        return {"observed_logprobs": True}

    def check(self, record: SequenceRecord) -> None:
        values, m = record.observed_logprobs, record.positions.shape[0]
        if values is None or values.shape != (m,):
            raise ConfigError(
                f"record {record.sequence_id}: expected observed_logprobs ({m},), got "
                f"{None if values is None else values.shape}"
            )
        if m and np.nanmax(np.append(values, -np.inf)) > 1e-3:
            raise ConfigError(
                f"record {record.sequence_id}: observed_logprobs are log-probabilities (<= 0)"
            )

    def encode(self, records: list[SequenceRecord]) -> list[bytes | np.ndarray]:
        values = np.concatenate([r.observed_logprobs for r in records]).astype(np.float16)
        return [planes(values.view("<u2"), 2)]

    def decode(self, columns: BlockColumns) -> dict[str, np.ndarray]:
        bits = unplanes(columns.payload("observed_logprobs"), 2, "<u2")
        return {"observed_logprobs": bits.view(np.float16).astype(np.float32)}

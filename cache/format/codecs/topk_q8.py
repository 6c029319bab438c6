"""The ``q8`` encoding: 8-bit log-domain top-k log-probs, fp16 tail mass, samples with counts.

Top-k: nothing is dropped (unlike ``compact``, so tail samples stay unbiased); each non-empty
row stores its top-1 log-prob as fp16 (2 byte planes), then one uint8 level per entry on the
``compact`` level table (``topk_compact.COMPACT_LEVELS``: steps of 1/16 nat near the top-1,
growing by 6% of the distance further down, to 24 nats): log p_i = fp16(log p_top1) - L[level].
The error of an entry is at most half its step, and an entry's share of the KL is about
p_i * error^2, so the coarse steps fall on small p_i. Tail mass: fp16 (2 byte planes).

Tail samples go to the ``tail_counts`` group (``tail_counts.py``) with 8-bit log-probs: each
distinct sampled id once, its multiplicity, and round(-log p / SAMPLE_Q8_STEP) as uint8. The
sample log-probs only enter the loss *value* (the gradient of the sample estimator is
q - counts / s on the sampled ids), so the quantization moves no gradient.
"""

from __future__ import annotations

import numpy as np

from kdcache.cache.errors import CacheError
from kdcache.cache.format.codecs.base import ShardSettings
from kdcache.cache.format.codecs.topk import ENCODINGS
from kdcache.cache.format.codecs.topk_compact import COMPACT_SCHEME, CompactEncoding


class Q8Encoding(CompactEncoding):
    """uint8 levels below the fp16 top-1 (nothing dropped); fp16 tail; samples with counts."""

    mode = "q8"
    sample_layout = "counts"
    sample_logprob_bits = 8
    description = (
        "8-bit log-prob levels below the fp16 top-1, fp16 tail mass, tail samples as distinct "
        "ids + counts (8-bit log-probs)"
    )

    def check_settings(self, settings: ShardSettings) -> None:
        if settings.metadata is not None and settings.metadata.get("levels") != COMPACT_SCHEME:
            raise CacheError(
                f"uses q8 levels {settings.metadata.get('levels')!r}, this kdcache reads "
                f"{COMPACT_SCHEME!r}: rebuild the cache with this version"
            )

    def metadata(self) -> dict[str, str]:
        return {"levels": COMPACT_SCHEME}

    def prepare(self, ids: np.ndarray, logprobs: np.ndarray, tail: np.ndarray):
        """Everything is kept (the tail mass the samples were drawn from stays the tail mass)."""
        return ids, logprobs, tail


ENCODINGS[Q8Encoding.mode] = Q8Encoding()

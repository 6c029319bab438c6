"""The ``compact`` top-k encoding: quantized log-probs, fp16 tail mass, improbable entries dropped.

Per row, entries past a cumulative probability of ``COMPACT_KEEP_MASS`` are dropped and their mass
joins the tail (the top-1 always stays). The log-prob blob is the top-1 log-prob of every
non-empty row as fp16 (2 byte planes), then one uint8 level per entry: log p_i = log p_top1 -
COMPACT_LEVELS[level]. The levels start in steps of COMPACT_STEP nats and then grow geometrically
(each step COMPACT_GROWTH times the distance so far) up to COMPACT_MAX_BELOW nats: an entry's KL
share is about p_i * error^2, so entries far below the top-1 (small p_i) can take coarser steps.
Measured on the demo teacher at k = 64: 84.7 B/token and mean KL 3.6e-4 nats, against 100.4 and
5.8e-5 for uniform 1/16-nat steps. Tail mass: 2 byte planes of fp16 bits.

Dropping moves mass into the tail *after* the teacher pass drew any tail samples from it, so
their importance weights would use the wrong p_tail: compact refuses top-k + tail samples
(``compact_tail_samples_problem``). A sampled cache (top_k = 0) drops nothing and is allowed.
"""

from __future__ import annotations

import numpy as np

from kdcache.cache.errors import CacheError, ConfigError
from kdcache.cache.format.codecs.base import ShardSettings, planes, unplanes
from kdcache.cache.format.codecs.topk import ENCODINGS, TopkEncoding

COMPACT_STEP = 1.0 / 16.0
COMPACT_GROWTH = 0.06
COMPACT_MAX_BELOW = 24.0
COMPACT_SCHEME = f"geometric:{COMPACT_STEP!r}:{COMPACT_GROWTH!r}:{COMPACT_MAX_BELOW!r}"
# entries past this cumulative probability (of the whole distribution) are dropped
COMPACT_KEEP_MASS = 0.9999


def _compact_levels() -> np.ndarray:
    """The level table: level q -> nats below the top-1, float32 (L,) ascending, L <= 256.

    Built in Python floats (IEEE double, the same on every platform), then cast once.
    """
    levels = [0.0]
    while levels[-1] < COMPACT_MAX_BELOW and len(levels) < 256:
        levels.append(levels[-1] + max(COMPACT_STEP, COMPACT_GROWTH * levels[-1]))
    return np.asarray(levels, dtype=np.float32)


COMPACT_LEVELS = _compact_levels()


def compact_tail_samples_problem(mode: str, top_k: int, tail_samples: int) -> str | None:
    """Why ``mode`` cannot store these settings (compact + top-k + tail samples), else None."""
    if mode != CompactEncoding.mode or not (top_k and tail_samples):
        return None
    return (
        f"--mode compact cannot store tail samples (top-k {top_k} + {tail_samples} samples): "
        "it moves dropped top-k mass into the tail after the samples were drawn, which would "
        "bias their importance weights; use --mode exact, or --tail-samples 0 for a compact "
        "top-k cache"
    )


class CompactEncoding(TopkEncoding):
    """uint8 levels on the geometric table below the fp16 top-1; fp16 tail mass."""

    mode = "compact"
    description = "8-bit log-prob levels, fp16 tail mass, entries past 0.9999 mass dropped"

    def check_settings(self, settings: ShardSettings) -> None:
        reading = settings.metadata is not None
        problem = compact_tail_samples_problem(self.mode, settings.top_k, settings.tail_samples)
        if problem:
            raise (CacheError if reading else ConfigError)(problem)
        if reading and settings.metadata.get("compact_scheme") != COMPACT_SCHEME:
            raise CacheError(
                f"uses compact scheme {settings.metadata.get('compact_scheme')!r}, this kdcache "
                f"reads {COMPACT_SCHEME!r}: rebuild the cache with this version"
            )

    def metadata(self) -> dict[str, str]:
        return {"compact_scheme": COMPACT_SCHEME}

    def prepare(self, ids: np.ndarray, logprobs: np.ndarray, tail: np.ndarray):
        """Drop entries past cumulative mass COMPACT_KEEP_MASS; their mass joins the tail."""
        probs = np.exp(logprobs.astype(np.float64))  # (P, k), rows sorted descending
        before = np.cumsum(probs, axis=1) - probs  # mass strictly before each entry
        drop = before >= COMPACT_KEEP_MASS
        drop[:, :1] = False  # the top-1 always stays (a sampled cache, k = 0, has no entries)
        if not drop.any():
            return ids, logprobs, tail
        tail = (tail.astype(np.float64) + np.where(drop, probs, 0.0).sum(axis=1)).astype(np.float32)
        return np.where(drop, 0, ids), np.where(drop, -np.inf, logprobs).astype(np.float32), tail

    def encode_logprobs(self, counts: np.ndarray, flat_logprobs: np.ndarray) -> bytes:
        """The top-1 log-prob of each non-empty row as fp16 (2 planes), then each entry's level."""
        nonempty = counts > 0
        starts = (np.cumsum(counts) - counts)[nonempty]
        top16 = (
            np.maximum.reduceat(flat_logprobs, starts).astype(np.float16)
            if starts.size
            else np.zeros(0, np.float16)
        )
        top_of_row = np.zeros(counts.shape[0], np.float32)
        top_of_row[nonempty] = top16.astype(np.float32)
        below = np.repeat(top_of_row, counts) - flat_logprobs  # (E,) nats below the top-1, >= 0
        midpoints = (COMPACT_LEVELS[1:] + COMPACT_LEVELS[:-1]) / 2
        levels = np.searchsorted(midpoints, below.astype(np.float32)).astype(np.uint8)  # nearest
        return planes(top16.view("<u2"), 2) + levels.tobytes()

    def decode_logprobs(self, raw: bytes, counts: np.ndarray, num_entries: int):
        """Flat float32 log-probs and their order key (the uint8 level: larger = less likely)."""
        nonempty = np.flatnonzero(counts > 0)
        split = 2 * nonempty.shape[0]
        top = unplanes(raw[:split], 2, "<u2").view(np.float16).astype(np.float32)
        levels = np.frombuffer(raw[split:], np.uint8)
        if levels.shape[0] != num_entries:
            raise ValueError("compact log-prob blob has the wrong length")
        if levels.size and int(levels.max()) >= COMPACT_LEVELS.shape[0]:
            raise ValueError("compact log-prob blob has a level outside the table")
        top_of_row = np.zeros(counts.shape[0], np.float32)
        top_of_row[nonempty] = top
        logprobs = np.repeat(top_of_row, counts) - COMPACT_LEVELS[levels]
        return logprobs.astype(np.float32), levels

    def encode_tail(self, tail: np.ndarray) -> bytes:
        return planes(tail.astype(np.float16).view("<u2"), 2)

    def decode_tail(self, raw: bytes) -> np.ndarray:
        return unplanes(raw, 2, "<u2").view(np.float16).astype(np.float32)


ENCODINGS[CompactEncoding.mode] = CompactEncoding()

"""How far a stored cache is from the teacher it was built from: the encodings' distortion.

``storage_distortion`` compares the records a teacher pass produced (float32) with what an
encoding gives back after a round trip through ``BlockCodec``: per position the KL divergence
KL(exact || stored) between the two top-k + tail-bucket distributions (each renormalized to sum
to one, as the trainer uses them; a top-k entry the encoding dropped joins the bucket on both
sides), and the largest error of a stored tail-sample log-prob. ``distinct_samples`` counts the
distinct ids among each position's tail draws (what the ``tail_counts`` group stores).
"""

from __future__ import annotations

import numpy as np

from kdcache.cache.records import SequenceRecord

__all__ = ["distinct_samples", "round_trip", "storage_distortion"]


def round_trip(records: list[SequenceRecord], mode: str, top_k: int, vocab_size: int,
               tail_samples: int = 0) -> list[SequenceRecord]:  # fmt: skip
    """``records`` as a shard of encoding ``mode`` returns them (one block, encoded and decoded)."""
    from kdcache.cache.format.blocks import BlockCodec

    codec = BlockCodec(mode, top_k, vocab_size, tail_samples=tail_samples)
    return codec.decode(codec.encode(records))


def position_kl(exact: SequenceRecord, stored: SequenceRecord) -> np.ndarray:
    """(M,) KL(exact || stored) in nats over each position's top-k entries + tail bucket."""
    rows = exact.topk_ids.shape[0]
    if rows == 0:
        return np.zeros(0)
    p = np.exp(exact.topk_logprobs.astype(np.float64))  # (M, k), 0 for padding
    big = np.int64(max(int(exact.topk_ids.max(initial=0)), int(stored.topk_ids.max(initial=0))) + 1)
    row = np.arange(rows, dtype=np.int64)[:, None]
    stored_valid = np.isfinite(stored.topk_logprobs)
    stored_keys = (row * big + stored.topk_ids)[stored_valid]
    order = np.argsort(stored_keys)
    stored_keys, stored_lp = stored_keys[order], stored.topk_logprobs[stored_valid][order]
    keys = row * big + exact.topk_ids  # (M, k)
    at = np.clip(np.searchsorted(stored_keys, keys), 0, max(len(stored_keys) - 1, 0))
    found = np.isfinite(exact.topk_logprobs) & (len(stored_keys) > 0)
    if len(stored_keys):
        found &= stored_keys[at] == keys
    q = np.where(found, np.exp(stored_lp[at].astype(np.float64)) if len(stored_keys) else 0.0, 0.0)
    p_bucket = exact.tail_mass.astype(np.float64) + np.where(found, 0.0, p).sum(axis=1)
    q_bucket = stored.tail_mass.astype(np.float64)
    p_found = np.where(found, p, 0.0)
    p_total = p_found.sum(axis=1) + p_bucket
    q_total = q.sum(axis=1) + q_bucket
    log_ratio = np.log(np.where(found, p_found, 1.0) / p_total[:, None]) - np.log(
        np.where(found, q, 1.0) / q_total[:, None]
    )
    kl = (np.where(found, p_found / p_total[:, None], 0.0) * log_ratio).sum(axis=1)
    bucket = p_bucket / p_total
    with np.errstate(divide="ignore", invalid="ignore"):
        bucket_term = np.where(
            bucket > 0, bucket * (np.log(bucket) - np.log(q_bucket / q_total)), 0.0
        )
    return np.maximum(kl + bucket_term, 0.0)


def distinct_samples(record: SequenceRecord) -> np.ndarray:
    """(M,) distinct ids among each position's present tail draws (0 without samples)."""
    if record.tail_ids is None:
        return np.zeros(record.num_positions, np.int64)
    present = record.tail_logprobs > -np.inf
    keys = np.sort(np.where(present, record.tail_ids.astype(np.int64), -1), axis=1)
    new = keys >= 0
    new[:, 1:] &= keys[:, 1:] != keys[:, :-1]
    return new.sum(axis=1)


def _sample_error(exact: SequenceRecord, stored: SequenceRecord) -> float:
    """Largest |stored - exact| tail-sample log-prob (rows compared sorted by id, log-prob)."""
    if exact.tail_ids is None or stored.tail_ids is None or exact.tail_ids.size == 0:
        return 0.0

    def by_id(record):
        lp = record.tail_logprobs.astype(np.float64)
        order = np.lexsort((-lp, np.where(np.isfinite(lp), record.tail_ids, -1)), axis=1)
        return np.take_along_axis(lp, order, axis=1)

    a, b = by_id(exact), by_id(stored)
    both = np.isfinite(a) & np.isfinite(b)
    return float(np.abs(np.where(both, a - np.where(both, b, 0.0), 0.0)).max(initial=0.0))


def storage_distortion(
    exact: list[SequenceRecord], stored: list[SequenceRecord]
) -> dict[str, float]:
    """Distortion of ``stored`` against the teacher pass's ``exact`` records (same order).

    Returns ``mean_kl`` / ``p99_kl`` / ``max_kl`` (nats per position, KL(exact || stored) of the
    top-k + bucket distribution; 0 for a sampled cache), ``max_sample_logprob_error`` (nats)
    and ``mean_distinct_samples`` (distinct tail ids per position; 0 without samples).
    """
    kl = np.concatenate([position_kl(e, s) for e, s in zip(exact, stored, strict=True)] or [[]])
    distinct = np.concatenate([distinct_samples(r) for r in exact] or [[]])
    errors = [_sample_error(e, s) for e, s in zip(exact, stored, strict=True)]
    return {
        "mean_kl": float(kl.mean()) if kl.size else 0.0,
        "p99_kl": float(np.percentile(kl, 99)) if kl.size else 0.0,
        "max_kl": float(kl.max()) if kl.size else 0.0,
        "max_sample_logprob_error": max(errors, default=0.0),
        "mean_distinct_samples": float(distinct.mean()) if distinct.size else 0.0,
    }

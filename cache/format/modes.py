"""What kind of teacher a cache stores (its storage mode), decided in this one place.

The storage mode follows from two manifest settings: ``top_k`` (entries stored per position) and
``tail_samples`` (token ids drawn per position; absent in caches older than the setting = 0).

    topk_bucket   k > 0, s = 0   top-k log-probs + the tail as one bucket (its mass)
    topk_samples  k > 0, s > 0   top-k + bucket + s draws from the teacher's tail (unbiased FKL)
    samples       k = 0, s > 0   s draws from the whole teacher distribution (RS-KD)

The trainer maps the mode to its teacher target; the online teacher (``kdcache train
--teacher``) is not a cache and has no storage mode.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kdcache.cache.errors import CacheError

__all__ = ["STORAGE_MODES", "describe_storage", "storage_mode"]

STORAGE_MODES: tuple[str, ...] = ("topk_bucket", "topk_samples", "samples")
# how a person reads each mode's settings (``describe_storage``)
_LAYOUTS = {
    "topk_bucket": "top-{top_k}",
    "topk_samples": "top-{top_k} + {tail_samples} tail samples",
    "samples": "sampled, {tail_samples} draws",
}


def storage_mode(manifest: Mapping[str, Any]) -> str:
    """The storage mode (one of ``STORAGE_MODES``) of a cache, from its manifest."""
    top_k = int(manifest.get("top_k") or 0)
    tail_samples = int(manifest.get("tail_samples") or 0)
    if top_k > 0:
        return "topk_samples" if tail_samples > 0 else "topk_bucket"
    if tail_samples > 0:
        return "samples"
    raise CacheError(
        "the manifest stores neither top-k entries nor samples (top_k = 0, tail_samples = 0); "
        "rebuild the cache with `kdcache build --top-k K` or `--top-k 0 --tail-samples N`"
    )


def describe_storage(manifest: Mapping[str, Any]) -> str:
    """The storage mode in words, e.g. ``top-24 + 16 tail samples`` or ``sampled, 32 draws``."""
    return _LAYOUTS[storage_mode(manifest)].format(
        top_k=int(manifest.get("top_k") or 0), tail_samples=int(manifest.get("tail_samples") or 0)
    )

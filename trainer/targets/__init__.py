"""Teacher targets, one module per storage mode, and the registry that picks one per cache.

    topk_bucket.py   top-k + tail bucket                 every loss kind, closed form
    topk_samples.py  top-k + bucket + tail samples       unbiased FKL / AKL's FKL part
    samples.py       samples from the whole teacher      FKL only (unbiased)
    dense.py         the online teacher (not a cache)    every kind; fkl / rkl / akl closed form

The storage mode is read in exactly one place, ``kdcache.cache.format.modes.storage_mode``; a new
target is one module with a ``TeacherTarget`` subclass plus one line in ``CACHE_TARGETS`` (or, for
a target that is not a storage mode, built by its own flag like ``DenseTeacherTarget``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kdcache.cache.format.modes import storage_mode
from kdcache.trainer.targets.base import LossOptions, TeacherRows, TeacherTarget, chunk_rows
from kdcache.trainer.targets.dense import DenseTeacherTarget
from kdcache.trainer.targets.samples import SamplesTarget
from kdcache.trainer.targets.topk_bucket import TopkBucketTarget
from kdcache.trainer.targets.topk_samples import TopkSamplesTarget

__all__ = [
    "CACHE_TARGETS",
    "MEASURES",
    "DenseTeacherTarget",
    "LossOptions",
    "SamplesTarget",
    "TeacherRows",
    "TeacherTarget",
    "TopkBucketTarget",
    "TopkSamplesTarget",
    "chunk_rows",
    "target_for_cache",
]

# storage mode (kdcache.cache.format.modes.STORAGE_MODES) -> its teacher target
CACHE_TARGETS: dict[str, type[TeacherTarget]] = {
    "topk_bucket": TopkBucketTarget,
    "topk_samples": TopkSamplesTarget,
    "samples": SamplesTarget,
}

# Every held-out divergence / agreement measure a cache target can report, in display order;
# a target that cannot estimate one leaves it out ("n/a").
MEASURES: tuple[str, ...] = ("top1", "fkl_bucket", "rkl_bucket", "fkl_unbiased")


def target_for_cache(manifest: Mapping[str, Any]) -> TeacherTarget:
    """The teacher target of a cache, from its manifest's storage mode."""
    return CACHE_TARGETS[storage_mode(manifest)](manifest)

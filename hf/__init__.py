"""kdcache caches inside Hugging Face Trainer (and TRL trainers built on it).

``cache_dataset(cache, split="train")`` is a torch ``IterableDataset`` of the cache's sequences
(split between ranks and DataLoader workers), ``KDCollator(cache)`` pads them into batches that
carry the teacher targets of any cache mode, and ``KDTrainer(model=..., args=..., train_dataset=
..., loss="akl", ce_weight=..., mu=...)`` is a ``transformers.Trainer`` whose ``compute_loss`` is
kdcache's fused sparse loss on a chunked lm_head. docs/HF.md shows the few lines and where TRL's
SFTTrainer can take it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kdcache.hf.collator import KDCollator
from kdcache.hf.dataset import CacheSequences, cache_dataset

if TYPE_CHECKING:
    from kdcache.hf.trainer import KDTrainer

__all__ = ["CacheSequences", "KDCollator", "KDTrainer", "cache_dataset"]


def __getattr__(name: str) -> Any:
    if name == "KDTrainer":  # transformers.Trainer (and accelerate) load on first use
        from kdcache.cache.requirements import check_min_version

        check_min_version("accelerate", "1.1", extra="hf")
        from kdcache.hf.trainer import KDTrainer

        return KDTrainer
    raise AttributeError(f"module 'kdcache.hf' has no attribute {name!r}")

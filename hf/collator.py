"""``KDCollator``: pads a list of cache sequences into one batch carrying the teacher targets.

The batch is the one ``kdcache train`` trains on (``kdcache.trainer.data.collate_records``):
``input_ids``, ``attention_mask``, ``labels`` (B, T) (labels hold the *next* token at each
distilled position, -100 elsewhere: already shifted, unlike HF's convention), ``distill_mask``
(B, T) and the cache mode's teacher tensors (``topk_ids`` / ``topk_logprobs`` (B, T, k),
``tail_mass`` (B, T), tail samples ...), collated by the mode's ``TeacherTarget``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from kdcache.cache.errors import ConfigError
from kdcache.cache.records import SequenceRecord

__all__ = ["KDCollator"]


class KDCollator:
    """``collator(records) -> batch``; ``cache`` (path, URL or opened Cache) decides the mode.

    ``target``: the ``TeacherTarget`` that collates (the cache's storage mode);
    ``temperature``: the cache's, which the loss divides the student's logits by. ``cache`` None:
    ``KDTrainer`` binds the collator to its ``cache_dataset``'s cache. ``pad_id`` (default: the
    ``tokenizer``'s pad id, else 0) fills input_ids after each sequence's end.
    """

    def __init__(
        self,
        cache: Any = None,
        *,
        tokenizer: Any = None,
        pad_id: int | None = None,
        **open_options: Any,
    ) -> None:
        if pad_id is None:
            pad_id = getattr(tokenizer, "pad_token_id", None) or 0
        self.pad_id = int(pad_id)
        self.manifest: dict[str, Any] | None = None
        if cache is not None:
            self.bind(cache, **open_options)

    def bind(self, cache: Any, **open_options: Any) -> None:
        """Take the storage mode and the temperature of ``cache``."""
        from kdcache.trainer.targets import target_for_cache

        if isinstance(cache, str) or hasattr(cache, "__fspath__"):
            from kdcache.cache import open_cache

            cache = open_cache(str(cache), **open_options)
        self.manifest = dict(cache.manifest)
        self.target = target_for_cache(self.manifest)
        self.temperature = float(self.manifest["temperature"])

    def __call__(self, records: Sequence[SequenceRecord]) -> dict[str, torch.Tensor]:
        from kdcache.trainer.data import collate_records

        if self.manifest is None:
            raise ConfigError("KDCollator() has no cache: pass KDCollator(cache)")
        if records and not isinstance(records[0], SequenceRecord):
            raise ConfigError(
                "KDCollator batches the items of kdcache.hf.cache_dataset (SequenceRecord), got "
                f"{type(records[0]).__name__}; pass train_dataset=cache_dataset(...)"
            )
        return collate_records(list(records), self.target, pad_id=self.pad_id)

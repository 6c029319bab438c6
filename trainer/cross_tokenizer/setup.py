"""Building the cross-tokenizer pieces of one training run (from the loop's config)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kdcache.cache.errors import CacheError, ConfigError
from kdcache.trainer.cross_tokenizer.alignment import CrossTokenizer
from kdcache.trainer.cross_tokenizer.batches import (
    check_cross_tokenizer_cache,
    missing_observed_message,
)
from kdcache.trainer.cross_tokenizer.target import CrossTokenizerTarget


def cross_tokenizer_for(
    cache: Any,
    student_tokenizer: Any,
    vocab_map: str = "exact",
    distill_inside: bool = True,
    xtok_loss: str = "exact",
) -> CrossTokenizer:
    """The teacher (``<cache>/tokenizer/``) -> student translation, after the cache's checks
    (``vocab_map``, ``distill_inside``, ``xtok_loss``: see ``CrossTokenizer``). A chunk-likelihood
    objective on a cache without observed log-probs is refused in one line."""
    from transformers import AutoTokenizer

    check_cross_tokenizer_cache(cache.manifest)
    if "alm" in xtok_loss and not cache.manifest.get("observed_logprobs"):
        raise ConfigError(missing_observed_message())
    teacher_dir = cache.path / "tokenizer"
    if not teacher_dir.is_dir():
        raise CacheError(
            f"--cross-tokenizer needs the teacher's tokenizer, and the cache has none at "
            f"{teacher_dir}; rebuild the cache (the build saves it)"
        )
    teacher_tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    return CrossTokenizer(
        teacher_tokenizer, student_tokenizer, vocab_map, distill_inside, xtok_loss
    )


def student_matched_rows(cross: CrossTokenizer, vocab_rows: int) -> torch.Tensor:
    """(vocab_rows,) bool: student ids with an exact teacher match; padding rows count as
    matched (they are no token, so ULD never ranks them)."""
    matched = torch.ones(vocab_rows, dtype=torch.bool)
    size = min(vocab_rows, cross.student.size)
    matched[:size] = torch.from_numpy(cross.student_matched[:size])
    return matched


def cross_tokenizer_target(
    cross: CrossTokenizer, model: nn.Module, uld_weight: float, alm_binarization: float = 100.0
) -> CrossTokenizerTarget:
    """The teacher target of a ``--cross-tokenizer`` run, for ``model``'s output rows (the
    objective ``cross.xtok_loss``)."""
    rows = int(model.get_output_embeddings().weight.shape[0])
    return CrossTokenizerTarget(
        student_matched_rows(cross, rows), uld_weight, cross.xtok_loss, alm_binarization
    )

"""Training on a topk+tail cache (``kdcache build --tail-samples N``), chunked like the other KDs.

The loss per position is ``topk_tail_kd_loss`` (``kdcache.trainer.sampled``; math in
docs/LOSSES.md): exact over the top-k, the FKL's tail part estimated without bias from the stored
tail samples, RKL with the bucket, AKL mixing both with the bucket's gap weights. The lm_head and
the loss run chunk by chunk of positions (``chunked_row_loss``), so the student's (N, V) logits
never exist at once.
"""

from __future__ import annotations

import math

import torch

from kdcache.cache.heads import OutputHead
from kdcache.trainer.chunked import _weighted_rows, chunked_row_loss
from kdcache.trainer.sampled import topk_tail_kd_loss

__all__ = ["chunked_topk_tail_loss", "fold_out_of_vocab_samples"]


def fold_out_of_vocab_samples(
    tail_ids: torch.Tensor, tail_logprobs: torch.Tensor, vocab_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mark samples the student cannot emit (a teacher padded to a larger vocab) absent. (N, s)."""
    outside = tail_ids >= vocab_size
    return tail_ids.masked_fill(outside, 0), tail_logprobs.masked_fill(outside, -math.inf)


def chunked_topk_tail_loss(
    hidden: torch.Tensor,
    head: OutputHead,
    topk_ids: torch.Tensor | None,
    topk_logprobs: torch.Tensor | None,
    tail_mass: torch.Tensor | None,
    tail_ids: torch.Tensor | None,
    tail_logprobs: torch.Tensor | None,
    labels: torch.Tensor | None,
    kd_weight: torch.Tensor | None,
    ce_weight: torch.Tensor | None,
    *,
    kind: str = "akl",
    mu: float = 0.5,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    method: str = "fused",
) -> torch.Tensor:
    """``sum_i kd_weight_i * KD_i + ce_weight_i * CE_i`` with KD = ``topk_tail_kd_loss``.

    Args:
        hidden: (N, H) student hidden states; head: the student's ``OutputHead``.
        topk_ids, topk_logprobs: (N, k); tail_mass: (N,); tail_ids, tail_logprobs: (N, s) as
            the cache stores them (``-inf`` log-prob = absent sample). None with kd_weight None.
        labels: (N,) next tokens (-100 = none) for the CE part; kd_weight, ce_weight: (N,).

    Returns:
        A scalar (the caller normalizes the weights).
    """
    kd_rows = None
    if kd_weight is not None:

        def kd_rows(logits: torch.Tensor, start: int, end: int) -> torch.Tensor:
            return topk_tail_kd_loss(
                logits,
                topk_ids[start:end],
                topk_logprobs[start:end],
                tail_mass[start:end],
                tail_ids[start:end],
                tail_logprobs[start:end],
                kind=kind,
                mu=mu,
                temperature=temperature,
            )

    row_loss = _weighted_rows(labels, kd_weight, ce_weight, kd_rows)
    return chunked_row_loss(hidden, head, row_loss, chunk_size=chunk_size, method=method)

"""Tail samples for the ``topk+tail`` cache mode: s ids drawn from the teacher's tail, on the device.

Besides the exact top-k, the mode stores per position ``s`` token ids drawn independently with
replacement from the teacher's tail distribution ``p_j / p_tail`` (``j`` outside the top-k) and
their teacher log-probs, which makes the tail part of the forward KL unbiased
(``kdcache.trainer.sampled.topk_tail_kd_loss``; math in docs/LOSSES.md).

Determinism: the uniforms behind the draws are a pure function of ``(seed, sequence_id, row,
sample)`` (numpy's counter-based Philox keyed by the seed and the sequence id), made on the host
(only (M, s) numbers) and turned into ids on the device by a two-level inverse-CDF search over the
full distribution (blocks of 256 ids in float64, then inside one block in float32). A sequence
therefore gets the same samples whatever batch, chunk, rank or resumed run it is computed in. The full (N, V) probabilities never leave the device.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from kdcache.cache.extraction.topk import ScratchBuffers

__all__ = [
    "draw_from_weights",
    "padded_weights",
    "sample_tail",
    "sequence_uniforms",
    "topk_and_tail_samples",
]


def sequence_uniforms(seed: int, sequence_id: int, num_rows: int, num_samples: int) -> np.ndarray:
    """(num_rows, num_samples) float64 uniforms in [0, 1), fixed by (seed, sequence_id).

    Row ``i`` is the same whatever ``num_rows`` is (rows are drawn in order from one stream).
    """
    key = [int(seed) & 0xFFFFFFFFFFFFFFFF, int(sequence_id) & 0xFFFFFFFFFFFFFFFF]
    generator = np.random.Generator(np.random.Philox(key=key))
    return generator.random((num_rows, num_samples))


BLOCK = 256  # ids per block of the two-level inverse CDF


@torch.no_grad()
def sample_tail(
    log_probs: torch.Tensor, topk_ids: torch.Tensor, uniforms: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse-CDF draws from the tail ``p_j / p_tail`` (``j`` not in ``topk_ids``) of each row.

    Two levels, so no (N, V) float64 cumsum is needed: the block of each draw comes from the
    float64 cumulative sum of per-block masses (``V / 256`` blocks), the id inside the block from
    a float32 cumulative sum over only that block's 256 probabilities. The same target
    ``u * p_tail`` maps to the same id as a one-level float64 search (up to rounding at a boundary).

    Args:
        log_probs: (N, V) the teacher's full log-probs (cache temperature), float32.
        topk_ids: (N, k) the stored top-k ids of each row (excluded from the draws; k may be 0).
        uniforms: (N, s) numbers in [0, 1) (``sequence_uniforms``), any float dtype.

    Returns:
        ``(ids (N, s) int64, logprobs (N, s) float32)``: the drawn ids and the teacher's
        ``log p_j`` of them; rows without tail mass get id 0 and ``-inf`` (absent).
    """
    log_probs = log_probs.float()
    padded = padded_weights(*log_probs.shape, device=log_probs.device)
    torch.exp(log_probs, out=padded[:, : log_probs.shape[1]])
    return draw_from_weights(padded, log_probs.shape[1], topk_ids, uniforms,
                             lambda ids: log_probs.gather(1, ids))  # fmt: skip


def padded_weights(rows: int, vocab: int, device: torch.device | None = None) -> torch.Tensor:
    """An (N, V rounded up to BLOCK) float32 buffer whose padding columns are zero."""
    padded = torch.empty(rows, vocab + (-vocab % BLOCK), dtype=torch.float32, device=device)
    padded[:, vocab:].zero_()
    return padded


def draw_from_weights(
    padded: torch.Tensor,
    vocab: int,
    topk_ids: torch.Tensor,
    uniforms: torch.Tensor,
    log_prob_of: Callable[[torch.Tensor], torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """``sample_tail`` from (N, V) probabilities known up to a factor per row.

    Args:
        padded: (N, V') ``padded_weights`` holding ``c_n * p`` in its first V columns (any
            c_n > 0: the search is scale-free); overwritten (the top-k are zeroed).
        log_prob_of: (N, s) ids -> (N, s) the teacher's log p of them.
    """
    rows = padded.shape[0]
    probs = padded[:, :vocab]  # (N, V) a view
    probs.scatter_(1, topk_ids.long(), 0.0)  # tail only
    blocks = padded.view(rows, -1, BLOCK)  # (N, B, 256)
    block_cdf = blocks.sum(-1).double().cumsum(-1)  # (N, B) float64 across blocks
    total = block_cdf[:, -1:]  # (N, 1) the (scaled) tail mass
    targets = uniforms.to(device=probs.device, dtype=torch.float64) * total  # (N, s)
    block = torch.searchsorted(block_cdf, targets, right=True).clamp_(max=blocks.shape[1] - 1)
    before = torch.where(block > 0, block_cdf.gather(1, (block - 1).clamp_min(0)), 0.0)  # (N, s)
    inside = _block_windows(blocks, block)  # (N, s, 256)
    offset = torch.searchsorted(
        inside.cumsum(-1), (targets - before).float()[..., None], right=True
    ).squeeze(-1)  # (N, s); BLOCK when rounding puts the target past the block's float32 sum
    ids = (block * BLOCK + offset.clamp_(max=BLOCK - 1)).clamp_(max=vocab - 1)
    # a target landing on a run of zero-probability ids maps to the next id with mass; float
    # rounding can at worst pick an id of zero tail probability: move it to the row's heaviest
    # tail id (a probability-1e-7 event, kept only so a top-k id is never drawn; the argmax pass
    # over (N, V) runs only then)
    missed = probs.gather(1, ids) <= 0  # (N, s)
    has_tail = total > 0  # (N, 1)
    if bool((missed & has_tail).any()):
        ids = torch.where(missed, probs.argmax(-1, keepdim=True).expand_as(ids), ids)
    logprobs = log_prob_of(ids)
    ids = torch.where(has_tail, ids, 0)
    return ids, torch.where(has_tail, logprobs, -math.inf)


def _block_windows(blocks: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """(N, s, 256) copies of the drawn blocks: ``blocks[n, block[n, j]]`` for (N, B, 256) blocks.

    One ``index_select`` of whole 1 KiB rows (a memcpy each) instead of a ``gather`` through an
    (N, s, 256) int64 index: 10.5 -> ~1 us per position at s = 16 (one CPU thread).
    """
    rows, count, width = blocks.shape
    flat = block + torch.arange(rows, device=block.device)[:, None] * count  # (N, s)
    return (
        blocks.reshape(rows * count, width).index_select(0, flat.reshape(-1)).view(rows, -1, width)
    )


@torch.no_grad()
def topk_and_tail_samples(
    logits_of: Callable[[int, int], torch.Tensor],
    num_rows: int,
    vocab_size: int,
    top_k: int,
    uniforms: np.ndarray,
    temperature: float = 1.0,
    chunk_elements: int = 1 << 24,
    scratch: ScratchBuffers | None = None,
    next_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:
    """Top-k (``topk_from_logits``) and ``sample_tail`` draws of ``num_rows`` rows, from one
    evaluation of their logits: ``logits_of(start, end)`` gives the ``(end - start, V)`` logits
    (e.g. the head over the selected hidden states) chunk by chunk, so the full (N, V) tensor
    never exists at once and the head runs once per row.

    Args:
        uniforms: (N, s) host uniforms (``sequence_uniforms``).
        scratch: where the sampler's (C, V') buffer lives across calls (the build keeps one per
            teacher); None allocates one for this call.

        next_ids: (N,) int64 next token per row (-1: none); given, a sixth output is its
            log-prob (N,) float32 (NaN: none), gathered from the same chunks.

    Returns:
        ids (N, k) int64, logprobs (N, k) float32, tail_mass (N,) float32, sample ids (N, s)
        int64 and sample log-probs (N, s) float32[, observed (N,)], on the logits' device.
    """
    from kdcache.cache.extraction.topk import (
        ScratchBuffers,
        _observed,
        chunk_rows,
        observed_logprobs,
        tempered_logits,
        topk_of_scaled,
    )

    rows = chunk_rows(vocab_size, chunk_elements)
    draws = torch.from_numpy(np.ascontiguousarray(uniforms))
    parts = []
    scratch = scratch if scratch is not None else ScratchBuffers()
    weights = None  # one sampler buffer for every chunk (no fresh (C, V) allocation per chunk)
    for start in range(0, num_rows, rows):
        end = min(num_rows, start + rows)
        scaled = tempered_logits(logits_of(start, end), temperature)  # (C, V)
        if weights is None:
            width = vocab_size + (-vocab_size % BLOCK)
            weights = scratch.get("tail_weights", min(rows, num_rows), width, scaled.device)
            weights[:, vocab_size:].zero_()  # the padding columns (never written below)
        padded = weights[: end - start]
        if next_ids is not None:
            picked, has_next = observed_logprobs(scaled, next_ids[start:end])
        # exp(scaled - row max) goes straight into the sampler's buffer: one exp pass serves
        # the normalizer and the draws (no (C, V) log-softmax is written)
        ids, logprobs, tail, normalizer = topk_of_scaled(
            scaled, top_k, exp_out=padded[:, :vocab_size]
        )
        samples = draw_from_weights(
            padded, vocab_size, ids, draws[start:end].to(scaled.device),
            lambda drawn, scaled=scaled, normalizer=normalizer: (
                scaled.gather(1, drawn) - normalizer[:, None]
            ),
        )  # fmt: skip
        observed = () if next_ids is None else (_observed(picked, has_next, normalizer),)
        parts.append((ids, logprobs, tail, *samples, *observed))
    if not parts:
        width = uniforms.shape[1] if uniforms.ndim == 2 else 0
        empty = (
            torch.zeros(0, top_k, dtype=torch.int64),
            torch.zeros(0, top_k),
            torch.zeros(0),
            torch.zeros(0, width, dtype=torch.int64),
            torch.zeros(0, width),
        )
        return empty if next_ids is None else (*empty, torch.zeros(0))
    return tuple(torch.cat(column) for column in zip(*parts, strict=True))

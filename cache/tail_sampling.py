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

import numpy as np
import torch

__all__ = ["sample_tail", "sequence_uniforms", "topk_and_tail_samples"]


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
    rows, vocab = log_probs.shape
    pad = -vocab % BLOCK
    padded = torch.zeros(rows, vocab + pad, dtype=torch.float32, device=log_probs.device)
    probs = padded[:, :vocab]  # (N, V) a view: exp writes straight into the padded buffer
    torch.exp(log_probs.float(), out=probs)
    probs.scatter_(1, topk_ids.long(), 0.0)  # tail only
    blocks = padded.view(rows, -1, BLOCK)  # (N, B, 256)
    block_cdf = blocks.sum(-1).double().cumsum(-1)  # (N, B) float64 across blocks
    total = block_cdf[:, -1:]  # (N, 1) the tail mass
    targets = uniforms.to(device=probs.device, dtype=torch.float64) * total  # (N, s)
    block = torch.searchsorted(block_cdf, targets, right=True).clamp_(max=blocks.shape[1] - 1)
    before = torch.where(block > 0, block_cdf.gather(1, (block - 1).clamp_min(0)), 0.0)  # (N, s)
    inside = blocks.gather(1, block[..., None].expand(-1, -1, BLOCK))  # (N, s, 256)
    offset = torch.searchsorted(
        inside.cumsum(-1), (targets - before).float()[..., None], right=True
    ).squeeze(-1)  # (N, s); BLOCK when rounding puts the target past the block's float32 sum
    ids = (block * BLOCK + offset.clamp_(max=BLOCK - 1)).clamp_(max=vocab - 1)
    # a target landing on a run of zero-probability ids maps to the next id with mass; float
    # rounding can at worst pick an id of zero tail probability: move it to the row's heaviest
    # tail id (a probability-1e-7 event, kept only so a top-k id is never drawn)
    drawn = probs.gather(1, ids)  # (N, s)
    fallback = probs.argmax(-1, keepdim=True).expand_as(ids)
    ids = torch.where(drawn > 0, ids, fallback)
    has_tail = total > 0  # (N, 1)
    logprobs = log_probs.float().gather(1, ids)
    ids = torch.where(has_tail, ids, 0)
    return ids, torch.where(has_tail, logprobs, -math.inf)


@torch.no_grad()
def topk_and_tail_samples(
    logits_of: Callable[[int, int], torch.Tensor],
    num_rows: int,
    vocab_size: int,
    top_k: int,
    uniforms: np.ndarray,
    temperature: float = 1.0,
    chunk_elements: int = 1 << 24,
) -> tuple[torch.Tensor, ...]:
    """Top-k (``topk_from_logits``) and ``sample_tail`` draws of ``num_rows`` rows, from one
    evaluation of their logits: ``logits_of(start, end)`` gives the ``(end - start, V)`` logits
    (e.g. the head over the selected hidden states) chunk by chunk, so the full (N, V) tensor
    never exists at once and the head runs once per row.

    Args:
        uniforms: (N, s) host uniforms (``sequence_uniforms``).

    Returns:
        ids (N, k) int64, logprobs (N, k) float32, tail_mass (N,) float32, sample ids (N, s)
        int64 and sample log-probs (N, s) float32, on the logits' device.
    """
    from kdcache.cache.topk import chunk_rows, tempered_log_probs, topk_of_log_probs

    rows = chunk_rows(vocab_size, chunk_elements)
    draws = torch.from_numpy(np.ascontiguousarray(uniforms))
    parts = []
    for start in range(0, num_rows, rows):
        end = min(num_rows, start + rows)
        log_probs = tempered_log_probs(logits_of(start, end), temperature)  # (C, V)
        ids, logprobs, tail = topk_of_log_probs(log_probs, top_k)
        samples = sample_tail(log_probs, ids, draws[start:end].to(log_probs.device))
        parts.append((ids, logprobs, tail, *samples))
    if not parts:
        width = uniforms.shape[1] if uniforms.ndim == 2 else 0
        return (
            torch.zeros(0, top_k, dtype=torch.int64),
            torch.zeros(0, top_k),
            torch.zeros(0),
            torch.zeros(0, width, dtype=torch.int64),
            torch.zeros(0, width),
        )
    return tuple(torch.cat(column) for column in zip(*parts, strict=True))

"""Tail samples for the ``topk+tail`` cache mode: s ids drawn from the teacher's tail, on the device.

Besides the exact top-k, the mode stores per position ``s`` token ids drawn independently with
replacement from the teacher's tail distribution ``p_j / p_tail`` (``j`` outside the top-k) and
their teacher log-probs, which makes the tail part of the forward KL unbiased
(``kdcache.trainer.sampled.topk_tail_kd_loss``; math in docs/LOSSES.md).

Determinism: the uniforms behind the draws are a pure function of ``(seed, sequence_id, row,
sample)`` (numpy's counter-based Philox keyed by the seed and the sequence id), made on the host
(only (M, s) numbers) and turned into ids on the device by inverse-CDF search over the full
distribution. A sequence therefore gets the same samples whatever batch, chunk, rank or resumed
run it is computed in. The full (N, V) probabilities never leave the device.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

__all__ = ["sample_tail", "sequence_uniforms", "tail_samples_for_rows"]


def sequence_uniforms(seed: int, sequence_id: int, num_rows: int, num_samples: int) -> np.ndarray:
    """(num_rows, num_samples) float64 uniforms in [0, 1), fixed by (seed, sequence_id).

    Row ``i`` is the same whatever ``num_rows`` is (rows are drawn in order from one stream).
    """
    key = [int(seed) & 0xFFFFFFFFFFFFFFFF, int(sequence_id) & 0xFFFFFFFFFFFFFFFF]
    generator = np.random.Generator(np.random.Philox(key=key))
    return generator.random((num_rows, num_samples))


@torch.no_grad()
def sample_tail(
    log_probs: torch.Tensor, topk_ids: torch.Tensor, uniforms: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse-CDF draws from the tail ``p_j / p_tail`` (``j`` not in ``topk_ids``) of each row.

    Args:
        log_probs: (N, V) the teacher's full log-probs (cache temperature), float32.
        topk_ids: (N, k) the stored top-k ids of each row (excluded from the draws).
        uniforms: (N, s) numbers in [0, 1) (``sequence_uniforms``), any float dtype.

    Returns:
        ``(ids (N, s) int64, logprobs (N, s) float32)``: the drawn ids and the teacher's
        ``log p_j`` of them; rows without tail mass get id 0 and ``-inf`` (absent).
    """
    probs = log_probs.float().exp().scatter(1, topk_ids.long(), 0.0)  # (N, V) tail only
    cdf = probs.double().cumsum(-1)  # (N, V) float64: no drift over a 150k vocabulary
    total = cdf[:, -1:]  # (N, 1) the tail mass
    targets = uniforms.to(device=cdf.device, dtype=torch.float64) * total  # (N, s)
    ids = torch.searchsorted(cdf, targets, right=True).clamp_(max=log_probs.shape[1] - 1)
    # a target landing on a run of zero-probability ids maps to the next id with mass; float
    # rounding can at worst pick an id of zero tail probability: move it to the row's heaviest
    # tail id (a probability-1e-16 event, kept only so a top-k id is never drawn)
    drawn = probs.gather(1, ids)  # (N, s)
    fallback = probs.argmax(-1, keepdim=True).expand_as(ids)
    ids = torch.where(drawn > 0, ids, fallback)
    has_tail = total > 0  # (N, 1)
    logprobs = log_probs.float().gather(1, ids)
    ids = torch.where(has_tail, ids, 0)
    return ids, torch.where(has_tail, logprobs, -math.inf)


@torch.no_grad()
def tail_samples_for_rows(
    logits_of: Callable[[int, int], torch.Tensor],
    num_rows: int,
    vocab_size: int,
    topk_ids: torch.Tensor,
    uniforms: np.ndarray,
    temperature: float = 1.0,
    chunk_elements: int = 1 << 24,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``sample_tail`` over ``num_rows`` rows whose logits come chunk by chunk from ``logits_of``.

    Args:
        logits_of: ``(start, end) -> (end - start, V)`` logits of those rows (e.g. the head over
            the selected hidden states), so the full (N, V) tensor never exists at once.
        topk_ids: (N, k) the rows' top-k ids (excluded). uniforms: (N, s) host uniforms.

    Returns:
        ids (N, s) int64 and log-probs (N, s) float32, on ``topk_ids``'s device.
    """
    rows = max(1, chunk_elements // max(1, vocab_size))
    device = topk_ids.device
    draws = torch.from_numpy(np.ascontiguousarray(uniforms))
    ids, logprobs = [], []
    for start in range(0, num_rows, rows):
        end = min(num_rows, start + rows)
        log_probs = torch.log_softmax(logits_of(start, end).float() / temperature, dim=-1)
        chunk_ids, chunk_lp = sample_tail(
            log_probs, topk_ids[start:end], draws[start:end].to(device)
        )
        ids.append(chunk_ids)
        logprobs.append(chunk_lp)
    if not ids:
        width = uniforms.shape[1] if uniforms.ndim == 2 else 0
        empty = torch.zeros(0, width, device=device)
        return empty.long(), empty
    return torch.cat(ids), torch.cat(logprobs)

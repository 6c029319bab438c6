"""Top-k log-probabilities and tail mass of the teacher, computed on the device.

For each position we keep the ``k`` most probable token ids, their log-probabilities at the cache
temperature, and the probability mass of every other token (the tail). All of it is computed in
float32 from the full distribution; only ``(positions, k)`` values leave the device.

The tail mass is computed in log space, ``-expm1(logsumexp(topk_logprobs))`` in float64 from the
float32 log-probabilities, clamped to [0, 1]: never negative, and free of the cancellation of
``1 - sum(exp(topk_logprobs))`` in float32. Its absolute error is that of the float32 normalizer,
about ``1e-7 * |logsumexp(logits)|`` (~1e-6), far below the fp16 rounding of the stored log-probs.
The exact alternative (a second logsumexp over the logits outside the top-k) costs one more pass
over the vocabulary per position; measured on the CPU (1024 x 16384 logits) the whole extraction
went from 349 ms to about 130 ms, against 213 ms for the head matmul itself.
"""

from __future__ import annotations

import torch

from kdcache.cache.extraction.block_topk import fast_topk
from kdcache.cache.extraction.heads import OutputHead

__all__ = [
    "DEFAULT_CHUNK_ELEMENTS",
    "ScratchBuffers",
    "chunk_rows",
    "fast_topk",
    "head_logits",
    "observed_logprobs",
    "row_logsumexp",
    "tempered_log_probs",
    "tempered_logits",
    "topk_from_hidden",
    "topk_from_logit_rows",
    "topk_from_logits",
    "topk_of_log_probs",
    "topk_of_scaled",
]

# Elements of one (chunk, V) float32 logits tensor; a chunk also needs one masked copy.
DEFAULT_CHUNK_ELEMENTS = 1 << 24


def topk_from_logits(
    logits: torch.Tensor, top_k: int, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k of ``log_softmax(logits / temperature)`` over the last dimension.

    Args:
        logits: (N, V) logits in any float dtype (upcast to float32).
        top_k: number of entries to keep, 0 <= top_k <= V.
        temperature: softmax temperature (> 0).

    Returns:
        ``(ids, logprobs, tail_mass)``: ids (N, k) int64 most probable first, logprobs (N, k) float32
        descending, tail_mass (N,) float32 in [0, 1], the mass outside the top-k.
    """
    # logits the caller keeps: one fused log-softmax pass (measured faster on the CPU than
    # logsumexp + top-k into a fresh buffer); temporaries take ``topk_of_scaled`` in place
    return topk_of_log_probs(tempered_log_probs(logits, temperature), top_k)


def tempered_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """(N, V) float32 ``logits / temperature`` (no copy for float32 logits at T 1)."""
    scaled = logits.float()
    return scaled / temperature if temperature != 1.0 else scaled


def tempered_log_probs(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """(N, V) float32 ``log_softmax(logits / temperature)``."""
    return torch.log_softmax(tempered_logits(logits, temperature), dim=-1)


def row_logsumexp(
    scaled: torch.Tensor, out: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logsumexp(scaled, -1) (N,), exp(scaled - row max) (N, V))`` in float32.

    Three passes over the row (max, subtract + exp in place, sum) instead of ``log_softmax``'s
    written (N, V) result plus a top-k of it: measured on one CPU thread at V = 16384, 44 ms
    against 77 ms for ``log_softmax`` per 1024 rows. The exponentials, written into ``out``
    when given, are the unnormalized probabilities (the tail sampler draws from them).
    """
    row_max = scaled.amax(-1, keepdim=True)  # (N, 1)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    weights = torch.sub(scaled, row_max, out=out) if out is not None else scaled - row_max
    weights.exp_()  # (N, V) in (0, 1], the row max at 1
    return row_max.squeeze(-1) + weights.sum(-1).log(), weights


def topk_of_scaled(
    scaled: torch.Tensor, top_k: int, exp_out: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``topk_from_logits`` from (N, V) tempered logits, plus their (N,) logsumexp.

    The top-k of the logits is the top-k of the log-probs (a shift per row); only the (N, k)
    values are normalized. ``exp_out``: where ``row_logsumexp`` writes its exponentials (pass
    ``scaled`` itself when it is a temporary: no (N, V) allocation).

    Returns:
        ids (N, k) int64, logprobs (N, k) float32, tail_mass (N,) float32, normalizer (N,).
    """
    values, ids = fast_topk(scaled, top_k)  # (N, k); exact, ties by ascending id
    normalizer, _ = row_logsumexp(scaled, out=exp_out)  # (N,)
    return (ids, *_normalized_topk(values - normalizer[:, None], scaled.shape[-1]), normalizer)


def head_logits(
    head: OutputHead, hidden: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """(C, V) float32 ``head.logits(hidden)``, written into ``out[:C]`` for a plain float32 head.

    Reusing one buffer across chunks spares a fresh (C, V) allocation per chunk (on the CPU each
    one is an mmap whose pages fault in again).
    """
    plain = head.scale == 1.0 and head.softcap is None
    if out is not None and plain and head.weight.dtype != torch.float32:
        return head.fp32_linear(hidden, out=out)  # 16-bit head: float32 accumulation and output
    if (
        out is None
        or not plain
        or hidden.dtype != torch.float32
        or head.weight.dtype != torch.float32
    ):
        return head.logits(hidden)
    logits = torch.mm(hidden, head.weight.t(), out=out[: hidden.shape[0]])  # (C, V)
    return logits if head.bias is None else logits.add_(head.bias)


def topk_of_log_probs(
    log_probs: torch.Tensor, top_k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``topk_from_logits`` on already normalized (N, V) float32 log-probs (top_k may be 0)."""
    logprobs, ids = fast_topk(log_probs, top_k)  # (N, k); exact, ties by ascending id
    return (ids, *_normalized_topk(logprobs, log_probs.shape[-1]))


def _normalized_topk(logprobs: torch.Tensor, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logprobs (N, k), tail_mass (N,))``: the mass outside the top-k, in log space."""
    log_kept = torch.logsumexp(logprobs.double(), dim=-1)  # (N,) log of the top-k mass
    tail_mass = (-torch.expm1(log_kept)).clamp_(0.0, 1.0).float()  # (N,)
    if logprobs.shape[-1] == vocab_size:
        tail_mass.zero_()  # nothing outside: exactly zero
    return logprobs, tail_mass


class ScratchBuffers:
    """Float32 (rows, V) buffers kept from one batch to the next, by name.

    A fresh 64 MiB (1024 x 16k) buffer per batch costs its page faults again on the CPU: measured
    at ~30 ms per first touch on one thread, i.e. ~2 us per position per buffer at the build's
    16k-token batches. ``get`` returns the first ``rows`` rows of a buffer that only grows.
    """

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, rows: int, columns: int, device: torch.device) -> torch.Tensor:
        """A (rows, columns) float32 view of the buffer ``name``; contents are left as they were."""
        buffer = self._buffers.get(name)
        if (
            buffer is None
            or buffer.shape[0] < rows
            or buffer.shape[1] != columns
            or buffer.device != torch.device(device)
        ):
            buffer = torch.empty(rows, columns, dtype=torch.float32, device=device)
            self._buffers[name] = buffer
        return buffer[:rows]


def chunk_rows(vocab_size: int, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> int:
    """How many positions fit in one logits chunk of at most ``chunk_elements`` values."""
    return max(1, chunk_elements // max(1, vocab_size))


def observed_logprobs(
    scaled: torch.Tensor, next_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(the tempered logit of each row's next token (C,), where it has one (C,) bool).

    Gathered from a chunk's (C, V) tempered logits *before* they are overwritten in place; minus
    the row's normalizer it is ``log p(next token)``. ``next_ids`` (C,) int64, -1: no next token.
    """
    has_next = next_ids >= 0
    return scaled.gather(1, next_ids.clamp_min(0)[:, None])[:, 0], has_next


def _observed(picked: torch.Tensor, has_next: torch.Tensor, normalizer: torch.Tensor):
    """(C,) float32 log p(next token), NaN where there is none."""
    return torch.where(has_next, picked - normalizer, torch.full_like(picked, float("nan")))


def topk_from_hidden(
    hidden: torch.Tensor,
    head: OutputHead,
    top_k: int,
    temperature: float = 1.0,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    scratch: ScratchBuffers | None = None,
    next_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:
    """``topk_from_logits(head.logits(hidden))`` computed chunk by chunk of positions.

    The full (N, V) logits never exist at once: at most ``chunk_elements`` logits per chunk.

    Args:
        hidden: (N, H) final hidden states (after the body's final norm).
        head: the model's output head (``resolve_head``).
        scratch: where the (C, V) logits buffer lives across calls (the build keeps one per
            teacher); None allocates one for this call.
        next_ids: (N,) int64 the token that follows each row (-1: none); given, a fourth output
            is the teacher's log-prob of it (N,) float32 (NaN: none), gathered from the same
            chunks (no extra pass over the logits).

    Returns:
        ids (N, k) int64, logprobs (N, k) float32, tail_mass (N,) float32[, observed (N,)], on
        ``hidden``'s device.
    """
    rows = chunk_rows(head.vocab_size, chunk_elements)
    scratch = scratch if scratch is not None else ScratchBuffers()
    buffer = scratch.get("logits", min(rows, hidden.shape[0]), head.vocab_size, hidden.device)
    parts = []
    for start in range(0, hidden.shape[0], rows):
        scaled = tempered_logits(
            head_logits(head, hidden[start : start + rows], buffer), temperature
        )
        if next_ids is not None:  # before topk_of_scaled overwrites ``scaled``
            picked, has_next = observed_logprobs(scaled, next_ids[start : start + rows])
        ids, logprobs, tail, normalizer = topk_of_scaled(scaled, top_k, exp_out=scaled)
        part = (ids, logprobs, tail)  # scaled was a temporary
        if next_ids is not None:
            part += (_observed(picked, has_next, normalizer),)
        parts.append(part)
    if not parts:
        device = hidden.device
        empty = (
            torch.zeros(0, top_k, dtype=torch.int64, device=device),
            torch.zeros(0, top_k, dtype=torch.float32, device=device),
            torch.zeros(0, dtype=torch.float32, device=device),
        )
        return empty if next_ids is None else (*empty, torch.zeros(0, device=device))
    return tuple(torch.cat(column) for column in zip(*parts, strict=True))


def topk_from_logit_rows(
    logits: torch.Tensor,
    top_k: int,
    temperature: float = 1.0,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    next_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:
    """``topk_from_logits`` over (N, V) ``logits`` in chunks of rows (bounds the fp32 copies);
    ``next_ids`` as for ``topk_from_hidden`` (then a fourth output, the observed log-probs)."""
    rows = chunk_rows(logits.shape[-1], chunk_elements)
    parts = []
    for start in range(0, logits.shape[0], rows):
        log_probs = tempered_log_probs(logits[start : start + rows], temperature)
        part = topk_of_log_probs(log_probs, top_k)
        if next_ids is not None:
            picked, has_next = observed_logprobs(log_probs, next_ids[start : start + rows])
            part += (_observed(picked, has_next, torch.zeros_like(picked)),)
        parts.append(part)
    if not parts:  # no rows: empty outputs of the right shapes
        empty = topk_from_logits(logits, top_k, temperature)
        return empty if next_ids is None else (*empty, torch.zeros(0, device=logits.device))
    return tuple(torch.cat(column) for column in zip(*parts, strict=True))

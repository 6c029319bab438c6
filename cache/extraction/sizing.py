"""The teacher pass sized for its device: rows per head chunk and tokens per batch.

``--head-chunk-rows`` and ``--batch-tokens`` take ``auto`` (the default) or a number.

* CPU: ``auto`` keeps the values measured best there (docs/BUILD.md): a head chunk of at most
  2^24 float32 logits (``chunk_rows(V)``, ~110 rows at vocab 152k, ~1k at 16k) and 16,384 tokens
  per batch. A bigger chunk does not help a CPU (the GEMM is already compute bound) and costs
  page faults.
* CUDA: the head GEMM is memory bound at small chunks (each chunk re-reads the whole (V, H)
  weight: 1 GB for a 7B model at vocab 152k), so ``auto`` takes the chunk from free memory:
  ``HEAD_FRACTION`` of the free bytes, at ``HEAD_BYTES_PER_LOGIT`` bytes per logit (the float32
  chunk, its exponentials and the top-k / sampling temporaries), clamped to
  [``MIN_CUDA_CHUNK_ROWS``, ``MAX_CUDA_CHUNK_ROWS``] and rounded down to a multiple of 64.
  The batch takes ``BATCH_FRACTION`` of what is left, at ``activation_bytes_per_token`` bytes per
  token (the widest layer's activations in inference, plus the (B, L, H) hidden states the head
  reads), clamped to [``max_length``, ``MAX_CUDA_BATCH_TOKENS``].

The free memory is read once, after the teacher is loaded (``torch.cuda.mem_get_info``); tests
pass ``free_bytes`` to check the arithmetic without a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kdcache.cache.errors import ConfigError

CPU_BATCH_TOKENS = 16384  # tokens per teacher batch on the CPU (the build's measured default)
CPU_CHUNK_ELEMENTS = 1 << 24  # float32 logits per head chunk on the CPU (64 MiB)
HEAD_FRACTION = 0.25  # of free CUDA memory, for the head chunk
BATCH_FRACTION = 0.5  # of the free CUDA memory left after the head chunk, for the body's batch
HEAD_BYTES_PER_LOGIT = 12  # float32 chunk + exponentials + top-k / sampling temporaries
MIN_CUDA_CHUNK_ROWS = 64
MAX_CUDA_CHUNK_ROWS = 16384
MAX_CUDA_BATCH_TOKENS = 1 << 20
AUTO = "auto"


@dataclass(frozen=True)
class PassSizes:
    """What the teacher pass runs with: ``chunk_rows`` positions per head chunk, ``batch_tokens``
    padded tokens per batch; ``source`` says where they came from (for the log line)."""

    chunk_rows: int
    batch_tokens: int
    source: str

    def line(self) -> str:
        return (
            f"teacher pass: {self.batch_tokens} tokens per batch, {self.chunk_rows} rows per "
            f"head chunk ({self.source})"
        )


def parse_auto_int(value: Any, flag: str) -> int | str:
    """``"auto"`` or a positive int from a CLI / config value; ConfigError otherwise."""
    if isinstance(value, str):
        if value.strip().lower() == AUTO:
            return AUTO
        try:
            value = int(value)
        except ValueError:
            raise ConfigError(f"{flag} must be auto or a number >= 1 (got {value!r})") from None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{flag} must be auto or a number >= 1 (got {value!r})")
    return value


def cpu_chunk_rows(vocab_size: int) -> int:
    """Rows of a CPU head chunk: at most ``CPU_CHUNK_ELEMENTS`` logits (today's value)."""
    return max(1, CPU_CHUNK_ELEMENTS // max(1, vocab_size))


def activation_bytes_per_token(model_config: Any, dtype_bytes: int, max_length: int) -> int:
    """Peak bytes per token of one inference forward of a decoder layer, plus the final hidden.

    ``8 H`` (residual, normed input, q/k/v/o) and ``3 I`` (gate, up, product of the MLP) values
    of ``dtype_bytes`` each, plus ``4 H`` float32 bytes of the hidden states kept for the head;
    with eager attention also the (heads, L) float32 score row of every token.
    """
    hidden = int(getattr(model_config, "hidden_size", 0) or getattr(model_config, "n_embd", 0))
    inner = int(getattr(model_config, "intermediate_size", 0) or 4 * hidden)
    heads = int(getattr(model_config, "num_attention_heads", 0) or 1)
    per_token = dtype_bytes * (8 * hidden + 3 * inner) + 4 * hidden
    if getattr(model_config, "_attn_implementation", None) == "eager":
        per_token += 4 * heads * max_length
    return max(per_token, 1)


def cuda_chunk_rows(vocab_size: int, free_bytes: int) -> int:
    """Rows of a CUDA head chunk from ``free_bytes`` (see the module docstring)."""
    rows = int(free_bytes * HEAD_FRACTION) // (HEAD_BYTES_PER_LOGIT * max(1, vocab_size))
    rows = max(MIN_CUDA_CHUNK_ROWS, min(MAX_CUDA_CHUNK_ROWS, rows))
    return max(MIN_CUDA_CHUNK_ROWS, rows // 64 * 64)


def cuda_batch_tokens(
    free_bytes: int, chunk_rows: int, vocab_size: int, per_token_bytes: int, max_length: int
) -> int:
    """Tokens per CUDA batch from what ``free_bytes`` leaves after the head chunk."""
    left = max(0, free_bytes - chunk_rows * vocab_size * HEAD_BYTES_PER_LOGIT)
    tokens = int(left * BATCH_FRACTION) // max(1, per_token_bytes)
    return max(max_length, min(MAX_CUDA_BATCH_TOKENS, tokens))


def size_teacher_pass(
    device_type: str,
    *,
    vocab_size: int,
    model_config: Any,
    dtype_bytes: int,
    max_length: int,
    head_chunk_rows: int | str = AUTO,
    batch_tokens: int | str = AUTO,
    free_bytes: int | None = None,
) -> PassSizes:
    """Resolve ``auto`` chunk rows and batch tokens for ``device_type`` ("cpu" or "cuda").

    A number is kept as given. On CUDA ``free_bytes`` defaults to the device's free memory now.
    """
    head_chunk_rows = parse_auto_int(head_chunk_rows, "--head-chunk-rows")
    batch_tokens = parse_auto_int(batch_tokens, "--batch-tokens")
    if device_type != "cuda":
        rows = cpu_chunk_rows(vocab_size) if head_chunk_rows == AUTO else head_chunk_rows
        tokens = CPU_BATCH_TOKENS if batch_tokens == AUTO else batch_tokens
        return PassSizes(int(rows), int(tokens), f"{device_type} defaults")
    if free_bytes is None and AUTO in (head_chunk_rows, batch_tokens):
        import torch

        free_bytes = int(torch.cuda.mem_get_info()[0])
    rows = head_chunk_rows
    if rows == AUTO:
        rows = cuda_chunk_rows(vocab_size, int(free_bytes or 0))
    tokens = batch_tokens
    if tokens == AUTO:
        per_token = activation_bytes_per_token(model_config, dtype_bytes, max_length)
        tokens = cuda_batch_tokens(
            int(free_bytes or 0), int(rows), vocab_size, per_token, max_length
        )
    source = "from free CUDA memory" if free_bytes is not None else "as given"
    if free_bytes is not None:
        source += f" ({free_bytes / 2**30:.1f} GiB free)"
    return PassSizes(int(rows), int(tokens), source)

"""Held-out CE, perplexity and bits per byte of a student on its own tokenization.

Bits per byte compare students of different tokenizers: the same held-out text, each student
scored on its own tokens, the total negative log-likelihood in bits divided by the UTF-8 bytes
it predicted. A sequence of S tokens predicts tokens 1..S-1; their bytes are counted (a special
token counts as one byte, as in the alignment's offsets). For a same-tokenizer student the
sequence is the cache's ``input_ids``; for another tokenizer its ``CrossTokenizer`` view.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from kdcache.trainer.cross_tokenizer.alignment import CrossTokenizer


def student_sequences(
    records: Iterable[Any], cross: CrossTokenizer, same_tokenizer: bool
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(student ids (S,), bytes per token (S,)) of each cached record.

    ``same_tokenizer``: the cache's own ids (``cross`` is then the teacher -> teacher
    translation, used for the byte counts only).
    """
    for record in records:
        if same_tokenizer:
            ids = np.asarray(record.input_ids, dtype=np.int64)
            yield ids, cross.student_token_bytes(ids)
        else:
            aligned = cross.align(record.input_ids, record.positions)
            yield aligned.input_ids, aligned.token_bytes


@torch.no_grad()
def bits_per_byte(
    model: nn.Module,
    sequences: Iterable[tuple[np.ndarray, np.ndarray]],
    *,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """``{"ce", "ppl", "bpb", "tokens", "bytes"}`` of ``model`` on ``sequences``.

    ``ce`` is nats per predicted token on the student's own tokens; ``bpb`` bits per byte.
    """
    was_training = model.training
    model.eval()
    nats = 0.0
    tokens = predicted_bytes = 0
    batch: list[tuple[np.ndarray, np.ndarray]] = []

    def flush() -> None:
        nonlocal nats, tokens, predicted_bytes
        length = max(len(ids) for ids, _ in batch)
        input_ids = torch.zeros(len(batch), length, dtype=torch.long)
        mask = torch.zeros(len(batch), length, dtype=torch.long)
        for row, (ids, token_bytes) in enumerate(batch):
            input_ids[row, : len(ids)] = torch.from_numpy(ids)
            mask[row, : len(ids)] = 1
            tokens += max(len(ids) - 1, 0)
            predicted_bytes += int(token_bytes[1:].sum())
        input_ids, mask = input_ids.to(device), mask.to(device)
        logits = model(input_ids=input_ids, attention_mask=mask).logits[:, :-1].float()
        labels = input_ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)  # (B, T - 1)
        nats += float(F.cross_entropy(logits.transpose(1, 2), labels, reduction="sum"))
        batch.clear()

    for item in sequences:
        batch.append(item)
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    model.train(was_training)
    ce = nats / max(tokens, 1)
    return {
        "ce": ce,
        "ppl": math.exp(min(ce, 700.0)),
        "bpb": nats / math.log(2) / max(predicted_bytes, 1),
        "tokens": float(tokens),
        "bytes": float(predicted_bytes),
    }


def held_out_byte_metrics(
    model: nn.Module,
    cache: Any,
    split: str,
    student_tokenizer: Any,
    *,
    same_tokenizer: bool,
    max_sequences: int | None = None,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """``bits_per_byte`` of ``model`` on ``split`` of ``cache`` (the first ``max_sequences``).

    Empty when the bytes are unknowable: a same-tokenizer cache without its tokenizer, or a
    tokenizer whose tokens have no byte meaning (WordPiece); the table then shows "n/a".
    """
    import itertools

    from transformers import AutoTokenizer

    from kdcache.cache.errors import ConfigError

    teacher_dir = cache.path / "tokenizer"
    if not teacher_dir.is_dir():
        return {}
    teacher_tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    try:
        cross = CrossTokenizer(teacher_tokenizer, student_tokenizer, "exact", distill_inside=False)
    except ConfigError:
        if same_tokenizer:
            return {}
        raise
    records = itertools.islice(cache.sequences(split), max_sequences)
    sequences = student_sequences(records, cross, same_tokenizer)
    return bits_per_byte(model, sequences, batch_size=batch_size, device=device)

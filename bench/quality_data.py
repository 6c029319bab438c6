"""Data and sparse targets of the distillation-quality study (``bench/quality.py``).

The held-out demo blocks, the teacher-written sharper dataset, the teacher's hidden states, the
sparse targets a cache would hold (top-k, fp16 log-probs, tail samples, RS-KD draws) and their
bytes/token measured with the real shard encoder.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from rskd import draw_samples  # bench/ is on sys.path when this file runs as a script

from kdcache.cache.extraction.heads import body_of
from kdcache.cache.format.blocks import BlockCodec
from kdcache.cache.records import SequenceRecord


# ----------------------------------------------------------------------------- data
def demo_blocks(tokenizer, length: int) -> torch.Tensor:
    """The held-out demo split (stdlib files the teacher never saw) as (N, length) token blocks."""
    from kdcache.demo import corpus

    ids: list[int] = []
    for enc in tokenizer(corpus.iter_texts("demo"), add_special_tokens=False)["input_ids"]:
        ids.extend(enc)
        ids.append(tokenizer.eos_token_id)
    n = len(ids) // length
    return torch.tensor(ids[: n * length], dtype=torch.long).view(n, length)


@torch.no_grad()
def teacher_written_blocks(teacher, prompts: torch.Tensor, length: int, temperature: float, seed):
    """Text the teacher writes itself at ``temperature`` < 1 from 8-token demo prompts.

    A lower-entropy dataset for the same teacher (its own likely continuations): the sharper
    setting. Returns (N, length) blocks.
    """
    torch.manual_seed(seed)
    blocks = []
    for start in range(0, len(prompts), 256):
        out = teacher.generate(
            input_ids=prompts[start : start + 256, :8],
            attention_mask=torch.ones_like(prompts[start : start + 256, :8]),
            do_sample=True,
            temperature=temperature,
            top_k=0,
            top_p=1.0,
            max_new_tokens=length - 8,
            min_new_tokens=length - 8,
            pad_token_id=teacher.config.pad_token_id,
        )
        blocks.append(out[:, :length])
    return torch.cat(blocks)


@torch.no_grad()
def teacher_targets(teacher, head, inputs: torch.Tensor) -> torch.Tensor:
    """Final hidden states (B, T, H) of the teacher: logits = head.logits(hidden), exactly."""
    return body_of(teacher)(input_ids=inputs).last_hidden_state


@dataclass
class Sparse:
    """The sparse targets of one batch, as a cache would hold them (rows = B * T positions)."""

    top_ids: torch.Tensor  # (N, 64)
    top_lp: torch.Tensor  # (N, 64) fp16-rounded
    tail64: torch.Tensor  # (N,)
    tail8: torch.Tensor  # (N,)
    tailk: torch.Tensor  # (N,) tail mass outside the top-k' of the tail mode
    tail_ids: torch.Tensor  # (N, s)
    tail_lp: torch.Tensor  # (N, s) fp16-rounded
    rs_ids: torch.Tensor  # (N, u)
    rs_counts: torch.Tensor  # (N, u)
    rs_lp: torch.Tensor  # (N, u) fp16-rounded


def _rounded(x: torch.Tensor) -> torch.Tensor:
    return x.half().float()


@torch.no_grad()
def sparse_targets(teacher_logits: torch.Tensor, study, seed: int) -> Sparse:
    """Top-64 / top-8 / top-k' + tail samples / RS-KD draws of (N, V) teacher logits."""
    log_p = torch.log_softmax(teacher_logits.float(), -1)  # (N, V)
    top_lp, top_ids = log_p.topk(64, dim=-1)
    probs = top_lp.exp()
    total = log_p.exp().sum(-1)  # 1 up to rounding

    def tail_after(k: int) -> torch.Tensor:
        return (total - probs[:, :k].sum(-1)).clamp_min(0.0)

    k = study.tail_topk
    generator = torch.Generator().manual_seed(seed)
    outside = log_p.scatter(1, top_ids[:, :k], -math.inf).exp()  # (N, V) tail p_j
    tail_ids = torch.multinomial(outside, study.tail_samples, replacement=True, generator=generator)
    rs_ids, rs_counts, rs_lp, _ = draw_samples(log_p, study.rskd_draws, generator=generator)
    return Sparse(
        top_ids=top_ids,
        top_lp=_rounded(top_lp),
        tail64=tail_after(64),
        tail8=tail_after(8),
        tailk=tail_after(k),
        tail_ids=tail_ids,
        tail_lp=_rounded(log_p.gather(1, tail_ids)),
        rs_ids=rs_ids,
        rs_counts=rs_counts,
        rs_lp=_rounded(rs_lp),
    )


def bytes_per_token(
    inputs: torch.Tensor,
    ids: torch.Tensor,
    lp: torch.Tensor,
    tail,
    vocab: int,
    tail_ids: torch.Tensor | None = None,
    tail_lp: torch.Tensor | None = None,
) -> float:
    """Exact-mode shard bytes/token of (B*T, w) rows (plus (B*T, s) tail samples), measured with
    the real block encoder."""
    batch, length = inputs.shape

    def rows(x: torch.Tensor | None, b: int, dtype) -> np.ndarray | None:
        if x is None:
            return None
        return x.view(batch, length, x.shape[1])[b].numpy().astype(dtype)

    records = [
        SequenceRecord(
            sequence_id=b,
            input_ids=inputs[b].numpy().astype(np.int32),
            topk_ids=rows(ids, b, np.int32),
            topk_logprobs=rows(lp, b, np.float32),
            tail_mass=tail.view(batch, length)[b].numpy().astype(np.float32),
            positions=np.arange(length, dtype=np.int32),
            tail_ids=rows(tail_ids, b, np.int32),
            tail_logprobs=rows(tail_lp, b, np.float32),
        )
        for b in range(batch)
    ]
    samples = 0 if tail_ids is None else tail_ids.shape[1]
    codec = BlockCodec("exact", top_k=ids.shape[1], vocab_size=vocab, tail_samples=samples)
    return codec.encode(records).nbytes / inputs.numel()


def measure_bytes(inputs: torch.Tensor, sparse: Sparse, study, vocab: int) -> dict:
    """Bytes/token of each stored mode on one batch of sequences (same encoder for all)."""
    k = study.tail_topk
    rs_lp = torch.where(sparse.rs_counts > 0, sparse.rs_lp, -math.inf)
    rs = bytes_per_token(inputs, sparse.rs_ids, rs_lp, sparse.tail64, vocab)
    rs += sparse.rs_counts.numel() / inputs.numel() * 0.25  # uint8 counts, zstd ~4x (estimate)
    tail = bytes_per_token(
        inputs,
        sparse.top_ids[:, :k],
        sparse.top_lp[:, :k],
        sparse.tailk,
        vocab,
        sparse.tail_ids,
        sparse.tail_lp,
    )
    return {
        "top8": bytes_per_token(
            inputs, sparse.top_ids[:, :8], sparse.top_lp[:, :8], sparse.tail8, vocab
        ),
        "top64": bytes_per_token(inputs, sparse.top_ids, sparse.top_lp, sparse.tail64, vocab),
        "tail": tail,
        "rskd": rs,
    }

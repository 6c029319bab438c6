"""Top-k + tail bucket (storage mode ``topk_bucket``): the teacher's top-k plus one tail outcome.

Both distributions are coarsened to k + 1 outcomes (the ids S of the teacher's top-k and
"anything else") and the divergence is exact over them (docs/LOSSES.md). Every loss kind works:
the closed-form gradient takes r = dD/dlog Q on the small (C, k + 1) outcome problem (autograd
there is cheap) and applies the chain rule through the softmax by hand, at z = logits / T:

    dD/dz_j = r_j - q_j sum(r)                      for j in S
    dD/dz_j = r_tail e_j / sum_tail - q_j sum(r)    for j outside S,  e_j = exp(z_j - max_tail)

Shifting the tail by its own maximum keeps sum_tail >= 1: the student's tail mass is exact in
log space however small it is, with no per-chunk test and no host sync.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from kdcache.cache.errors import CacheError
from kdcache.cache.records import SequenceRecord
from kdcache.trainer.divergences import (
    LOSS_KINDS,
    akl_head_mask,
    compute_dtype,
    outcome_divergence,
)
from kdcache.trainer.targets.base import LossOptions, TeacherRows, TeacherTarget

__all__ = [
    "TopkBucketTarget",
    "bucket_divergence",
    "bucket_loss_and_grad",
    "fold_out_of_vocab",
    "student_outcomes",
    "teacher_outcomes",
]


def collate_rows(
    records: Sequence[SequenceRecord],
    length: int,
    fields: Mapping[str, tuple[int, float, np.dtype]],
) -> dict[str, torch.Tensor]:
    """(B, T, width) per field of ``records``, ``fill`` where no distribution is stored.

    ``fields``: record attribute -> (width, fill value, dtype); the width comes from the
    manifest, and a record of another width is refused (a cache mixing layouts is corrupt).
    """
    out = {}
    for name, (width, fill, dtype) in fields.items():
        array = np.full((len(records), length, width), fill, dtype=dtype)
        for row, record in enumerate(records):
            values = getattr(record, name)
            if values is None or values.shape[1:] != (width,):
                got = None if values is None else tuple(values.shape[1:])
                raise CacheError(
                    f"sequence {record.sequence_id} stores {name} of width {got}, the manifest "
                    f"says {width}; the cache is inconsistent: rebuild it or run kdcache verify"
                )
            array[row, np.asarray(record.positions, dtype=np.int64)] = values
        out[name] = torch.from_numpy(array)
    return out


def fold_out_of_vocab(
    topk_ids: torch.Tensor, topk_logprobs: torch.Tensor, tail_mass: torch.Tensor, vocab_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Move teacher entries whose id the student cannot emit into the tail (no host sync).

    A teacher padded to a larger vocab_size than the student (e.g. Qwen2.5-7B 152064 vs 0.5B
    151936) can in principle rank a padding id in its top-k. Shapes: (N, k), (N, k), (N,).
    """
    outside = topk_ids >= vocab_size  # (N, k)
    moved = torch.where(outside, topk_logprobs.exp(), 0.0).sum(-1)  # (N,)
    return (
        topk_ids.masked_fill(outside, 0),
        topk_logprobs.masked_fill(outside, -math.inf),
        tail_mass + moved,
    )


def student_outcomes(
    logits: torch.Tensor, topk_ids: torch.Tensor, present: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Student log q at S (N, k), log q_tail (N,) exact in log space, has_tail (N,) bool.

    logits: (N, V) already divided by the temperature (differentiable). Absent entries
    (present False) do not count in S, whatever their id.
    """
    n, vocab = logits.shape
    log_norm = torch.logsumexp(logits, dim=-1)  # (N,)
    log_q_topk = logits.gather(1, topk_ids) - log_norm[:, None]  # (N, k)
    in_topk = torch.zeros(n, vocab, dtype=torch.uint8, device=logits.device)
    in_topk.scatter_reduce_(1, topk_ids, present.to(torch.uint8), reduce="amax")  # (N, V)
    in_topk = in_topk.bool()
    has_tail = in_topk.sum(-1) < vocab  # (N,) False when S covers the whole vocabulary
    # Rows without a tail keep their logits (finite, harmless) and get the bucket masked out.
    outside = logits.masked_fill(in_topk & has_tail[:, None], -math.inf)  # (N, V)
    log_q_tail = torch.logsumexp(outside, dim=-1) - log_norm  # (N,) exact, even when tiny
    return log_q_topk, log_q_tail, has_tail


def teacher_outcomes(
    topk_logprobs: torch.Tensor,
    tail_mass: torch.Tensor | None,
    has_tail: torch.Tensor,
    kind: str,
    mu: float,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The teacher's renormalized (k + 1)-outcome log-probs (N, k + 1), valid mask, AKL head.

    tail_mass None -> 1 - sum of the top-k mass. (p_S, p_tail) are divided by their stored sum.
    """
    teacher_logprobs = topk_logprobs.detach().to(dtype)  # (N, k)
    present = teacher_logprobs > -math.inf  # (N, k)
    p_topk = torch.where(present, teacher_logprobs, -math.inf).exp()  # (N, k)
    if tail_mass is None:
        p_tail = (1.0 - p_topk.sum(-1)).clamp(0.0, 1.0)  # (N,)
    else:
        p_tail = tail_mass.detach().to(dtype).clamp(0.0, 1.0)  # (N,)
    p_tail = torch.where(has_tail, p_tail, 0.0)
    log_total = torch.log((p_topk.sum(-1) + p_tail).clamp_min(torch.finfo(dtype).tiny))  # (N,)
    log_p_topk = teacher_logprobs - log_total[:, None]  # (N, k)
    log_p = torch.cat([log_p_topk, (torch.log(p_tail) - log_total)[:, None]], dim=1)
    valid = torch.cat([present, has_tail[:, None]], dim=1)  # (N, k + 1)
    head = None
    if kind == "akl":
        head_topk = akl_head_mask(log_p_topk.exp(), present, mu)  # (N, k)
        head = torch.cat([head_topk, torch.zeros_like(has_tail)[:, None]], dim=1)
    return log_p, valid, head


def bucket_divergence(
    logits: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    tail_mass: torch.Tensor | None,
    options: LossOptions,
) -> torch.Tensor:
    """(N,) top-k + bucket divergence of raw ``logits`` (N, V), differentiable (the reference)."""
    dtype = compute_dtype(logits)
    scaled = logits.to(dtype) / options.temperature  # (N, V)
    present = topk_logprobs.detach() > -math.inf  # (N, k); -inf (and NaN) entries are padding
    log_q_topk, log_q_tail, has_tail = student_outcomes(scaled, topk_ids.long(), present)
    log_p, valid, head = teacher_outcomes(
        topk_logprobs, tail_mass, has_tail, options.kind, options.mu, dtype
    )
    log_q = torch.cat([log_q_topk, log_q_tail[:, None]], dim=1)  # (N, k + 1)
    return outcome_divergence(log_p, log_q, valid, head, options.kind, options.skew)


@dataclass
class StudentChunk:
    """The student's side of one chunk, as the closed-form kernels need it (no autograd).

    ``tail_exp`` (C, V) is e_j = exp((z_j - max_tail) / T) outside S and 0 at S: a buffer the
    kernel turns into the gradient in place. Log-probs are at temperature T.
    """

    tail_exp: torch.Tensor  # (C, V)
    sum_tail: torch.Tensor  # (C,) sum of tail_exp: >= 1 where the row has a tail, else 0
    log_q_scale: torch.Tensor  # (C,) log q_j - log e_j for j outside S (<= 0)
    log_norm: torch.Tensor  # (C,) logsumexp(z / T)
    log_q: torch.Tensor  # (C, k + 1) log q at S, then log q_tail (-inf without a tail)
    has_tail: torch.Tensor  # (C,) bool
    present: torch.Tensor  # (C, k) bool
    any_present: torch.Tensor  # (C,) bool
    canon_ids: torch.Tensor  # (C, k): the id of each column, absent columns -> a present one
    canon_cols: torch.Tensor  # (C, k) the column each canon id comes from
    temperature: float


def student_chunk(
    logits: torch.Tensor, topk_ids: torch.Tensor, present: torch.Tensor, temperature: float
) -> StudentChunk:
    """One chunk's student outcomes from raw ``logits`` (C, V) float32 (not modified)."""
    rows, vocab = logits.shape
    k = topk_ids.shape[1]
    tail_exp = logits.clone()  # (C, V)
    any_present = present.any(-1)  # (C,)
    columns = torch.arange(k, device=logits.device).expand(rows, k)
    canon_cols, canon_ids = columns, topk_ids
    if k:  # absent entries rewrite a present id of their row (rows with none: their own logit)
        first = present.int().argmax(-1, keepdim=True)  # (C, 1)
        canon_cols = torch.where(present, columns, first)
        canon_ids = topk_ids.gather(1, canon_cols)
        keep = logits.gather(1, canon_ids)
        tail_exp.scatter_(1, canon_ids, torch.where(any_present[:, None], -math.inf, keep))
    max_tail = tail_exp.amax(-1)  # (C,)
    max_tail = torch.where(torch.isfinite(max_tail), max_tail, 0.0)  # no tail: all -inf
    tail_exp.sub_(max_tail[:, None])
    if temperature != 1.0:
        tail_exp.div_(temperature)
    tail_exp.exp_()  # (C, V), 0 at S
    sum_tail = tail_exp.sum(-1)  # (C,)
    log_sum_tail = torch.log(sum_tail) + max_tail / temperature  # (C,) -inf without a tail
    z_topk = logits.gather(1, topk_ids) / temperature  # (C, k)
    log_sum_topk = torch.logsumexp(torch.where(present, z_topk, -math.inf), -1)  # (C,)
    log_norm = torch.logaddexp(log_sum_tail, log_sum_topk)  # (C,)
    log_q = torch.cat([z_topk - log_norm[:, None], (log_sum_tail - log_norm)[:, None]], 1)
    return StudentChunk(
        tail_exp=tail_exp,
        sum_tail=sum_tail,
        log_q_scale=max_tail / temperature - log_norm,
        log_norm=log_norm,
        log_q=log_q,
        has_tail=present.sum(-1) < vocab,
        present=present,
        any_present=any_present,
        canon_ids=canon_ids,
        canon_cols=canon_cols,
        temperature=temperature,
    )


# correction(logits (C, V), chunk, log_p (C, k + 1), valid, head) -> (loss delta (C,), extra
#   r_tail (C,), sample ids (C, s), sample gradient weights (C, s)[, extra r_sum (C,)]): a term
#   on top of the bucket, all per unit row weight (the kernel multiplies by the row weights).
#   Sample ids lie outside S; the optional extra r_sum adds -extra * q_j at every id j (the
#   softmax's dense part of a term that depends on a few probabilities, e.g. ULD).
Correction = Callable[
    [torch.Tensor, StudentChunk, torch.Tensor, torch.Tensor, torch.Tensor | None],
    tuple[torch.Tensor, ...],
]


@torch.no_grad()
def bucket_loss_and_grad(
    logits: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    tail_mass: torch.Tensor | None,
    weight: torch.Tensor,
    options: LossOptions,
    correction: Correction | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight * bucket divergence (C,), gradient (C, V)) in closed form (module docstring).

    Assumes the present top-k ids of a row are distinct (as top-k ids are). ``correction``
    adds an estimator on top of the bucket (the tail samples of ``topk_samples``).
    """
    kind, temperature = options.kind, options.temperature
    ids, k = topk_ids.long(), topk_ids.shape[1]
    present = topk_logprobs > -math.inf  # (C, k)
    chunk = student_chunk(logits, ids, present, temperature)
    log_p, valid, head = teacher_outcomes(
        topk_logprobs, tail_mass, chunk.has_tail, kind, options.mu
    )
    log_q = chunk.log_q.requires_grad_()  # (C, k + 1)
    with torch.enable_grad():
        kd = outcome_divergence(log_p, log_q, valid, head, kind, options.skew)  # (C,)
        (r,) = torch.autograd.grad((kd * weight).sum(), log_q)  # (C, k + 1)
    loss = weight * kd.detach()
    r = torch.where(valid, r, 0.0)
    r_tail, r_sum = r[:, k], r.sum(-1)  # (C,)
    samples = None
    if correction is not None:
        delta, extra_r_tail, sample_ids, sample_grad, *extra_r_sum = correction(
            logits, chunk, log_p, valid, head
        )
        loss = loss + weight * delta
        r_tail = r_tail + weight * extra_r_tail
        if extra_r_sum:
            r_sum = r_sum + weight * extra_r_sum[0]
        samples = sample_ids, sample_grad * weight[:, None]
    coef = r_tail / chunk.sum_tail.clamp_min(1.0) - r_sum * chunk.log_q_scale.exp()  # (C,)
    grad = chunk.tail_exp.mul_(coef[:, None])  # (C, V): the tail's gradient, 0 at S
    if k:
        q_topk = chunk.log_q[:, :k].detach().exp()  # (C, k)
        at_s = (r[:, :k] - q_topk * r_sum[:, None]).gather(1, chunk.canon_cols)
        current = grad.gather(1, chunk.canon_ids)  # rows without present entries: unchanged
        grad.scatter_(1, chunk.canon_ids, torch.where(chunk.any_present[:, None], at_s, current))
    if samples is not None:  # sampled ids lie outside S: added after the S values are written
        grad.scatter_add_(1, samples[0], -samples[1])
    if temperature != 1.0:
        grad.div_(temperature)
    return loss, grad


def collate_topk(records: Sequence[SequenceRecord], length: int, top_k: int) -> dict:
    """``topk_ids`` (B, T, k) int64 (0 where absent), ``topk_logprobs`` (B, T, k) float32
    (-inf where absent), ``tail_mass`` (B, T) float32 (1 where no distribution is stored)."""
    fields = {
        "topk_ids": (top_k, 0, np.int64),
        "topk_logprobs": (top_k, -np.inf, np.float32),
    }
    batch = collate_rows(records, length, fields)
    tail_mass = np.ones((len(records), length), dtype=np.float32)
    for row, record in enumerate(records):
        tail_mass[row, np.asarray(record.positions, dtype=np.int64)] = record.tail_mass
    batch["tail_mass"] = torch.from_numpy(tail_mass)
    return batch


def select_topk(batch: Mapping[str, torch.Tensor], rows: torch.Tensor, vocab_size: int) -> dict:
    """(N, k) ``topk_ids`` / ``topk_logprobs`` and (N,) ``tail_mass`` of ``rows``, folded."""
    ids, logprobs, tail_mass = fold_out_of_vocab(
        batch["topk_ids"].flatten(0, 1)[rows],
        batch["topk_logprobs"].flatten(0, 1)[rows],
        batch["tail_mass"].reshape(-1)[rows],
        vocab_size,
    )
    return {"topk_ids": ids, "topk_logprobs": logprobs, "tail_mass": tail_mass}


class TopkBucketTarget(TeacherTarget):
    """The teacher's top-k log-probs plus the tail as one bucket outcome (every loss kind)."""

    name = "topk_bucket"
    losses = LOSS_KINDS
    closed_form_losses = LOSS_KINDS
    measures = ("fkl_bucket", "rkl_bucket", "top1")

    @property
    def top_k(self) -> int:
        """Entries stored per position (the manifest's ``top_k``)."""
        return int(self.manifest["top_k"])

    def collate(self, records: Sequence[SequenceRecord], length: int) -> dict[str, torch.Tensor]:
        return collate_topk(records, length, self.top_k)

    def select(
        self, batch: Mapping[str, torch.Tensor], rows: torch.Tensor, vocab_size: int
    ) -> TeacherRows:
        return select_topk(batch, rows, vocab_size)

    def loss(self, logits: torch.Tensor, rows: TeacherRows, options: LossOptions) -> torch.Tensor:
        return bucket_divergence(
            logits, rows["topk_ids"], rows["topk_logprobs"], rows["tail_mass"], options
        )

    def loss_and_grad(
        self, logits: torch.Tensor, rows: TeacherRows, weight: torch.Tensor, options: LossOptions
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return bucket_loss_and_grad(
            logits, rows["topk_ids"], rows["topk_logprobs"], rows["tail_mass"], weight, options
        )

    def evaluate_rows(
        self, logits: torch.Tensor, rows: TeacherRows, temperature: float
    ) -> dict[str, torch.Tensor]:
        ids, logprobs, tail = rows["topk_ids"], rows["topk_logprobs"], rows["tail_mass"]
        values = {
            f"{kind}_bucket": bucket_divergence(
                logits, ids, logprobs, tail, LossOptions(kind=kind, temperature=temperature)
            )
            for kind in ("fkl", "rkl")
        }
        top1 = (logits.argmax(-1) == ids[:, 0]) & (logprobs[:, 0] > -math.inf)  # (C,)
        values["top1"] = top1.float()
        return values

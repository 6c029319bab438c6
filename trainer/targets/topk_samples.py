"""Top-k + tail samples (storage mode ``topk_samples``, the build default).

The exact top-k plus ``s`` tail tokens drawn with replacement from the teacher's tail
p_j / p_tail (j outside S), stored with their teacher log-probs. FKL's tail part
sum_{j not in S} p_j (log p_j - log q_j) is estimated without bias by
p_tail * mean_s (log p_js - log q_js); RKL keeps the bucket (its tail needs the teacher where no
sample is); AKL mixes the unbiased FKL with the bucket RKL using the bucket's gap weights. The
other kinds (js, tvd, skew) have no sample estimator and use the top-k + bucket.

In the fused kernel the samples are a correction of the bucket loss: ``loss = bucket + w
(estimate - bucket FKL term)``, w = 1 for FKL, the detached AKL head weight for AKL. Its
gradient w.r.t. z = logits / T is ``w p_tail softmax_outside_S(z)_j - sum_m u_m [j = j_m]``
(the q_j terms of the two parts cancel), so the bucket kernel only gets an extra r_tail and a
scatter of the sample weights.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from kdcache.cache.records import SequenceRecord
from kdcache.trainer.divergences import (
    akl_gap_sums,
    akl_mix_weights,
    compute_dtype,
    outcome_divergence,
)
from kdcache.trainer.targets.base import LossOptions, TeacherRows
from kdcache.trainer.targets.topk_bucket import (
    Correction,
    StudentChunk,
    TopkBucketTarget,
    bucket_divergence,
    bucket_loss_and_grad,
    collate_rows,
    student_outcomes,
    teacher_outcomes,
)

__all__ = ["SAMPLE_KINDS", "TopkSamplesTarget", "fold_out_of_vocab_samples", "topk_samples_loss"]

SAMPLE_KINDS: tuple[str, ...] = ("fkl", "akl")  # kinds whose FKL part uses the samples


def fold_out_of_vocab_samples(
    tail_ids: torch.Tensor, tail_logprobs: torch.Tensor, vocab_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mark samples the student cannot emit (a teacher padded to a larger vocab) absent. (N, s)."""
    outside = tail_ids >= vocab_size
    return tail_ids.masked_fill(outside, 0), tail_logprobs.masked_fill(outside, -math.inf)


def _log_total(
    topk_logprobs: torch.Tensor,
    tail_mass: torch.Tensor,
    has_tail: torch.Tensor,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """(N,) log of the teacher's stored total mass sum p_S + p_tail (what p is divided by)."""
    p_topk = topk_logprobs.detach().to(dtype).exp().sum(-1)  # (N,); -inf entries give 0
    p_tail = torch.where(has_tail, tail_mass.detach().to(dtype).clamp(0.0, 1.0), 0.0)
    return torch.log((p_topk + p_tail).clamp_min(torch.finfo(dtype).tiny))


def _sample_terms(
    log_p: torch.Tensor,
    valid: torch.Tensor,
    log_total: torch.Tensor,
    log_q_samples: torch.Tensor,
    tail_logprobs: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(unbiased tail estimate (N,), bucket FKL term (N,), sampled (N, s) bool, draws (N,)).

    log_p, valid (N, k + 1) the teacher's outcomes; log_q_samples (N, s) the student's log q at
    the sampled ids, tail_logprobs (N, s) the teacher's (full-distribution scale).
    """
    sampled = (tail_logprobs.detach() > -math.inf) & valid[:, -1:]  # (N, s)
    draws = sampled.sum(-1)  # (N,)
    p_tail = torch.where(valid[:, -1], log_p[:, -1], -math.inf).exp()  # (N,) renormalized
    log_p_samples = tail_logprobs.detach().to(log_p.dtype) - log_total[:, None]  # (N, s)
    terms = torch.where(sampled, log_p_samples - log_q_samples, 0.0)  # (N, s)
    estimate = p_tail * terms.sum(-1) / draws.clamp_min(1)
    return estimate, p_tail, sampled, draws


def topk_samples_loss(
    logits: torch.Tensor,
    rows: TeacherRows,
    options: LossOptions,
) -> torch.Tensor:
    """(N,) KD from the exact top-k plus the tail samples, differentiable (the reference).

    ``rows``: ``topk_ids``, ``topk_logprobs`` (N, k), ``tail_mass`` (N,), ``tail_ids``,
    ``tail_logprobs`` (N, s) (-inf = absent sample; a row without samples uses the bucket).
    Kinds other than fkl / akl: the top-k + bucket divergence.
    """
    ids, logprobs, tail_mass = rows["topk_ids"], rows["topk_logprobs"], rows["tail_mass"]
    if options.kind not in SAMPLE_KINDS:
        return bucket_divergence(logits, ids, logprobs, tail_mass, options)
    dtype = compute_dtype(logits)
    scaled = logits.to(dtype) / options.temperature  # (N, V)
    present = logprobs.detach() > -math.inf  # (N, k)
    log_q_topk, log_q_tail, has_tail = student_outcomes(scaled, ids.long(), present)
    log_p, valid, head = teacher_outcomes(
        logprobs, tail_mass, has_tail, options.kind, options.mu, dtype
    )
    log_q = torch.cat([log_q_topk, log_q_tail[:, None]], dim=1)  # (N, k + 1)
    k = ids.shape[1]
    log_q_samples = scaled.gather(1, rows["tail_ids"].long()) - torch.logsumexp(scaled, -1)[:, None]
    estimate, _, _, draws = _sample_terms(
        log_p,
        valid,
        _log_total(logprobs, tail_mass, has_tail),
        log_q_samples,
        rows["tail_logprobs"],
    )
    fkl_topk = outcome_divergence(log_p[:, :k], log_q_topk, valid[:, :k], None, "fkl")
    fkl_bucket = outcome_divergence(log_p[:, k:], log_q[:, k:], valid[:, k:], None, "fkl")
    fkl = fkl_topk + torch.where(draws > 0, estimate, fkl_bucket)  # (N,)
    if options.kind == "fkl":
        return fkl
    q = torch.where(valid, log_q, -math.inf).exp()  # (N, k + 1)
    p = torch.where(valid, log_p, -math.inf).exp()
    w_fkl, w_rkl = akl_mix_weights(*akl_gap_sums(p, q, head, valid))
    return w_fkl * fkl + w_rkl * outcome_divergence(log_p, log_q, valid, None, "rkl")


def _sample_correction(rows: TeacherRows, kind: str) -> Correction:
    """The bucket kernel's correction for the tail samples of ``rows`` (module docstring)."""
    tail_ids, tail_logprobs = rows["tail_ids"].long(), rows["tail_logprobs"]
    tail_mass, topk_logprobs = rows["tail_mass"], rows["topk_logprobs"]

    def correction(
        logits: torch.Tensor,
        chunk: StudentChunk,
        log_p: torch.Tensor,
        valid: torch.Tensor,
        head: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        log_q = chunk.log_q.detach()  # (C, k + 1)
        temperature = chunk.temperature
        log_q_samples = logits.gather(1, tail_ids) / temperature - chunk.log_norm[:, None]
        log_total = _log_total(topk_logprobs, tail_mass, chunk.has_tail)
        estimate, p_tail, sampled, draws = _sample_terms(
            log_p, valid, log_total, log_q_samples, tail_logprobs
        )
        weight = torch.ones_like(p_tail)
        if kind == "akl":
            q = torch.where(valid, log_q, -math.inf).exp()
            p = torch.where(valid, log_p, -math.inf).exp()
            weight = akl_mix_weights(*akl_gap_sums(p, q, head, valid))[0]
        weight = torch.where(draws > 0, weight, 0.0)  # (C,) rows without samples: the bucket
        bucket = torch.where(p_tail > 0, p_tail * (log_p[:, -1] - log_q[:, -1]), 0.0)
        c = weight * p_tail  # (C,)
        per_sample = torch.where(sampled, (c / draws.clamp_min(1))[:, None], 0.0)  # (C, s)
        return weight * (estimate - bucket), c, tail_ids, per_sample

    return correction


class TopkSamplesTarget(TopkBucketTarget):
    """Top-k + bucket plus tail samples: unbiased FKL (and AKL's FKL part) from the samples."""

    name = "topk_samples"
    measures = ("fkl_bucket", "rkl_bucket", "fkl_unbiased", "top1")

    @property
    def tail_samples(self) -> int:
        """Draws stored per position (the manifest's ``tail_samples``)."""
        return int(self.manifest["tail_samples"])

    def collate(self, records: Sequence[SequenceRecord], length: int) -> dict[str, torch.Tensor]:
        batch = super().collate(records, length)
        fields = {
            "tail_ids": (self.tail_samples, 0, np.int64),
            "tail_logprobs": (self.tail_samples, -np.inf, np.float32),
        }
        batch.update(collate_rows(records, length, fields))
        return batch

    def select(
        self, batch: Mapping[str, torch.Tensor], rows: torch.Tensor, vocab_size: int
    ) -> TeacherRows:
        selected = super().select(batch, rows, vocab_size)
        selected["tail_ids"], selected["tail_logprobs"] = fold_out_of_vocab_samples(
            batch["tail_ids"].flatten(0, 1)[rows],
            batch["tail_logprobs"].flatten(0, 1)[rows],
            vocab_size,
        )
        return selected

    def loss(self, logits: torch.Tensor, rows: TeacherRows, options: LossOptions) -> torch.Tensor:
        return topk_samples_loss(logits, rows, options)

    def loss_and_grad(
        self, logits: torch.Tensor, rows: TeacherRows, weight: torch.Tensor, options: LossOptions
    ) -> tuple[torch.Tensor, torch.Tensor]:
        correction = None
        if options.kind in SAMPLE_KINDS:
            correction = _sample_correction(rows, options.kind)
        return bucket_loss_and_grad(
            logits,
            rows["topk_ids"],
            rows["topk_logprobs"],
            rows["tail_mass"],
            weight,
            options,
            correction,
        )

    def evaluate_rows(
        self, logits: torch.Tensor, rows: TeacherRows, temperature: float
    ) -> dict[str, torch.Tensor]:
        values = super().evaluate_rows(logits, rows, temperature)
        options = LossOptions(kind="fkl", temperature=temperature)
        values["fkl_unbiased"] = topk_samples_loss(logits, rows, options)
        return values

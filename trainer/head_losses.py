"""KD + CE of given teacher tensors through the chunked lm_head, for users' own training loops.

``chunked_distill_loss`` (a cached sparse teacher: top-k + bucket, with tail samples when given)
and ``chunked_dense_distill_loss`` (the teacher's full logits or hidden states) validate their
tensors once, wrap them as a teacher target's rows and run the same path as ``kdcache train``:
``chunked_head_loss`` with ``objective.loss_kernel`` (the target's closed-form gradient plus the
CE mix). The student's (N, V) logits never exist at once.
"""

from __future__ import annotations

import torch

from kdcache.cache.errors import ConfigError
from kdcache.cache.extraction.heads import OutputHead
from kdcache.trainer.chunked import chunked_head_loss
from kdcache.trainer.losses import check_teacher_ids
from kdcache.trainer.objective import loss_kernel
from kdcache.trainer.targets.base import LossOptions, TeacherRows, TeacherTarget
from kdcache.trainer.targets.dense import DenseTeacherTarget
from kdcache.trainer.targets.topk_bucket import TopkBucketTarget
from kdcache.trainer.targets.topk_samples import TopkSamplesTarget

__all__ = ["chunked_dense_distill_loss", "chunked_distill_loss"]


def _check_rows(n: int, **tensors: torch.Tensor | None) -> None:
    for name, tensor in tensors.items():
        if tensor is not None and tensor.shape[0] != n:
            raise ConfigError(
                f"{name} has {tensor.shape[0]} rows but hidden has {n}; pass one row per position"
            )


def _check_pair(name: str, ids: torch.Tensor | None, values: torch.Tensor | None) -> None:
    if (ids is None) != (values is None):
        raise ConfigError(f"{name}: pass the ids with their log-probs, or neither")
    if ids is not None and (ids.dim() != 2 or values.shape != ids.shape):
        raise ConfigError(
            f"{name}: ids {tuple(ids.shape)} and log-probs {tuple(values.shape)} must both be (N, w)"
        )


def chunked_distill_loss(
    hidden: torch.Tensor,
    head: OutputHead,
    topk_ids: torch.Tensor | None,
    topk_logprobs: torch.Tensor | None,
    tail_mass: torch.Tensor | None,
    labels: torch.Tensor | None,
    kd_weight: torch.Tensor | None,
    ce_weight: torch.Tensor | None,
    *,
    kind: str = "akl",
    mu: float = 0.5,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    skew: float = 0.1,
    method: str = "fused",
    tail_ids: torch.Tensor | None = None,
    tail_logprobs: torch.Tensor | None = None,
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Sparse-teacher KD + CE over N positions without materializing the (N, V) logits.

    Args:
        hidden: (N, H) the student body's last hidden states (any float dtype).
        head: the student's ``OutputHead`` (weight (V, H), bias, scale, softcap).
        topk_ids, topk_logprobs: (N, k) the cached teacher top-k (see ``sparse_kd_loss``);
            None for a CE-only loss.
        tail_mass: (N,) the cached tail mass, or None (-> 1 - sum of top-k mass).
        labels: (N,) next-token ids for CE, -100 where there is none; None for no CE.
        kd_weight, ce_weight: (N,) per-position weights (the caller normalizes, e.g.
            (1 - alpha) / n_distilled; 0 for padding). None drops that term.
        kind, mu, temperature, skew: as in ``sparse_kd_loss`` (temperature applies to KD only).
        chunk_size: rows of logits alive at once. method: "fused" (default) or "plain".
        tail_ids, tail_logprobs: (N, s) tail samples of a topk_samples cache: KD is then
            ``kdcache.trainer.sampled.topk_tail_kd_loss`` (FKL / AKL use the samples).
        compute_dtype: the head GEMMs' operand dtype (None: hidden's; e.g. torch.bfloat16 with
            fp32 master weights); the loss math stays float32.

    Returns:
        scalar float32: sum_i kd_weight_i * KD_i + ce_weight_i * CE_i.
    """
    options = LossOptions(kind=kind, mu=mu, temperature=temperature, skew=skew)
    n = hidden.shape[0]
    _check_rows(n, topk_ids=topk_ids, tail_mass=tail_mass, labels=labels, tail_ids=tail_ids)
    _check_rows(n, kd_weight=kd_weight, ce_weight=ce_weight)
    _check_pair("top-k", topk_ids, topk_logprobs)
    _check_pair("tail samples", tail_ids, tail_logprobs)
    target: TeacherTarget | None = None
    rows: TeacherRows = {}
    if topk_ids is not None:
        check_teacher_ids("topk_ids", topk_ids, head.vocab_size)
        if tail_mass is None:  # derived once per call, not per chunk
            tail_mass = (1.0 - topk_logprobs.float().exp().sum(-1)).clamp(0.0, 1.0)
        rows = {"topk_ids": topk_ids.long(), "topk_logprobs": topk_logprobs, "tail_mass": tail_mass}
        target = TopkBucketTarget()
        if tail_ids is not None:
            check_teacher_ids("tail_ids", tail_ids, head.vocab_size)
            rows.update(tail_ids=tail_ids.long(), tail_logprobs=tail_logprobs)
            target = TopkSamplesTarget()
    elif tail_ids is not None:
        raise ConfigError("tail samples need topk_ids (k may be 0): pass both")
    kernel = loss_kernel(target, rows, options, kd_weight, labels, ce_weight)
    return chunked_head_loss(
        hidden, head, kernel, chunk_size=chunk_size, method=method, compute_dtype=compute_dtype
    )


def chunked_dense_distill_loss(
    hidden: torch.Tensor,
    head: OutputHead,
    labels: torch.Tensor | None,
    kd_weight: torch.Tensor | None,
    ce_weight: torch.Tensor | None,
    *,
    teacher_hidden: torch.Tensor | None = None,
    teacher_head: OutputHead | None = None,
    teacher_logits: torch.Tensor | None = None,
    kind: str = "akl",
    mu: float = 0.5,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    skew: float = 0.1,
    method: str = "fused",
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Full-vocabulary KD (online teacher) + CE, both heads run chunk by chunk.

    The teacher is ``teacher_head`` over ``teacher_hidden`` (N, H_teacher), its logits computed
    one chunk at a time, or given ``teacher_logits`` (N, V_teacher). They never receive
    gradients. Other arguments as in ``chunked_distill_loss``; KD is ``dense_kd_loss``.
    """
    options = LossOptions(kind=kind, mu=mu, temperature=temperature, skew=skew)
    if teacher_logits is not None:
        states, teacher_head = teacher_logits, None
    elif teacher_hidden is not None and teacher_head is not None:
        states = teacher_hidden
    else:
        raise ConfigError("pass teacher_hidden with teacher_head, or teacher_logits")
    _check_rows(hidden.shape[0], teacher=states, labels=labels, kd_weight=kd_weight)
    _check_rows(hidden.shape[0], ce_weight=ce_weight)
    target = DenseTeacherTarget(None, teacher_head, head.vocab_size)
    rows = {"teacher_states": states}
    kernel = loss_kernel(target, rows, options, kd_weight, labels, ce_weight)
    return chunked_head_loss(
        hidden, head, kernel, chunk_size=chunk_size, method=method, compute_dtype=compute_dtype
    )

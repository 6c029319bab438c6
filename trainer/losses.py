"""Distillation divergences on full student logits: the public per-row loss functions.

``sparse_kd_loss`` (top-k + tail bucket) and ``dense_kd_loss`` (full teacher logits) check their
inputs and call the teacher targets' math (``kdcache.trainer.targets``), which calls
``kdcache.trainer.divergences``. With ``k = V`` the bucket is empty and ``sparse_kd_loss`` equals
``dense_kd_loss``. All math runs in float32 (float64 inputs stay float64); the teacher side never
receives gradients. See docs/LOSSES.md for the formulas, the AKL rule and the numerical guards.
Training does not call these (the fused chunked head does, through the targets); they are the
reference and the API for users' own loops.
"""

from __future__ import annotations

import torch

from kdcache.cache.errors import ConfigError
from kdcache.trainer.divergences import (
    LOSS_KINDS,
    REDUCTIONS,
    akl_head_mask,
    check_loss_options,
    reduce,
)
from kdcache.trainer.targets.base import LossOptions
from kdcache.trainer.targets.dense import dense_divergence
from kdcache.trainer.targets.topk_bucket import bucket_divergence

__all__ = [
    "LOSS_KINDS",
    "REDUCTIONS",
    "akl_head_mask",
    "check_loss_options",
    "check_teacher_ids",
    "dense_kd_loss",
    "sparse_kd_loss",
]


def check_teacher_ids(name: str, ids: torch.Tensor, vocab_size: int) -> None:
    """ConfigError when integer ``ids`` fall outside the student's vocabulary [0, vocab_size)."""
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ConfigError(f"{name} must be an integer tensor, got {ids.dtype}")
    if ids.numel() and (int(ids.max()) >= vocab_size or int(ids.min()) < 0):
        raise ConfigError(
            f"{name} hold ids outside the student's vocabulary [0, {vocab_size}); the cache was "
            "built with a larger vocabulary than this student's lm_head"
        )


def _check_shapes(
    student_logits: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    tail_mass: torch.Tensor | None,
) -> None:
    if student_logits.dim() != 2:
        raise ConfigError(
            f"student_logits must be (N, V), got shape {tuple(student_logits.shape)}; "
            "flatten batch and time first"
        )
    n, vocab = student_logits.shape
    if topk_ids.dim() != 2 or topk_ids.shape[0] != n or topk_logprobs.shape != topk_ids.shape:
        raise ConfigError(
            f"topk_ids {tuple(topk_ids.shape)} and topk_logprobs {tuple(topk_logprobs.shape)} "
            f"must both be (N, k) with N = {n} rows like student_logits"
        )
    if tail_mass is not None and tuple(tail_mass.shape) != (n,):
        raise ConfigError(f"tail_mass must be (N,) = ({n},), got {tuple(tail_mass.shape)}")
    check_teacher_ids("topk_ids", topk_ids, vocab)


def sparse_kd_loss(
    student_logits: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    tail_mass: torch.Tensor | None = None,
    kind: str = "akl",
    mu: float = 0.5,
    reduction: str = "none",
    temperature: float = 1.0,
    skew: float = 0.1,
) -> torch.Tensor:
    """Divergence between a sparse teacher (top-k + tail bucket) and the student, per row.

    Args:
        student_logits: (N, V) raw student logits (any float dtype; math in float32).
        topk_ids: (N, k) integer teacher token ids. Entries whose log-prob is -inf are padding
            (absent) and are ignored, whatever their id.
        topk_logprobs: (N, k) teacher log-probabilities at the cache temperature.
        tail_mass: (N,) teacher mass outside the top-k. None -> 1 - sum(exp(topk_logprobs)),
            clamped to [0, 1] (imprecise where the tail is small: pass the stored value).
        kind: one of ``LOSS_KINDS``: "fkl", "rkl", "akl", "js", "tvd", "skew-fkl", "skew-rkl".
        mu: AKL head mass threshold in (0, 1).
        reduction: "none" -> (N,), "mean" or "sum" -> scalar.
        temperature: the student's logits are divided by it (use the cache's temperature).
        skew: mixing weight of the skew KLs.

    Returns:
        (N,) per-position losses, or a scalar. No temperature**2 factor is applied.
    """
    check_loss_options(kind, mu, reduction, temperature, skew)
    _check_shapes(student_logits, topk_ids, topk_logprobs, tail_mass)
    options = LossOptions(kind=kind, mu=mu, temperature=temperature, skew=skew)
    loss = bucket_divergence(student_logits, topk_ids, topk_logprobs, tail_mass, options)
    return reduce(loss, reduction)


def dense_kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    kind: str = "akl",
    mu: float = 0.5,
    reduction: str = "none",
    temperature: float = 1.0,
    skew: float = 0.1,
) -> torch.Tensor:
    """Full-vocabulary divergence between teacher and student logits, per row.

    Args:
        student_logits: (N, V) raw student logits.
        teacher_logits: (N, V') raw teacher logits (no gradient); V' <= V (a student padded to a
            larger vocabulary gets teacher probability 0 on the extra ids).
        kind, mu, reduction, temperature, skew: as in ``sparse_kd_loss``; both models' logits
            are divided by ``temperature``.

    Returns:
        (N,) per-position losses, or a scalar.
    """
    check_loss_options(kind, mu, reduction, temperature, skew)
    if student_logits.dim() != 2 or teacher_logits.dim() != 2:
        raise ConfigError("student_logits and teacher_logits must both be (N, V) tensors")
    n, vocab = student_logits.shape
    if teacher_logits.shape[0] != n or teacher_logits.shape[1] > vocab:
        raise ConfigError(
            f"teacher_logits {tuple(teacher_logits.shape)} do not fit student_logits "
            f"{tuple(student_logits.shape)}: same rows, teacher vocabulary <= student's"
        )
    options = LossOptions(kind=kind, mu=mu, temperature=temperature, skew=skew)
    return reduce(dense_divergence(student_logits, teacher_logits, options), reduction)

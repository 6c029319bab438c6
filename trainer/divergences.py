"""Divergences between two distributions over M outcomes per row: the math alone.

No I/O, no storage modes, no tensors of the vocabulary size: callers reduce the student and the
teacher to the same outcomes (the top-k ids plus a tail bucket, or the whole vocabulary) and
pass log-probabilities here. The AKL gap weights are written once (``akl_gap_sums``,
``akl_mix_weights``) and used by every AKL in the package. See docs/LOSSES.md for the formulas.
"""

from __future__ import annotations

import math

import torch

from kdcache.cache.errors import ConfigError

LOSS_KINDS: tuple[str, ...] = ("fkl", "rkl", "akl", "js", "tvd", "skew-fkl", "skew-rkl")
REDUCTIONS: tuple[str, ...] = ("none", "mean", "sum")

__all__ = [
    "LOSS_KINDS",
    "REDUCTIONS",
    "akl_gap_sums",
    "akl_head_mask",
    "akl_mix_weights",
    "check_loss_options",
    "compute_dtype",
    "kl_terms",
    "outcome_divergence",
    "reduce",
]


def check_loss_options(
    kind: str, mu: float = 0.5, reduction: str = "none", temperature: float = 1.0, skew: float = 0.1
) -> None:
    """Raise ``ConfigError`` (one line per problem) for an unknown kind or an out-of-range value."""
    problems = []
    if kind not in LOSS_KINDS:
        problems.append(f"unknown loss kind {kind!r}; choose one of {', '.join(LOSS_KINDS)}")
    if not 0.0 < mu < 1.0:
        problems.append(f"mu must be in (0, 1) (the AKL head mass), got {mu}")
    if reduction not in REDUCTIONS:
        problems.append(f"unknown reduction {reduction!r}; choose one of {', '.join(REDUCTIONS)}")
    if not (temperature > 0.0 and math.isfinite(temperature)):
        problems.append(f"temperature must be a positive number, got {temperature}")
    if not 0.0 < skew < 1.0:
        problems.append(f"skew must be in (0, 1) (the skew-KL mixing weight), got {skew}")
    if problems:
        raise ConfigError("; ".join(problems))


def compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    """float32 for half/bfloat16/float32 inputs, float64 for float64 inputs."""
    return torch.promote_types(tensor.dtype, torch.float32)


def reduce(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    """(N,) -> (N,) for "none", a scalar for "mean" / "sum"."""
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


def akl_head_mask(probs: torch.Tensor, valid: torch.Tensor, mu: float) -> torch.Tensor:
    """The AKL head of each row of ``probs`` (N, M) -> (N, M) bool.

    The authors' rule: sort the teacher's probabilities descending; the head is the top-1 outcome
    plus every further outcome whose inclusive cumulative mass is <= mu. Invalid outcomes (absent
    padding) are never in the head.
    """
    probs = torch.where(valid, probs, -1.0)  # absent entries sort last
    sorted_probs, order = probs.sort(dim=-1, descending=True)  # (N, M)
    cumulative = sorted_probs.clamp_min(0.0).cumsum(-1)  # (N, M)
    head_sorted = cumulative <= mu
    head_sorted[:, :1] = True  # (no column at all when M = 0)
    head = torch.zeros_like(head_sorted).scatter_(-1, order, head_sorted)
    return head & valid


def akl_gap_sums(
    p: torch.Tensor, q: torch.Tensor, head: torch.Tensor, valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(g_head, g_tail) (N,): sums of |p - q| over the head and over the other valid outcomes.

    p, q (N, M) probabilities, head / valid (N, M) bool. Detached (AKL's weights get no gradient).
    """
    gap = (p - q).abs().detach()  # (N, M)
    return (gap * (head & valid)).sum(-1), (gap * (~head & valid)).sum(-1)


def akl_mix_weights(
    g_head: torch.Tensor, g_tail: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """AKL's (FKL weight, RKL weight) (N,): g_head / (g_head + g_tail), g_tail / (...).

    0/0 (identical distributions) gives weights 0: the loss is 0 there.
    """
    total = (g_head + g_tail).clamp_min(torch.finfo(g_head.dtype).tiny)
    return g_head / total, g_tail / total


def kl_terms(a: torch.Tensor, log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """sum_m a_m (log a_m - log b_m) -> (N,); a = 0 contributes 0 (the log terms are finite)."""
    return (a * (log_a - log_b)).sum(-1)


def outcome_divergence(
    log_p: torch.Tensor,
    log_q: torch.Tensor,
    valid: torch.Tensor,
    head: torch.Tensor | None,
    kind: str,
    skew: float = 0.1,
) -> torch.Tensor:
    """Divergence between two distributions over M outcomes per row -> (N,).

    log_p (N, M) teacher (no gradient), log_q (N, M) student, valid (N, M) bool: outcomes that
    exist (others are ignored and may hold any value, -inf and NaN included). head (N, M) bool:
    the AKL head (only for kind "akl"). Zero-probability outcomes follow 0 log 0 = 0; a teacher
    outcome with p = 0 but q > 0 uses log p floored at the smallest normal float (finite RKL).
    """
    # Replace absent outcomes by a harmless 0 *before* any op so no NaN reaches the gradient.
    log_p = torch.where(valid, log_p.detach(), 0.0)
    log_q = torch.where(valid, log_q, 0.0).clamp_min(-1e30)  # a -inf student logit: q = 0, no NaN
    log_p = log_p.clamp_min(math.log(torch.finfo(log_p.dtype).tiny))  # p = 0 -> tiny, finite
    mask = valid.to(log_p.dtype)
    p = log_p.exp() * mask  # (N, M)
    q = log_q.exp() * mask  # (N, M)
    if kind == "fkl":
        return kl_terms(p, log_p, log_q)
    if kind == "rkl":
        return kl_terms(q, log_q, log_p)
    if kind == "akl":
        if head is None:
            raise ValueError("kind 'akl' needs the head mask")  # invariant: callers pass it
        w_fkl, w_rkl = akl_mix_weights(*akl_gap_sums(p, q, head, valid))
        return w_fkl * kl_terms(p, log_p, log_q) + w_rkl * kl_terms(q, log_q, log_p)
    if kind == "js":
        log_m = torch.logaddexp(log_p, log_q) - math.log(2.0)  # (N, M)
        return 0.5 * kl_terms(p, log_p, log_m) + 0.5 * kl_terms(q, log_q, log_m)
    if kind == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    if kind == "skew-fkl":  # KL(p || skew p + (1 - skew) q)
        log_m = torch.logaddexp(log_p + math.log(skew), log_q + math.log1p(-skew))
        return kl_terms(p, log_p, log_m)
    if kind == "skew-rkl":  # KL(q || skew q + (1 - skew) p)
        log_m = torch.logaddexp(log_q + math.log(skew), log_p + math.log1p(-skew))
        return kl_terms(q, log_q, log_m)
    raise ConfigError(f"unknown loss kind {kind!r}; choose one of {', '.join(LOSS_KINDS)}")

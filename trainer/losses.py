"""Distillation divergences for a sparse (top-k + tail mass) or a full teacher distribution.

A cached teacher position holds the ids ``S`` of its top-k tokens, their log-probabilities and the
probability mass of every other token (the tail). The sparse losses treat the tail as one extra
outcome, the *bucket*: both distributions are coarsened to ``k + 1`` outcomes (the ``k`` tokens of
``S`` and "anything else") and the divergence is computed exactly over those outcomes. With
``k = V`` the bucket is empty and the losses equal the full-vocabulary ones (``dense_kd_loss``).

All math runs in float32 (float64 inputs stay float64). The teacher side never receives
gradients. See docs/LOSSES.md for the formulas, the AKL rule and the numerical guards.
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
    "akl_head_mask",
    "check_loss_options",
    "dense_kd_loss",
    "sparse_kd_loss",
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


def _compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    """float32 for half/bfloat16/float32 inputs, float64 for float64 inputs."""
    return torch.promote_types(tensor.dtype, torch.float32)


def _reduce(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


def _outcome_divergence(
    log_p: torch.Tensor,
    log_q: torch.Tensor,
    valid: torch.Tensor,
    head: torch.Tensor | None,
    kind: str,
    skew: float,
) -> torch.Tensor:
    """Divergence between two distributions over M outcomes per row -> (N,).

    log_p (N, M) teacher (no gradient), log_q (N, M) student, valid (N, M) bool: outcomes that
    exist (others are ignored and may hold any value, -inf and NaN included). head (N, M) bool:
    the AKL head (only for kind "akl"). Zero-probability outcomes follow 0 log 0 = 0; a teacher
    outcome with p = 0 but q > 0 uses log p floored at the smallest normal float (finite RKL).
    """
    # Replace absent outcomes by a harmless 0 *before* any op so no NaN reaches the gradient.
    log_p = torch.where(valid, log_p, 0.0)
    log_q = torch.where(valid, log_q, 0.0)
    log_p = log_p.clamp_min(math.log(torch.finfo(log_p.dtype).tiny))  # p = 0 -> tiny, finite
    mask = valid.to(log_p.dtype)
    p = log_p.exp() * mask  # (N, M)
    q = log_q.exp() * mask  # (N, M)

    def kl(a: torch.Tensor, log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
        return (a * (log_a - log_b)).sum(-1)  # a = 0 -> 0 (log terms are finite)

    if kind == "fkl":
        return kl(p, log_p, log_q)
    if kind == "rkl":
        return kl(q, log_q, log_p)
    if kind == "akl":
        assert head is not None
        gap = (p - q).abs().detach()  # (N, M)
        g_head = (gap * (head & valid)).sum(-1)  # (N,)
        g_tail = (gap * (~head & valid)).sum(-1)  # (N,)
        total = (g_head + g_tail).clamp_min(torch.finfo(gap.dtype).tiny)  # 0/0 -> weights 0
        return g_head / total * kl(p, log_p, log_q) + g_tail / total * kl(q, log_q, log_p)
    if kind == "js":
        log_m = torch.logaddexp(log_p, log_q) - math.log(2.0)  # (N, M)
        return 0.5 * kl(p, log_p, log_m) + 0.5 * kl(q, log_q, log_m)
    if kind == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    if kind == "skew-fkl":  # KL(p || skew p + (1 - skew) q)
        log_m = torch.logaddexp(log_p + math.log(skew), log_q + math.log1p(-skew))
        return kl(p, log_p, log_m)
    if kind == "skew-rkl":  # KL(q || skew q + (1 - skew) p)
        log_m = torch.logaddexp(log_q + math.log(skew), log_p + math.log1p(-skew))
        return kl(q, log_q, log_m)
    raise ConfigError(f"unknown loss kind {kind!r}; choose one of {', '.join(LOSS_KINDS)}")


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
    head_sorted[:, 0] = True
    head = torch.zeros_like(head_sorted).scatter_(-1, order, head_sorted)
    return head & valid


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
    if topk_ids.dtype.is_floating_point or topk_ids.dtype == torch.bool:
        raise ConfigError(f"topk_ids must be an integer tensor, got {topk_ids.dtype}")
    if topk_ids.numel() and (int(topk_ids.max()) >= vocab or int(topk_ids.min()) < 0):
        raise ConfigError(
            f"topk_ids hold ids outside the student's vocabulary [0, {vocab}); the cache was "
            "built with a larger vocabulary than this student's lm_head"
        )


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
    dtype = _compute_dtype(student_logits)
    n, vocab = student_logits.shape
    topk_ids = topk_ids.long()

    # Student: log q over the vocabulary, gathered at S, and the tail in log space.
    logits = student_logits.to(dtype) / temperature  # (N, V)
    log_norm = torch.logsumexp(logits, dim=-1)  # (N,)
    log_q_topk = logits.gather(1, topk_ids) - log_norm[:, None]  # (N, k)

    teacher_logprobs = topk_logprobs.detach().to(dtype)  # (N, k)
    present = teacher_logprobs > -math.inf  # (N, k); -inf (and NaN) entries are padding
    in_topk = torch.zeros(n, vocab, dtype=torch.uint8, device=logits.device)
    in_topk.scatter_reduce_(1, topk_ids, present.to(torch.uint8), reduce="amax")  # (N, V)
    in_topk = in_topk.bool()
    has_tail = in_topk.sum(-1) < vocab  # (N,) False when S covers the whole vocabulary
    # Rows without a tail keep their logits (finite, harmless) and get the bucket masked out.
    outside = logits.masked_fill(in_topk & has_tail[:, None], -math.inf)  # (N, V)
    log_q_tail = torch.logsumexp(outside, dim=-1) - log_norm  # (N,) exact, even when tiny

    # Teacher: p_S and p_tail, renormalized so that they sum to 1.
    p_topk = torch.where(present, teacher_logprobs, -math.inf).exp()  # (N, k)
    if tail_mass is None:
        p_tail = (1.0 - p_topk.sum(-1)).clamp(0.0, 1.0)  # (N,)
    else:
        p_tail = tail_mass.detach().to(dtype).clamp(0.0, 1.0)  # (N,)
    p_tail = torch.where(has_tail, p_tail, 0.0)
    log_total = torch.log((p_topk.sum(-1) + p_tail).clamp_min(torch.finfo(dtype).tiny))  # (N,)
    log_p_topk = teacher_logprobs - log_total[:, None]  # (N, k)
    log_p_tail = torch.log(p_tail) - log_total  # (N,) -inf when the tail is empty

    log_p = torch.cat([log_p_topk, log_p_tail[:, None]], dim=1)  # (N, k + 1)
    log_q = torch.cat([log_q_topk, log_q_tail[:, None]], dim=1)  # (N, k + 1)
    valid = torch.cat([present, has_tail[:, None]], dim=1)  # (N, k + 1)
    head = None
    if kind == "akl":  # the bucket always belongs to the tail
        head_topk = akl_head_mask(log_p_topk.exp(), present, mu)  # (N, k)
        head = torch.cat([head_topk, torch.zeros_like(has_tail)[:, None]], dim=1)
    loss = _outcome_divergence(log_p, log_q, valid, head, kind, skew)  # (N,)
    return _reduce(loss, reduction)


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
    dtype = _compute_dtype(student_logits)
    log_q = torch.log_softmax(student_logits.to(dtype) / temperature, dim=-1)  # (N, V)
    log_p = torch.log_softmax(teacher_logits.detach().to(dtype) / temperature, dim=-1)
    if log_p.shape[1] < vocab:  # padded student vocabulary: the teacher gives it no mass
        log_p = torch.nn.functional.pad(log_p, (0, vocab - log_p.shape[1]), value=-math.inf)
    valid = torch.ones_like(log_p, dtype=torch.bool)
    head = akl_head_mask(log_p.exp(), valid, mu) if kind == "akl" else None
    return _reduce(_outcome_divergence(log_p, log_q, valid, head, kind, skew), reduction)

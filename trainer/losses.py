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
    log_q = torch.where(valid, log_q, 0.0).clamp_min(-1e30)  # a -inf student logit: q = 0, no NaN
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
    head_sorted[:, :1] = True  # (no column at all when M = 0)
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


def _student_outcomes(
    logits: torch.Tensor, topk_ids: torch.Tensor, present: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Student log q at S (N, k), log q_tail (N,) exact in log space, has_tail (N,) bool.

    logits: (N, V) already divided by the temperature. Absent entries (present False) do not
    count in S, whatever their id.
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
    topk_ids = topk_ids.long()
    logits = student_logits.to(dtype) / temperature  # (N, V)
    present = topk_logprobs.detach() > -math.inf  # (N, k); -inf (and NaN) entries are padding
    log_q_topk, log_q_tail, has_tail = _student_outcomes(logits, topk_ids, present)

    # Teacher: p_S and p_tail, renormalized so that they sum to 1.
    log_p, valid, head = _teacher_outcomes(topk_logprobs, tail_mass, has_tail, kind, mu, dtype)
    log_q = torch.cat([log_q_topk, log_q_tail[:, None]], dim=1)  # (N, k + 1)
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


def _teacher_outcomes(
    topk_logprobs: torch.Tensor,
    tail_mass: torch.Tensor | None,
    has_tail: torch.Tensor,
    kind: str,
    mu: float,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The teacher's renormalized (k + 1)-outcome log-probs (N, k + 1), valid mask, AKL head."""
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


@torch.no_grad()
def sparse_kd_loss_with_grad(
    logits: torch.Tensor,
    topk_ids: torch.Tensor | None,
    topk_logprobs: torch.Tensor | None,
    tail_mass: torch.Tensor | None,
    kd_weight: torch.Tensor | None,
    labels: torch.Tensor | None,
    ce_weight: torch.Tensor | None,
    *,
    kind: str = "akl",
    mu: float = 0.5,
    temperature: float = 1.0,
    skew: float = 0.1,
    tail_ids: torch.Tensor | None = None,
    tail_logprobs: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``kd_weight * sparse_kd_loss + ce_weight * CE`` per row and its gradient w.r.t. logits.

    The fast kernel of the fused chunked loss: a handful of passes over the (C, V) logits instead
    of autograd through the plain formulas. With Q the student's (k + 1)-outcome distribution and
    r = dD/dlog Q (autograd on the small (C, k + 1) problem), the chain rule through the softmax
    gives, at z = logits / T:  dD/dz_j = r_j [j in S] + r_tail softmax_outside_S(z)_j
    - q_j sum(r). Assumes the present top-k ids of a row are distinct (as top-k ids are).

    Args:
        logits: (C, V) float32 student logits (not modified).
        topk_ids, topk_logprobs, tail_mass: (C, k), (C, k), (C,) as in ``sparse_kd_loss``; ids
            None for CE only. kd_weight: (C,) or None.
        labels: (C,) CE targets (-100 = none) or None; ce_weight: (C,) or None. CE is at T = 1.
        tail_ids, tail_logprobs: (C, s) importance-sampled tail tokens (topk+tail cache): the
            loss is then ``topk_tail_kd_loss`` (FKL/AKL; RKL ignores them).

    Returns:
        ((C,) weighted per-row loss, (C, V) float32 gradient of its sum w.r.t. ``logits``).
    """
    rows, vocab = logits.shape
    max_logit = logits.amax(-1)  # (C,)
    exp_shifted = (logits - max_logit[:, None]).div_(temperature).exp_()  # (C, V) e_j
    loss = logits.new_zeros(rows)
    coef = logits.new_zeros(rows)  # gradient outside S = e_j * coef
    ce_w = None
    if labels is not None and ce_weight is not None:
        ce_w = torch.where(labels != -100, ce_weight.float(), 0.0)  # (C,)
        safe_labels = labels.clamp_min(0).long()[:, None]  # (C, 1)
    fold_ce = ce_w is not None and temperature == 1.0
    s_values = sample_w = None
    if topk_ids is not None and kd_weight is not None:
        ids = topk_ids.long()
        present = topk_logprobs > -math.inf  # (C, k)
        k = ids.shape[1]
        e_topk = exp_shifted.gather(1, ids)  # (C, k)
        # Zero e at S; padding entries rewrite a present id of their row with the same value.
        any_present = present.any(-1)  # (C,)
        first = present.int().argmax(-1, keepdim=True)  # (C, 1)
        columns = torch.arange(k, device=ids.device).expand(rows, k)
        canon_cols = torch.where(present, columns, first)  # (C, k)
        canon_ids = ids.gather(1, canon_cols)
        no_op = e_topk.gather(1, canon_cols)  # rows without present entries: write e back
        exp_shifted.scatter_(1, canon_ids, torch.where(any_present[:, None], 0.0, no_op))
        sum_tail = exp_shifted.sum(-1)  # (C,) exact: a sum of the tail terms only
        sum_all = sum_tail + (e_topk * present).sum(-1)  # (C,)
        has_tail = present.sum(-1) < vocab
        log_sum = torch.log(sum_all)
        z_topk = (logits.gather(1, ids) - max_logit[:, None]) / temperature  # (C, k)
        log_q_topk = z_topk - log_sum[:, None]
        tiny_tail = has_tail & (sum_tail < 1e-25)  # recomputed exactly below
        log_q_tail = torch.where(has_tail & ~tiny_tail, torch.log(sum_tail) - log_sum, 0.0)
        log_q = torch.cat([log_q_topk, log_q_tail[:, None]], 1).requires_grad_()  # (C, k + 1)
        log_p, valid, head = _teacher_outcomes(topk_logprobs, tail_mass, has_tail, kind, mu)
        with torch.enable_grad():
            kd = _outcome_divergence(log_p, log_q, valid, head, kind, skew)  # (C,)
            (r,) = torch.autograd.grad((kd * kd_weight.float()).sum(), log_q)  # (C, k + 1)
        loss += kd_weight.float() * kd.detach()
        r = r * valid
        r_tail, r_sum = r[:, k], r.sum(-1)  # (C,)
        if tail_ids is not None and kind in ("fkl", "akl"):  # topk+tail: unbiased FKL tail part
            from kdcache.trainer.sampled import tail_sample_correction

            p_topk = torch.where(present, topk_logprobs.float(), -math.inf).exp().sum(-1)  # (C,)
            p_tail_raw = (1.0 - p_topk) if tail_mass is None else tail_mass.float()
            p_tail_raw = torch.where(has_tail, p_tail_raw.clamp(0.0, 1.0), 0.0)
            log_total = torch.log((p_topk + p_tail_raw).clamp_min(torch.finfo(torch.float32).tiny))
            log_q_samples = (logits.gather(1, tail_ids.long()) - max_logit[:, None]) / temperature
            delta, c, sample_w = tail_sample_correction(
                log_p,
                log_q.detach(),
                valid,
                head,
                log_total,
                log_q_samples - log_sum[:, None],
                tail_logprobs,
            )
            loss += kd_weight.float() * delta
            r_tail = r_tail + kd_weight.float() * c
            sample_w = sample_w * kd_weight.float()[:, None]
        coef += torch.where(sum_tail > 0, r_tail / sum_tail.clamp_min(1e-30), 0.0) - r_sum / sum_all
        q_topk = log_q_topk.exp()  # (C, k)
        s_values = r[:, :k] - q_topk * r_sum[:, None]  # (C, k) gradient at S
        if fold_ce:
            s_values = s_values + q_topk * ce_w[:, None]
    else:
        sum_all = exp_shifted.sum(-1)
        log_sum = torch.log(sum_all)
    if fold_ce:
        coef += ce_w / sum_all
    grad = exp_shifted.mul_(coef[:, None])  # (C, V), 0 at S
    if s_values is not None:
        current = grad.gather(1, canon_ids)  # rows without present entries keep their values
        values = torch.where(any_present[:, None], s_values.gather(1, canon_cols), current)
        grad.scatter_(1, canon_ids, values)
    if sample_w is not None:  # tail ids are outside S: after the S values are written
        grad.scatter_add_(1, tail_ids.long(), -sample_w)
    if temperature != 1.0:
        grad.div_(temperature)
    if ce_w is not None:
        if temperature == 1.0:
            log_norm = max_logit + log_sum
        else:
            log_norm = torch.logsumexp(logits, -1)
            grad.add_((logits - log_norm[:, None]).exp_().mul_(ce_w[:, None]))
        loss += ce_w * (log_norm - logits.gather(1, safe_labels)[:, 0])
        grad.scatter_add_(1, safe_labels, -ce_w[:, None])
    if s_values is not None and bool(tiny_tail.any()):  # the student's tail < 1e-25 of its max
        index = tiny_tail.nonzero()[:, 0]
        exact_loss, exact_grad = _autograd_rows(
            logits[index],
            topk_ids[index],
            topk_logprobs[index],
            None if tail_mass is None else tail_mass[index],
            kd_weight[index],
            None if ce_w is None else labels[index],
            None if ce_w is None else ce_weight[index],
            None if sample_w is None else (tail_ids[index], tail_logprobs[index]),
            kind=kind,
            mu=mu,
            temperature=temperature,
            skew=skew,
        )
        loss[index], grad[index] = exact_loss, exact_grad
    return loss, grad


def _autograd_rows(
    logits, topk_ids, topk_logprobs, tail_mass, kd_weight, labels, ce_weight, samples=None, **kw
):
    """The reference path of ``sparse_kd_loss_with_grad`` (autograd through the plain formulas)."""
    with torch.enable_grad():
        leaf = logits.detach().requires_grad_()
        if samples is None:
            kd = sparse_kd_loss(leaf, topk_ids, topk_logprobs, tail_mass, **kw)
        else:
            from kdcache.trainer.sampled import topk_tail_kd_loss

            if tail_mass is None:
                tail_mass = (1 - topk_logprobs.float().exp().sum(-1)).clamp(0.0, 1.0)
            kw.pop("skew")
            kd = topk_tail_kd_loss(leaf, topk_ids, topk_logprobs, tail_mass, *samples, **kw)
        loss = kd_weight.float() * kd
        if labels is not None:
            ce = torch.nn.functional.cross_entropy(
                leaf, labels, ignore_index=-100, reduction="none"
            )
            loss = loss + ce_weight.float() * ce
        (grad,) = torch.autograd.grad(loss.sum(), leaf)
    return loss.detach(), grad

"""Less-biased sparse caches: losses on sampled teacher tokens (issue 7, storage modes a and b).

Top-k + bucket KD is biased: the student never learns the shape of the teacher's tail. Two cache
modes fix the forward KL (the one that needs the teacher's tail) without a dense teacher:

(b) ``topk+tail``: the exact top-k plus ``s`` tail tokens drawn with replacement from the
    teacher's tail distribution p_j / p_tail (j outside S), stored with their teacher log-probs.
    FKL's tail part sum_{j not in S} p_j (log p_j - log q_j) is estimated without bias by
    p_tail * mean_s (log p_js - log q_js). RKL keeps the bucket (its tail part needs the student's
    whole tail against a teacher it does not know); AKL mixes the unbiased FKL with the bucket RKL
    using the bucket's gap weights.

(a) ``sampled`` (RS-KD, Anshumann et al. 2025): N tokens drawn from a proposal r (r = p by
    default), stored as unique ids with counts c_j and the teacher's log p_j (and log r_j when
    r != p). FKL = sum_j p_j (log p_j - log q_j) is estimated without bias by
    sum_j (c_j / N) (p_j / r_j) (log p_j - log q_j). Only FKL is supported.

The samplers here are the reference for the cache builder (cache/ must not import trainer/; copy
the few lines) and for the tests. See docs/LOSSES.md for the math.
"""

from __future__ import annotations

import math

import torch

from kdcache.cache.errors import ConfigError
from kdcache.trainer.losses import (
    _outcome_divergence,
    _reduce,
    _student_outcomes,
    _teacher_outcomes,
    check_loss_options,
    sparse_kd_loss,
)

__all__ = [
    "draw_samples",
    "draw_tail_samples",
    "sampled_kd_loss",
    "topk_tail_kd_loss",
]


SAMPLED_CACHE_LOSSES = (
    "a sampled cache (top-k 0: tail samples from the whole distribution) supports --loss fkl "
    "only: RKL and AKL need the teacher's probabilities where the samples are not; build with "
    "--top-k >= 1 for them"
)


def _check_pair(name: str, ids: torch.Tensor, values: torch.Tensor, rows: int) -> None:
    if ids.dim() != 2 or ids.shape[0] != rows or values.shape != ids.shape:
        raise ConfigError(
            f"{name}: ids {tuple(ids.shape)} and values {tuple(values.shape)} must both be "
            f"(N, s) with N = {rows} rows like student_logits"
        )


def topk_tail_kd_loss(
    student_logits: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    tail_mass: torch.Tensor,
    tail_ids: torch.Tensor,
    tail_logprobs: torch.Tensor,
    kind: str = "akl",
    mu: float = 0.5,
    reduction: str = "none",
    temperature: float = 1.0,
) -> torch.Tensor:
    """KD from the exact top-k plus importance-sampled tail tokens (mode b), per row.

    Args:
        student_logits: (N, V). topk_ids, topk_logprobs, tail_mass: as in ``sparse_kd_loss``.
        tail_ids: (N, s) ids drawn with replacement from p_j / p_tail over j outside S.
        tail_logprobs: (N, s) the teacher's log p_j of those ids (full-distribution scale);
            -inf marks an absent sample. Rows with no sample fall back to the bucket term.
        kind: "fkl" (unbiased full FKL), "rkl" (bucket RKL), "akl" (bucket gap weights, unbiased
            FKL part, bucket RKL part).

    Returns:
        (N,) or a scalar. For "fkl" its expectation over the draws is the full-vocabulary FKL.
    """
    check_loss_options(kind, mu, reduction, temperature)
    if kind not in ("fkl", "rkl", "akl"):
        raise ConfigError(f"the topk+tail mode supports fkl, rkl and akl, not {kind!r}")
    if topk_ids.shape[-1] == 0 and kind != "fkl":
        raise ConfigError(SAMPLED_CACHE_LOSSES)
    if kind == "rkl":
        return sparse_kd_loss(
            student_logits, topk_ids, topk_logprobs, tail_mass, "rkl", mu, reduction, temperature
        )
    rows = student_logits.shape[0]
    _check_pair("tail samples", tail_ids, tail_logprobs, rows)
    if tail_ids.numel() and int(tail_ids.max()) >= student_logits.shape[1]:
        raise ConfigError("tail_ids hold ids outside the student's vocabulary")
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    logits = student_logits.to(dtype) / temperature  # (N, V)
    topk_ids = topk_ids.long()
    present = topk_logprobs.detach() > -math.inf  # (N, k)
    log_q_topk, log_q_tail, has_tail = _student_outcomes(logits, topk_ids, present)
    log_p, valid, head = _teacher_outcomes(topk_logprobs, tail_mass, has_tail, kind, mu, dtype)
    log_q = torch.cat([log_q_topk, log_q_tail[:, None]], dim=1)  # (N, k + 1)
    k = topk_ids.shape[1]

    # The exact FKL over S and the bucket (the bucket term is replaced where there are samples).
    fkl_topk = _outcome_divergence(log_p[:, :k], log_q_topk, valid[:, :k], None, "fkl", 0.1)
    fkl_bucket = _outcome_divergence(log_p[:, k:], log_q[:, k:], valid[:, k:], None, "fkl", 0.1)
    # Unbiased tail part: p_tail * mean over samples of (log p_j - log q_j), with p_j divided by
    # the same stored total (sum p_S + p_tail) as p_S and p_tail.
    sampled = (tail_logprobs.detach() > -math.inf) & has_tail[:, None]  # (N, s)
    n_samples = sampled.sum(-1)  # (N,)
    p_topk_raw = torch.where(present, topk_logprobs.detach().to(dtype), -math.inf).exp()
    log_total = torch.log(p_topk_raw.sum(-1) + tail_mass.detach().to(dtype).clamp(0.0, 1.0))
    log_q_samples = logits.gather(1, tail_ids.long()) - torch.logsumexp(logits, -1)[:, None]
    log_p_samples = tail_logprobs.detach().to(dtype) - log_total[:, None]  # (N, s)
    terms = torch.where(sampled, log_p_samples - log_q_samples, 0.0)  # (N, s)
    p_tail = torch.where(valid[:, k], log_p[:, k], -math.inf).exp()  # (N,) renormalized
    tail_estimate = p_tail * terms.sum(-1) / n_samples.clamp_min(1)
    fkl = fkl_topk + torch.where(n_samples > 0, tail_estimate, fkl_bucket)  # (N,)
    if kind == "fkl":
        return _reduce(fkl, reduction)
    q = torch.where(valid, log_q, -math.inf).exp()  # (N, k + 1)
    p = torch.where(valid, log_p, -math.inf).exp()
    gap = (p - q).abs().detach()
    g_head = (gap * head).sum(-1)  # (N,)
    g_tail = (gap * (valid & ~head)).sum(-1)
    total = (g_head + g_tail).clamp_min(torch.finfo(dtype).tiny)
    rkl = _outcome_divergence(log_p, log_q, valid, None, "rkl", 0.1)  # bucket RKL
    return _reduce(g_head / total * fkl + g_tail / total * rkl, reduction)


def sampled_kd_loss(
    student_logits: torch.Tensor,
    sample_ids: torch.Tensor,
    sample_counts: torch.Tensor,
    sample_logprobs: torch.Tensor,
    proposal_logprobs: torch.Tensor | None = None,
    kind: str = "fkl",
    reduction: str = "none",
    temperature: float = 1.0,
) -> torch.Tensor:
    """RS-KD forward KL from N sampled teacher tokens (mode a), per row.

    Args:
        student_logits: (N, V).
        sample_ids: (N, u) distinct sampled ids of each row (padding: count 0).
        sample_counts: (N, u) how often each id was drawn; the row's draws are their sum.
        sample_logprobs: (N, u) the teacher's log p of the ids (gives the entropy term, so the
            value estimates the KL itself; the gradient needs only the counts).
        proposal_logprobs: (N, u) log r of the ids when they were drawn from r != p.

    Returns:
        (N,) or a scalar: sum_j (c_j / N) (p_j / r_j) (log p_j - log q_j), whose expectation
        over the draws is the full-vocabulary FKL (and its gradient's, the FKL gradient).
    """
    check_loss_options("fkl", 0.5, reduction, temperature)
    if kind != "fkl":
        raise ConfigError(
            f"a sampled (RS-KD) cache supports kind='fkl' only, not {kind!r}: RKL and AKL need "
            "the teacher outside the samples; use a topk+tail cache for them"
        )
    rows = student_logits.shape[0]
    _check_pair("samples", sample_ids, sample_counts, rows)
    _check_pair("samples", sample_ids, sample_logprobs, rows)
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    logits = student_logits.to(dtype) / temperature  # (N, V)
    log_q = logits.gather(1, sample_ids.long()) - torch.logsumexp(logits, -1)[:, None]  # (N, u)
    counts = sample_counts.to(dtype)  # (N, u)
    weights = counts / counts.sum(-1, keepdim=True).clamp_min(1.0)  # (N, u) c_j / N
    log_p = sample_logprobs.detach().to(dtype)
    if proposal_logprobs is not None:
        _check_pair("samples", sample_ids, proposal_logprobs, rows)
        log_ratio = torch.where(counts > 0, log_p - proposal_logprobs.detach().to(dtype), 0.0)
        weights = weights * log_ratio.exp()  # importance weights p_j / r_j
    terms = torch.where(counts > 0, log_p - log_q, 0.0)  # (N, u)
    return _reduce((weights * terms).sum(-1), reduction)


@torch.no_grad()
def draw_tail_samples(
    teacher_logprobs: torch.Tensor,
    topk_ids: torch.Tensor,
    num_samples: int,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``num_samples`` ids per row from the teacher's tail p_j / p_tail (j outside S).

    Args:
        teacher_logprobs: (N, V) full teacher log-probs (cache temperature).
        topk_ids: (N, k) the stored top-k ids.

    Returns:
        (tail_ids (N, s) int64, tail_logprobs (N, s) teacher log p_j; -inf where the row has no
        tail mass to draw from).
    """
    outside = teacher_logprobs.float().scatter(1, topk_ids.long(), -math.inf)  # (N, V)
    has_tail = torch.isfinite(outside).any(-1) & (outside.exp().sum(-1) > 0)  # (N,)
    weights = torch.where(has_tail[:, None], outside.exp(), 1.0)
    ids = torch.multinomial(weights, num_samples, replacement=True, generator=generator)
    logprobs = teacher_logprobs.float().gather(1, ids)
    return ids, torch.where(has_tail[:, None], logprobs, -math.inf)


@torch.no_grad()
def draw_samples(
    teacher_logprobs: torch.Tensor,
    num_draws: int,
    generator: torch.Generator | None = None,
    proposal_temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """RS-KD draws: ``num_draws`` ids per row from r = softmax(log p / proposal_temperature).

    Returns:
        (ids (N, u), counts (N, u) int32, teacher log p (N, u), proposal log r (N, u) or None
        when r = p). ``u`` = the most distinct ids of any row; shorter rows are padded with id 0,
        count 0.
    """
    teacher_logprobs = teacher_logprobs.float()
    proposal = None
    if proposal_temperature != 1.0:
        proposal = torch.log_softmax(teacher_logprobs / proposal_temperature, -1)  # (N, V)
    draw_from = (teacher_logprobs if proposal is None else proposal).exp()
    draws = torch.multinomial(draw_from, num_draws, replacement=True, generator=generator)
    counts_full = torch.zeros_like(teacher_logprobs, dtype=torch.int32)
    counts_full.scatter_add_(1, draws, torch.ones_like(draws, dtype=torch.int32))  # (N, V)
    width = int((counts_full > 0).sum(-1).max())
    counts, ids = counts_full.topk(width, dim=-1)  # distinct ids first, zero counts last
    ids = torch.where(counts > 0, ids, 0)
    logprobs = teacher_logprobs.gather(1, ids)
    return ids, counts, logprobs, None if proposal is None else proposal.gather(1, ids)


@torch.no_grad()
def tail_sample_correction(
    log_p: torch.Tensor,
    log_q: torch.Tensor,
    valid: torch.Tensor,
    head: torch.Tensor | None,
    log_total: torch.Tensor,
    log_q_samples: torch.Tensor,
    tail_logprobs: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mode (b) as a correction of the bucket loss, for the fused kernel (no autograd).

    ``topk_tail_kd_loss = bucket loss + delta`` with ``delta = w (tail_estimate - bucket FKL
    term)``, ``w`` = 1 for FKL, the detached AKL head weight for AKL. Its gradient w.r.t. the
    student's z = logits / T is ``c * softmax_outside_S(z)_j - sum_m u_m [j = j_m]``: the q_j
    terms of the two parts cancel.

    Args:
        log_p, log_q, valid, head: (C, k + 1) outcomes as in ``losses._outcome_divergence``.
        log_total: (C,) log of the teacher's stored total mass (sum p_S + p_tail).
        log_q_samples: (C, s) student log q at the sampled ids; tail_logprobs: (C, s) teacher's.

    Returns:
        (delta (C,), c (C,), u (C, s)); rows without samples get zeros.
    """
    sampled = (tail_logprobs > -math.inf) & valid[:, -1:]  # (C, s)
    n_samples = sampled.sum(-1).clamp_min(1)  # (C,)
    if head is None:
        weight = torch.ones_like(log_total)
    else:
        gap = (
            torch.where(valid, log_p, -math.inf).exp() - torch.where(valid, log_q, -math.inf).exp()
        )
        gap = gap.abs()  # (C, k + 1)
        g_head, g_tail = (gap * head).sum(-1), (gap * (valid & ~head)).sum(-1)
        weight = g_head / (g_head + g_tail).clamp_min(torch.finfo(gap.dtype).tiny)
    weight = torch.where(sampled.any(-1), weight, 0.0)  # (C,)
    p_tail = torch.where(valid[:, -1], log_p[:, -1], -math.inf).exp()  # (C,)
    log_p_samples = tail_logprobs.float() - log_total[:, None]
    terms = torch.where(sampled, log_p_samples - log_q_samples, 0.0)  # (C, s)
    estimate = p_tail * terms.sum(-1) / n_samples
    bucket = torch.where(p_tail > 0, p_tail * (log_p[:, -1] - log_q[:, -1]), 0.0)
    delta = weight * (estimate - bucket)
    c = weight * p_tail  # (C,)
    u = torch.where(sampled, (c / n_samples)[:, None], 0.0)  # (C, s)
    return delta, c, u

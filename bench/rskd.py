"""RS-KD (Anshumann et al. 2025) for the quality study: N draws from a proposal r, as counts.

The cache builder never writes this layout (it stores draws one by one: ``kdcache build
--top-k 0 --tail-samples N``, trained by ``kdcache.trainer.targets.samples``), so the code lives
here with the study that compares it, not in the package.
"""

from __future__ import annotations

import torch

from kdcache.cache.errors import ConfigError

__all__ = ["draw_samples", "sampled_kd_loss"]


def _check_pair(name: str, ids: torch.Tensor, values: torch.Tensor, rows: int) -> None:
    if ids.dim() != 2 or ids.shape[0] != rows or values.shape != ids.shape:
        raise ConfigError(
            f"{name}: ids {tuple(ids.shape)} and values {tuple(values.shape)} must both be "
            f"(N, s) with N = {rows} rows like student_logits"
        )


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
    loss = (weights * terms).sum(-1)
    return loss.mean() if reduction == "mean" else loss.sum() if reduction == "sum" else loss


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

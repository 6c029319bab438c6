"""Universal Logit Distillation over the tokens that have no exact match, with its gradient.

ULD (Boizard et al. 2024, "Towards Cross-Tokenizer Distillation: the Universal Logit
Distillation Loss for LLMs") compares two distributions over different vocabularies by their
sorted probabilities: the L1 distance between the sorted vectors, which is the Wasserstein-1
distance between the two distributions over ranks. Here it covers only what the exact-match
divergence does not:

    ULD = sum_{r < m} | p^u_(r) - q^u_(r) |

p^u_(r): the r-th largest teacher probability among teacher tokens without a student match
(known for the m unmatched entries of the top-k, which are exactly the top m of them);
q^u_(r): the r-th largest student probability among student tokens that no teacher token maps
to (``student_matched`` False), q = softmax(z / T). Ranks beyond m are unknown to the cache and
left out.

Gradient (sorting is piecewise constant, so the ranks are fixed locally): with s_r =
sign(q^u_(r) - p^u_(r)) placed at the student id of rank r (g, zero elsewhere),
dULD/dz = q * (g - <g, q>) / T.
"""

from __future__ import annotations

import torch


def _student_rest(
    logits: torch.Tensor, student_matched: torch.Tensor, ranks: int, temperature: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q (C, V), top ``ranks`` unmatched student probabilities (C, m), their ids (C, m)).

    With fewer than ``ranks`` unmatched student ids the missing ranks hold probability 0 (the
    shorter sorted vector is zero-padded) and id -1.
    """
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # (C, V)
    rest = probs.masked_fill(student_matched[None, :], -1.0)  # matched ids never rank
    top = rest.topk(min(ranks, probs.shape[-1]), dim=-1)
    missing = top.values < 0  # (C, m) a matched id filled the rank
    values = torch.where(missing, 0.0, probs.gather(1, top.indices))
    return probs, values, top.indices.masked_fill(missing, -1)


def uld_loss(
    logits: torch.Tensor,
    unmatched_probs: torch.Tensor,
    student_matched: torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    """(C,) ULD per row, differentiable w.r.t. ``logits`` (C, V).

    ``unmatched_probs`` (C, k) teacher probabilities of unmatched tokens, sorted descending,
    0-padded (padding ranks are left out); ``student_matched`` (V,) bool.
    """
    ranks = unmatched_probs.shape[-1]
    if ranks == 0:
        return logits.new_zeros(logits.shape[0])
    _, student_sorted, _ = _student_rest(logits, student_matched, ranks, temperature)  # (C, m)
    teacher = unmatched_probs[:, : student_sorted.shape[-1]].float()
    known = teacher > 0
    return torch.where(known, (student_sorted - teacher).abs(), 0.0).sum(-1)


@torch.no_grad()
def uld_loss_and_grad(
    logits: torch.Tensor,
    unmatched_probs: torch.Tensor,
    student_matched: torch.Tensor,
    weight: torch.Tensor,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(``weight * ULD`` (C,), gradient of its sum w.r.t. ``logits`` (C, V)), closed form."""
    rows, vocab = logits.shape
    ranks = unmatched_probs.shape[-1]
    if ranks == 0:
        return logits.new_zeros(rows), torch.zeros_like(logits, dtype=torch.float32)
    probs, student_sorted, ids = _student_rest(logits, student_matched, ranks, temperature)
    teacher = unmatched_probs[:, : student_sorted.shape[-1]].float()
    known = teacher > 0
    loss = torch.where(known, (student_sorted - teacher).abs(), 0.0).sum(-1)  # (C,)
    signs = torch.where(known, torch.sign(student_sorted - teacher), 0.0) * weight.float()[:, None]
    signs = torch.where(ids < 0, 0.0, signs)  # a zero-padded rank has no student id to move
    g = torch.zeros(rows, vocab, dtype=torch.float32, device=logits.device)
    g.scatter_add_(1, ids.clamp_min(0), signs)  # distinct real ids per row; padded ranks add 0
    inner = (signs * student_sorted).sum(-1, keepdim=True)  # <g, q>  (C, 1)
    grad = probs.mul_(g.sub_(inner)).div_(temperature)
    return weight.float() * loss, grad

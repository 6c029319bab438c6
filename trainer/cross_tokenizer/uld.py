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

from kdcache.trainer.targets.topk_bucket import Correction, StudentChunk


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


def unmatched_student_ids(student_matched: torch.Tensor) -> torch.Tensor:
    """(U,) int64 the student ids no teacher id maps to (the ids ULD ranks), ascending."""
    return (~student_matched).nonzero().squeeze(-1)


@torch.no_grad()
def uld_loss_and_grad(
    logits: torch.Tensor,
    unmatched_probs: torch.Tensor,
    student_matched: torch.Tensor,
    weight: torch.Tensor,
    temperature: float = 1.0,
    *,
    unmatched_ids: torch.Tensor | None = None,
    grad: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(``weight * ULD`` (C,), gradient of its sum w.r.t. ``logits`` (C, V)), closed form.

    ``unmatched_ids`` (U,): ``unmatched_student_ids(student_matched)``, computed once by the
    caller (else here). ``grad`` (C, V) float32: added to in place and returned (else a new one).
    Cost: one normalizer pass, a top-m over the U unmatched columns only, and one pass that adds
    the dense part ``-<g, q> q / T``; ``g`` is sparse (m ids per row) and is scattered.
    """
    rows, vocab = logits.shape
    ranks = unmatched_probs.shape[-1]
    if unmatched_ids is None:
        unmatched_ids = unmatched_student_ids(student_matched)
    teacher = unmatched_probs.float()  # (C, ranks)
    known = teacher > 0
    width = min(ranks, int(unmatched_ids.numel()))
    if width == 0:  # nothing the student can move: ULD is the teacher's known unmatched mass
        loss = torch.where(known, teacher, 0.0).sum(-1)
        if grad is None:
            grad = torch.zeros(rows, vocab, dtype=torch.float32, device=logits.device)
        return weight.float() * loss, grad
    scaled = logits.float() if temperature == 1.0 else logits.float() / temperature
    row_max = scaled.amax(-1, keepdim=True)  # (C, 1)
    shifted_exp = (scaled - row_max).exp_()  # (C, V): q up to the row's normalizer
    norm = shifted_exp.sum(-1, keepdim=True)  # (C, 1)
    top = scaled.index_select(1, unmatched_ids).topk(width, dim=-1)  # (C, m) over U only
    ids = unmatched_ids[top.indices]  # (C, m) student ids, distinct per row
    q_top = (top.values - row_max).exp_().div_(norm)  # (C, m)
    student_sorted = torch.zeros_like(teacher)
    student_sorted[:, :width] = q_top  # ranks beyond U hold probability 0
    diff = student_sorted - teacher
    loss = torch.where(known, diff.abs(), 0.0).sum(-1)  # (C,)
    signs = torch.where(known, torch.sign(diff), 0.0)[:, :width] * weight.float()[:, None]
    inner = (signs * q_top).sum(-1, keepdim=True)  # <g, q>  (C, 1)
    dense_coef = -inner / (norm * temperature)  # (C, 1): -<g, q> q / T = coef * shifted_exp
    if grad is None:
        grad = shifted_exp.mul_(dense_coef)
    else:
        grad.addcmul_(shifted_exp, dense_coef)
    grad.scatter_add_(1, ids, signs * q_top / temperature)  # + g q / T at the ranked ids
    return weight.float() * loss, grad


def uld_correction(
    unmatched_probs: torch.Tensor, unmatched_ids: torch.Tensor, uld_weight: float
) -> Correction:
    """``uld_weight * ULD`` as a correction of the bucket kernel (``bucket_loss_and_grad``).

    The kernel's own normalizer serves ULD, and ULD's dense gradient part ``-<g, q> q`` rides on
    the kernel's softmax term (the extra ``r_sum``): ULD adds no pass over the (C, V) logits,
    only a top-m over the U unmatched columns and a scatter of m values per row. The unmatched
    ids lie outside the row's exact-match ids S, as the kernel's sample ids must.
    """

    def correction(logits, chunk: StudentChunk, log_p, valid, head):
        rows = logits.shape[0]
        teacher = unmatched_probs.float()  # (C, ranks)
        known = teacher > 0
        width = min(teacher.shape[-1], int(unmatched_ids.numel()))
        zeros = torch.zeros(rows, dtype=torch.float32, device=logits.device)
        if width == 0:  # nothing the student can move: a constant, no gradient
            constant = torch.where(known, teacher, 0.0).sum(-1) * uld_weight
            empty = torch.zeros(rows, 0, dtype=torch.float32, device=logits.device)
            return constant, zeros, empty.long(), empty
        top = logits.index_select(1, unmatched_ids).topk(width, dim=-1)  # (C, m) over U only
        ids = unmatched_ids[top.indices]  # (C, m)
        q_top = (top.values / chunk.temperature - chunk.log_norm[:, None]).exp()  # (C, m)
        student_sorted = torch.zeros_like(teacher)
        student_sorted[:, :width] = q_top
        diff = student_sorted - teacher
        loss = torch.where(known, diff.abs(), 0.0).sum(-1) * uld_weight  # (C,)
        signs = torch.where(known, torch.sign(diff), 0.0)[:, :width] * uld_weight  # (C, m)
        inner = (signs * q_top).sum(-1)  # <g, q> (C,)
        # the kernel scatters -sample_grad and divides by T: + g q / T at the ranked ids
        return loss, zeros, ids, -(signs * q_top), inner

    return correction

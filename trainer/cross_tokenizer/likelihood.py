"""Chunk-likelihood distillation across tokenizers (Approximate Likelihood Matching, ALM).

Minixhofer, Vulić, Ponti 2025, "Universal Cross-Tokenizer Distillation via Approximate
Likelihood Matching". The chunks (``kdcache.trainer.cross_tokenizer.chunks``) are spans of text
that both tokenizations cut at their start and end; the teacher's log-likelihood of chunk c,
``a_c = ll_T(c)``, is the sum of the cache's observed log-probs of its teacher tokens, and the
student's ``b_c = ll_S(c)`` the sum of its own log-probs of its tokens in the chunk (temperature
T, the cache's). Each chunk is compared as a Bernoulli event ("the text continues with this
chunk") through the binarised KL at binarisation temperature tau:

    a' = a_c / tau - eps,  b' = b_c / tau - eps,  p = exp(a'),  q = exp(b')
    D_c = tau * [ p (a' - b') + (1 - p) (log(1 - p) - log(1 - q)) ]
    dD_c / db_c = (q - p) / (1 - q)

(eps = 1e-6 keeps 1 - q > 0.) The factor tau keeps the gradient on CE's scale: as tau -> inf,
with A = -a_c, B = -b_c the two negative log-likelihoods, D_c -> B - A - A log(B / A) and
dD_c/db_c -> A / B - 1, i.e. per chunk the student's NLL is pulled towards the teacher's with the
weight 1 - A / B (full CE weight far from it, none at it, pushed back when the student is more
confident than the teacher).

Per position: chunk c's D_c is spread over its n_c student positions (D_c / n_c each), so with
the objective's KD weight w (per position, the same within a chunk) the loss is w * sum_c D_c.
Gradient w.r.t. the logits z_i of a position i of chunk c (predicting student token y_i):

    d(w D_c)/dz_i = w * dD_c/db_c * (onehot(y_i) - softmax(z_i / T)) / T

i.e. a CE gradient with the per-chunk weight ``-w dD_c/db_c``: one logsumexp and one softmax
pass over the chunk's (C, V) logits, a gather and a scatter (``add_chunk_likelihood``). The
chunk sums need every position of a chunk in the same head chunk: the objective cuts the fused
head's chunks at chunk boundaries (``row_groups``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

__all__ = [
    "ALM_ROW_NAMES",
    "XTOK_LOSSES",
    "ChunkLikelihood",
    "add_chunk_likelihood",
    "binary_kl",
    "chunk_likelihood_loss",
]

XTOK_LOSSES = ("exact", "alm", "alm+exact")  # --xtok-loss
ALM_ROW_NAMES = ("labels", "alm_chunk", "alm_teacher_ll", "alm_size")
EPS = 1e-6


@dataclass(frozen=True)
class ChunkLikelihood:
    """Settings of the chunk-likelihood term: binarisation temperature tau and the cache's T."""

    binarization: float = 100.0
    temperature: float = 1.0


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable on both sides of log(1/2)."""
    return torch.where(x < -math.log(2.0), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def binary_kl(
    teacher_ll: torch.Tensor, student_ll: torch.Tensor, binarization: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(D (n,), dD/dstudent_ll (n,)) of the binarised KL (module docstring), in float64.

    ``teacher_ll``, ``student_ll`` (n,) chunk log-likelihoods (<= 0; clamped there).
    """
    tau = float(binarization)
    a = teacher_ll.double().clamp_max(0.0) / tau - EPS
    b = student_ll.double().clamp_max(0.0) / tau - EPS
    p, q = a.exp(), b.exp()
    loss = tau * (p * (a - b) + (1.0 - p) * (_log1mexp(a) - _log1mexp(b)))
    grad = (q - p) / (-torch.expm1(b))
    return loss, grad


def _segments(chunk: torch.Tensor) -> torch.Tensor:
    """(C,) index of each row's run of equal chunk ids (rows of one chunk are consecutive)."""
    new = torch.ones_like(chunk, dtype=torch.bool)
    new[1:] = chunk[1:] != chunk[:-1]
    return new.long().cumsum(0) - 1


def chunk_likelihood_loss(
    logits: torch.Tensor, rows: Mapping[str, torch.Tensor], setting: ChunkLikelihood
) -> torch.Tensor:
    """(C,) D_c / n_c at each row of a kept chunk, 0 elsewhere; differentiable (the reference).

    ``logits`` (C, V) raw student logits; ``rows``: ``labels`` (C,) next student token,
    ``alm_chunk`` (C,) chunk id (-1: none; a chunk's rows consecutive and all present),
    ``alm_teacher_ll`` (C,) its teacher log-likelihood, ``alm_size`` (C,) its student positions.
    """
    chunk = rows["alm_chunk"]
    valid = chunk >= 0
    log_q = torch.log_softmax(logits.double() / setting.temperature, dim=-1)
    picked = log_q.gather(1, rows["labels"].clamp_min(0).long()[:, None])[:, 0]  # (C,)
    seg = _segments(chunk)
    sums = torch.zeros(logits.shape[0], dtype=torch.float64, device=logits.device)
    sums = sums.index_add(0, seg, torch.where(valid, picked, 0.0))  # (C,) per segment
    tau = float(setting.binarization)
    a = rows["alm_teacher_ll"].double().clamp_max(0.0) / tau - EPS
    b = sums[seg].clamp_max(0.0) / tau - EPS
    p = a.exp()
    loss = tau * (p * (a - b) + (1.0 - p) * (_log1mexp(a) - _log1mexp(b)))
    return torch.where(valid, loss / rows["alm_size"].double().clamp_min(1.0), 0.0)


@torch.no_grad()
def add_chunk_likelihood(
    logits: torch.Tensor,
    rows: Mapping[str, torch.Tensor],
    weight: torch.Tensor,
    setting: ChunkLikelihood,
    loss: torch.Tensor | None = None,
    grad: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``loss + weight * D_c / n_c`` (C,) and ``grad + its gradient`` (C, V), closed form.

    ``logits`` (C, V) float32 raw logits; ``rows`` as for ``chunk_likelihood_loss``; ``weight``
    (C,). ``grad`` is updated in place when given. Every row of a chunk must be in this call.
    """
    temperature = setting.temperature
    scaled = logits if temperature == 1.0 else logits / temperature  # (C, V)
    chunk = rows["alm_chunk"]
    valid = chunk >= 0  # (C,)
    labels = rows["labels"].clamp_min(0).long()[:, None]  # (C, 1)
    log_norm = torch.logsumexp(scaled, -1)  # (C,)
    picked = scaled.gather(1, labels)[:, 0] - log_norm  # (C,) log q(y)
    seg = _segments(chunk)
    sums = torch.zeros(logits.shape[0], dtype=torch.float64, device=logits.device)
    sums.index_add_(0, seg, torch.where(valid, picked, 0.0).double())
    value, slope = binary_kl(rows["alm_teacher_ll"], sums[seg], setting.binarization)  # (C,)
    share = torch.where(valid, weight.double(), 0.0) / rows["alm_size"].double().clamp_min(1.0)
    term = (share * value).float()  # (C,) w D_c / n_c
    chunk_weight = torch.zeros_like(sums).index_add_(0, seg, share)[seg]  # (C,) sum_c w / n_c
    coef = (-chunk_weight * slope).float() / temperature  # (C,): grad = coef (q - onehot(y))
    dense = (scaled - log_norm[:, None]).exp_().mul_(coef[:, None])  # (C, V)
    if grad is None:
        grad = dense
    else:
        grad.add_(dense)
    grad.scatter_add_(1, labels, -coef[:, None])
    return (term if loss is None else loss + term), grad

"""The dense online teacher (``kdcache train --teacher``): full-vocabulary KD, no cache.

The teacher runs on the same batch (``select``, no gradient); its logits exist one chunk at a
time when its head splits off exactly (``teacher_head``), else they come from its own forward.
Closed-form gradients for fkl, rkl and akl (d = log q - log p at temperature T):
dFKL/dz = q sum(p) - p, dRKL/dz = q (d - RKL); AKL mixes them with its detached gap weights.
The other kinds take autograd per chunk (``fallback_reason`` says so once at start-up).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from kdcache.cache.extraction.heads import OutputHead, body_of
from kdcache.cache.records import SequenceRecord
from kdcache.trainer.divergences import (
    LOSS_KINDS,
    akl_head_mask,
    akl_mix_weights,
    compute_dtype,
    outcome_divergence,
)
from kdcache.trainer.targets.base import LossOptions, TeacherRows, TeacherTarget

__all__ = ["DenseTeacherTarget", "dense_divergence", "dense_loss_and_grad"]


def _teacher_log_probs(teacher_logits: torch.Tensor, vocab: int, temperature: float, dtype):
    """(N, V) teacher log-probs; a student padded beyond V' gets teacher probability 0 there."""
    log_p = torch.log_softmax(teacher_logits.detach().to(dtype) / temperature, dim=-1)
    if log_p.shape[1] < vocab:
        log_p = F.pad(log_p, (0, vocab - log_p.shape[1]), value=-math.inf)
    return log_p


def dense_divergence(
    logits: torch.Tensor, teacher_logits: torch.Tensor, options: LossOptions
) -> torch.Tensor:
    """(N,) full-vocabulary divergence, differentiable w.r.t. ``logits`` (N, V) (the reference).

    teacher_logits (N, V') raw, V' <= V, no gradient.
    """
    dtype = compute_dtype(logits)
    log_q = torch.log_softmax(logits.to(dtype) / options.temperature, dim=-1)  # (N, V)
    log_p = _teacher_log_probs(teacher_logits, logits.shape[1], options.temperature, dtype)
    valid = torch.ones_like(log_p, dtype=torch.bool)
    head = akl_head_mask(log_p.exp(), valid, options.mu) if options.kind == "akl" else None
    return outcome_divergence(log_p, log_q, valid, head, options.kind, options.skew)


def _akl_head_gap(p: torch.Tensor, q: torch.Tensor, mu: float) -> torch.Tensor:
    """(C,) sum of |p - q| over the AKL head, found among the teacher's top few tokens.

    The head is usually a handful of tokens: look in the top 64, widen only for rows whose head
    reaches past that width.
    """
    vocab = p.shape[1]
    g_head = torch.zeros(p.shape[0], dtype=p.dtype, device=p.device)
    rows = torch.arange(p.shape[0], device=p.device)  # rows whose head is not found yet
    for width in (64, 2048, vocab):
        top_p, top_ids = p[rows].topk(min(width, vocab), dim=-1)  # sorted descending
        head = top_p.cumsum(-1) <= mu
        head[:, 0] = True
        g_head[rows] = ((top_p - q[rows].gather(1, top_ids)).abs() * head).sum(-1)
        if width >= vocab:
            break
        rows = rows[head[:, -1]]  # the head may reach past this width: widen
        if not rows.numel():
            break
    return g_head


@torch.no_grad()
def dense_loss_and_grad(
    logits: torch.Tensor, teacher_logits: torch.Tensor, weight: torch.Tensor, options: LossOptions
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight * divergence (C,), gradient (C, V)) in closed form, kinds fkl / rkl / akl."""
    kind, temperature = options.kind, options.temperature
    log_q = torch.log_softmax(logits / temperature, -1)  # (C, V)
    log_p = _teacher_log_probs(teacher_logits, logits.shape[1], temperature, torch.float32)
    log_p.clamp_min_(math.log(torch.finfo(torch.float32).tiny))  # as in outcome_divergence
    p, q = log_p.exp(), log_q.exp()  # (C, V)
    diff = log_q.sub(log_p)  # (C, V) log q - log p
    fkl, rkl = -(p * diff).sum(-1), (q * diff).sum(-1)  # (C,)
    w_fkl, w_rkl = torch.ones_like(fkl), torch.zeros_like(fkl)
    if kind == "rkl":
        w_fkl, w_rkl = w_rkl, w_fkl
    elif kind == "akl":
        g_head = _akl_head_gap(p, q, options.mu)
        g_tail = ((p - q).abs_().sum(-1) - g_head).clamp_min(0.0)
        w_fkl, w_rkl = akl_mix_weights(g_head, g_tail)
    loss = weight * (w_fkl * fkl + w_rkl * rkl)
    scale = weight / temperature  # (C,)
    grad = diff.sub_(rkl[:, None]).mul_(q).mul_((w_rkl * scale)[:, None])  # (C, V)
    grad.addcmul_(q, (w_fkl * scale * p.sum(-1))[:, None]).addcmul_(p, -(w_fkl * scale)[:, None])
    return loss, grad


class DenseTeacherTarget(TeacherTarget):
    """A teacher model run in the loop: exact full-vocabulary divergences of every kind."""

    name = "dense"
    losses = LOSS_KINDS
    closed_form_losses = ("fkl", "rkl", "akl")
    measures = ("fkl_full", "rkl_full")

    def __init__(
        self, teacher: nn.Module, teacher_head: OutputHead | None, student_vocab_size: int
    ) -> None:
        """``teacher_head``: the teacher's split head (None: logits from its own forward)."""
        super().__init__(None)
        self.teacher, self.teacher_head = teacher, teacher_head
        self.student_vocab_size = student_vocab_size

    def collate(self, records: Sequence[SequenceRecord], length: int) -> dict[str, torch.Tensor]:
        return {}  # the teacher reads the batch's input_ids

    @torch.no_grad()
    def select(
        self, batch: Mapping[str, torch.Tensor], rows: torch.Tensor, vocab_size: int
    ) -> TeacherRows:
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        if self.teacher_head is not None:
            states = body_of(self.teacher)(**inputs).last_hidden_state  # (B, T, H)
        else:
            states = self.teacher(**inputs).logits  # (B, T, V')
        return {"teacher_states": states.reshape(-1, states.shape[-1])[rows]}

    def teacher_logits(self, rows: TeacherRows) -> torch.Tensor:
        """(C, min(V', V)) float32 teacher logits (ids beyond the student's vocab dropped)."""
        states = rows["teacher_states"]
        with torch.no_grad():
            logits = states if self.teacher_head is None else self.teacher_head.logits(states)
        return logits[:, : self.student_vocab_size].float()

    def loss(self, logits: torch.Tensor, rows: TeacherRows, options: LossOptions) -> torch.Tensor:
        return dense_divergence(logits, self.teacher_logits(rows), options)

    def loss_and_grad(
        self, logits: torch.Tensor, rows: TeacherRows, weight: torch.Tensor, options: LossOptions
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.closed_form(options.kind):
            return super().loss_and_grad(logits, rows, weight, options)
        return dense_loss_and_grad(logits, self.teacher_logits(rows), weight, options)

    def evaluate_rows(
        self, logits: torch.Tensor, rows: TeacherRows, temperature: float
    ) -> dict[str, torch.Tensor]:
        teacher_logits = self.teacher_logits(rows)
        return {
            f"{kind}_full": dense_divergence(
                logits, teacher_logits, LossOptions(kind=kind, temperature=temperature)
            )
            for kind in ("fkl", "rkl")
        }

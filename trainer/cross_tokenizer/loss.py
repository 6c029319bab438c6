"""The cross-tokenizer KD loss per position: exact-match divergence + ULD on the rest.

    KD = D(p, q) over the exact-match outcomes and the bucket   (FKL / RKL / AKL, as for a
         same-tokenizer cache, on the rows ``map_teacher_rows`` made)
       + uld_weight * ULD(unmatched teacher probabilities, unmatched student probabilities)

The teacher side of C rows is a dict (as ``TeacherRows`` of the trainer's targets):
``topk_ids`` (C, k) student ids, ``topk_logprobs`` (C, k) (-inf = unmatched), ``tail_mass``
(C,) the bucket, ``unmatched_probs`` (C, k) sorted descending, 0-padded.
``cross_tokenizer_kd_loss`` is the differentiable reference; ``cross_tokenizer_loss_and_grad``
is the closed form for the fused chunked head (the sparse divergence's closed form plus ULD's).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from kdcache.trainer.chunked import add_cross_entropy
from kdcache.trainer.cross_tokenizer.uld import uld_correction, uld_loss, unmatched_student_ids
from kdcache.trainer.targets.base import LossOptions
from kdcache.trainer.targets.topk_bucket import bucket_divergence, bucket_loss_and_grad


@dataclass(frozen=True)
class CrossTokenizerLoss:
    """The settings of the cross-tokenizer KD term and the student's unmatched ids."""

    student_matched: torch.Tensor  # (V,) bool: student ids some teacher id maps to
    kind: str = "akl"  # the exact-match divergence: fkl | rkl | akl
    mu: float = 0.5
    temperature: float = 1.0
    uld_weight: float = 1.0
    unmatched_ids: torch.Tensor | None = None  # (U,) ~student_matched's ids (None: derived)

    @property
    def options(self) -> LossOptions:
        """The exact-match divergence's settings (the same-tokenizer ``topk_bucket`` math)."""
        return LossOptions(kind=self.kind, mu=self.mu, temperature=self.temperature)


def cross_tokenizer_kd_loss(
    logits: torch.Tensor, rows: Mapping[str, torch.Tensor], setting: CrossTokenizerLoss
) -> torch.Tensor:
    """(C,) KD per row of the student's ``logits`` (C, V), differentiable."""
    loss = bucket_divergence(
        logits, rows["topk_ids"], rows["topk_logprobs"], rows["tail_mass"], setting.options
    )
    if setting.uld_weight:
        uld = uld_loss(logits, rows["unmatched_probs"], setting.student_matched,
                       setting.temperature)  # fmt: skip
        loss = loss + setting.uld_weight * uld
    return loss


def cross_tokenizer_loss_and_grad(
    logits: torch.Tensor,
    rows: Mapping[str, torch.Tensor],
    setting: CrossTokenizerLoss,
    kd_weight: torch.Tensor,
    labels: torch.Tensor | None = None,
    ce_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(``kd_weight * KD + ce_weight * CE`` (C,), gradient of its sum w.r.t. ``logits`` (C, V)).

    ``kd_weight`` (C,); ``labels`` (C,) next student token (-100 = none) and ``ce_weight`` (C,),
    or None for no CE. CE is at temperature 1.
    """
    correction = None
    if setting.uld_weight:
        unmatched = setting.unmatched_ids
        if unmatched is None:
            unmatched = unmatched_student_ids(setting.student_matched)
        correction = uld_correction(rows["unmatched_probs"], unmatched, setting.uld_weight)
    loss, grad = bucket_loss_and_grad(
        logits, rows["topk_ids"], rows["topk_logprobs"], rows["tail_mass"], kd_weight.float(),
        setting.options, correction,
    )  # fmt: skip
    if labels is not None and ce_weight is not None:
        loss, grad = add_cross_entropy(logits, labels, ce_weight, loss, grad)
    return loss, grad

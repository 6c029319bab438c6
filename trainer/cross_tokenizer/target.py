"""The cross-tokenizer teacher target: mapped top-k rows in student ids, exact-match KD + ULD.

A ``TeacherTarget`` like the cache's storage modes, so a cross-tokenizer run trains through the
one objective (``kdcache.trainer.objective.DistillObjective``: body -> chunked lm_head -> target
-> + CE). Its batches come from ``CrossTokenizerDataset`` (the student's tokenization, with the
teacher's rows already mapped by ``map_teacher_rows``), so ``select`` only picks rows; the loss
is ``cross_tokenizer_kd_loss`` and its closed form ``cross_tokenizer_loss_and_grad``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from kdcache.cache.records import SequenceRecord
from kdcache.trainer.cross_tokenizer.loss import (
    CrossTokenizerLoss,
    cross_tokenizer_kd_loss,
    cross_tokenizer_loss_and_grad,
)
from kdcache.trainer.cross_tokenizer.uld import unmatched_student_ids
from kdcache.trainer.targets.base import LossOptions, TeacherRows, TeacherTarget

ROW_NAMES = ("topk_ids", "topk_logprobs", "tail_mass", "unmatched_probs")
EXACT_MATCH_LOSSES = ("fkl", "rkl", "akl")


class CrossTokenizerTarget(TeacherTarget):
    """The teacher's top-k carried into the student's vocabulary (docs/LOSSES.md).

    ``student_matched`` (V,) bool: student ids some teacher id maps to; ``uld_weight`` scales
    the ULD term over the others. The loss kind, mu and temperature come with each call's
    ``LossOptions``, as for every target.
    """

    name = "cross_tokenizer"
    losses = EXACT_MATCH_LOSSES
    closed_form_losses = EXACT_MATCH_LOSSES

    def __init__(self, student_matched: torch.Tensor, uld_weight: float = 1.0) -> None:
        super().__init__(None)
        self.student_matched = student_matched.bool()
        self.unmatched_ids = unmatched_student_ids(self.student_matched)  # once, not per chunk
        self.uld_weight = float(uld_weight)
        self._on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def loss_hint(self) -> str:
        return " (a cross-tokenizer student distills the exact-match outcomes)"

    def collate(self, records: Sequence[SequenceRecord], length: int) -> dict[str, torch.Tensor]:
        raise TypeError(
            "cross-tokenizer batches are the student's tokenization: collate them with "
            "CrossTokenizerDataset / collate_student_records, not collate_records"
        )

    def select(
        self, batch: Mapping[str, torch.Tensor], rows: torch.Tensor, vocab_size: int
    ) -> TeacherRows:
        """The mapped rows (N, ...) at the flat positions ``rows`` (N,)."""
        return {name: batch[name].flatten(0, 1)[rows] for name in ROW_NAMES}

    def _setting(self, options: LossOptions, device: torch.device) -> CrossTokenizerLoss:
        if device not in self._on_device:
            self._on_device[device] = (
                self.student_matched.to(device),
                self.unmatched_ids.to(device),
            )
        matched, unmatched = self._on_device[device]
        return CrossTokenizerLoss(
            matched,
            kind=options.kind,
            mu=options.mu,
            temperature=options.temperature,
            uld_weight=self.uld_weight,
            unmatched_ids=unmatched,
        )

    def loss(self, logits: torch.Tensor, rows: TeacherRows, options: LossOptions) -> torch.Tensor:
        """(C,) exact-match divergence + uld_weight * ULD per row, differentiable."""
        return cross_tokenizer_kd_loss(logits, rows, self._setting(options, logits.device))

    def loss_and_grad(
        self,
        logits: torch.Tensor,
        rows: TeacherRows,
        weight: torch.Tensor,
        options: LossOptions,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(``weight * KD`` (C,), its gradient (C, V)) in closed form (the CE mix is added by
        the objective)."""
        setting = self._setting(options, logits.device)
        return cross_tokenizer_loss_and_grad(logits, rows, setting, weight)

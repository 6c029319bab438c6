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
from kdcache.trainer.cross_tokenizer.likelihood import (
    ALM_ROW_NAMES,
    ChunkLikelihood,
    add_chunk_likelihood,
    chunk_likelihood_loss,
)
from kdcache.trainer.cross_tokenizer.loss import (
    CrossTokenizerLoss,
    cross_tokenizer_kd_loss,
    cross_tokenizer_loss_and_grad,
)
from kdcache.trainer.cross_tokenizer.uld import unmatched_student_ids
from kdcache.trainer.targets.base import LossOptions, TeacherRows, TeacherTarget

ROW_NAMES = ("topk_ids", "topk_logprobs", "tail_mass", "unmatched_probs", "exact_mask")
EXACT_MATCH_LOSSES = ("fkl", "rkl", "akl")


class CrossTokenizerTarget(TeacherTarget):
    """The teacher's top-k carried into the student's vocabulary (docs/LOSSES.md).

    ``student_matched`` (V,) bool: student ids some teacher id maps to; ``uld_weight`` scales
    the ULD term over the others. ``xtok_loss``: ``exact`` (the exact-match divergence + ULD at
    the rows that have one), ``alm`` (the chunk-likelihood term, ``likelihood.py``) or
    ``alm+exact`` (their sum); ``binarization``: ALM's tau. The loss kind, mu and temperature
    come with each call's ``LossOptions``, as for every target.
    """

    name = "cross_tokenizer"
    losses = EXACT_MATCH_LOSSES
    closed_form_losses = EXACT_MATCH_LOSSES

    def __init__(
        self,
        student_matched: torch.Tensor,
        uld_weight: float = 1.0,
        xtok_loss: str = "exact",
        binarization: float = 100.0,
    ) -> None:
        super().__init__(None)
        self.exact = xtok_loss in ("exact", "alm+exact")
        self.chunks = "alm" in xtok_loss
        self.binarization = float(binarization)
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
        """The mapped rows (N, ...) at the flat positions ``rows`` (N,) (and the chunks')."""
        names = ROW_NAMES + (ALM_ROW_NAMES if self.chunks else ())
        return {name: batch[name].flatten(0, 1)[rows] for name in names}

    def row_groups(self, rows: TeacherRows) -> torch.Tensor | None:
        """(N,) the chunk of each row (-1: none): a fused head chunk must hold whole chunks."""
        return rows["alm_chunk"] if self.chunks else None

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

    def _chunk_setting(self, options: LossOptions) -> ChunkLikelihood:
        return ChunkLikelihood(self.binarization, options.temperature)

    def loss(self, logits: torch.Tensor, rows: TeacherRows, options: LossOptions) -> torch.Tensor:
        """(C,) per row: exact-match divergence + uld_weight * ULD where a row has an exact-match
        row, plus D_c / n_c at chunk positions (by ``xtok_loss``); differentiable."""
        loss = logits.new_zeros(logits.shape[0])
        if self.exact:
            exact = cross_tokenizer_kd_loss(logits, rows, self._setting(options, logits.device))
            loss = loss + torch.where(rows["exact_mask"], exact, 0.0)
        if self.chunks:
            loss = loss + chunk_likelihood_loss(logits, rows, self._chunk_setting(options))
        return loss

    def loss_and_grad(
        self,
        logits: torch.Tensor,
        rows: TeacherRows,
        weight: torch.Tensor,
        options: LossOptions,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(``weight * KD`` (C,), its gradient (C, V)) in closed form (the CE mix is added by
        the objective)."""
        loss = grad = None
        if self.exact:
            setting = self._setting(options, logits.device)
            exact_weight = torch.where(rows["exact_mask"], weight, 0.0)
            loss, grad = cross_tokenizer_loss_and_grad(logits, rows, setting, exact_weight)
        if self.chunks:
            loss, grad = add_chunk_likelihood(
                logits, rows, weight, self._chunk_setting(options), loss, grad
            )
        return loss, grad

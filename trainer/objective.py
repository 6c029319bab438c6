"""The training objective: student body -> chunked lm_head -> teacher target (+ the CE mix).

Per position the loss is ``(1 - alpha) * KD + alpha * CE(next token)``, averaged over the
distilled positions of the whole optimizer step (all micro-batches, all ranks), so gradient
accumulation and DDP give the same update as one big batch. Padding and masked prompt positions
never count. KD comes from the run's ``TeacherTarget`` (chosen once from the cache manifest, or
the online teacher); nothing here depends on the storage mode. The CE mix is written once, in
``loss_kernel``. The module wraps the model so DDP sees one ``forward`` per micro-batch.
"""

from __future__ import annotations

import torch
from torch import nn

from kdcache.cache.errors import ConfigError
from kdcache.cache.extraction.heads import body_of, split_head
from kdcache.trainer.chunked import RowKernel, add_cross_entropy, chunked_head_loss, logits_loss
from kdcache.trainer.data import IGNORE_INDEX
from kdcache.trainer.targets.base import LossOptions, TeacherRows, TeacherTarget, chunk_rows

__all__ = [
    "DistillObjective",
    "batch_loss",
    "loss_kernel",
    "position_rows",
    "position_weights",
    "with_position_rows",
]


def position_weights(
    distill_mask: torch.Tensor,
    labels: torch.Tensor,
    alpha: float,
    num_distilled: float,
    num_labels: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(kd_weight, ce_weight), both shaped like ``labels`` (B, T), float32.

    kd_weight = (1 - alpha) / num_distilled at distilled positions; ce_weight = alpha /
    num_labels at positions with a next-token label. The counts are over the whole step.
    """
    kd_weight = distill_mask.float() * ((1.0 - alpha) / max(num_distilled, 1.0))
    ce_weight = (labels != IGNORE_INDEX).float() * (alpha / max(num_labels, 1.0))
    return kd_weight, ce_weight


def position_rows(distill_mask: torch.Tensor, labels: torch.Tensor, alpha: float) -> torch.Tensor:
    """(N,) int64 flat indices of the (B, T) positions with a non-zero weight.

    Distilled positions count when alpha < 1, labelled ones when alpha > 0 (exactly the
    positions where ``position_weights`` is non-zero). ``nonzero`` syncs a CUDA device with the
    host: the training loop runs it on the host-side batch (``with_position_rows``).
    """
    keep = torch.zeros_like(distill_mask, dtype=torch.bool)
    if alpha < 1.0:
        keep |= distill_mask.bool()
    if alpha > 0.0:
        keep |= labels != IGNORE_INDEX
    return keep.reshape(-1).nonzero().squeeze(-1)


def with_position_rows(
    batch: dict[str, torch.Tensor], alpha: float, *, pin: bool = False
) -> dict[str, torch.Tensor]:
    """``batch`` plus ``rows`` (``position_rows``), computed where the batch is (the host).

    ``pin``: page-lock ``rows`` like the rest of a pinned batch, so that its ``non_blocking``
    copy to CUDA does not wait for the device (a pageable source would).
    """
    rows = position_rows(batch["distill_mask"], batch["labels"], alpha)
    return {**batch, "rows": rows.pin_memory() if pin else rows}


def loss_kernel(
    target: TeacherTarget | None,
    rows: TeacherRows,
    options: LossOptions,
    kd_weight: torch.Tensor | None,
    labels: torch.Tensor | None,
    ce_weight: torch.Tensor | None,
) -> RowKernel:
    """The per-chunk ``kd_weight * KD + ce_weight * CE`` and its gradient: the one CE mix.

    rows: the target's teacher rows (N, ...); kd_weight, labels, ce_weight (N,) or None (that
    term is left out). The kernel maps a chunk's logits (C, V) float32 and its row range to
    ((C,) loss, (C, V) gradient).
    """
    with_kd = target is not None and kd_weight is not None
    with_ce = labels is not None and ce_weight is not None
    if not (with_kd or with_ce):
        raise ConfigError("nothing to train: pass a teacher target with kd_weight, or CE labels")

    def kernel(logits: torch.Tensor, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        loss = grad = None
        if with_kd:
            weight = kd_weight[start:end].float()
            loss, grad = target.loss_and_grad(logits, chunk_rows(rows, start, end), weight, options)
        if with_ce:
            loss, grad = add_cross_entropy(
                logits, labels[start:end], ce_weight[start:end], loss, grad
            )
        return loss, grad

    return kernel


class DistillObjective(nn.Module):
    """``forward(batch, counts) -> scalar loss`` for one micro-batch.

    With ``chunked`` the body's hidden states go through ``chunked_head_loss`` (the lm_head runs
    chunk by chunk, memory O(chunk x V), its GEMMs in ``compute_dtype``); otherwise the model's full forward gives the logits
    (architectures whose head cannot be split exactly) and the same kernel gives the gradient.
    ``target`` None (or alpha 1) trains on next-token CE alone.
    """

    def __init__(
        self,
        model: nn.Module,
        target: TeacherTarget | None,
        options: LossOptions,
        *,
        alpha: float,
        chunk_size: int,
        chunked: bool,
        compute_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if target is not None and alpha < 1.0:
            target.check_loss(options.kind)  # once, before any step (a samples cache: fkl only)
        self.model = model
        # the target is kept out of the module tree: an online teacher must not be synced by DDP
        self._target = (target,) if target is not None and alpha < 1.0 else ()
        self.options, self.alpha = options, alpha
        self.chunk_size, self.chunked = chunk_size, chunked
        self.compute_dtype = compute_dtype  # the head GEMMs' operand dtype (None: the hidden's)
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])

    @property
    def target(self) -> TeacherTarget | None:
        """The teacher target (None: CE only)."""
        return self._target[0] if self._target else None

    def forward(
        self, batch: dict[str, torch.Tensor], num_distilled: float, num_labels: float
    ) -> torch.Tensor:
        kd_weight, ce_weight = position_weights(
            batch["distill_mask"], batch["labels"], self.alpha, num_distilled, num_labels
        )
        rows = batch.get("rows")  # (N,) precomputed on the host by the loop
        if rows is None:
            rows = position_rows(batch["distill_mask"], batch["labels"], self.alpha)
        if rows.numel() == 0:  # nothing to learn here (e.g. a chat record without assistant)
            return sum(p.sum() for p in self.model.parameters()) * 0.0  # keeps DDP in step
        target = self.target
        teacher_rows = {} if target is None else target.select(batch, rows, self.vocab_size)
        with_ce = self.alpha > 0.0
        kernel = loss_kernel(
            target,
            teacher_rows,
            self.options,
            None if target is None else kd_weight.reshape(-1)[rows],
            batch["labels"].reshape(-1)[rows] if with_ce else None,
            ce_weight.reshape(-1)[rows] if with_ce else None,
        )
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        if self.chunked:
            hidden = body_of(self.model)(**inputs).last_hidden_state  # (B, T, H)
            hidden = hidden.reshape(-1, hidden.shape[-1])[rows]  # (N, H)
            groups = None if target is None else target.row_groups(teacher_rows)
            return chunked_head_loss(
                hidden,
                split_head(self.model),
                kernel,
                chunk_size=self.chunk_size,
                compute_dtype=self.compute_dtype,
                groups=groups,
            )
        logits = self.model(**inputs).logits  # (B, T, V)
        return logits_loss(logits.reshape(-1, logits.shape[-1])[rows], kernel)


def batch_loss(
    objective: nn.Module, batch: dict[str, torch.Tensor], num_distilled: float, num_labels: float
) -> torch.Tensor:
    """``objective(batch, ...)`` on one collated batch (``collate_records`` with the target's).

    ``objective`` is a ``DistillObjective`` or its DDP wrapper; the counts are the normalizers
    of the whole optimizer step (see ``DistillObjective.forward``).
    """
    return objective(batch, num_distilled, num_labels)

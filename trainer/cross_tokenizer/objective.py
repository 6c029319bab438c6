"""The cross-tokenizer training objective: student body -> chunked lm_head -> KD + ULD + CE.

The same per-position loss as ``kdcache.trainer.objective`` with the cross-tokenizer KD term:
``(1 - alpha) * (D_exact + uld_weight * ULD)`` at aligned positions, ``alpha * CE`` at every
position with a next student token, both normalized over the whole optimizer step. The fused
chunked head (``kdcache.trainer.chunked``) takes the closed-form gradient of
``cross_tokenizer_loss_and_grad``: memory O(chunk x V), as for a same-tokenizer cache.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from torch.nn import functional as F

from kdcache.cache.heads import body_of, split_head
from kdcache.trainer.chunked import chunked_head_loss
from kdcache.trainer.cross_tokenizer.loss import (
    CrossTokenizerLoss,
    cross_tokenizer_kd_loss,
    cross_tokenizer_loss_and_grad,
)
from kdcache.trainer.cross_tokenizer.uld import unmatched_student_ids
from kdcache.trainer.objective import position_weights

ROW_NAMES = ("topk_ids", "topk_logprobs", "tail_mass", "unmatched_probs")


class CrossTokenizerObjective(nn.Module):
    """``forward(batch, num_distilled, num_labels) -> scalar loss`` for one student micro-batch.

    ``batch``: ``collate_student_records`` tensors on the device. ``chunked``: the body's
    hidden states go through the fused chunked head; otherwise the model's full forward.
    """

    def __init__(
        self,
        model: nn.Module,
        setting: CrossTokenizerLoss,
        *,
        alpha: float,
        chunk_size: int,
        chunked: bool,
    ) -> None:
        super().__init__()
        self.model, self.setting, self.alpha = model, setting, alpha
        self.chunk_size, self.chunked = chunk_size, chunked
        self.register_buffer("student_matched", setting.student_matched, persistent=False)
        unmatched = unmatched_student_ids(setting.student_matched)  # once, not per chunk
        self.register_buffer("student_unmatched", unmatched, persistent=False)

    def forward(
        self, batch: dict[str, torch.Tensor], num_distilled: float, num_labels: float
    ) -> torch.Tensor:
        # the unmatched-id mask is a buffer: it follows the module to its device
        setting = dataclasses.replace(
            self.setting,
            student_matched=self.student_matched,
            unmatched_ids=self.student_unmatched,
        )
        labels = batch["labels"]
        kd_weight, ce_weight = position_weights(
            batch["distill_mask"], labels, self.alpha, num_distilled, num_labels
        )
        rows = ((kd_weight > 0) | (ce_weight > 0)).reshape(-1).nonzero().squeeze(-1)  # (N,)
        if rows.numel() == 0:
            return sum(p.sum() for p in self.model.parameters()) * 0.0  # keeps DDP in step
        teacher = {name: batch[name].flatten(0, 1)[rows] for name in ROW_NAMES}
        row_labels = labels.reshape(-1)[rows]
        kd_rows, ce_rows = kd_weight.reshape(-1)[rows], ce_weight.reshape(-1)[rows]
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        if not self.chunked:
            logits = self.model(**inputs).logits
            logits = logits.reshape(-1, logits.shape[-1])[rows].float()  # (N, V)
            loss = kd_rows * cross_tokenizer_kd_loss(logits, teacher, setting)
            ce = F.cross_entropy(logits, row_labels.clamp(min=0), reduction="none")
            return (loss + ce_rows * ce).sum()
        hidden = body_of(self.model)(**inputs).last_hidden_state  # (B, T, H)
        hidden = hidden.reshape(-1, hidden.shape[-1])[rows]  # (N, H)

        def kernel(logits: torch.Tensor, start: int, end: int):
            part = {name: tensor[start:end] for name, tensor in teacher.items()}
            return cross_tokenizer_loss_and_grad(
                logits, part, setting, kd_rows[start:end], row_labels[start:end],
                ce_rows[start:end],
            )  # fmt: skip

        return chunked_head_loss(hidden, split_head(self.model), kernel, chunk_size=self.chunk_size)


def cross_tokenizer_batch_loss(
    objective: nn.Module, batch: dict[str, torch.Tensor], num_distilled: float, num_labels: float
) -> torch.Tensor:
    """``objective(batch, ...)`` (a ``CrossTokenizerObjective`` or its DDP wrapper)."""
    return objective(batch, num_distilled, num_labels)

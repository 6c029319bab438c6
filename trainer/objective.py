"""The per-batch training objective: student body -> chunked lm_head -> weighted KD + CE.

Per position the loss is ``(1 - alpha) * KD + alpha * CE(next token)``, averaged over the
distilled positions of the whole optimizer step (all micro-batches, all ranks), so gradient
accumulation and DDP give the same update as one big batch. Padding and masked prompt positions
never count. The module wraps the model so DDP sees one ``forward`` per micro-batch.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from kdcache.cache.heads import body_of, split_head
from kdcache.trainer.data import IGNORE_INDEX

TAIL_SAMPLE_KINDS = ("fkl", "rkl", "akl")  # losses that use a cache's tail samples


def fold_out_of_vocab(
    topk_ids: torch.Tensor, topk_logprobs: torch.Tensor, tail_mass: torch.Tensor, vocab_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Move teacher entries whose id the student cannot emit into the tail.

    A teacher padded to a larger vocab_size than the student (e.g. Qwen2.5-7B 152064 vs 0.5B
    151936) can in principle rank a padding id in its top-k. Shapes: (N, k), (N, k), (N,).
    """
    outside = topk_ids >= vocab_size  # (N, k)
    if not bool(outside.any()):
        return topk_ids, topk_logprobs, tail_mass
    moved = torch.where(outside, topk_logprobs.exp(), torch.zeros_like(topk_logprobs)).sum(-1)
    tail_mass = tail_mass + moved
    topk_logprobs = topk_logprobs.masked_fill(outside, float("-inf"))
    topk_ids = topk_ids.masked_fill(outside, 0)
    return topk_ids, topk_logprobs, tail_mass


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


class DistillObjective(nn.Module):
    """``forward(batch tensors, counts) -> scalar loss`` for one micro-batch.

    With ``chunked`` the body's hidden states go through ``chunked_distill_loss`` (the lm_head is
    recomputed chunk by chunk, memory O(chunk x V)); otherwise the model's full forward gives the
    logits (for architectures whose head cannot be split exactly).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        kind: str,
        mu: float,
        temperature: float,
        alpha: float,
        chunk_size: int,
        chunked: bool,
        teacher: nn.Module | None = None,
        teacher_chunked: bool = False,
    ) -> None:
        super().__init__()
        self.model = model
        self.kind = "fkl" if alpha >= 1.0 else kind  # CE only: the KD term has weight 0
        self.mu, self.temperature, self.alpha = mu, temperature, alpha
        self.chunk_size, self.chunked = chunk_size, chunked
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        # Online distillation: a frozen teacher kept out of the module tree (DDP must not sync it).
        self._teacher = (teacher,) if teacher is not None else ()
        self.teacher_chunked = teacher_chunked

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, T)
        attention_mask: torch.Tensor,  # (B, T)
        labels: torch.Tensor,  # (B, T)
        topk_ids: torch.Tensor,  # (B, T, k)
        topk_logprobs: torch.Tensor,  # (B, T, k)
        tail_mass: torch.Tensor,  # (B, T)
        distill_mask: torch.Tensor,  # (B, T)
        num_distilled: float,
        num_labels: float,
        tail_ids: torch.Tensor | None = None,  # (B, T, s) topk+tail caches only
        tail_logprobs: torch.Tensor | None = None,  # (B, T, s)
    ) -> torch.Tensor:
        kd_weight, ce_weight = position_weights(
            distill_mask, labels, self.alpha, num_distilled, num_labels
        )
        rows = ((kd_weight > 0) | (ce_weight > 0)).reshape(-1).nonzero().squeeze(-1)  # (N,)
        if rows.numel() == 0:  # nothing to learn here (e.g. a chat record without assistant)
            return sum(p.sum() for p in self.model.parameters()) * 0.0  # keeps DDP in step
        ids, logprobs, tail = fold_out_of_vocab(
            topk_ids.flatten(0, 1)[rows],  # (N, k); k may be 0 (a sampled cache)
            topk_logprobs.flatten(0, 1)[rows],
            tail_mass.reshape(-1)[rows],
            self.vocab_size,
        )
        row_labels = labels.reshape(-1)[rows]
        kd_rows, ce_rows = kd_weight.reshape(-1)[rows], ce_weight.reshape(-1)[rows]
        if self._teacher and self.alpha < 1.0:
            return self._online_loss(input_ids, attention_mask, rows, row_labels, kd_rows, ce_rows)
        # topk+tail cache: unbiased FKL tail (the other divergences have no sample estimator
        # and use the top-k + bucket like a plain cache)
        if tail_ids is not None and self.alpha < 1.0 and self.kind in TAIL_SAMPLE_KINDS:
            from kdcache.trainer.topk_tail import fold_out_of_vocab_samples

            samples = fold_out_of_vocab_samples(
                tail_ids.flatten(0, 1)[rows],
                tail_logprobs.flatten(0, 1)[rows],
                self.vocab_size,
            )
            sparse = (ids, logprobs, tail, *samples)
            return self._topk_tail_loss(input_ids, attention_mask, rows, sparse, row_labels,
                                        kd_rows, ce_rows)  # fmt: skip
        if self.chunked:
            from kdcache.trainer.chunked import chunked_distill_loss

            hidden = body_of(self.model)(
                input_ids=input_ids, attention_mask=attention_mask
            ).last_hidden_state  # (B, T, H)
            hidden = hidden.reshape(-1, hidden.shape[-1])[rows]  # (N, H)
            with_kd, with_ce = self.alpha < 1.0, self.alpha > 0.0
            return chunked_distill_loss(
                hidden,
                split_head(self.model),
                ids if with_kd else None,
                logprobs if with_kd else None,
                tail if with_kd else None,
                row_labels if with_ce else None,
                kd_rows if with_kd else None,
                ce_rows if with_ce else None,
                kind=self.kind,
                mu=self.mu,
                temperature=self.temperature,
                chunk_size=self.chunk_size,
            )
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
        logits = logits.reshape(-1, logits.shape[-1])[rows].float()  # (N, V)
        return weighted_loss(logits, ids, logprobs, tail, row_labels, kd_rows, ce_rows, self)

    def _topk_tail_loss(
        self, input_ids, attention_mask, rows, sparse, labels, kd_weight, ce_weight
    ):
        """KD from the top-k plus the cache's tail samples (``topk_tail_kd_loss``) + CE."""
        ce = (labels, ce_weight) if self.alpha > 0.0 else (None, None)
        options = {"kind": self.kind, "mu": self.mu, "temperature": self.temperature}
        if self.chunked:
            from kdcache.trainer.topk_tail import chunked_topk_tail_loss

            hidden = body_of(self.model)(
                input_ids=input_ids, attention_mask=attention_mask
            ).last_hidden_state
            return chunked_topk_tail_loss(
                hidden.reshape(-1, hidden.shape[-1])[rows], split_head(self.model), *sparse,
                ce[0], kd_weight, ce[1], chunk_size=self.chunk_size, **options,
            )  # fmt: skip
        from kdcache.trainer.sampled import topk_tail_kd_loss

        logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
        logits = logits.reshape(-1, logits.shape[-1])[rows].float()  # (N, V)
        loss = (kd_weight * topk_tail_kd_loss(logits, *sparse, **options)).sum()
        if self.alpha > 0.0:
            loss = (
                loss
                + (ce_weight * F.cross_entropy(logits, labels.clamp(min=0), reduction="none")).sum()
            )
        return loss

    def _online_loss(self, input_ids, attention_mask, rows, labels, kd_weight, ce_weight):
        """Full-vocabulary KD against the teacher's forward on the same batch (+ CE)."""
        from kdcache.trainer.chunked import chunked_dense_distill_loss
        from kdcache.trainer.losses import dense_kd_loss

        teacher = self._teacher[0]
        with torch.no_grad():
            if self.teacher_chunked:
                states = body_of(teacher)(input_ids=input_ids, attention_mask=attention_mask)
                states = states.last_hidden_state
            else:
                states = teacher(input_ids=input_ids, attention_mask=attention_mask).logits
            states = states.reshape(-1, states.shape[-1])[rows]  # (N, H) or (N, V_teacher)
        head = split_head(teacher) if self.teacher_chunked else None

        def teacher_logits(start: int, end: int) -> torch.Tensor:
            logits = head.logits(states[start:end]) if head is not None else states[start:end]
            return logits[:, : self.vocab_size].float()  # a teacher's padding ids beyond V: dropped

        with_ce = self.alpha > 0.0
        if self.chunked:
            hidden = body_of(self.model)(
                input_ids=input_ids, attention_mask=attention_mask
            ).last_hidden_state
            return chunked_dense_distill_loss(
                hidden.reshape(-1, hidden.shape[-1])[rows],
                split_head(self.model),
                labels if with_ce else None,
                kd_weight,
                ce_weight if with_ce else None,
                teacher_logits_fn=teacher_logits,
                kind=self.kind,
                mu=self.mu,
                temperature=self.temperature,
                chunk_size=self.chunk_size,
            )
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
        logits = logits.reshape(-1, logits.shape[-1])[rows].float()  # (N, V)
        kd = dense_kd_loss(
            logits,
            teacher_logits(0, logits.shape[0]),
            kind=self.kind,
            mu=self.mu,
            temperature=self.temperature,
        )
        loss = (kd_weight * kd).sum()
        if with_ce:
            ce = F.cross_entropy(logits, labels.clamp(min=0), reduction="none")
            loss = loss + (ce_weight * ce).sum()
        return loss


def batch_loss(
    objective: nn.Module, batch: dict[str, torch.Tensor], num_distilled: float, num_labels: float
) -> torch.Tensor:
    """``objective(...)`` on one collated batch (``collate_records``' keys; tail samples if any).

    ``objective`` is a ``DistillObjective`` or its DDP wrapper; the counts are the normalizers
    of the whole optimizer step (see ``DistillObjective.forward``).
    """
    return objective(
        batch["input_ids"],
        batch["attention_mask"],
        batch["labels"],
        batch["topk_ids"],
        batch["topk_logprobs"],
        batch["tail_mass"],
        batch["distill_mask"],
        num_distilled,
        num_labels,
        tail_ids=batch.get("tail_ids"),  # topk+tail caches only
        tail_logprobs=batch.get("tail_logprobs"),
    )


def weighted_loss(
    logits: torch.Tensor,  # (N, V) float32
    topk_ids: torch.Tensor,  # (N, k)
    topk_logprobs: torch.Tensor,  # (N, k)
    tail_mass: torch.Tensor,  # (N,)
    labels: torch.Tensor,  # (N,)
    kd_weight: torch.Tensor,  # (N,)
    ce_weight: torch.Tensor,  # (N,)
    objective: DistillObjective,
) -> torch.Tensor:
    """sum_i kd_weight_i * KD_i + ce_weight_i * CE_i over full logits (the unchunked path)."""
    from kdcache.trainer.losses import sparse_kd_loss

    loss = logits.new_zeros(())
    if objective.alpha < 1.0:
        kd = sparse_kd_loss(
            logits,
            topk_ids,
            topk_logprobs,
            tail_mass,
            kind=objective.kind,
            mu=objective.mu,
            reduction="none",
            temperature=objective.temperature,
        )  # (N,)
        loss = loss + (kd_weight * kd).sum()
    if objective.alpha > 0.0:
        ce = F.cross_entropy(logits, labels.clamp(min=0), reduction="none")  # (N,)
        loss = loss + (ce_weight * ce).sum()
    return loss

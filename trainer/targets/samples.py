"""Samples only (storage mode ``samples``: top-k 0, ``s`` draws from the whole teacher).

Each position stores s ids drawn with replacement from the teacher's full distribution p, with
their log p_j. FKL = sum_j p_j (log p_j - log q_j) is estimated without bias by
mean_s (log p_js - log q_js); its gradient w.r.t. z = logits / T is q - mean_s onehot(j_s), one
softmax and a scatter. RKL, AKL and the others need the teacher where no sample is: refused.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from kdcache.cache.records import SequenceRecord
from kdcache.trainer.divergences import compute_dtype
from kdcache.trainer.targets.base import LossOptions, TeacherRows, TeacherTarget
from kdcache.trainer.targets.topk_bucket import collate_rows
from kdcache.trainer.targets.topk_samples import fold_out_of_vocab_samples

__all__ = ["SamplesTarget", "samples_fkl"]


def _sample_weights(tail_logprobs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sampled (N, s) bool, 1 / draws (N,), 0 for rows without a sample)."""
    sampled = tail_logprobs > -math.inf  # (N, s)
    draws = sampled.sum(-1)  # (N,)
    return sampled, torch.where(draws > 0, 1.0 / draws.clamp_min(1), 0.0)


def samples_fkl(logits: torch.Tensor, rows: TeacherRows, options: LossOptions) -> torch.Tensor:
    """(N,) unbiased FKL estimate mean_s (log p_js - log q_js), differentiable (the reference).

    logits (N, V) raw; rows ``tail_ids``, ``tail_logprobs`` (N, s), -inf = absent draw.
    """
    scaled = logits.to(compute_dtype(logits)) / options.temperature  # (N, V)
    log_q = scaled.gather(1, rows["tail_ids"].long()) - torch.logsumexp(scaled, -1)[:, None]
    tail_logprobs = rows["tail_logprobs"].detach().to(log_q.dtype)
    sampled, inverse_draws = _sample_weights(tail_logprobs)
    terms = torch.where(sampled, tail_logprobs - log_q, 0.0)  # (N, s)
    return terms.sum(-1) * inverse_draws


class SamplesTarget(TeacherTarget):
    """Draws from the whole teacher distribution: FKL only, unbiased, in closed form."""

    name = "samples"
    losses = ("fkl",)
    closed_form_losses = ("fkl",)
    measures = ("fkl_unbiased",)

    def loss_hint(self) -> str:
        return (
            ": RKL, AKL and the others need the teacher's probabilities where the samples are "
            "not; build with --top-k >= 1 for them"
        )

    @property
    def tail_samples(self) -> int:
        """Draws stored per position (the manifest's ``tail_samples``)."""
        return int(self.manifest["tail_samples"])

    def collate(self, records: Sequence[SequenceRecord], length: int) -> dict[str, torch.Tensor]:
        fields = {
            "tail_ids": (self.tail_samples, 0, np.int64),
            "tail_logprobs": (self.tail_samples, -np.inf, np.float32),
        }
        return collate_rows(records, length, fields)

    def select(
        self, batch: Mapping[str, torch.Tensor], rows: torch.Tensor, vocab_size: int
    ) -> TeacherRows:
        tail_ids, tail_logprobs = fold_out_of_vocab_samples(
            batch["tail_ids"].flatten(0, 1)[rows],
            batch["tail_logprobs"].flatten(0, 1)[rows],
            vocab_size,
        )
        return {"tail_ids": tail_ids, "tail_logprobs": tail_logprobs}

    def loss(self, logits: torch.Tensor, rows: TeacherRows, options: LossOptions) -> torch.Tensor:
        return samples_fkl(logits, rows, options)

    @torch.no_grad()
    def loss_and_grad(
        self, logits: torch.Tensor, rows: TeacherRows, weight: torch.Tensor, options: LossOptions
    ) -> tuple[torch.Tensor, torch.Tensor]:
        temperature = options.temperature
        tail_ids, tail_logprobs = rows["tail_ids"].long(), rows["tail_logprobs"].float()
        sampled, inverse_draws = _sample_weights(tail_logprobs)
        max_logit = logits.amax(-1)  # (C,)
        grad = logits - max_logit[:, None]  # (C, V)
        if temperature != 1.0:
            grad.div_(temperature)
        z_samples = grad.gather(1, tail_ids)  # (C, s) before the exp
        grad.exp_()
        sum_exp = grad.sum(-1)  # (C,)
        log_q = z_samples - torch.log(sum_exp)[:, None]  # (C, s)
        terms = torch.where(sampled, tail_logprobs - log_q, 0.0)
        row_weight = weight * inverse_draws  # (C,) weight / draws
        loss = row_weight * terms.sum(-1)
        has_draws = (inverse_draws > 0).float()
        grad.mul_((weight * has_draws / sum_exp)[:, None])  # weight * q
        grad.scatter_add_(1, tail_ids, -torch.where(sampled, row_weight[:, None], 0.0))
        if temperature != 1.0:
            grad.div_(temperature)
        return loss, grad

    def evaluate_rows(
        self, logits: torch.Tensor, rows: TeacherRows, temperature: float
    ) -> dict[str, torch.Tensor]:
        options = LossOptions(kind="fkl", temperature=temperature)
        return {"fkl_unbiased": samples_fkl(logits, rows, options)}

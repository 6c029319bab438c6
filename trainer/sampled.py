"""Top-k + tail samples on full student logits: the public loss and the reference tail sampler.

``topk_tail_kd_loss`` checks its inputs and calls ``kdcache.trainer.targets.topk_samples``
(math in docs/LOSSES.md): exact over the top-k, the FKL's tail part estimated without bias from
s draws of the teacher's tail, RKL with the bucket, AKL mixing both with the bucket's gap
weights. With k = 0 (a ``samples`` cache: the "tail" is everything) it is the plain unbiased
FKL estimate. ``draw_tail_samples`` is the reference sampler of the tests (the cache builder has
its own, ``kdcache.cache.extraction.tail_sampling``: cache/ never imports trainer/).
"""

from __future__ import annotations

import math

import torch

from kdcache.cache.errors import ConfigError
from kdcache.trainer.divergences import check_loss_options, reduce
from kdcache.trainer.losses import _check_shapes, check_teacher_ids
from kdcache.trainer.targets.base import LossOptions
from kdcache.trainer.targets.topk_samples import topk_samples_loss

__all__ = ["TAIL_SAMPLE_LOSSES", "draw_tail_samples", "topk_tail_kd_loss"]

TAIL_SAMPLE_LOSSES: tuple[str, ...] = ("fkl", "rkl", "akl")


def topk_tail_kd_loss(
    student_logits: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    tail_mass: torch.Tensor,
    tail_ids: torch.Tensor,
    tail_logprobs: torch.Tensor,
    kind: str = "akl",
    mu: float = 0.5,
    reduction: str = "none",
    temperature: float = 1.0,
) -> torch.Tensor:
    """KD from the exact top-k plus importance-sampled tail tokens, per row.

    Args:
        student_logits: (N, V). topk_ids, topk_logprobs, tail_mass: as in ``sparse_kd_loss``
            (k may be 0: then tail_mass is 1 and the samples come from the whole teacher).
        tail_ids: (N, s) ids drawn with replacement from p_j / p_tail over j outside S.
        tail_logprobs: (N, s) the teacher's log p_j of those ids (full-distribution scale);
            -inf marks an absent sample. Rows with no sample fall back to the bucket term.
        kind: "fkl" (unbiased full FKL), "rkl" (bucket RKL), "akl" (bucket gap weights, unbiased
            FKL part, bucket RKL part). With k = 0 only "fkl" has an estimator.

    Returns:
        (N,) or a scalar. For "fkl" its expectation over the draws is the full-vocabulary FKL.
    """
    check_loss_options(kind, mu, reduction, temperature)
    if kind not in TAIL_SAMPLE_LOSSES:
        raise ConfigError(f"the tail samples support fkl, rkl and akl, not {kind!r}")
    if topk_ids.shape[-1] == 0 and kind != "fkl":
        raise ConfigError(
            f"kind {kind!r} needs the teacher's top-k: with k = 0 (samples only) only fkl has "
            "an estimator; build with --top-k >= 1 for rkl and akl"
        )
    _check_shapes(student_logits, topk_ids, topk_logprobs, tail_mass)
    rows = student_logits.shape[0]
    if tail_ids.dim() != 2 or tail_ids.shape[0] != rows or tail_logprobs.shape != tail_ids.shape:
        raise ConfigError(
            f"tail samples: ids {tuple(tail_ids.shape)} and log-probs "
            f"{tuple(tail_logprobs.shape)} must both be (N, s) with N = {rows} rows"
        )
    check_teacher_ids("tail_ids", tail_ids, student_logits.shape[1])
    teacher = {
        "topk_ids": topk_ids,
        "topk_logprobs": topk_logprobs,
        "tail_mass": tail_mass,
        "tail_ids": tail_ids,
        "tail_logprobs": tail_logprobs,
    }
    options = LossOptions(kind=kind, mu=mu, temperature=temperature)
    return reduce(topk_samples_loss(student_logits, teacher, options), reduction)


@torch.no_grad()
def draw_tail_samples(
    teacher_logprobs: torch.Tensor,
    topk_ids: torch.Tensor,
    num_samples: int,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``num_samples`` ids per row from the teacher's tail p_j / p_tail (j outside S).

    Args:
        teacher_logprobs: (N, V) full teacher log-probs (cache temperature).
        topk_ids: (N, k) the stored top-k ids.

    Returns:
        (tail_ids (N, s) int64, tail_logprobs (N, s) teacher log p_j; -inf where the row has no
        tail mass to draw from).
    """
    outside = teacher_logprobs.float().scatter(1, topk_ids.long(), -math.inf)  # (N, V)
    has_tail = torch.isfinite(outside).any(-1) & (outside.exp().sum(-1) > 0)  # (N,)
    weights = torch.where(has_tail[:, None], outside.exp(), 1.0)
    ids = torch.multinomial(weights, num_samples, replacement=True, generator=generator)
    logprobs = teacher_logprobs.float().gather(1, ids)
    return ids, torch.where(has_tail[:, None], logprobs, -math.inf)

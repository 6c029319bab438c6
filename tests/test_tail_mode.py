"""The topk+tail mode's device sampler: draws follow the teacher's tail, deterministic per sequence."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from kdcache.cache.tail_sampling import sample_tail, sequence_uniforms
from kdcache.trainer.sampled import topk_tail_kd_loss

V, K = 40, 5


def teacher(seed: int = 0, rows: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, V) teacher log-probs with a real tail, and their top-K ids."""
    gen = torch.Generator().manual_seed(seed)
    log_probs = torch.log_softmax(1.5 * torch.randn(rows, V, generator=gen), -1)
    return log_probs, log_probs.topk(K, -1).indices


def test_draws_follow_the_teacher_tail_distribution():
    """Chi-square of 40,000 draws against p_j / p_tail over the tail ids (dense reference)."""
    log_probs, topk_ids = teacher()
    uniforms = torch.from_numpy(sequence_uniforms(0, 1, 1, 40_000))
    ids, logprobs = sample_tail(log_probs, topk_ids, uniforms)
    p = log_probs[0].double().exp()
    tail_ids = [j for j in range(V) if j not in set(topk_ids[0].tolist())]
    expected = p[tail_ids] / p[tail_ids].sum() * ids.numel()
    observed = torch.bincount(ids[0], minlength=V).double()
    assert observed[topk_ids[0]].sum() == 0  # never a top-k id
    chi2 = float(((observed[tail_ids] - expected) ** 2 / expected).sum())
    assert chi2 < stats.chi2.ppf(0.999, df=len(tail_ids) - 1), chi2
    torch.testing.assert_close(logprobs[0], log_probs[0, ids[0]])  # the teacher's own log p_j


def test_same_samples_whatever_the_batch():
    """Rows of a sequence get the same draws alone, inside a bigger batch, or as a prefix."""
    log_probs, topk_ids = teacher(1, rows=6)
    alone = sample_tail(
        log_probs[:2], topk_ids[:2], torch.from_numpy(sequence_uniforms(3, 9, 2, 8))
    )
    uniforms = np.concatenate([sequence_uniforms(3, 9, 2, 8), sequence_uniforms(3, 10, 4, 8)])
    batched = sample_tail(log_probs, topk_ids, torch.from_numpy(uniforms))
    assert torch.equal(alone[0], batched[0][:2]) and torch.equal(alone[1], batched[1][:2])
    np.testing.assert_array_equal(sequence_uniforms(3, 9, 5, 8)[:2], sequence_uniforms(3, 9, 2, 8))
    assert not np.array_equal(sequence_uniforms(3, 9, 2, 8), sequence_uniforms(3, 10, 2, 8))
    assert not np.array_equal(sequence_uniforms(3, 9, 2, 8), sequence_uniforms(4, 9, 2, 8))


def test_rows_without_tail_are_absent():
    log_probs = torch.log_softmax(torch.randn(2, 6), -1)
    ids, logprobs = sample_tail(log_probs, torch.arange(6).expand(2, 6), torch.rand(2, 3))
    assert torch.equal(ids, torch.zeros(2, 3, dtype=torch.int64))
    assert torch.isneginf(logprobs).all()


def test_fkl_on_the_samples_is_unbiased():
    """Mean over 4,000 sequences' draws of the topk+tail FKL == the dense FKL (5 std errors)."""
    log_probs, topk_ids = teacher(2)
    student = torch.randn(1, V, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    reps, samples = 4000, 4
    uniforms = np.concatenate([sequence_uniforms(0, i, 1, samples) for i in range(reps)])
    ids, logprobs = sample_tail(
        log_probs.expand(reps, V), topk_ids.expand(reps, K), torch.from_numpy(uniforms)
    )
    topk_lp = log_probs.gather(1, topk_ids)
    tail = 1 - topk_lp.exp().sum(-1)
    losses = topk_tail_kd_loss(
        student.expand(reps, V), topk_ids.expand(reps, K), topk_lp.expand(reps, K),
        tail.expand(reps), ids, logprobs, kind="fkl",
    )  # fmt: skip
    p = log_probs.double().exp()
    dense = float((p * (log_probs.double() - torch.log_softmax(student, -1))).sum())
    error = float(losses.std()) / math.sqrt(reps)
    assert abs(float(losses.mean()) - dense) < 5 * error, (float(losses.mean()), dense, error)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_uniform_dtype_does_not_matter(dtype):
    log_probs, topk_ids = teacher(3, rows=4)
    uniforms = torch.from_numpy(sequence_uniforms(0, 0, 4, 16))
    a = sample_tail(log_probs, topk_ids, uniforms.to(dtype))[0]
    b = sample_tail(log_probs, topk_ids, uniforms)[0]
    assert (a != b).float().mean() < 0.05  # float32 rounding may move a rare boundary draw

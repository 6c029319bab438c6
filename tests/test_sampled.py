"""Sampled-teacher losses (issue 7 modes a and b): expectation over draws == the dense loss."""

from __future__ import annotations

import math

import pytest
import torch

from bench.rskd import draw_samples, sampled_kd_loss  # RS-KD counts: the quality study only
from kdcache.cache.errors import ConfigError
from kdcache.trainer.losses import sparse_kd_loss
from kdcache.trainer.sampled import draw_tail_samples, topk_tail_kd_loss

pytestmark = pytest.mark.usefixtures("one_torch_thread")


N, V, K = 3, 12, 3
REPS = 10000


def dense_fkl(student_logits, teacher_logits):
    """Full-vocabulary forward KL, written out."""
    p = torch.softmax(teacher_logits, -1)
    return (p * (torch.log(p) - torch.log_softmax(student_logits, -1))).sum(-1)


def problem(seed=0):
    gen = torch.Generator().manual_seed(seed)
    student = torch.randn(N, V, generator=gen, dtype=torch.float64)
    teacher = 1.5 * torch.randn(N, V, generator=gen, dtype=torch.float64)
    teacher_lp = torch.log_softmax(teacher, -1)
    topk_lp, topk_ids = teacher_lp.topk(K, -1)
    tail = 1 - topk_lp.exp().sum(-1)
    return gen, student, teacher, teacher_lp, topk_ids, topk_lp, tail


def assert_unbiased(per_rep_loss, per_rep_grad, student, teacher):
    """Mean over REPS draws within 5 standard errors of the dense loss and gradient."""
    leaf = student.clone().requires_grad_()
    want = dense_fkl(leaf, teacher)
    (want_grad,) = torch.autograd.grad(want.sum(), leaf)
    losses = per_rep_loss.reshape(REPS, N)
    error = (losses.mean(0) - want.detach()).abs()
    assert (error <= 5 * losses.std(0) / REPS**0.5 + 1e-12).all(), (losses.mean(0), want)
    grads = per_rep_grad.reshape(REPS, N, V)
    error = (grads.mean(0) - want_grad).abs()
    assert (error <= 5 * grads.std(0) / REPS**0.5 + 1e-12).all()


def replicated(student):
    return student.repeat(REPS, 1).requires_grad_()


def test_topk_tail_fkl_is_unbiased_for_the_full_fkl():
    gen, student, teacher, teacher_lp, ids, lp, tail = problem()
    leaf = replicated(student)
    rep = lambda x: x.repeat(REPS, *([1] * (x.dim() - 1)))  # noqa: E731
    tail_ids, tail_lp = draw_tail_samples(rep(teacher_lp), rep(ids), 4, generator=gen)
    loss = topk_tail_kd_loss(leaf, rep(ids), rep(lp), rep(tail), tail_ids, tail_lp, kind="fkl")
    (grad,) = torch.autograd.grad(loss.sum(), leaf)
    assert_unbiased(loss.detach(), grad, student, teacher)
    # ... while the bucket FKL is biased low (a lower bound of the full FKL).
    bucket = sparse_kd_loss(student, ids, lp, tail, kind="fkl")
    assert (bucket < dense_fkl(student, teacher) - 1e-3).all()


@pytest.mark.parametrize("proposal_temperature", [1.0, 2.0])
def test_rs_kd_fkl_is_unbiased_for_the_full_fkl(proposal_temperature):
    gen, student, teacher, teacher_lp, *_ = problem(seed=1)
    leaf = replicated(student)
    ids, counts, logprobs, proposal = draw_samples(
        teacher_lp.repeat(REPS, 1), 8, generator=gen, proposal_temperature=proposal_temperature
    )
    assert (counts.sum(-1) == 8).all()
    assert (proposal is None) == (proposal_temperature == 1.0)
    loss = sampled_kd_loss(leaf, ids, counts, logprobs, proposal)
    (grad,) = torch.autograd.grad(loss.sum(), leaf)
    assert_unbiased(loss.detach(), grad, student, teacher)


def test_topk_tail_with_a_single_tail_token_is_exact():
    gen, student, teacher, teacher_lp, *_ = problem(seed=2)
    lp, ids = teacher_lp.topk(V - 1, -1)
    tail = 1 - lp.exp().sum(-1)
    tail_ids, tail_lp = draw_tail_samples(teacher_lp, ids, 3, generator=gen)
    fkl = topk_tail_kd_loss(student, ids, lp, tail, tail_ids, tail_lp, kind="fkl")
    torch.testing.assert_close(fkl, dense_fkl(student, teacher))
    for kind in ("akl", "rkl"):
        got = topk_tail_kd_loss(student, ids, lp, tail, tail_ids, tail_lp, kind=kind)
        torch.testing.assert_close(got, sparse_kd_loss(student, ids, lp, tail, kind=kind))


def test_rkl_keeps_the_bucket_and_rows_without_samples_fall_back():
    gen, student, _, teacher_lp, ids, lp, tail = problem(seed=3)
    tail_ids, tail_lp = draw_tail_samples(teacher_lp, ids, 5, generator=gen)
    got = topk_tail_kd_loss(student, ids, lp, tail, tail_ids, tail_lp, kind="rkl")
    torch.testing.assert_close(got, sparse_kd_loss(student, ids, lp, tail, kind="rkl"))
    absent = torch.full_like(tail_lp, -math.inf)
    for kind in ("fkl", "akl"):
        got = topk_tail_kd_loss(student, ids, lp, tail, tail_ids, absent, kind=kind)
        torch.testing.assert_close(got, sparse_kd_loss(student, ids, lp, tail, kind=kind))


def test_topk_tail_akl_mixes_bucket_weights_with_the_unbiased_fkl():
    gen, student, _, teacher_lp, ids, lp, tail = problem(seed=4)
    tail_ids, tail_lp = draw_tail_samples(teacher_lp, ids, 5, generator=gen)
    akl = topk_tail_kd_loss(student, ids, lp, tail, tail_ids, tail_lp, kind="akl")
    fkl = topk_tail_kd_loss(student, ids, lp, tail, tail_ids, tail_lp, kind="fkl")
    rkl = sparse_kd_loss(student, ids, lp, tail, kind="rkl")
    # The bucket AKL's weights: recover them from its FKL/RKL mix.
    b_akl = sparse_kd_loss(student, ids, lp, tail, kind="akl")
    b_fkl = sparse_kd_loss(student, ids, lp, tail, kind="fkl")
    w_head = (b_akl - rkl) / (b_fkl - rkl)
    torch.testing.assert_close(akl, w_head * fkl + (1 - w_head) * rkl)


def test_temperature_and_renormalization():
    gen, student, teacher, _, *_ = problem(seed=5)
    teacher_lp = torch.log_softmax(teacher / 2.0, -1)
    lp, ids = teacher_lp.topk(V - 1, -1)
    tail = 1 - lp.exp().sum(-1)
    tail_ids, tail_lp = draw_tail_samples(teacher_lp, ids, 2, generator=gen)
    got = topk_tail_kd_loss(student, ids, lp, tail, tail_ids, tail_lp, "fkl", temperature=2.0)
    torch.testing.assert_close(got, dense_fkl(student / 2.0, teacher / 2.0))
    scaled = topk_tail_kd_loss(
        student,
        ids,
        lp + 0.1,
        tail * math.exp(0.1),
        tail_ids,
        tail_lp + 0.1,
        "fkl",
        temperature=2.0,
    )
    torch.testing.assert_close(scaled, got)


def test_refusals():
    gen, student, _, teacher_lp, ids, lp, tail = problem(seed=6)
    tail_ids, tail_lp = draw_tail_samples(teacher_lp, ids, 2, generator=gen)
    with pytest.raises(ConfigError, match="support fkl, rkl and akl"):
        topk_tail_kd_loss(student, ids, lp, tail, tail_ids, tail_lp, kind="js")
    with pytest.raises(ConfigError, match="must both be"):
        topk_tail_kd_loss(student, ids, lp, tail, tail_ids[:, :1], tail_lp, kind="fkl")
    s_ids, counts, s_lp, _ = draw_samples(teacher_lp, 4, generator=gen)
    with pytest.raises(ConfigError, match="supports kind='fkl' only"):
        sampled_kd_loss(student, s_ids, counts, s_lp, kind="akl")
    with pytest.raises(ConfigError, match="must both be"):
        sampled_kd_loss(student, s_ids, counts[:1], s_lp)

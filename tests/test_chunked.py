"""The chunked head (and the targets' closed-form kernels) equal the plain full-logits loss."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from kdcache.cache.errors import ConfigError
from kdcache.cache.extraction.heads import OutputHead
from kdcache.trainer.head_losses import chunked_dense_distill_loss, chunked_distill_loss
from kdcache.trainer.losses import LOSS_KINDS, dense_kd_loss, sparse_kd_loss
from kdcache.trainer.objective import loss_kernel
from kdcache.trainer.targets import (
    DenseTeacherTarget,
    LossOptions,
    TopkBucketTarget,
    TopkSamplesTarget,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


N, H, V, K = 23, 8, 40, 5


def make_problem(seed=0, bias=True, scale=1.0, softcap=None, ce=True):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=gen).requires_grad_()
    weight = (torch.randn(V, H, generator=gen) / H**0.5).requires_grad_()
    bias_t = (0.1 * torch.randn(V, generator=gen)).requires_grad_() if bias else None
    head = OutputHead(weight, bias_t, scale=scale, softcap=softcap)
    teacher = 2 * torch.randn(N, V, generator=gen)
    logprobs, ids = torch.log_softmax(teacher, -1).topk(K, -1)
    tail = (1 - logprobs.exp().sum(-1)).clamp_min(0)
    labels = torch.randint(0, V, (N,), generator=gen)
    labels[::4] = -100  # positions without a CE target
    kd_weight = torch.rand(N, generator=gen)
    kd_weight[1::5] = 0.0  # masked positions
    ce_weight = torch.rand(N, generator=gen) if ce else None
    return hidden, head, teacher, ids, logprobs, tail, labels, kd_weight, ce_weight


def reference(hidden, head, ids, logprobs, tail, labels, kd_weight, ce_weight, kind, **kw):
    """Plain path written out: full logits, then the per-row losses."""
    logits = F.linear(hidden, head.weight, head.bias) * head.scale
    if head.softcap is not None:
        logits = torch.tanh(logits / head.softcap) * head.softcap
    loss = (kd_weight * sparse_kd_loss(logits, ids, logprobs, tail, kind=kind, **kw)).sum()
    if ce_weight is not None:
        ce = F.cross_entropy(logits, labels, ignore_index=-100, reduction="none")
        loss = loss + (ce_weight * ce).sum()
    return loss


def kernel_loss_and_grad(target, teacher_rows, logits, kd_w, labels, ce_w, **options):
    """One kernel call over all rows: the closed-form KD of ``target`` plus the CE mix."""
    kernel = loss_kernel(target, teacher_rows, LossOptions(**options), kd_w, labels, ce_w)
    return kernel(logits, 0, logits.shape[0])


def params(hidden, head):
    return [hidden, head.weight] + ([head.bias] if head.bias is not None else [])


def assert_same(got, want, inputs, rtol=1e-5, atol=1e-5):
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
    for g, w in zip(
        torch.autograd.grad(got, inputs), torch.autograd.grad(want, inputs), strict=True
    ):
        torch.testing.assert_close(g, w, rtol=rtol, atol=atol)


@pytest.mark.parametrize("method", ["fused", "plain"])
@pytest.mark.parametrize("kind", LOSS_KINDS)
def test_chunked_equals_plain_all_kinds(kind, method):
    hidden, head, _, ids, lp, tail, labels, kd_w, ce_w = make_problem(seed=1)
    got = chunked_distill_loss(
        hidden, head, ids, lp, tail, labels, kd_w, ce_w, kind=kind, chunk_size=7, method=method
    )
    want = reference(hidden, head, ids, lp, tail, labels, kd_w, ce_w, kind)
    assert_same(got, want, params(hidden, head))


@pytest.mark.parametrize(
    ("scale", "softcap", "bias"), [(1.0, None, False), (0.5, None, True), (1.7, 3.0, True)]
)
def test_chunked_head_postprocessing(scale, softcap, bias):
    hidden, head, _, ids, lp, tail, labels, kd_w, ce_w = make_problem(
        seed=2, bias=bias, scale=scale, softcap=softcap
    )
    got = chunked_distill_loss(
        hidden, head, ids, lp, tail, labels, kd_w, ce_w, kind="akl", temperature=2.0, chunk_size=5
    )
    want = reference(hidden, head, ids, lp, tail, labels, kd_w, ce_w, "akl", temperature=2.0)
    assert_same(got, want, params(hidden, head))
    torch.testing.assert_close(head.logits(hidden), _plain_logits(hidden, head))


def _plain_logits(hidden, head):
    logits = F.linear(hidden, head.weight, head.bias) * head.scale
    return logits if head.softcap is None else torch.tanh(logits / head.softcap) * head.softcap


def test_chunked_ce_only_and_kd_only():
    hidden, head, _, ids, lp, tail, labels, kd_w, ce_w = make_problem(seed=3)
    ce_only = chunked_distill_loss(hidden, head, None, None, None, labels, None, ce_w, chunk_size=4)
    want = (ce_w * F.cross_entropy(_plain_logits(hidden, head), labels, reduction="none")).sum()
    assert_same(ce_only, want, params(hidden, head))
    kd_only = chunked_distill_loss(hidden, head, ids, lp, tail, None, kd_w, None, kind="fkl")
    want = reference(hidden, head, ids, lp, tail, labels, kd_w, None, "fkl")
    assert_same(kd_only, want, params(hidden, head))


def test_chunk_size_does_not_change_the_result():
    hidden, head, _, ids, lp, tail, labels, kd_w, ce_w = make_problem(seed=4)
    values = [
        chunked_distill_loss(hidden, head, ids, lp, tail, labels, kd_w, ce_w, chunk_size=c)
        for c in (1, 6, N, 1000)
    ]
    for value in values[1:]:
        torch.testing.assert_close(value, values[0])


def test_frozen_head_and_scaled_backward():
    hidden, head, _, ids, lp, tail, labels, kd_w, ce_w = make_problem(seed=5)
    frozen = OutputHead(head.weight.detach(), head.bias.detach())
    got = 3.0 * chunked_distill_loss(hidden, frozen, ids, lp, tail, labels, kd_w, ce_w)
    want = 3.0 * reference(hidden, frozen, ids, lp, tail, labels, kd_w, ce_w, "akl")
    assert_same(got, want, [hidden])


def test_bf16_hidden_and_weight():
    hidden, head, _, ids, lp, tail, labels, kd_w, ce_w = make_problem(seed=6)
    low_hidden = hidden.detach().bfloat16().requires_grad_()
    got = chunked_distill_loss(low_hidden, head, ids, lp, tail, labels, kd_w, ce_w, chunk_size=8)
    want = reference(hidden, head, ids, lp, tail, labels, kd_w, ce_w, "akl")
    torch.testing.assert_close(got, want, rtol=3e-2, atol=3e-2)
    grads = torch.autograd.grad(got, [low_hidden, head.weight, head.bias])
    assert grads[0].dtype == torch.bfloat16 and grads[1].dtype == torch.float32
    ref_grads = torch.autograd.grad(want, [hidden, head.weight, head.bias])
    for g, w in zip(grads, ref_grads, strict=True):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g.float(), w, rtol=5e-2, atol=5e-2)
    low_head = OutputHead(head.weight.detach().bfloat16().requires_grad_(), None)
    loss = chunked_distill_loss(low_hidden, low_head, ids, lp, tail, labels, kd_w, ce_w)
    loss.backward()
    assert low_head.weight.grad.dtype == torch.bfloat16 and torch.isfinite(loss)


@pytest.mark.parametrize("method", ["fused", "plain"])
@pytest.mark.parametrize("kind", ["fkl", "rkl", "akl", "js"])  # js: the autograd fallback
def test_chunked_dense_equals_plain(kind, method):
    hidden, head, _, _, _, _, labels, kd_w, ce_w = make_problem(seed=7)
    gen = torch.Generator().manual_seed(70)
    teacher_hidden = torch.randn(N, 6, generator=gen)
    teacher_head = OutputHead(torch.randn(V - 3, 6, generator=gen), None, softcap=4.0)
    got = chunked_dense_distill_loss(
        hidden,
        head,
        labels,
        kd_w,
        ce_w,
        teacher_hidden=teacher_hidden,
        teacher_head=teacher_head,
        kind=kind,
        chunk_size=6,
        method=method,
    )
    logits = _plain_logits(hidden, head)
    kd = dense_kd_loss(logits, teacher_head.logits(teacher_hidden), kind=kind)
    ce = F.cross_entropy(logits, labels, ignore_index=-100, reduction="none")
    want = (kd_w * kd + ce_w * ce).sum()
    assert_same(got, want, params(hidden, head))
    full_teacher = teacher_head.logits(teacher_hidden)
    via_logits = chunked_dense_distill_loss(
        hidden, head, labels, kd_w, ce_w, teacher_logits=full_teacher, kind=kind
    )
    torch.testing.assert_close(via_logits, want)


def test_bad_arguments_are_refused():
    hidden, head, _, ids, lp, tail, labels, kd_w, ce_w = make_problem(seed=8)
    args = (hidden, head, ids, lp, tail, labels, kd_w, ce_w)
    with pytest.raises(ConfigError, match="chunk_size must be >= 1"):
        chunked_distill_loss(*args, chunk_size=0)
    with pytest.raises(ConfigError, match="unknown chunked-loss method"):
        chunked_distill_loss(*args, method="fast")
    with pytest.raises(ConfigError, match="unknown loss kind"):
        chunked_distill_loss(*args, kind="kl")
    with pytest.raises(ConfigError, match="labels has 3 rows"):
        chunked_distill_loss(hidden, head, ids, lp, tail, labels[:3], kd_w, ce_w)
    with pytest.raises(ConfigError, match="hidden must be"):
        chunked_distill_loss(hidden[:, :3], head, ids, lp, tail, labels, kd_w, ce_w)
    with pytest.raises(ConfigError, match="pass the ids with their log-probs"):
        chunked_distill_loss(hidden, head, ids, None, tail, labels, kd_w, ce_w)
    with pytest.raises(ConfigError, match="teacher_hidden with teacher_head"):
        chunked_dense_distill_loss(hidden, head, labels, kd_w, ce_w)
    with pytest.raises(ConfigError, match="tail samples need topk_ids"):
        chunked_distill_loss(*args[:2], None, None, None, *args[5:], tail_ids=ids, tail_logprobs=lp)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("kind", LOSS_KINDS)
def test_closed_form_gradient_matches_autograd(kind, temperature):
    gen = torch.Generator().manual_seed(11)
    rows, vocab, k = 9, 30, 5
    logits = 3 * torch.randn(rows, vocab, generator=gen)
    logits[3] *= 200  # so peaked that the student's tail is < 1e-30 of its top token
    teacher = 2 * torch.randn(rows, vocab, generator=gen)
    lp, ids = torch.log_softmax(teacher / temperature, -1).topk(k, -1)
    tail = (1 - lp.exp().sum(-1)).clamp_min(0)
    lp[1, 3:], ids[1, 3:] = -math.inf, 0  # padding at the end of a row
    lp[2, :], ids[2, :], tail[2] = -math.inf, 0, 1.0  # all padding: everything in the bucket
    tail[4] = 0.0  # teacher tail mass 0
    labels = torch.randint(0, vocab, (rows,), generator=gen)
    labels[0] = -100
    kd_w, ce_w = torch.rand(rows, generator=gen), torch.rand(rows, generator=gen)
    kw = {"kind": kind, "temperature": temperature}
    bucket = TopkBucketTarget()
    teacher_rows = {"topk_ids": ids, "topk_logprobs": lp, "tail_mass": tail}
    loss, grad = kernel_loss_and_grad(bucket, teacher_rows, logits, kd_w, labels, ce_w, **kw)
    leaf = logits.clone().requires_grad_()
    want = kd_w * sparse_kd_loss(leaf, ids, lp, tail, **kw)
    want = want + ce_w * F.cross_entropy(leaf, labels, ignore_index=-100, reduction="none")
    torch.testing.assert_close(loss, want.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, torch.autograd.grad(want.sum(), leaf)[0], rtol=1e-5, atol=1e-6)
    full_lp, full_ids = torch.log_softmax(teacher / temperature, -1).topk(vocab, -1)  # k = V
    full_rows = {"topk_ids": full_ids, "topk_logprobs": full_lp, "tail_mass": torch.zeros(rows)}
    loss, grad = kernel_loss_and_grad(bucket, full_rows, logits, kd_w, None, None, **kw)
    want = kd_w * sparse_kd_loss(leaf, full_ids, full_lp, torch.zeros(rows), **kw)
    torch.testing.assert_close(loss, want.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, torch.autograd.grad(want.sum(), leaf)[0], rtol=1e-5, atol=1e-6)


def test_out_of_range_ids_are_refused():
    hidden, head, _, ids, lp, tail, labels, kd_w, ce_w = make_problem(seed=9)
    with pytest.raises(ConfigError, match="outside the student's vocabulary"):
        chunked_distill_loss(hidden, head, ids + V, lp, tail, labels, kd_w, ce_w)


@pytest.mark.parametrize("method", ["fused"])
def test_no_full_logits_are_kept_for_backward(method):
    hidden, head, _, ids, lp, tail, labels, kd_w, ce_w = make_problem(seed=10)
    saved: list[int] = []

    def pack(tensor):
        saved.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = chunked_distill_loss(
            hidden, head, ids, lp, tail, labels, kd_w, ce_w, chunk_size=4, method=method
        )
    loss.backward()
    assert saved and max(saved) < N * V // 2  # chunk x V and (V, H) buffers only
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        chunked_distill_loss(hidden, head, ids, lp, tail, labels, kd_w, ce_w, method="plain")
    assert max(saved) >= N * V  # the plain path does keep (N, V) tensors


def test_no_grad_mode_gives_the_same_value():
    hidden, head, _, ids, lp, tail, labels, kd_w, ce_w = make_problem(seed=13)
    with torch.no_grad():
        value = chunked_distill_loss(hidden, head, ids, lp, tail, labels, kd_w, ce_w, chunk_size=5)
    want = reference(hidden, head, ids, lp, tail, labels, kd_w, ce_w, "akl")
    assert not value.requires_grad
    torch.testing.assert_close(value, want.detach())
    with torch.no_grad():
        low = chunked_distill_loss(hidden.bfloat16(), head, ids, lp, tail, labels, kd_w, ce_w)
    torch.testing.assert_close(low, want.detach(), rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize(
    ("kind", "mu", "temperature"),
    [("fkl", 0.5, 1.0), ("rkl", 0.5, 2.0), ("akl", 0.5, 1.0), ("akl", 0.9, 1.5)],
)
def test_dense_closed_form_gradient_matches_autograd(kind, mu, temperature):
    gen = torch.Generator().manual_seed(14)
    rows, vocab = 6, 300
    logits = 2 * torch.randn(rows, vocab, generator=gen)
    teacher = 0.3 * torch.randn(rows, vocab - 4, generator=gen)  # flat: a long AKL head
    teacher[0] *= 30  # and one peaked row
    labels = torch.randint(0, vocab, (rows,), generator=gen)
    labels[1] = -100
    kd_w, ce_w = torch.rand(rows, generator=gen), torch.rand(rows, generator=gen)
    kw = {"kind": kind, "mu": mu, "temperature": temperature}
    dense = DenseTeacherTarget(None, None, vocab)
    teacher_rows = {"teacher_states": teacher}
    loss, grad = kernel_loss_and_grad(dense, teacher_rows, logits, kd_w, labels, ce_w, **kw)
    leaf = logits.clone().requires_grad_()
    want = kd_w * dense_kd_loss(leaf, teacher, **kw)
    want = want + ce_w * F.cross_entropy(leaf, labels, ignore_index=-100, reduction="none")
    torch.testing.assert_close(loss, want.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, torch.autograd.grad(want.sum(), leaf)[0], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("method", ["fused", "plain"])
def test_empty_batch_gives_zero_and_zero_gradients(method):
    hidden = torch.randn(0, H, requires_grad=True)
    head = OutputHead(torch.randn(V, H, requires_grad=True), torch.zeros(V, requires_grad=True))
    ids, lp = torch.zeros(0, K, dtype=torch.long), torch.zeros(0, K)
    empty, labels = torch.zeros(0), torch.zeros(0, dtype=torch.long)
    loss = chunked_distill_loss(hidden, head, ids, lp, empty, labels, empty, empty, method=method)
    loss.backward()
    assert loss.item() == 0.0 and head.weight.grad.abs().sum() == 0


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("kind", ["fkl", "rkl", "akl"])
def test_closed_form_with_tail_samples_matches_topk_tail_loss(kind, temperature):
    from kdcache.trainer.sampled import draw_tail_samples, topk_tail_kd_loss

    gen = torch.Generator().manual_seed(15)
    rows, vocab, k = 8, 30, 4
    logits = 3 * torch.randn(rows, vocab, generator=gen)
    logits[3] *= 200  # a student tail < 1e-30 of its top token: still exact
    teacher_lp = torch.log_softmax(2 * torch.randn(rows, vocab, generator=gen) / temperature, -1)
    lp, ids = teacher_lp.topk(k, -1)
    tail = (1 - lp.exp().sum(-1)).clamp_min(0) * 1.02  # rounded: renormalization matters
    tail_ids, tail_lp = draw_tail_samples(teacher_lp, ids, 3, generator=gen)
    tail_lp[1, 1:] = -math.inf  # absent samples
    tail_lp[2, :] = -math.inf  # a row without samples: the bucket
    labels = torch.randint(0, vocab, (rows,), generator=gen)
    kd_w, ce_w = torch.rand(rows, generator=gen), torch.rand(rows, generator=gen)
    kw = {"kind": kind, "temperature": temperature}
    teacher_rows = {
        "topk_ids": ids,
        "topk_logprobs": lp,
        "tail_mass": tail,
        "tail_ids": tail_ids,
        "tail_logprobs": tail_lp,
    }
    samples = TopkSamplesTarget()
    loss, grad = kernel_loss_and_grad(samples, teacher_rows, logits, kd_w, labels, ce_w, **kw)
    leaf = logits.clone().requires_grad_()
    want = kd_w * topk_tail_kd_loss(leaf, ids, lp, tail, tail_ids, tail_lp, **kw)
    want = want + ce_w * F.cross_entropy(leaf, labels, reduction="none")
    torch.testing.assert_close(loss, want.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, torch.autograd.grad(want.sum(), leaf)[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["fused", "plain"])
def test_chunked_with_tail_samples_equals_plain(method):
    from kdcache.trainer.sampled import draw_tail_samples, topk_tail_kd_loss

    hidden, head, teacher, ids, lp, tail, labels, kd_w, ce_w = make_problem(seed=16)
    tail_ids, tail_lp = draw_tail_samples(torch.log_softmax(teacher, -1), ids, 4)
    got = chunked_distill_loss(
        hidden,
        head,
        ids,
        lp,
        tail,
        labels,
        kd_w,
        ce_w,
        kind="akl",
        chunk_size=6,
        method=method,
        tail_ids=tail_ids,
        tail_logprobs=tail_lp,
    )
    logits = _plain_logits(hidden, head)
    kd = topk_tail_kd_loss(logits, ids, lp, tail, tail_ids, tail_lp, kind="akl")
    ce = F.cross_entropy(logits, labels, ignore_index=-100, reduction="none")
    assert_same(got, (kd_w * kd + ce_w * ce).sum(), params(hidden, head))
    # js has no sample estimator: the samples are ignored, the top-k + bucket js is the loss
    with_samples = chunked_distill_loss(
        hidden, head, ids, lp, tail, None, kd_w, None, kind="js", tail_ids=tail_ids,
        tail_logprobs=tail_lp,
    )  # fmt: skip
    logits = _plain_logits(hidden, head)
    want_js = (kd_w * sparse_kd_loss(logits, ids, lp, tail, kind="js")).sum()
    assert_same(with_samples, want_js, params(hidden, head))

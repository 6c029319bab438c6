"""The teacher-target layer: one target per storage mode, closed forms, refusals, no host syncs."""

from __future__ import annotations

import contextlib
import math

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from kdcache.cache.errors import CacheError, ConfigError
from kdcache.cache.extraction.heads import OutputHead
from kdcache.cache.records import SequenceRecord
from kdcache.trainer.chunked import chunked_head_loss
from kdcache.trainer.data import collate_records
from kdcache.trainer.divergences import LOSS_KINDS
from kdcache.trainer.head_losses import chunked_distill_loss
from kdcache.trainer.objective import DistillObjective, loss_kernel
from kdcache.trainer.sampled import draw_tail_samples
from kdcache.trainer.targets import (
    CACHE_TARGETS,
    DenseTeacherTarget,
    LossOptions,
    SamplesTarget,
    TopkBucketTarget,
    TopkSamplesTarget,
    target_for_cache,
)
from tests import train_helpers as helpers

pytestmark = pytest.mark.usefixtures("one_torch_thread")

N, H, V, K, S = 19, 8, 40, 5, 4


def _problem(seed: int = 0, k: int = K):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=gen).requires_grad_()
    head = OutputHead((torch.randn(V, H, generator=gen) / H**0.5).requires_grad_(), None)
    teacher_lp = torch.log_softmax(2 * torch.randn(N, V, generator=gen), -1)
    lp, ids = teacher_lp.topk(k, -1)
    tail = (1 - lp.exp().sum(-1)).clamp_min(0)
    if k:
        tail_ids, tail_lp = draw_tail_samples(teacher_lp, ids, S, generator=gen)
    else:  # samples mode: draws from the whole distribution
        tail_ids = torch.multinomial(teacher_lp.exp(), S, replacement=True, generator=gen)
        tail_lp = teacher_lp.gather(1, tail_ids)
    tail_lp[2, 1:] = -math.inf  # a row with one draw
    rows = {"topk_ids": ids, "topk_logprobs": lp, "tail_mass": tail}
    rows.update(tail_ids=tail_ids, tail_logprobs=tail_lp)
    return hidden, head, rows, torch.rand(N, generator=gen)


def _hand_samples_fkl(logits: torch.Tensor, tail_ids, tail_lp) -> torch.Tensor:
    """mean over present draws of log p - log q, written out over the full log-softmax."""
    log_q = torch.log_softmax(logits, -1).gather(1, tail_ids)
    present = tail_lp > -math.inf
    terms = torch.where(present, tail_lp - log_q, 0.0)
    return terms.sum(-1) / present.sum(-1)


@pytest.mark.parametrize(
    ("manifest", "target"),
    [
        ({"top_k": 8}, TopkBucketTarget),
        ({"top_k": 8, "tail_samples": 0}, TopkBucketTarget),
        ({"top_k": 8, "tail_samples": 4}, TopkSamplesTarget),
        ({"top_k": 0, "tail_samples": 4}, SamplesTarget),
    ],
)
def test_the_registry_picks_the_target_of_the_storage_mode(manifest, target):
    chosen = target_for_cache(manifest)
    assert type(chosen) is target and CACHE_TARGETS[chosen.name] is target


def test_fused_head_on_samples_only_equals_the_hand_estimate():
    """k = 0 through chunked_distill_loss (was an IndexError: argmax over an empty dim)."""
    hidden, head, rows, kd_w = _problem(seed=1, k=0)
    got = chunked_distill_loss(
        hidden, head, rows["topk_ids"], rows["topk_logprobs"], torch.ones(N), None, kd_w, None,
        kind="fkl", chunk_size=6, tail_ids=rows["tail_ids"], tail_logprobs=rows["tail_logprobs"],
    )  # fmt: skip
    logits = hidden @ head.weight.t()
    want = (kd_w * _hand_samples_fkl(logits, rows["tail_ids"], rows["tail_logprobs"])).sum()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    grads = torch.autograd.grad(got, [hidden, head.weight])
    for grad, reference in zip(
        grads, torch.autograd.grad(want, [hidden, head.weight]), strict=True
    ):
        torch.testing.assert_close(grad, reference, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_samples_target_closed_form_equals_the_hand_estimate(temperature):
    _, _, rows, kd_w = _problem(seed=2, k=0)
    logits = 3 * torch.randn(N, V, generator=torch.Generator().manual_seed(20))
    options = LossOptions(kind="fkl", temperature=temperature)
    loss, grad = SamplesTarget().loss_and_grad(logits, rows, kd_w, options)
    leaf = logits.clone().requires_grad_()
    want = kd_w * _hand_samples_fkl(leaf / temperature, rows["tail_ids"], rows["tail_logprobs"])
    torch.testing.assert_close(loss, want.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, torch.autograd.grad(want.sum(), leaf)[0], rtol=1e-5, atol=1e-7)
    # the same estimate as top-k + samples with k = 0 (its tail is the whole distribution)
    same = TopkSamplesTarget().loss_and_grad(logits, {**rows, "tail_mass": torch.ones(N)}, kd_w,
                                             options)  # fmt: skip
    torch.testing.assert_close(same[0], loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(same[1], grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kind", ["js", "tvd", "rkl", "akl", "skew-fkl"])
def test_samples_target_refuses_the_losses_it_cannot_estimate(kind):
    """Unchunked js / tvd on a samples cache returned 0.0 silently; now a clear refusal."""
    model = helpers.tiny_llama(V)
    with pytest.raises(ConfigError, match=f"--loss {kind} is not available with a samples"):
        DistillObjective(model, SamplesTarget(), LossOptions(kind=kind), alpha=0.0, chunk_size=4,
                         chunked=False)  # fmt: skip
    with pytest.raises(ConfigError, match="build with --top-k >= 1"):
        SamplesTarget().check_loss(kind)
    for target in (TopkBucketTarget(), TopkSamplesTarget()):
        target.check_loss(kind)  # every kind trains on a top-k cache


def test_every_cache_mode_is_on_the_closed_form_path():
    for target in (TopkBucketTarget(), TopkSamplesTarget(), SamplesTarget()):
        for kind in target.losses:
            assert target.fallback_reason(kind) is None, (target.name, kind)
    dense = DenseTeacherTarget(None, None, V)
    assert dense.fallback_reason("akl") is None
    assert "no closed-form gradient" in dense.fallback_reason("js")


def _record(sequence_id: int, k: int, samples: int | None) -> SequenceRecord:
    rng = np.random.default_rng(sequence_id)
    length = 4
    logprobs = np.log(np.full((length, k), 0.1, np.float32))
    return SequenceRecord(
        sequence_id=sequence_id,
        input_ids=rng.integers(0, V, length).astype(np.int32),
        topk_ids=rng.integers(0, V, (length, k)).astype(np.int32),
        topk_logprobs=logprobs,
        tail_mass=np.full(length, 1 - 0.1 * k, np.float32),
        positions=np.arange(length, dtype=np.int32),
        tail_ids=None if samples is None else np.ones((length, samples), np.int32),
        tail_logprobs=None if samples is None else np.full((length, samples), -3.0, np.float32),
    )


def test_collate_follows_the_manifest_not_the_first_record():
    """A batch whose first record lacks samples used to collate without any (mode from
    records[0]); the target collates the manifest's layout and refuses a mismatch."""
    target = TopkSamplesTarget({"top_k": 2, "tail_samples": 3})
    good = collate_records([_record(0, 2, 3), _record(1, 2, 3)], target)
    assert good["tail_ids"].shape == (2, 4, 3) and good["topk_ids"].shape == (2, 4, 2)
    with pytest.raises(CacheError, match="sequence 0 stores tail_ids of width None"):
        collate_records([_record(0, 2, None), _record(1, 2, 3)], target)
    with pytest.raises(CacheError, match="sequence 1 stores topk_ids of width"):
        collate_records([_record(0, 2, None), _record(1, 3, None)], TopkBucketTarget({"top_k": 2}))


@contextlib.contextmanager
def _no_host_syncs():
    """Any tensor -> Python conversion (a device sync on CUDA) raises inside the block."""

    def refuse(*_args, **_kwargs):
        raise AssertionError("host sync inside the per-chunk loop")

    names = ("__bool__", "__int__", "__float__", "__index__", "item", "tolist")
    saved = {name: getattr(torch.Tensor, name) for name in names}
    try:
        for name in names:
            setattr(torch.Tensor, name, refuse)
        yield
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


@pytest.mark.parametrize(
    ("target_class", "kind"),
    [
        (TopkBucketTarget, "fkl"),
        (TopkBucketTarget, "akl"),
        (TopkSamplesTarget, "fkl"),
        (TopkSamplesTarget, "akl"),
        (SamplesTarget, "fkl"),  # its only loss
    ],
)
def test_no_host_sync_per_chunk(target_class, kind):
    """The per-chunk loop (matmul, target kernel, CE mix) never converts a tensor to Python."""
    k = 0 if target_class is SamplesTarget else K
    hidden, head, rows, kd_w = _problem(seed=3, k=k)
    labels = torch.randint(0, V, (N,))
    kernel = loss_kernel(target_class(), rows, LossOptions(kind=kind), kd_w, labels, kd_w)
    with _no_host_syncs():
        loss = chunked_head_loss(hidden, head, kernel, chunk_size=4)
    logits = hidden @ head.weight.t()
    want = (kd_w * target_class().loss(logits, rows, LossOptions(kind=kind))).sum()
    want = want + (kd_w * F.cross_entropy(logits, labels, reduction="none")).sum()
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", LOSS_KINDS)
def test_topk_samples_kernel_equals_autograd_for_every_kind(kind):
    """js / tvd / skew use the bucket on a top-k + samples cache, fkl / akl the samples."""
    _, _, rows, kd_w = _problem(seed=4)
    logits = 2 * torch.randn(N, V, generator=torch.Generator().manual_seed(40))
    target, options = TopkSamplesTarget(), LossOptions(kind=kind)
    loss, grad = target.loss_and_grad(logits, rows, kd_w, options)
    leaf = logits.clone().requires_grad_()
    want = kd_w * target.loss(leaf, rows, options)
    torch.testing.assert_close(loss, want.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, torch.autograd.grad(want.sum(), leaf)[0], rtol=1e-5, atol=1e-7)
    bucket = TopkBucketTarget().loss(logits, rows, options)
    uses_samples = kind in ("fkl", "akl")
    assert (
        not torch.allclose(want.detach(), kd_w * bucket)
        if uses_samples
        else torch.allclose(want.detach(), kd_w * bucket)
    )

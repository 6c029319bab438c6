"""The chunked head in the compute dtype: bf16 GEMM operands, fp32 loss math, every cache mode.

The CUDA path under ``--dtype bfloat16`` is the same code with CUDA tensors; here the bf16 branch
is selected explicitly (``compute_dtype=torch.bfloat16``) on CPU tensors. Stated tolerance: the
bf16 head's loss within 1e-3 relative of the fp32 dense reference, gradients within 2e-2
relative of their largest entry (bf16 keeps 8 mantissa bits: ~4e-3 relative per operand).
"""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from kdcache.cache.extraction.heads import OutputHead
from kdcache.trainer import chunked
from kdcache.trainer.chunked import chunked_head_loss
from kdcache.trainer.losses import dense_kd_loss, sparse_kd_loss
from kdcache.trainer.objective import loss_kernel
from kdcache.trainer.sampled import topk_tail_kd_loss
from kdcache.trainer.targets import (
    DenseTeacherTarget,
    LossOptions,
    TopkBucketTarget,
    TopkSamplesTarget,
)
from kdcache.trainer.targets.samples import SamplesTarget, samples_fkl

pytestmark = pytest.mark.usefixtures("one_torch_thread")

N, H, V, K, S, CHUNK = 48, 32, 300, 8, 6, 16
LOSS_RTOL, GRAD_RTOL = 1e-3, 2e-2
MODES = ("topk-bucket", "topk-samples", "samples", "dense")


def _problem(mode: str, seed: int = 0, device: str = "cpu"):
    """hidden (N, H), an fp32 head with bias, the mode's target + rows, a reference loss fn."""
    gen = torch.Generator().manual_seed(seed)

    def leaf(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(device).requires_grad_()

    hidden = leaf(torch.randn(N, H, generator=gen))
    weight = leaf(torch.randn(V, H, generator=gen) / H**0.5)
    bias = leaf(0.1 * torch.randn(V, generator=gen))
    head = OutputHead(weight, bias)
    teacher_logp = torch.log_softmax(3 * torch.randn(N, V, generator=gen), -1)  # (N, V)
    top_lp, top_ids = teacher_logp.topk(K, -1)
    tail = (1 - top_lp.exp().sum(-1)).clamp_min(0)
    draws = torch.multinomial(teacher_logp.exp(), S, replacement=True, generator=gen)  # (N, S)
    labels = torch.randint(0, V, (N,), generator=gen)
    labels[::5] = -100
    kd_w, ce_w = torch.rand(N, generator=gen) / N, torch.rand(N, generator=gen) / N
    outside = teacher_logp.scatter(1, top_ids, -float("inf"))  # draws outside the top-k
    tail_ids = torch.multinomial(outside.exp(), S, replacement=True, generator=gen)
    moved = [t.to(device) for t in (teacher_logp, top_lp, top_ids, tail, draws, labels, kd_w,
                                    ce_w, tail_ids)]  # fmt: skip
    teacher_logp, top_lp, top_ids, tail, draws, labels, kd_w, ce_w, tail_ids = moved
    kind = "fkl" if mode == "samples" else "akl"
    if mode == "topk-bucket":
        target, rows = TopkBucketTarget(), {"topk_ids": top_ids, "topk_logprobs": top_lp,
                                            "tail_mass": tail}  # fmt: skip

        def kd(logits):
            return sparse_kd_loss(logits, top_ids, top_lp, tail, kind=kind)
    elif mode == "topk-samples":
        tail_lp = teacher_logp.gather(1, tail_ids)
        target = TopkSamplesTarget()
        rows = {"topk_ids": top_ids, "topk_logprobs": top_lp, "tail_mass": tail,
                "tail_ids": tail_ids, "tail_logprobs": tail_lp}  # fmt: skip

        def kd(logits):
            return topk_tail_kd_loss(logits, top_ids, top_lp, tail, tail_ids, tail_lp, kind=kind)
    elif mode == "samples":
        target, rows = SamplesTarget(), {"tail_ids": draws, "tail_logprobs":
                                         teacher_logp.gather(1, draws)}  # fmt: skip

        def kd(logits):
            return samples_fkl(logits, rows, LossOptions(kind=kind))
    else:
        target = DenseTeacherTarget(None, None, V)
        rows = {"teacher_states": teacher_logp}

        def kd(logits):
            return dense_kd_loss(logits, teacher_logp, kind=kind)

    kernel = loss_kernel(target, rows, LossOptions(kind=kind), kd_w, labels, ce_w)

    def reference():  # the fp32 dense reference: full logits, autograd
        logits = F.linear(hidden, weight, bias)  # (N, V) fp32
        ce = F.cross_entropy(logits, labels, ignore_index=-100, reduction="none")
        return (kd_w * kd(logits) + ce_w * ce).sum()

    return hidden, head, kernel, reference


def _record_gemms(monkeypatch) -> list[tuple[torch.dtype, torch.dtype]]:
    """Wrap the head's matmul: every call appends its two operand dtypes."""
    seen: list[tuple[torch.dtype, torch.dtype]] = []
    original = chunked._gemm

    def recording(a, b, out_dtype):
        seen.append((a.dtype, b.dtype))
        return original(a, b, out_dtype)

    monkeypatch.setattr(chunked, "_gemm", recording)
    return seen


@pytest.mark.parametrize("mode", MODES)
def test_bf16_head_gemms_get_bf16_operands_and_match_the_fp32_reference(mode, monkeypatch):
    hidden, head, kernel, reference = _problem(mode)
    seen = _record_gemms(monkeypatch)
    got = chunked_head_loss(hidden, head, kernel, chunk_size=CHUNK, compute_dtype=torch.bfloat16)
    chunks = -(-N // CHUNK)
    assert len(seen) == 3 * chunks  # forward, grad input, grad weight per chunk
    assert set(seen) == {(torch.bfloat16, torch.bfloat16)}
    want = reference()
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=LOSS_RTOL, atol=1e-4)
    inputs = [hidden, head.weight, head.bias]
    grads = torch.autograd.grad(got, inputs)
    for name, g, w in zip(("hidden", "weight", "bias"), grads, torch.autograd.grad(want, inputs),
                          strict=True):  # fmt: skip
        assert g.dtype == torch.float32, name  # fp32 master weights get fp32 gradients
        error = (g - w).abs().max() / w.abs().max()
        assert error < GRAD_RTOL, (name, float(error))


@pytest.mark.parametrize("mode", MODES)
def test_fp32_head_is_exact_and_runs_in_fp32(mode, monkeypatch):
    hidden, head, kernel, reference = _problem(mode, seed=1)
    seen = _record_gemms(monkeypatch)
    got = chunked_head_loss(hidden, head, kernel, chunk_size=CHUNK, compute_dtype=torch.float32)
    assert set(seen) == {(torch.float32, torch.float32)}
    want = reference()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    inputs = [hidden, head.weight, head.bias]
    for g, w in zip(torch.autograd.grad(got, inputs), torch.autograd.grad(want, inputs),
                    strict=True):  # fmt: skip
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


def test_bf16_error_is_bf16_sized_not_worse():
    """The bf16 head is further from the reference than fp32 is, by a bf16-sized margin."""
    hidden, head, kernel, reference = _problem("topk-bucket", seed=2)
    want = float(reference().detach())
    bf16 = float(chunked_head_loss(hidden, head, kernel, compute_dtype=torch.bfloat16))
    fp32 = float(chunked_head_loss(hidden, head, kernel, compute_dtype=torch.float32))
    assert abs(fp32 - want) < 1e-5 * abs(want)
    assert abs(bf16 - want) < LOSS_RTOL * abs(want)


def test_weight_is_cast_once_per_call_not_per_chunk(monkeypatch):
    hidden, head, kernel, _ = _problem("topk-bucket", seed=3)
    casts = []
    original = torch.Tensor.to

    def counting_to(self, *args, **kwargs):
        if self.shape == head.weight.shape and torch.bfloat16 in (*args, *kwargs.values()):
            casts.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", counting_to)
    chunked_head_loss(hidden, head, kernel, chunk_size=8, compute_dtype=torch.bfloat16)
    assert N // 8 > 1 and len(casts) == 1


def test_autocast_does_not_override_an_explicit_fp32_head(monkeypatch):
    hidden, head, kernel, _ = _problem("dense", seed=4)
    seen = _record_gemms(monkeypatch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        chunked_head_loss(hidden, head, kernel, chunk_size=CHUNK, compute_dtype=torch.float32)
    assert set(seen) == {(torch.float32, torch.float32)}

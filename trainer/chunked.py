"""The student's lm_head run chunk by chunk of positions: the (N, V) logits never exist at once.

``chunked_head_loss(hidden, head, kernel)`` sums a row loss over N positions, where the logits
``head.logits(hidden)`` exist only for ``chunk_size`` rows at a time and ``kernel(logits, start,
end)`` gives the chunk's (C,) loss and its (C, V) gradient w.r.t. those logits (the teacher
target's closed form, plus the CE mix: ``kdcache.trainer.objective.loss_kernel``). A custom
autograd Function computes, in the forward pass, each chunk's logits, loss and gradient and
folds the gradient into those of ``hidden``, the head weight and bias at once (the way Liger's
fused linear cross-entropy does). Backward only scales the stored gradients: one head matmul
forward and two backward, no recomputation, no autograd graph over (C, V) tensors. Peak extra
memory: about two (C, V) float32 buffers plus a float32 gradient the size of the head weight.

Precision: ``compute_dtype`` (default: the hidden states' dtype) is the dtype of the operands of
the three GEMMs (logits = hidden @ W.T, grad hidden = grad @ W, grad W = grad.T @ hidden); the
weight and the hidden states are cast to it once per call, not per chunk, and autocast is off
inside the GEMMs so the choice is explicit. Under ``--dtype bfloat16`` the trainer passes
bfloat16: bf16 operands, fp32 accumulation inside each GEMM (cuBLAS / oneDNN), the grad-weight
summed over chunks in an fp32 buffer. The loss math on each (C, V) chunk (softmax, the target's
closed-form gradient) always runs in float32.

``method="plain"`` builds the full logits and applies the same kernel (a baseline for benchmarks;
``logits_loss`` does the same for logits a model's own forward produced).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
import torch

from kdcache.cache.errors import ConfigError
from kdcache.cache.extraction.heads import OutputHead

__all__ = [
    "METHODS",
    "RowKernel",
    "add_cross_entropy",
    "chunk_spans",
    "chunked_head_loss",
    "logits_loss",
]

METHODS: tuple[str, ...] = ("fused", "plain")

# kernel(logits (C, V) float32, start, end) -> ((C,) row loss, (C, V) its gradient w.r.t. logits)
RowKernel = Callable[[torch.Tensor, int, int], tuple[torch.Tensor, torch.Tensor]]


@torch.no_grad()
def add_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    weight: torch.Tensor,
    loss: torch.Tensor | None = None,
    grad: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``loss + weight * CE`` (C,) and ``grad + d/dlogits`` (C, V), CE at temperature 1.

    logits (C, V) float32, labels (C,) (-100 = no label: weight 0), weight (C,). ``grad`` is
    updated in place when given (the KD gradient of the same chunk).
    """
    weight = torch.where(labels != -100, weight.float(), 0.0)  # (C,)
    safe_labels = labels.clamp_min(0).long()[:, None]  # (C, 1)
    log_norm = torch.logsumexp(logits, -1)  # (C,)
    ce = weight * (log_norm - logits.gather(1, safe_labels)[:, 0])
    softmax = (logits - log_norm[:, None]).exp_().mul_(weight[:, None])  # (C, V) weight * q
    if grad is None:
        grad = softmax
    else:
        grad.add_(softmax)
    grad.scatter_add_(1, safe_labels, -weight[:, None])
    return (ce if loss is None else loss + ce), grad


def _gemm(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """``a @ b`` (M, K) x (K, N) with autocast off, as ``out_dtype``: the head's only matmuls.

    Operands in one dtype (the compute dtype); accumulation is fp32 inside the GEMM for bf16
    operands on CUDA and CPU. On CUDA, where torch has ``mm(..., out_dtype=)``, a bf16 GEMM
    writes its fp32 result directly (no bf16 rounding of the output). Tests wrap this function
    to see the operand dtypes.
    """
    with torch.autocast(a.device.type, enabled=False):
        if a.is_cuda and out_dtype != a.dtype and _cuda_mm_has_out_dtype():
            try:
                return torch.mm(a, b, out_dtype=out_dtype)
            except RuntimeError:  # a layout or dtype this torch's kernel lacks: round, then cast
                pass
        return (a @ b).to(out_dtype)


@functools.cache
def _cuda_mm_has_out_dtype() -> bool:
    """Whether this torch's CUDA ``torch.mm`` takes ``out_dtype`` (bf16 in, fp32 out)."""
    try:
        ones = torch.ones(2, 2, dtype=torch.bfloat16, device="cuda")
        return torch.mm(ones, ones, out_dtype=torch.float32).dtype == torch.float32
    except (TypeError, RuntimeError, NotImplementedError):
        return False


def _postprocess(pre_logits: torch.Tensor, head: OutputHead) -> torch.Tensor:
    """(C, V) ``hidden @ W.T + b`` -> the model's logits in float32 (as ``OutputHead.logits``)."""
    logits = pre_logits.float()
    if head.scale != 1.0:
        logits = logits * head.scale
    if head.softcap is not None:
        logits = torch.tanh(logits / head.softcap) * head.softcap
    return logits


class _FusedHeadLoss(torch.autograd.Function):
    """sum over chunks of row losses of head(hidden[chunk]); gradients made in the forward pass."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, head, kernel, spans, compute_dtype):
        compute_dtype = compute_dtype or hidden.dtype
        weight_c = weight.detach().to(compute_dtype)  # (V, H), cast once per call
        hidden_c = hidden.detach().to(compute_dtype)  # (N, H)
        need_hidden, need_weight = hidden.requires_grad, weight.requires_grad
        need_bias = bias is not None and bias.requires_grad
        grad_hidden = torch.zeros_like(hidden) if need_hidden else None  # (N, H)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        grad_bias = None
        if bias is not None:
            grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device)
        bias_f = None if bias is None else bias.detach().float()  # (V,) added in fp32
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start, end in spans:
            hidden_chunk = hidden_c[start:end]  # (C, H) compute dtype
            pre_logits = _gemm(hidden_chunk, weight_c.t(), torch.float32)  # (C, V) fp32
            if bias_f is not None:
                pre_logits += bias_f
            logits = _postprocess(pre_logits, head)  # (C, V) fp32
            del pre_logits
            loss, grad = kernel(logits, start, end)  # (C,), (C, V) d loss / d logits, fp32
            total += loss.sum()
            if head.softcap is not None:  # d/dx softcap * tanh(x / softcap) = 1 - tanh^2
                grad.mul_(1.0 - (logits / head.softcap).square_())
            if head.scale != 1.0:
                grad.mul_(head.scale)
            del logits
            if need_bias:
                grad_bias += grad.sum(0)
            grad = grad.to(compute_dtype)  # (C, V) gradient w.r.t. hidden @ W.T + b
            if need_hidden:
                grad_hidden[start:end] = _gemm(grad, weight_c, hidden.dtype)  # (C, H)
            if need_weight:
                grad_weight += _gemm(grad.t(), hidden_chunk, torch.float32)  # (V, H) fp32 sum
        ctx.save_for_backward(
            grad_hidden,
            grad_weight.to(weight.dtype) if need_weight else None,
            grad_bias.to(bias.dtype) if need_bias else None,
        )
        return total

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        scale = grad_output  # the loss is a sum: each stored gradient scales by d(out)/d(loss)
        return (
            None if grad_hidden is None else grad_hidden * scale.to(grad_hidden.dtype),
            None if grad_weight is None else grad_weight * scale.to(grad_weight.dtype),
            None if grad_bias is None else grad_bias * scale.to(grad_bias.dtype),
            None,
            None,
            None,
            None,
        )


class _LogitsLoss(torch.autograd.Function):
    """sum of the kernel's row losses over given (N, V) logits; its gradient made in forward."""

    @staticmethod
    def forward(ctx, logits, kernel):
        loss, grad = kernel(logits.detach().float(), 0, logits.shape[0])
        ctx.save_for_backward(grad.to(logits.dtype))
        return loss.sum()

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return grad * grad_output.to(grad.dtype), None


def logits_loss(logits: torch.Tensor, kernel: RowKernel) -> torch.Tensor:
    """Scalar sum of ``kernel``'s row losses over full ``logits`` (N, V) (a model's own forward)."""
    return _LogitsLoss.apply(logits, kernel)


def chunk_spans(
    rows: int, chunk_size: int, groups: torch.Tensor | None = None
) -> list[tuple[int, int]]:
    """(start, end) row ranges of at most ``chunk_size`` rows covering ``rows``; with ``groups``
    (rows,) int64 (-1: none) a range never ends inside a run of equal non-negative ids (a run
    longer than ``chunk_size`` gets a range of its own). One host copy of ``groups``."""
    if groups is None:
        return [(start, min(start + chunk_size, rows)) for start in range(0, rows, chunk_size)]
    ids = groups.cpu().numpy()
    cuts = np.ones(rows + 1, dtype=bool)  # cuts[i]: a range may start at row i
    cuts[1:rows] = (ids[1:] != ids[:-1]) | (ids[1:] < 0)
    allowed = np.flatnonzero(cuts)  # increasing, ends with ``rows``
    spans, start = [], 0
    while start < rows:
        index = np.searchsorted(allowed, start + chunk_size, side="right") - 1
        end = int(allowed[index])
        if end <= start:  # one group longer than chunk_size
            end = int(allowed[np.searchsorted(allowed, start, side="right")])
        spans.append((start, end))
        start = end
    return spans


def chunked_head_loss(
    hidden: torch.Tensor,
    head: OutputHead,
    kernel: RowKernel,
    *,
    chunk_size: int = 1024,
    method: str = "fused",
    compute_dtype: torch.dtype | None = None,
    groups: torch.Tensor | None = None,
) -> torch.Tensor:
    """Scalar sum over N rows of ``kernel``'s loss on ``head.logits(hidden)``, chunk by chunk.

    Args:
        hidden: (N, H) the student body's last hidden states (any float dtype).
        head: the student's ``OutputHead`` (weight (V, H), bias, scale, softcap).
        kernel: (logits (C, V) float32, start, end) -> ((C,) loss, (C, V) gradient).
        chunk_size: rows of logits alive at once. method: "fused" or "plain".
        compute_dtype: dtype of the head GEMMs' operands (None: ``hidden``'s dtype; the
            trainer passes bfloat16 under ``--dtype bfloat16``). Accumulation and the loss math
            stay float32.
        groups: (N,) int64 or None: rows the kernel couples (equal ids >= 0, consecutive) stay
            in one chunk (``chunk_spans``; the target's ``row_groups``).
    """
    if method not in METHODS:
        raise ConfigError(f"unknown chunked-loss method {method!r}; choose one of {METHODS}")
    if chunk_size < 1:
        raise ConfigError(f"chunk_size must be >= 1, got {chunk_size}")
    if hidden.dim() != 2 or hidden.shape[1] != head.weight.shape[1]:
        raise ConfigError(
            f"hidden must be (N, H) with H = {head.weight.shape[1]} (the head's input size), "
            f"got {tuple(hidden.shape)}"
        )
    if hidden.shape[0] == 0:  # nothing to distill in this batch: a zero that still backprops
        zero = hidden.float().sum() * 0.0 + head.weight.float().sum() * 0.0
        return zero if head.bias is None else zero + head.bias.float().sum() * 0.0
    if method == "plain":
        return logits_loss(head.logits(hidden), kernel)
    spans = chunk_spans(hidden.shape[0], chunk_size, groups)
    return _FusedHeadLoss.apply(hidden, head.weight, head.bias, head, kernel, spans, compute_dtype)

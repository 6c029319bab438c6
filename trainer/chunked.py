"""The distillation loss computed head-chunk by head-chunk: never the whole (N, V) logits.

``loss = sum_i kd_weight_i * KD_i + ce_weight_i * CE_i`` over N positions, where the student's
logits ``head.logits(hidden)`` exist only for ``chunk_size`` rows at a time. Two ways to get the
gradient (``method``):

- ``"fused"`` (default): a custom autograd Function that, in the forward pass, computes each
  chunk's logits, its loss and the gradient of the loss w.r.t. those logits, and immediately
  folds that into the gradients of ``hidden``, the head weight and bias (the way Liger's fused
  linear cross-entropy does). Backward only scales the stored gradients: one head matmul forward
  and two backward, no recomputation. The sparse KD + CE gradient w.r.t. the logits comes from
  the closed form in ``sparse_kd_loss_with_grad`` (a few passes over the chunk, no autograd
  graph over (C, V) tensors). Peak extra memory: about two (C, V) float32 buffers, plus a
  float32 gradient buffer the size of the head weight.
- ``"checkpoint"``: ``torch.utils.checkpoint`` per chunk; the chunk's logits are recomputed in
  backward (one extra head matmul per chunk).

``method="plain"`` builds the full logits (reference and benchmark baseline only).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from kdcache.cache.errors import ConfigError
from kdcache.cache.heads import OutputHead
from kdcache.trainer.losses import (
    check_loss_options,
    dense_kd_loss,
    sparse_kd_loss,
    sparse_kd_loss_with_grad,
)
from kdcache.trainer.sampled import topk_tail_kd_loss

__all__ = [
    "METHODS",
    "chunked_dense_distill_loss",
    "chunked_distill_loss",
    "chunked_row_loss",
    "dense_kd_loss_with_grad",
]

METHODS: tuple[str, ...] = ("fused", "checkpoint", "plain")

# row_loss(logits (C, V) float32, start, end) -> (C,) weighted per-row loss of rows start:end
RowLoss = Callable[[torch.Tensor, int, int], torch.Tensor]
# kernel(logits (C, V) float32, start, end) -> ((C,) row loss, (C, V) its gradient w.r.t. logits)
RowKernel = Callable[[torch.Tensor, int, int], tuple[torch.Tensor, torch.Tensor]]


def _postprocess(pre_logits: torch.Tensor, head: OutputHead) -> torch.Tensor:
    """(C, V) ``hidden @ W.T + b`` -> the model's logits in float32 (as ``OutputHead.logits``)."""
    logits = pre_logits.float()
    if head.scale != 1.0:
        logits = logits * head.scale
    if head.softcap is not None:
        logits = torch.tanh(logits / head.softcap) * head.softcap
    return logits


def _autograd_kernel(row_loss: RowLoss) -> RowKernel:
    """A row kernel from a differentiable row loss: autograd on one chunk's logits."""

    def kernel(logits: torch.Tensor, start: int, end: int):
        with torch.enable_grad():
            leaf = logits.detach().requires_grad_(True)
            loss = row_loss(leaf, start, end)  # (C,)
            (grad,) = torch.autograd.grad(loss.sum(), leaf)
        return loss.detach(), grad

    return kernel


class _FusedHeadLoss(torch.autograd.Function):
    """sum over chunks of row losses of head(hidden[chunk]); gradients made in the forward pass."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, head, kernel, chunk_size):
        compute_dtype = hidden.dtype  # autocast-like: the activations' dtype runs the matmuls
        weight_c = weight.detach().to(compute_dtype)  # (V, H)
        bias_c = None if bias is None else bias.detach().to(compute_dtype)  # (V,)
        need_hidden, need_weight = hidden.requires_grad, weight.requires_grad
        need_bias = bias is not None and bias.requires_grad
        grad_hidden = torch.zeros_like(hidden) if need_hidden else None  # (N, H)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        grad_bias = None
        if bias is not None:
            grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_size):
            end = min(start + chunk_size, hidden.shape[0])
            hidden_chunk = hidden[start:end].detach()  # (C, H)
            logits = _postprocess(F.linear(hidden_chunk, weight_c, bias_c), head)  # (C, V) fp32
            loss, grad = kernel(logits, start, end)  # (C,), (C, V) d loss / d logits
            total += loss.sum()
            if head.softcap is not None:  # d/dx softcap * tanh(x / softcap) = 1 - tanh^2
                grad.mul_(1.0 - (logits / head.softcap).square_())
            if head.scale != 1.0:
                grad.mul_(head.scale)
            del logits
            grad = grad.to(compute_dtype)  # (C, V) gradient w.r.t. hidden @ W.T + b
            if need_hidden:
                grad_hidden[start:end] = grad @ weight_c
            if need_weight:
                if compute_dtype == torch.float32:
                    grad_weight.addmm_(grad.t(), hidden_chunk)
                else:
                    grad_weight += (grad.t() @ hidden_chunk).float()
            if need_bias:
                grad_bias += grad.float().sum(0)
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
        )


def _run_chunks(
    hidden: torch.Tensor,
    head: OutputHead,
    row_loss: RowLoss,
    chunk_size: int,
    method: str,
    kernel: RowKernel | None = None,
) -> torch.Tensor:
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
        return row_loss(head.logits(hidden), 0, hidden.shape[0]).sum()
    if not torch.is_grad_enabled():  # evaluation: no gradients to fold, just the loss per chunk
        weight = head.weight.to(hidden.dtype)  # (V, H) matmuls in the activations' dtype
        bias = None if head.bias is None else head.bias.to(hidden.dtype)
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, hidden.shape[0], chunk_size):
            end = min(start + chunk_size, hidden.shape[0])
            logits = _postprocess(F.linear(hidden[start:end], weight, bias), head)  # (C, V)
            total += row_loss(logits, start, end).sum()
        return total
    if method == "fused":
        kernel = kernel or _autograd_kernel(row_loss)
        return _FusedHeadLoss.apply(hidden, head.weight, head.bias, head, kernel, chunk_size)

    def chunk_loss(hidden_chunk: torch.Tensor, start: int, end: int) -> torch.Tensor:
        return row_loss(head.logits(hidden_chunk), start, end).sum()

    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk_size):
        end = min(start + chunk_size, hidden.shape[0])
        total = total + checkpoint(chunk_loss, hidden[start:end], start, end, use_reentrant=False)
    return total


def chunked_row_loss(
    hidden: torch.Tensor,
    head: OutputHead,
    row_loss: RowLoss,
    *,
    chunk_size: int = 1024,
    method: str = "fused",
) -> torch.Tensor:
    """sum over rows of ``row_loss(head.logits(hidden[start:end]), start, end)``, chunked.

    For losses this module does not know (e.g. ``kdcache.trainer.sampled``): ``row_loss`` maps a
    chunk's float32 logits (C, V) and its row range to a differentiable (C,) weighted loss; the
    gradient per chunk comes from autograd. Returns a scalar.
    """
    return _run_chunks(hidden, head, row_loss, chunk_size, method)


@torch.no_grad()
def dense_kd_loss_with_grad(
    logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    kd_weight: torch.Tensor,
    labels: torch.Tensor | None,
    ce_weight: torch.Tensor | None,
    *,
    kind: str,
    mu: float = 0.5,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``kd_weight * dense_kd_loss + ce_weight * CE`` per row (C,) and its gradient (C, V).

    Closed form for kind fkl, rkl, akl (d = log q - log p at temperature T):
    dFKL/dz = q sum(p) - p, dRKL/dz = q (d - RKL), AKL mixes them with its detached weights.
    The AKL head comes from the teacher's top-64 (wider top-k only for rows whose head is longer).
    """
    vocab = logits.shape[1]
    log_q = torch.log_softmax(logits / temperature, -1)  # (C, V)
    log_p = torch.log_softmax(teacher_logits.float() / temperature, -1)  # (C, V')
    if log_p.shape[1] < vocab:  # padded student vocabulary: teacher probability 0 there
        log_p = F.pad(log_p, (0, vocab - log_p.shape[1]), value=-math.inf)
    log_p.clamp_min_(math.log(torch.finfo(torch.float32).tiny))  # as in dense_kd_loss
    p, q = log_p.exp(), log_q.exp()  # (C, V)
    diff = log_q.sub(log_p)  # (C, V) log q - log p
    fkl, rkl = -(p * diff).sum(-1), (q * diff).sum(-1)  # (C,)
    w_fkl, w_rkl = torch.ones_like(fkl), torch.zeros_like(fkl)
    if kind == "rkl":
        w_fkl, w_rkl = w_rkl, w_fkl
    elif kind == "akl":
        gap_total = (p - q).abs_().sum(-1)  # (C,)
        g_head = torch.zeros_like(gap_total)
        rows = torch.arange(p.shape[0], device=p.device)  # rows whose head is not found yet
        for width in (64, 2048, vocab):  # the head is usually a handful of tokens
            top_p, top_ids = p[rows].topk(min(width, vocab), dim=-1)  # sorted descending
            head = top_p.cumsum(-1) <= mu
            head[:, 0] = True
            g_head[rows] = ((top_p - q[rows].gather(1, top_ids)).abs() * head).sum(-1)
            if width >= vocab:
                break
            rows = rows[head[:, -1]]  # the head may reach past this width: widen
            if not rows.numel():
                break
        g_tail = (gap_total - g_head).clamp_min(0.0)
        total = (g_head + g_tail).clamp_min(torch.finfo(torch.float32).tiny)
        w_fkl, w_rkl = g_head / total, g_tail / total
    loss = kd_weight * (w_fkl * fkl + w_rkl * rkl)
    scale = kd_weight / temperature  # (C,)
    grad = diff.sub_(rkl[:, None]).mul_(q).mul_((w_rkl * scale)[:, None])  # (C, V)
    grad.addcmul_(q, (w_fkl * scale * p.sum(-1))[:, None]).addcmul_(p, -(w_fkl * scale)[:, None])
    if labels is not None and ce_weight is not None:
        ce_w = torch.where(labels != -100, ce_weight.float(), 0.0)  # (C,)
        safe_labels = labels.clamp_min(0).long()[:, None]
        log_q1 = log_q if temperature == 1.0 else torch.log_softmax(logits, -1)
        loss = loss - ce_w * log_q1.gather(1, safe_labels)[:, 0]
        grad.addcmul_(log_q1.exp() if temperature != 1.0 else q, ce_w[:, None])
        grad.scatter_add_(1, safe_labels, -ce_w[:, None])
    return loss, grad


def _check_rows(n: int, **tensors: torch.Tensor | None) -> None:
    for name, tensor in tensors.items():
        if tensor is not None and tensor.shape[0] != n:
            raise ConfigError(
                f"{name} has {tensor.shape[0]} rows but hidden has {n}; pass one row per position"
            )


def _weighted_rows(
    labels: torch.Tensor | None,
    kd_weight: torch.Tensor | None,
    ce_weight: torch.Tensor | None,
    kd_rows: Callable[[torch.Tensor, int, int], torch.Tensor] | None,
) -> RowLoss:
    """row_loss = kd_weight * KD + ce_weight * CE (CE at temperature 1, label -100 = none)."""

    def row_loss(logits: torch.Tensor, start: int, end: int) -> torch.Tensor:
        loss = logits.new_zeros(logits.shape[0])  # (C,)
        if kd_rows is not None and kd_weight is not None:
            loss = loss + kd_weight[start:end].float() * kd_rows(logits, start, end)
        if labels is not None and ce_weight is not None:
            ce = F.cross_entropy(logits, labels[start:end], ignore_index=-100, reduction="none")
            loss = loss + ce_weight[start:end].float() * ce
        return loss

    return row_loss


def chunked_distill_loss(
    hidden: torch.Tensor,
    head: OutputHead,
    topk_ids: torch.Tensor | None,
    topk_logprobs: torch.Tensor | None,
    tail_mass: torch.Tensor | None,
    labels: torch.Tensor | None,
    kd_weight: torch.Tensor | None,
    ce_weight: torch.Tensor | None,
    *,
    kind: str = "akl",
    mu: float = 0.5,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    skew: float = 0.1,
    method: str = "fused",
    tail_ids: torch.Tensor | None = None,
    tail_logprobs: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sparse-teacher KD + CE over N positions without materializing the (N, V) logits.

    Args:
        hidden: (N, H) the student body's last hidden states (any float dtype).
        head: the student's ``OutputHead`` (weight (V, H), bias, scale, softcap).
        topk_ids, topk_logprobs: (N, k) the cached teacher top-k (see ``sparse_kd_loss``);
            None for a CE-only loss.
        tail_mass: (N,) the cached tail mass, or None (-> 1 - sum of top-k mass).
        labels: (N,) next-token ids for CE, -100 where there is none; None for no CE.
        kd_weight, ce_weight: (N,) per-position weights (the caller normalizes, e.g.
            (1 - alpha) / n_distilled; 0 for padding). None drops that term.
        kind, mu, temperature, skew: as in ``sparse_kd_loss`` (temperature applies to KD only).
        chunk_size: rows of logits alive at once.
        method: "fused" (default), "checkpoint" or "plain" (see the module docstring).
        tail_ids, tail_logprobs: (N, s) importance-sampled tail tokens of a topk+tail cache:
            KD is then ``kdcache.trainer.sampled.topk_tail_kd_loss`` (kind fkl, rkl or akl).

    Returns:
        scalar float32: sum_i kd_weight_i * KD_i + ce_weight_i * CE_i.
    """
    check_loss_options(kind, mu, "none", temperature, skew)
    _check_rows(
        hidden.shape[0],
        topk_ids=topk_ids,
        topk_logprobs=topk_logprobs,
        tail_mass=tail_mass,
        labels=labels,
        kd_weight=kd_weight,
        ce_weight=ce_weight,
    )
    kd_rows = None
    if topk_ids is not None:
        if topk_logprobs is None:
            raise ConfigError("topk_ids were given without topk_logprobs; pass both or neither")
        if topk_ids.dim() != 2 or topk_logprobs.shape != topk_ids.shape:
            raise ConfigError(
                f"topk_ids {tuple(topk_ids.shape)} and topk_logprobs "
                f"{tuple(topk_logprobs.shape)} must both be (N, k)"
            )
        if topk_ids.numel() and (int(topk_ids.max()) >= head.vocab_size or int(topk_ids.min()) < 0):
            raise ConfigError(
                f"topk_ids hold ids outside the student's vocabulary [0, {head.vocab_size}); "
                "the cache was built with a larger vocabulary than this student's lm_head"
            )

        def kd_rows(logits: torch.Tensor, start: int, end: int) -> torch.Tensor:
            rows = slice(start, end)
            if tail_ids is not None:
                return topk_tail_kd_loss(
                    logits,
                    topk_ids[rows],
                    topk_logprobs[rows],
                    _tail_or_derived(tail_mass, topk_logprobs, rows),
                    tail_ids[rows],
                    tail_logprobs[rows],
                    kind=kind,
                    mu=mu,
                    temperature=temperature,
                )
            return sparse_kd_loss(
                logits,
                topk_ids[rows],
                topk_logprobs[rows],
                None if tail_mass is None else tail_mass[rows],
                kind=kind,
                mu=mu,
                temperature=temperature,
                skew=skew,
            )

    if tail_ids is not None:
        if topk_ids is None or tail_logprobs is None or tail_logprobs.shape != tail_ids.shape:
            raise ConfigError(
                "tail samples need topk_ids, and tail_ids / tail_logprobs of the same (N, s) shape"
            )
        if kind not in ("fkl", "rkl", "akl"):
            raise ConfigError(f"tail samples support kind fkl, rkl or akl, not {kind!r}")
        _check_rows(hidden.shape[0], tail_ids=tail_ids)

    def kernel(logits: torch.Tensor, start: int, end: int):
        return sparse_kd_loss_with_grad(
            logits,
            None if topk_ids is None else topk_ids[start:end],
            None if topk_logprobs is None else topk_logprobs[start:end],
            None if tail_mass is None else tail_mass[start:end],
            None if kd_weight is None else kd_weight[start:end],
            None if labels is None else labels[start:end],
            None if ce_weight is None else ce_weight[start:end],
            kind=kind,
            mu=mu,
            temperature=temperature,
            skew=skew,
            tail_ids=None if tail_ids is None else tail_ids[start:end],
            tail_logprobs=None if tail_logprobs is None else tail_logprobs[start:end],
        )

    row_loss = _weighted_rows(labels, kd_weight, ce_weight, kd_rows)
    return _run_chunks(hidden, head, row_loss, chunk_size, method, kernel)


def _tail_or_derived(
    tail_mass: torch.Tensor | None, topk_logprobs: torch.Tensor, rows: slice
) -> torch.Tensor:
    if tail_mass is not None:
        return tail_mass[rows]
    return (1.0 - topk_logprobs[rows].float().exp().sum(-1)).clamp(0.0, 1.0)


def chunked_dense_distill_loss(
    hidden: torch.Tensor,
    head: OutputHead,
    labels: torch.Tensor | None,
    kd_weight: torch.Tensor | None,
    ce_weight: torch.Tensor | None,
    *,
    teacher_hidden: torch.Tensor | None = None,
    teacher_head: OutputHead | None = None,
    teacher_logits_fn: Callable[[int, int], torch.Tensor] | None = None,
    kind: str = "akl",
    mu: float = 0.5,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    skew: float = 0.1,
    method: str = "fused",
) -> torch.Tensor:
    """Full-vocabulary KD (online teacher) + CE, both heads run chunk by chunk.

    The teacher's logits of rows ``start:end`` come from ``teacher_head.logits(
    teacher_hidden[start:end])`` or from ``teacher_logits_fn(start, end)`` -> (C, V_teacher)
    (e.g. slices of logits the teacher's own forward produced). They never receive gradients.
    Other arguments as in ``chunked_distill_loss``; KD is ``dense_kd_loss``.
    """
    check_loss_options(kind, mu, "none", temperature, skew)
    if teacher_logits_fn is None:
        if teacher_hidden is None or teacher_head is None:
            raise ConfigError("pass teacher_hidden with teacher_head, or teacher_logits_fn")
        _check_rows(hidden.shape[0], teacher_hidden=teacher_hidden)

        def teacher_logits_fn(start: int, end: int) -> torch.Tensor:
            return teacher_head.logits(teacher_hidden[start:end])

    _check_rows(hidden.shape[0], labels=labels, kd_weight=kd_weight, ce_weight=ce_weight)

    def kd_rows(logits: torch.Tensor, start: int, end: int) -> torch.Tensor:
        with torch.no_grad():
            teacher_logits = teacher_logits_fn(start, end).float()  # (C, V_teacher)
        return dense_kd_loss(
            logits, teacher_logits, kind=kind, mu=mu, temperature=temperature, skew=skew
        )

    kernel = None
    if kind in ("fkl", "rkl", "akl") and kd_weight is not None:

        def kernel(logits: torch.Tensor, start: int, end: int):
            rows = slice(start, end)
            return dense_kd_loss_with_grad(
                logits,
                teacher_logits_fn(start, end),
                kd_weight[rows].float(),
                None if labels is None else labels[rows],
                None if ce_weight is None else ce_weight[rows],
                kind=kind,
                mu=mu,
                temperature=temperature,
            )

    row_loss = _weighted_rows(labels, kd_weight, ce_weight, kd_rows)
    return _run_chunks(hidden, head, row_loss, chunk_size, method, kernel)

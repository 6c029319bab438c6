"""Split a Hugging Face causal LM into its body (hidden states) and its output head (logits).

Both stages need the logits of many positions without ever materialising the full (B, T, V)
tensor: the teacher's top-k in ``build`` and the student's loss in ``train`` run the head chunk by
chunk over the body's hidden states. That is only exact when ``logits == head(hidden)``; some
architectures post-process logits (Gemma-2 soft-capping, Cohere/Granite scaling). ``resolve_head``
knows those, and always checks the split against the model's own forward on a probe batch: when
they disagree it returns ``None`` and callers fall back to the model's full forward.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class OutputHead:
    """The output projection plus any logit post-processing of one causal LM.

    ``logits = softcap * tanh(scale * (hidden @ weight.T + bias) / softcap)`` (no tanh when
    ``softcap`` is None).
    """

    weight: torch.Tensor  # (V, H)
    bias: torch.Tensor | None  # (V,)
    scale: float = 1.0
    softcap: float | None = None
    _weight_fp32: torch.Tensor | None = field(default=None, init=False, repr=False)

    @property
    def vocab_size(self) -> int:
        return int(self.weight.shape[0])

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., H) hidden states -> (..., V) logits in float32.

        A float32 head is one float32 GEMM. A bf16/fp16 head run without autograd (the teacher)
        accumulates and returns float32 without rounding the logits to 16 bits
        (``fp32_linear``): a bf16 logit near 30 carries up to ~0.06 of rounding. With autograd
        (a student's head) the 16-bit GEMM is kept, its output upcast, as before.
        """
        if hidden.dtype == torch.float32 and self.weight.dtype == torch.float32:
            logits = nn.functional.linear(hidden, self.weight, self.bias)
        elif torch.is_grad_enabled() and (hidden.requires_grad or self.weight.requires_grad):
            logits = nn.functional.linear(hidden, self.weight, self.bias).float()
        else:
            logits = self.fp32_linear(hidden)
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def fp32_linear(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """(..., H) -> (..., V) float32 ``hidden @ weight.T + bias``, accumulated in float32.

        The product of two bf16 (or fp16) values is exact in float32, so the result is the exact
        product of the 16-bit operands up to float32 accumulation: at most
        ``H * 2**-24 * sum_i |h_i w_i|`` per logit in the worst case (twice that per log-prob;
        measured ~1e-5 nats at H 128-256 and |logits| 30-45, tests/test_teacher_head_precision.py),
        against up to ``2**-9 * |logit|`` (0.06 at 30) of rounding for a bf16 output. On CUDA this is a 16-bit GEMM with a
        float32 output (``torch.mm(..., out_dtype=torch.float32)``: the speed of the bf16 GEMM);
        where that does not exist (CPU, older torch) the operands are upcast to float32 (the
        weight once per call, or once for good after ``keep_fp32_weight``). ``out``: a float32
        (N, V) buffer for the upcast path (N = rows of ``hidden``).
        """
        flat = hidden.reshape(-1, hidden.shape[-1])  # (N, H)
        logits = None
        if flat.is_cuda and flat.dtype == self.weight.dtype:
            try:
                logits = torch.mm(flat, self.weight.t(), out_dtype=torch.float32)  # (N, V)
            except (TypeError, RuntimeError, NotImplementedError):
                logits = None
        if logits is None:
            weight = self._weight_fp32 if self._weight_fp32 is not None else self.weight.float()
            if out is not None:
                logits = torch.mm(flat.float(), weight.t(), out=out[: flat.shape[0]])
            else:
                logits = torch.mm(flat.float(), weight.t())  # (N, V)
        if self.bias is not None:
            logits = logits.add_(self.bias.float())
        return logits.reshape(*hidden.shape[:-1], logits.shape[-1])

    def keep_fp32_weight(self) -> None:
        """Keep one float32 copy of a 16-bit weight for ``fp32_linear`` (frozen heads only: the
        copy does not follow later changes of the weight). No-op for a float32 weight."""
        if self.weight.dtype != torch.float32:
            self._weight_fp32 = self.weight.detach().float()


def fp32_output_gemm(head: OutputHead, device: torch.device) -> bool:
    """Whether ``torch.mm(..., out_dtype=torch.float32)`` runs for ``head``'s dtype on ``device``
    (CUDA, recent torch); False for a float32 head (it needs no such GEMM)."""
    if head.weight.dtype == torch.float32 or torch.device(device).type != "cuda":
        return False
    probe = torch.zeros(2, head.weight.shape[1], dtype=head.weight.dtype, device=device)
    try:
        return torch.mm(probe, head.weight[:2].t(), out_dtype=torch.float32).dtype == torch.float32
    except (TypeError, RuntimeError, NotImplementedError):
        return False


def body_of(model: nn.Module) -> nn.Module:
    """The transformer body of a ``*ForCausalLM`` (returns ``last_hidden_state``, final norm applied)."""
    prefix = getattr(model, "base_model_prefix", "model")
    body = getattr(model, prefix, None)
    if body is None:
        raise ValueError(f"{type(model).__name__} has no body attribute '{prefix}'")
    return body


def _head_postprocessing(config) -> tuple[float, float | None]:
    """Known logit post-processing in Hugging Face configs: (scale, softcap)."""
    scale = 1.0
    if getattr(config, "logit_scale", None) is not None:  # Cohere: logits * logit_scale
        scale *= float(config.logit_scale)
    if getattr(config, "logits_scaling", None) is not None:  # Granite: logits / logits_scaling
        scale /= float(config.logits_scaling)
    softcap = getattr(config, "final_logit_softcapping", None)  # Gemma-2/3
    return scale, (float(softcap) if softcap else None)


def split_head(model: nn.Module) -> OutputHead | None:
    """The model's output head from its weights and config, or None if it has no linear head."""
    projection = model.get_output_embeddings()
    if not isinstance(projection, nn.Linear):
        return None
    scale, softcap = _head_postprocessing(model.config)
    return OutputHead(projection.weight, projection.bias, scale=scale, softcap=softcap)


@torch.no_grad()
def resolve_head(
    model: nn.Module, probe_input_ids: torch.Tensor, atol: float = 1e-3, rtol: float = 1e-3
) -> OutputHead | None:
    """``split_head`` checked against the model's own forward on ``probe_input_ids`` (B, T).

    Returns None (use the full forward) when the split is not exact for this architecture.
    """
    head = split_head(model)
    if head is None:
        return None
    try:
        hidden = body_of(model)(input_ids=probe_input_ids).last_hidden_state  # (B, T, H)
    except (ValueError, TypeError, AttributeError):
        return None
    expected = model(input_ids=probe_input_ids).logits.float()  # (B, T, V)
    actual = head.logits(hidden)
    if expected.shape != actual.shape:
        return None
    # the model's own logits may be rounded to its dtype (bf16: 2**-8 relative); ours are not
    rtol = (
        max(rtol, torch.finfo(head.weight.dtype).eps) if head.weight.is_floating_point() else rtol
    )
    tolerance = atol + rtol * expected.abs().max().item()
    if (expected - actual).abs().max().item() > tolerance:
        return None
    return head

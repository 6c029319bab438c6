"""Split a Hugging Face causal LM into its body (hidden states) and its output head (logits).

Both stages need the logits of many positions without ever materialising the full (B, T, V)
tensor: the teacher's top-k in ``build`` and the student's loss in ``train`` run the head chunk by
chunk over the body's hidden states. That is only exact when ``logits == head(hidden)``; some
architectures post-process logits (Gemma-2 soft-capping, Cohere/Granite scaling). ``resolve_head``
knows those, and always checks the split against the model's own forward on a probe batch: when
they disagree it returns ``None`` and callers fall back to the model's full forward.
"""

from __future__ import annotations

from dataclasses import dataclass

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

    @property
    def vocab_size(self) -> int:
        return int(self.weight.shape[0])

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., H) hidden states -> (..., V) logits in float32."""
        logits = nn.functional.linear(hidden, self.weight, self.bias).float()
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


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
    tolerance = atol + rtol * expected.abs().max().item()
    if (expected - actual).abs().max().item() > tolerance:
        return None
    return head

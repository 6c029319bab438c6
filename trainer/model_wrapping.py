"""The student as the step runs it: attention kernel, activation checkpointing, torch.compile.

``wrap_model(model, settings)`` is the one entry the loop calls: it returns the same model with
activation checkpointing per decoder layer (``--gradient-checkpointing``) and each decoder layer
compiled in place (``--compile``), so parameter names, ``state_dict`` and ``save_pretrained`` are
those of the plain model. ``decoder_layers(model)`` finds the repeated blocks (the unit that
checkpointing, compile and ``fully_shard`` work on). ``attention_kwargs`` gives the
``from_pretrained`` / ``from_config`` keywords of ``--attn-implementation``.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch
from torch import nn

from kdcache.cache.errors import ConfigError
from kdcache.trainer.config import ATTN_IMPLEMENTATIONS

__all__ = [
    "ATTN_IMPLEMENTATIONS",
    "WrapSettings",
    "attention_kwargs",
    "check_compiler",
    "check_wrap_settings",
    "decoder_layers",
    "wrap_model",
]


@dataclass(frozen=True)
class WrapSettings:
    """How the student runs (none of these changes what it computes, up to rounding)."""

    gradient_checkpointing: bool = False  # recompute each decoder layer's activations in backward
    compile: bool = False  # torch.compile each decoder layer (inductor)


def attention_kwargs(attn_implementation: str) -> dict[str, str]:
    """``{"attn_implementation": ...}`` for transformers; refuses a kernel that is not installed."""
    if attn_implementation not in ATTN_IMPLEMENTATIONS:
        raise ConfigError(
            f"unknown --attn-implementation {attn_implementation!r}; choose one of "
            f"{', '.join(ATTN_IMPLEMENTATIONS)}"
        )
    if (
        attn_implementation == "flash_attention_2"
        and importlib.util.find_spec("flash_attn") is None
    ):
        raise ConfigError(
            "--attn-implementation flash_attention_2 needs the flash-attn package "
            "(pip install flash-attn, on a CUDA machine); or use sdpa (the default)"
        )
    return {"attn_implementation": attn_implementation}


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's repeated decoder blocks: its largest ``nn.ModuleList`` (llama ``model.layers``,
    gpt2 ``transformer.h``)."""
    lists = [module for module in model.modules() if isinstance(module, nn.ModuleList)]
    if not lists:
        raise ConfigError(f"{type(model).__name__} has no list of decoder layers to wrap")
    return max(lists, key=len)


def check_compiler(device: torch.device) -> None:
    """Compile and run a two-op function on ``device``; a ConfigError line when that fails.

    A success is remembered per device type (the second check of a run costs nothing).
    """
    if device.type in _COMPILER_WORKS:
        return
    try:
        compiled = torch.compile(lambda x: torch.sin(x) * 2.0 + 1.0)
        compiled(torch.ones(4, device=device))
    except Exception as error:  # any backend failure (no C compiler, no triton, ...)
        first_line = (str(error).strip() or type(error).__name__).splitlines()[0][:200]
        raise ConfigError(
            f"--compile: torch.compile does not work on this machine ({first_line}); "
            "drop --compile to train eagerly"
        ) from None
    _COMPILER_WORKS.add(device.type)


_COMPILER_WORKS: set[str] = set()


def check_wrap_settings(model: nn.Module, settings: WrapSettings, device: torch.device) -> None:
    """Every refusal of ``wrap_model``, without changing the model: run it before writing."""
    if settings.gradient_checkpointing and not getattr(
        model, "supports_gradient_checkpointing", False
    ):
        raise ConfigError(
            f"--gradient-checkpointing: {type(model).__name__} does not support it; drop the flag"
        )
    if settings.compile:
        check_compiler(device)


def wrap_model(model: nn.Module, settings: WrapSettings, device: torch.device) -> nn.Module:
    """``model`` (modified in place, returned) with checkpointing and compile applied per layer.

    Call it after the model is on ``device`` and before the optimizer and DDP see it.
    """
    check_wrap_settings(model, settings, device)
    if settings.gradient_checkpointing:
        options = {"use_reentrant": False}
        enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5
        if enable is not None:
            enable(activation_checkpointing_kwargs=options)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)
        if getattr(model.config, "use_cache", False):
            model.config.use_cache = False  # no KV cache in training (it conflicts with it)
    if settings.compile:
        for layer in decoder_layers(model):
            layer.compile()  # in place: parameter names and state_dict keys are unchanged
    return model

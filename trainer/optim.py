"""The optimizer and learning-rate schedule of ``kdcache train``: AdamW (fused on CUDA), a
``--lr-scheduler`` schedule with warmup (``kdcache.trainer.schedules``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from kdcache.trainer.config import TrainConfig
from kdcache.trainer.schedules import lr_factor, warmup_steps_for

__all__ = [
    "adamw_kwargs",
    "build_optimizer",
    "build_scheduler",
    "load_optimizer_state",
    "warmup_cosine",
]


def warmup_cosine(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """Linear warmup to the peak, then cosine decay to 0 at ``total_steps``."""
    return lr_factor("cosine", warmup_steps, total_steps)


def adamw_kwargs(device: torch.device) -> dict[str, Any]:
    """AdamW's implementation for ``device``: the fused CUDA kernel there (one launch for all
    parameters instead of a loop of small ones), the default (foreach) elsewhere."""
    return {"fused": True} if device.type == "cuda" else {}


def build_optimizer(
    model: nn.Module, config: TrainConfig, device: torch.device | None = None
) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases and norm weights (1-D parameters)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    device = device if device is not None else next(model.parameters()).device
    return torch.optim.AdamW(
        groups, lr=config.lr, betas=(0.9, 0.95), eps=1e-8, **adamw_kwargs(device)
    )


def load_optimizer_state(
    optimizer: torch.optim.Optimizer, state: dict[str, Any], device: torch.device
) -> None:
    """``optimizer.load_state_dict(state)``, keeping this device's AdamW implementation.

    A state dict carries its groups' ``fused`` / ``foreach`` flags: a checkpoint written on a
    CPU (or before AdamW was fused) would otherwise resume unfused on CUDA, and a fused CUDA
    one would ask a CPU for the fused kernel.
    """
    optimizer.load_state_dict(state)
    chosen = adamw_kwargs(device)
    for group in optimizer.param_groups:
        if "fused" in group:
            group["fused"] = chosen.get("fused", None)
        if chosen.get("fused") and "foreach" in group:
            group["foreach"] = None  # fused and foreach are exclusive


def build_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """The ``--lr-scheduler`` schedule over ``total_steps`` (warmup from --warmup-steps/-ratio)."""
    warmup = warmup_steps_for(config.warmup_steps, config.warmup_ratio, total_steps)
    factor = lr_factor(
        config.lr_scheduler,
        warmup,
        total_steps,
        min_lr_ratio=config.min_lr / config.lr,
        decay_ratio=config.decay_ratio,
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

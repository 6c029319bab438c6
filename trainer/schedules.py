"""Learning-rate schedules of ``kdcache train`` (``--lr-scheduler``), as LambdaLR factors.

Each schedule is a function of the step giving the multiplier of the peak ``--lr``; the names are
Hugging Face's (``get_scheduler``): after ``warmup`` linear warmup steps (factor
``(step + 1) / warmup``, so the first step already moves),

* ``cosine``: min + (1 - min) * 0.5 * (1 + cos(pi * progress)), progress from 0 to 1 at the end;
* ``linear``: min + (1 - min) * (1 - progress);
* ``constant``: 1;
* ``wsd`` (warmup-stable-decay): 1 until the last ``decay_ratio`` of the steps, then a cosine
  from 1 to min over them;

where ``min = --min-lr / --lr``. ``--warmup-ratio r`` sets ``warmup = ceil(r * total steps)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from kdcache.trainer.config import LR_SCHEDULERS

__all__ = ["LR_SCHEDULERS", "lr_factor", "warmup_steps_for"]


def warmup_steps_for(warmup_steps: int, warmup_ratio: float, total_steps: int) -> int:
    """The warmup length: ``warmup_steps`` when given (> 0), else ``ceil(ratio * total)``."""
    if warmup_steps > 0:
        return warmup_steps
    return math.ceil(warmup_ratio * total_steps)


def lr_factor(
    name: str,
    warmup_steps: int,
    total_steps: int,
    *,
    min_lr_ratio: float = 0.0,
    decay_ratio: float = 0.1,
) -> Callable[[int], float]:
    """``factor(step)`` multiplying the peak lr at optimizer step ``step`` (0-based)."""
    if name not in LR_SCHEDULERS:
        raise ValueError(f"unknown lr scheduler {name!r}; choose one of {LR_SCHEDULERS}")
    low = min_lr_ratio
    decay_steps = max(1, round(decay_ratio * total_steps))
    decay_start = max(warmup_steps, total_steps - decay_steps)

    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        if name == "constant":
            return 1.0
        if name == "wsd":
            if step < decay_start:
                return 1.0
            progress = min(1.0, (step - decay_start) / max(1, total_steps - decay_start))
            return low + (1.0 - low) * 0.5 * (1.0 + math.cos(math.pi * progress))
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        if name == "linear":
            return low + (1.0 - low) * (1.0 - progress)
        return low + (1.0 - low) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor

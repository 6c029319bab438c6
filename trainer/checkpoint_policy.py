"""When a run saves, what it keeps, and in which dtype it exports (``kdcache train`` checkpoints).

* ``step-N/`` (resumable: model, optimizer, scheduler, data cursors, RNG) every ``--save-every``
  steps and/or every ``--save-every-minutes`` minutes of wall time (default 60 minutes: a
  multi-day run loses at most an hour); the clock is read every ``--log-every`` steps, and under
  several ranks rank 0's clock decides for all (one collective per log step, none per step);
* ``--save-total-limit N`` keeps the N newest ``step-*`` checkpoints (default 3; 0 keeps all);
  older ones are deleted after a newer one is complete;
* ``final/`` is the model alone (``save_pretrained`` + tokenizer + a small ``trainer_state.pt``
  without the optimizer), in ``--export-dtype`` (``bf16`` halves it; steps stay float32 so a
  resume is exact);
* every checkpoint is written into ``.tmp-<name>-<pid>/`` and renamed into place: a process
  killed mid-save (even by SIGKILL) leaves the previous checkpoint as the latest, and the
  leftover temporary directory is removed when the run is resumed.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from kdcache.trainer import distributed as dist_utils

EXPORT_DTYPES: dict[str, torch.dtype | None] = {
    "float32": None,  # as trained (the master weights)
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}
SAVE_SLEEP_ENV = "KDCACHE_TEST_SAVE_SLEEP"  # test hook: "<name>:<seconds>" sleeps inside a save
_STEP_DIR = re.compile(r"^step-(\d+)$")
_PARTIAL = re.compile(r"^\.(tmp|old)-.+-\d+$")


class SaveClock:
    """Decides at each step whether a ``step-N`` checkpoint is due."""

    def __init__(self, every_steps: int, every_minutes: float, check_every: int) -> None:
        self.every_steps, self.every_seconds = every_steps, every_minutes * 60.0
        self.check_every = max(1, check_every)
        self.last_save = time.monotonic()

    def due(self, step: int, info: dist_utils.DistInfo) -> bool:
        """True when ``step`` should save (the same answer on every rank)."""
        if self.every_steps and step % self.every_steps == 0:
            return True
        if not self.every_seconds or step % self.check_every:
            return False
        late = float(time.monotonic() - self.last_save >= self.every_seconds)
        return dist_utils.all_reduce(late, info, op="max") > 0  # rank 0's clock would do; any

    def saved(self) -> None:
        self.last_save = time.monotonic()


def step_checkpoints(out: Path) -> list[tuple[int, Path]]:
    """The complete ``step-N`` checkpoints of ``out``, oldest first."""
    found = []
    for child in out.iterdir() if out.is_dir() else []:
        match = _STEP_DIR.match(child.name)
        if match and child.is_dir():
            found.append((int(match.group(1)), child))
    return sorted(found)


def prune_checkpoints(out: Path, limit: int) -> list[Path]:
    """Delete all but the ``limit`` newest ``step-N`` checkpoints (0: keep all); the deleted."""
    if limit <= 0:
        return []
    old = [path for _, path in step_checkpoints(out)[:-limit]]
    for path in old:
        shutil.rmtree(path, ignore_errors=True)
    return old


def remove_partial_saves(out: Path) -> list[str]:
    """Delete the temporary directories a save killed midway left in ``out``; their names."""
    removed = []
    for child in out.iterdir() if out.is_dir() else []:
        if child.is_dir() and _PARTIAL.match(child.name):
            shutil.rmtree(child, ignore_errors=True)
            removed.append(child.name)
    return removed


def export_state_dict(model: torch.nn.Module, export_dtype: str) -> dict[str, Any] | None:
    """The weights to save for ``final/`` in ``export_dtype`` (None: the model's own).

    Floating tensors are cast; tensors shared between names (tied embeddings) stay shared.
    """
    if EXPORT_DTYPES[export_dtype] is None:
        return None
    return cast_weights(model.state_dict(), export_dtype)


def cast_weights(weights: dict[str, torch.Tensor], export_dtype: str) -> dict[str, torch.Tensor]:
    """``weights`` with floating tensors in ``export_dtype`` (shared tensors stay shared)."""
    dtype = EXPORT_DTYPES[export_dtype]
    if dtype is None:
        return weights
    cast: dict[int, torch.Tensor] = {}
    state = {}
    for name, tensor in weights.items():
        if not tensor.is_floating_point():
            state[name] = tensor
            continue
        key = tensor.data_ptr()
        if key not in cast:
            cast[key] = tensor.detach().to(dtype)
        state[name] = cast[key]
    return state


def sleep_if_test_hook(name: str) -> None:
    """Sleep inside the save of ``name`` when ``KDCACHE_TEST_SAVE_SLEEP=name:seconds`` (tests kill
    the process there); nothing otherwise."""
    setting = os.environ.get(SAVE_SLEEP_ENV, "")
    target, _, seconds = setting.partition(":")
    if setting and target == name:
        time.sleep(float(seconds or 60))

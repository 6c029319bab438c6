"""Checkpoints: a ``save_pretrained`` directory (safetensors + tokenizer) plus the training state.

``<out>/step-N/`` and ``<out>/final/`` load with ``AutoModelForCausalLM.from_pretrained``; their
``trainer_state.pt`` holds what ``--resume`` needs to continue exactly: optimizer, scheduler, RNG
states, the data cursor of every rank and the step. A checkpoint is written to a temporary
directory and renamed into place, so a crash never leaves a half-written one behind.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

STATE_FILE = "trainer_state.pt"
FINAL = "final"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def rng_state() -> dict[str, Any]:
    """Every RNG a training step may draw from (python, numpy, torch CPU and CUDA)."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore ``rng_state()``."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_dir(path: Path) -> None:
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def save_checkpoint(
    out_dir: Path, name: str, model: torch.nn.Module, tokenizer: Any, state: dict[str, Any]
) -> Path:
    """Write ``out_dir/name`` atomically (temp dir, then rename) and return its path."""
    final = out_dir / name
    temporary = out_dir / f".tmp-{name}-{os.getpid()}"
    shutil.rmtree(temporary, ignore_errors=True)
    model.save_pretrained(temporary)
    if tokenizer is not None:
        tokenizer.save_pretrained(temporary)
    with open(temporary / STATE_FILE, "wb") as handle:
        torch.save(state, handle)
        handle.flush()
        os.fsync(handle.fileno())
    _fsync_dir(temporary)
    if final.exists():  # a re-saved checkpoint (e.g. final after a resume): swap, then drop
        old = out_dir / f".old-{name}-{os.getpid()}"
        final.rename(old)
        temporary.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        temporary.rename(final)
    _fsync_dir(out_dir)
    return final


def checkpoint_step(path: Path) -> int:
    """The step a checkpoint directory was saved at."""
    return int(load_training_state(path)["step"])


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The complete checkpoint with the highest step in ``out_dir`` (``final`` included)."""
    candidates: list[tuple[int, int, Path]] = []
    if not out_dir.is_dir():
        return None
    for child in out_dir.iterdir():
        if not (child / STATE_FILE).is_file():
            continue
        match = _STEP_DIR.match(child.name)
        if match:
            candidates.append((int(match.group(1)), 0, child))
        elif child.name == FINAL:
            candidates.append((checkpoint_step(child), 1, child))
    return max(candidates)[2] if candidates else None


def load_training_state(path: Path) -> dict[str, Any]:
    """The ``trainer_state.pt`` of a checkpoint directory."""
    return torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)

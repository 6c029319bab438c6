"""The run directory: run.json, metrics.jsonl, and checkpoints with their training state.

Checkpoints are ``save_pretrained`` directories (safetensors + tokenizer) plus the training state.

``<out>/step-N/`` and ``<out>/final/`` load with ``AutoModelForCausalLM.from_pretrained``; their
``trainer_state.pt`` holds what ``--resume`` needs to continue exactly: optimizer, scheduler, RNG
states, the data cursor of every rank and the step. A checkpoint is written to a temporary
directory and renamed into place, so a crash never leaves a half-written one behind.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdcache.cache.errors import ConfigError
from kdcache.cache.format.manifest import fsync_dir
from kdcache.trainer.checkpoint_policy import sleep_if_test_hook

STATE_FILE = "trainer_state.pt"
RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
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


def save_checkpoint(
    out_dir: Path,
    name: str,
    model: torch.nn.Module,
    tokenizer: Any,
    state: dict[str, Any],
    weights: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``out_dir/name`` atomically (temp dir, then rename) and return its path.

    ``weights``: the state dict to save instead of the model's own (e.g. cast to bf16 for
    export, or gathered from FSDP shards); its dtype is written into config.json.
    """
    final = out_dir / name
    temporary = out_dir / f".tmp-{name}-{os.getpid()}"
    shutil.rmtree(temporary, ignore_errors=True)
    dtypes = {tensor.dtype for tensor in (weights or {}).values() if tensor.is_floating_point()}
    model.save_pretrained(temporary, state_dict=weights)
    if len(dtypes) == 1:
        _write_config_dtype(temporary, dtypes.pop())
    if tokenizer is not None:
        tokenizer.save_pretrained(temporary)
    sleep_if_test_hook(name)  # tests SIGKILL the process here: a half-written checkpoint
    with open(temporary / STATE_FILE, "wb") as handle:
        torch.save(state, handle)
        handle.flush()
        os.fsync(handle.fileno())
    fsync_dir(temporary)
    if final.exists():  # a re-saved checkpoint (e.g. final after a resume): swap, then drop
        old = out_dir / f".old-{name}-{os.getpid()}"
        final.rename(old)
        temporary.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        temporary.rename(final)
    fsync_dir(out_dir)
    return final


def _write_config_dtype(directory: Path, dtype: torch.dtype) -> None:
    """config.json names the dtype of the saved weights (save_pretrained writes the model's), so
    ``from_pretrained(dtype="auto")`` loads an exported bf16 model as bf16."""
    path = directory / "config.json"
    if not path.is_file():
        return
    config = json.loads(path.read_text(encoding="utf-8"))
    name = str(dtype).removeprefix("torch.")
    for key in ("dtype", "torch_dtype"):
        if key in config:
            config[key] = name
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


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
    """The ``trainer_state.pt`` of a checkpoint directory, memory-mapped (tensors are read from
    the file as they are used, e.g. when the optimizer moves its state to the GPU, not first
    copied into host memory)."""
    return torch.load(path / STATE_FILE, map_location="cpu", weights_only=False, mmap=True)


def check_run_dir(config: Any) -> Path | None:
    """Refuse an out dir we must not write into; return the checkpoint to resume from.

    ``config`` is a ``TrainConfig``. Nothing is written here.
    """
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; choose a directory")
    run_file = out / RUN_FILE
    holds_files = out.is_dir() and any(out.iterdir())
    if config.resume:
        if not run_file.is_file():
            raise ConfigError(f"nothing to resume in {out} (no {RUN_FILE}); drop --resume")
        differences = config.differences(json.loads(run_file.read_text(encoding="utf-8")))
        if differences:
            raise ConfigError(
                f"--resume: {out} holds a run with other settings ({'; '.join(differences)}); "
                "resume with the same settings or use --overwrite"
            )
        return latest_checkpoint(out)
    if holds_files and not run_file.is_file():  # never delete what is not a kdcache run
        raise ConfigError(
            f"{out} already holds other files (no {RUN_FILE}); choose an empty or new --out"
        )
    if holds_files and not config.overwrite:
        raise ConfigError(
            f"{out} already holds a training run; pass --resume to continue it, --overwrite to "
            "replace it, or choose another --out"
        )
    return None


def start_run_dir(out: Path, config: Any) -> None:
    """Create ``out`` (replacing a previous run with --overwrite) and write run.json."""
    if config.overwrite and (out / RUN_FILE).is_file():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / RUN_FILE).write_text(json.dumps(config.to_dict(), indent=2) + "\n", encoding="utf-8")


def append_metrics(out: Path, entry: dict[str, Any]) -> None:
    """One JSON line in ``<out>/metrics.jsonl``."""
    with open(out / METRICS_FILE, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(entry) + "\n")


def truncate_metrics(out: Path, step: int) -> None:
    """Drop metric lines logged after ``step`` (a resumed run logs them again)."""
    path = out / METRICS_FILE
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8").splitlines()
    kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")

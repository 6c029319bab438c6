"""Checkpoints of an FSDP run: sharded with torch.distributed.checkpoint, resumable on any ranks.

``step-N/`` of an ``--fsdp`` run holds ``config.json`` + tokenizer (so the student can be built
from it), ``sharded/`` (the DCP checkpoint: model and AdamW state, each rank writing its own
shards in parallel) and ``trainer_state.pt`` (step, scheduler, data cursors, RNG: no weights).
DCP re-shards on load, so a resume may use another number of ranks (the data cursors follow
``kdcache.trainer.resume``). ``final/`` is consolidated: the full state dict is gathered to rank
0's CPU and written with ``save_pretrained`` (loadable by transformers, no FSDP needed).

Every rank writes into the same temporary directory, which rank 0 renames into place after all
have finished: a killed save leaves the previous checkpoint as the latest. The directory must be
on a filesystem every rank sees (as the cache is, for several nodes).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdcache.cache.format.manifest import fsync_dir
from kdcache.trainer import distributed as dist_utils
from kdcache.trainer.checkpoint import STATE_FILE
from kdcache.trainer.checkpoint_policy import sleep_if_test_hook

SHARDED_DIR = "sharded"


def save_sharded(
    out_dir: Path,
    name: str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    tokenizer: Any,
    state: dict[str, Any],
    info: dist_utils.DistInfo,
) -> Path:
    """Every rank: write ``out_dir/name`` (sharded model + optimizer); rank 0 adds the rest."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    pid = dist_utils.gather_objects(os.getpid(), info)[0]  # rank 0's: one directory for all
    temporary, final = out_dir / f".tmp-{name}-{pid}", out_dir / name
    if info.is_main:
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir(parents=True)
    dist_utils.barrier(info)
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state},
             checkpoint_id=str(temporary / SHARDED_DIR))  # fmt: skip
    dist_utils.barrier(info)
    if info.is_main:
        model.config.save_pretrained(temporary)
        if tokenizer is not None:
            tokenizer.save_pretrained(temporary)
        sleep_if_test_hook(name)
        with open(temporary / STATE_FILE, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        fsync_dir(temporary)
        if final.exists():
            shutil.rmtree(final)
        temporary.rename(final)
        fsync_dir(out_dir)
    dist_utils.barrier(info)
    return final


def is_sharded(path: Path) -> bool:
    return (path / SHARDED_DIR).is_dir()


def load_sharded(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Every rank: load ``path``'s sharded model and optimizer into the FSDP ``model`` (any
    number of ranks: DCP re-shards)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=str(path / SHARDED_DIR))
    set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"]
    )


def full_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every rank (a collective): the full, unsharded state dict, on CPU (complete on rank 0)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)

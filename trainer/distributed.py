"""torch.distributed plumbing for ``kdcache train`` under torchrun (DDP; nccl on CUDA, gloo on CPU).

Rank and world size come from torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``)
when ``init_distributed`` is called, never at import. With ``WORLD_SIZE`` unset or 1 everything
here is a no-op, so the single-process path has no distributed dependency.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from kdcache.cache.build.teacher import resolve_device


@dataclass
class DistInfo:
    """Where this process sits in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False  # True when init_distributed created the process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(
    device: str = "auto", timeout_minutes: float | None = None, group: bool = False
) -> DistInfo:
    """Join the torchrun job when ``WORLD_SIZE > 1`` (nccl on CUDA, gloo on CPU), else one process.

    ``timeout_minutes``: how long a collective waits for the other ranks (``--dist-timeout``;
    None: torch's default). ``group``: create a process group even for one process (FSDP and
    its sharded checkpoints need one; without torchrun's address a local one is used)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    timeout = None if timeout_minutes is None else timedelta(minutes=timeout_minutes)
    if world_size <= 1:
        info = DistInfo(device=resolve_device(device))
        if group and not dist.is_initialized():  # FSDP in one process: a group of one
            backend = "nccl" if info.device.type == "cuda" else "gloo"
            address = f"tcp://127.0.0.1:{_free_port()}"
            dist.init_process_group(
                backend, init_method=address, rank=0, world_size=1, timeout=timeout
            )
            info.owns_group = True
        return info
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device != "cpu" and torch.cuda.is_available()
    chosen = torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(chosen)
    owns = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", timeout=timeout)
        owns = True
    return DistInfo(rank, world_size, local_rank, chosen, owns)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def shutdown(info: DistInfo) -> None:
    """Leave the process group if ``init_distributed`` created it."""
    if info.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def all_reduce(value: float, info: DistInfo, op: str = "sum") -> float:
    """``value`` summed (or min / max) over ranks; the value itself in a single process."""
    if not info.distributed:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=_comm_device(info))
    reduce_op = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}[op]
    dist.all_reduce(tensor, op=reduce_op)
    return float(tensor.item())


def gather_objects(value: Any, info: DistInfo) -> list[Any]:
    """Every rank's ``value``, in rank order (``[value]`` in a single process)."""
    if not info.distributed:
        return [value]
    gathered: list[Any] = [None] * info.world_size
    dist.all_gather_object(gathered, value)
    return gathered


def _comm_device(info: DistInfo) -> torch.device:
    return info.device if dist.get_backend() == "nccl" else torch.device("cpu")

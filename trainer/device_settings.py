"""How a run uses its device: the head's compute dtype, TF32, the data loader's workers and pinning.

Each is a small pure function of the settings and the device, so the CUDA choices are tested on
a CPU by passing ``torch.device("cuda")`` explicitly.
"""

from __future__ import annotations

import torch

__all__ = ["enable_tf32", "head_compute_dtype", "loader_workers", "pin_memory_for"]


def head_compute_dtype(autocast: torch.dtype | None) -> torch.dtype:
    """The chunked head's GEMM operand dtype: the autocast dtype (bf16), else float32."""
    return autocast if autocast is not None else torch.float32


def enable_tf32(device: torch.device, autocast: torch.dtype | None) -> bool:
    """For fp32 runs on CUDA, let fp32 matmuls and convolutions use TF32 tensor cores.

    (10-bit mantissa products, fp32 accumulation: the setting Hugging Face's ``--tf32`` and
    most training recipes use.) Returns whether it was enabled. A process-wide torch setting,
    made when the run starts (never at import).
    """
    if device.type != "cuda" or autocast is not None:
        return False
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return True


def loader_workers(num_workers: int | None, device: torch.device) -> int:
    """DataLoader workers per rank: the flag's, else 1 on CUDA (shard decoding off the training
    process; one worker keeps the data order of 0 workers) and 0 on a CPU (the cores train)."""
    if num_workers is not None:
        return num_workers
    return 1 if device.type == "cuda" else 0


def pin_memory_for(device: torch.device, num_workers: int) -> bool:
    """Pin batches in page-locked memory when they go to CUDA from workers (``non_blocking``
    host-to-device copies then overlap with compute)."""
    return device.type == "cuda" and num_workers > 0

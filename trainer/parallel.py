"""How the training objective is spread over ranks: DDP (default) or FSDP2 (``--fsdp``).

``wrap_objective(objective, info, fsdp=..., policy=...)`` is the one place that decides; the loop
calls ``no_sync`` / ``clip_grad_norm`` from here and never branches on the wrapper itself.

FSDP2 (``torch.distributed.fsdp.fully_shard``): one FSDP unit per decoder layer (the classes the
model lists in ``_no_split_modules``, else the body's ``ModuleList``), then the objective itself
as the root unit (embeddings, final norm and lm_head: the chunked head reads the lm_head weight
inside the objective's forward, where the root unit has gathered it). Parameters, gradients and
AdamW state are sharded over the ranks (``4 x params / world`` bytes each for fp32 master weights
+ grads ... see docs/SCALING.md); on CUDA with ``--dtype bfloat16``/auto the units compute in
bf16 and reduce gradients in fp32 (``MixedPrecisionPolicy``). Checkpoints of an FSDP run are
sharded (``kdcache.trainer.sharded_checkpoint``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from kdcache.cache.errors import ConfigError
from kdcache.cache.extraction.heads import body_of
from kdcache.trainer import distributed as dist_utils


def fsdp_available() -> str | None:
    """None when this torch has FSDP2 (``fully_shard``), else the reason it cannot run."""
    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard  # noqa: F401
    except ImportError as error:
        return f"this torch ({torch.__version__}) has no FSDP2 fully_shard: {error}"
    if not torch.distributed.is_available():
        return f"this torch ({torch.__version__}) was built without torch.distributed"
    return None


def mixed_precision(device: torch.device, autocast: torch.dtype | None):
    """The FSDP2 policy: bf16 parameters with fp32 gradient reduction on CUDA under bf16; None
    (full fp32) elsewhere, e.g. on CPU where the tests compare against DDP."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if device.type == "cuda" and autocast == torch.bfloat16:
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return None


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a ``*ForCausalLM``: one FSDP unit each."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [module for module in model.modules() if type(module).__name__ in names]
    if layers:
        return layers
    lists = [child for child in body_of(model).children() if isinstance(child, nn.ModuleList)]
    if not lists:
        raise ConfigError(
            f"--fsdp: cannot find the decoder layers of {type(model).__name__} (no "
            "_no_split_modules, no ModuleList in its body); train it without --fsdp"
        )
    return list(max(lists, key=len))


def wrap_objective(
    objective: nn.Module,
    info: dist_utils.DistInfo,
    *,
    fsdp: bool,
    autocast: torch.dtype | None = None,
) -> nn.Module:
    """``objective`` (a ``DistillObjective``) ready for ``info``'s ranks.

    fsdp: shard it in place with FSDP2 (needs a process group, also on one rank); else DDP when
    there are several ranks; else the objective itself.
    """
    if fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(info.device.type, (torch.distributed.get_world_size(),))
        policy = mixed_precision(info.device, autocast)
        options = {"mesh": mesh} if policy is None else {"mesh": mesh, "mp_policy": policy}
        for layer in decoder_layers(objective.model):
            fully_shard(layer, **options)
        fully_shard(objective, **options)
        return objective
    if info.distributed:
        ids = [info.device.index] if info.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(objective, device_ids=ids)
    return objective


def is_fsdp(objective: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(objective, FSDPModule)


@contextlib.contextmanager
def no_sync(objective: nn.Module, sync: bool) -> Iterator[None]:
    """Gradients of this micro-batch are only accumulated (``sync`` False: not the last one of
    the step) -- DDP's ``no_sync()``, FSDP2's ``set_requires_gradient_sync(False)``."""
    if sync:
        yield
    elif isinstance(objective, nn.parallel.DistributedDataParallel):
        with objective.no_sync():
            yield
    elif is_fsdp(objective):
        objective.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            objective.set_requires_gradient_sync(True)
    else:
        yield


def clip_grad_norm(model: nn.Module, max_norm: float) -> float:
    """Clip the gradients to ``max_norm`` (global norm over all shards); the norm before."""
    norm = nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    full_tensor = getattr(norm, "full_tensor", None)  # a DTensor under FSDP
    return float(full_tensor() if full_tensor is not None else norm)

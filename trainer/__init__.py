"""Stage two: stream a teacher cache and distill students with sparse KL losses.

The names below are imported lazily (PEP 562, as in ``kdcache.cache``): ``kdcache --help`` reads
``kdcache.trainer.config`` for its defaults without importing torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kdcache.cache._lazy import lazy_exports

_LAZY = {
    "chunked_dense_distill_loss": "head_losses",
    "chunked_distill_loss": "head_losses",
    "EvalConfig": "config",
    "TrainConfig": "config",
    "CacheDataset": "data",
    "collate_records": "data",
    "evaluate": "evaluation",
    "evaluate_model": "evaluation",
    "format_table": "evaluation",
    "TrainResult": "loop",
    "train": "loop",
    "LOSS_KINDS": "losses",
    "dense_kd_loss": "losses",
    "sparse_kd_loss": "losses",
}

if TYPE_CHECKING:
    from kdcache.trainer.config import EvalConfig, TrainConfig
    from kdcache.trainer.data import CacheDataset, collate_records
    from kdcache.trainer.evaluation import evaluate, evaluate_model, format_table
    from kdcache.trainer.head_losses import chunked_dense_distill_loss, chunked_distill_loss
    from kdcache.trainer.loop import TrainResult, train
    from kdcache.trainer.losses import LOSS_KINDS, dense_kd_loss, sparse_kd_loss


__getattr__, __dir__ = lazy_exports("kdcache.trainer", _LAZY, globals())

__all__ = [
    "LOSS_KINDS",
    "CacheDataset",
    "EvalConfig",
    "TrainConfig",
    "TrainResult",
    "chunked_dense_distill_loss",
    "chunked_distill_loss",
    "collate_records",
    "dense_kd_loss",
    "evaluate",
    "evaluate_model",
    "format_table",
    "sparse_kd_loss",
    "train",
]

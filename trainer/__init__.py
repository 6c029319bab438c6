"""Stage two: stream a teacher cache and distill students with sparse KL losses."""

from kdcache.trainer.chunked import chunked_dense_distill_loss, chunked_distill_loss
from kdcache.trainer.config import EvalConfig, TrainConfig
from kdcache.trainer.data import CacheDataset, collate_records
from kdcache.trainer.evaluate import evaluate, evaluate_model, format_table
from kdcache.trainer.loop import TrainResult, train
from kdcache.trainer.losses import LOSS_KINDS, dense_kd_loss, sparse_kd_loss

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

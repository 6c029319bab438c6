"""Stage two: stream a teacher cache and distill students with sparse KL losses."""

from kdcache.trainer.config import EvalConfig, TrainConfig
from kdcache.trainer.data import CacheDataset, collate_records
from kdcache.trainer.evaluate import evaluate, evaluate_model, format_table
from kdcache.trainer.loop import TrainResult, train

__all__ = [
    "CacheDataset",
    "EvalConfig",
    "TrainConfig",
    "TrainResult",
    "collate_records",
    "evaluate",
    "evaluate_model",
    "format_table",
    "train",
]

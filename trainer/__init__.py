"""Stage two: stream a teacher cache and distill students with sparse KL losses."""

from kdcache.trainer.losses import LOSS_KINDS, dense_kd_loss, sparse_kd_loss

__all__: list[str] = ["LOSS_KINDS", "dense_kd_loss", "sparse_kd_loss"]

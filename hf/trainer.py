"""``KDTrainer``: Hugging Face Trainer whose loss is kdcache's fused sparse KD loss on a cache.

``compute_loss`` runs ``kdcache.trainer.objective.DistillObjective``, the objective of
``kdcache train``: student body -> chunked lm_head (``chunk_size`` positions at a time, never the
(N, V) logits) -> the cache mode's teacher target (``loss=`` fkl / rkl / akl / ..., ``mu=``, the
cache's temperature) plus the next-token CE mix ``ce_weight=``. Architectures whose head does not
split off exactly fall back to the full logits, as in ``kdcache train``.

Normalization follows Trainer's convention: the loss is the mean over the distilled (and, for the
CE share, the labelled) positions of each micro-batch, and Trainer divides by the gradient
accumulation steps; ``kdcache train`` averages over all positions of the optimizer step instead.
Both are the same with one micro-batch per step on one process.

Under DDP (several processes, accelerate / torchrun) the loss goes through the wrapped model's
forward, so DDP synchronizes the gradients as for any Trainer model: for the duration of the call
the student's ``forward`` is the objective.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from transformers import Trainer

from kdcache.cache.errors import ConfigError
from kdcache.hf.collator import KDCollator
from kdcache.hf.dataset import CacheSequences

__all__ = ["KDTrainer"]


@contextlib.contextmanager
def _forward_is(student: nn.Module, objective: nn.Module) -> Iterator[None]:
    """Make ``student(...)`` run ``objective(...)`` (once: the objective's own calls of the
    student inside it see the student's usual forward)."""
    own = student.__dict__.get("forward")  # an instance forward (e.g. accelerate's autocast)

    def restore() -> None:
        if own is None:
            student.__dict__.pop("forward", None)
        else:
            student.forward = own

    def objective_forward(*args: Any, **kwargs: Any) -> torch.Tensor:
        restore()
        return objective(*args, **kwargs)

    student.forward = objective_forward
    try:
        yield
    finally:
        restore()


class KDTrainer(Trainer):
    """``Trainer`` training a student on a kdcache cache (``cache_dataset`` + ``KDCollator``).

    ``loss``: the divergence (``kdcache.trainer.divergences.LOSS_KINDS``) or ``ce`` (tokens only);
    ``ce_weight``: alpha of ``(1 - alpha) * KD + alpha * CE``; ``mu``: the AKL head mass;
    ``chunk_size``: positions per lm_head chunk. ``data_collator`` defaults to
    ``KDCollator(train_dataset.cache)``; every other argument is Trainer's.
    """

    def __init__(
        self,
        *args: Any,
        loss: str = "akl",
        ce_weight: float = 0.0,
        mu: float = 0.5,
        chunk_size: int = 1024,
        **kwargs: Any,
    ) -> None:
        from kdcache.trainer.config import CE_ONLY, loss_kinds

        if loss not in loss_kinds():
            raise ConfigError(f"unknown loss {loss!r}; choose one of {', '.join(loss_kinds())}")
        if not 0.0 <= ce_weight <= 1.0:
            raise ConfigError(f"ce_weight must be in [0, 1], got {ce_weight}")
        if chunk_size < 1:
            raise ConfigError(f"chunk_size must be >= 1, got {chunk_size}")
        dataset = kwargs.get("train_dataset")
        if kwargs.get("data_collator") is None and isinstance(dataset, CacheSequences):
            kwargs["data_collator"] = KDCollator(dataset.cache)
        collator = kwargs.get("data_collator")
        if isinstance(collator, KDCollator) and collator.manifest is None:
            if not isinstance(dataset, CacheSequences):
                raise ConfigError("KDCollator() has no cache: pass KDCollator(cache)")
            collator.bind(dataset.cache)
        if not isinstance(collator, KDCollator):
            raise ConfigError(
                "KDTrainer needs data_collator=KDCollator(cache) (or train_dataset=cache_dataset"
                "(cache)): the collator carries the teacher targets"
            )
        super().__init__(*args, **kwargs)
        self.kd_loss, self.mu, self.chunk_size = loss, mu, chunk_size
        self.ce_weight = 1.0 if loss == CE_ONLY else ce_weight
        self.kd_collator = collator
        self.model_accepts_loss_kwargs = False  # mean per micro-batch; Trainer divides by GA
        # every process reads its own share of the cache (cache_dataset splits by rank):
        # accelerate must neither dispatch batches from rank 0 nor re-shard them
        self.accelerator.dataloader_config.dispatch_batches = False
        self._objectives: dict[int, nn.Module] = {}
        if self.ce_weight < 1.0:
            collator.target.check_loss(loss)  # e.g. a samples-only cache: fkl only

    # -- data -------------------------------------------------------------------------------------

    def _get_collator_with_removed_columns(self, data_collator, description=None):
        return data_collator  # the teacher tensors are not arguments of the model's forward

    def get_train_dataloader(self):
        dataloader = super().get_train_dataloader()
        shard = getattr(dataloader, "dataset", None)
        if isinstance(getattr(shard, "dataset", None), CacheSequences):
            shard.num_processes, shard.process_index = 1, 0  # already split by rank: passthrough
        return dataloader

    # -- loss -------------------------------------------------------------------------------------

    def objective_for(self, student: nn.Module) -> nn.Module:
        """The ``DistillObjective`` of ``student`` (built once: resolving the head runs a probe)."""
        from kdcache.cache.extraction.heads import resolve_head
        from kdcache.trainer.config import CE_ONLY
        from kdcache.trainer.objective import DistillObjective
        from kdcache.trainer.targets import LossOptions

        key = id(student)
        if key not in self._objectives:
            ce_only = self.kd_loss == CE_ONLY
            device = next(student.parameters()).device
            probe = torch.arange(8, device=device).unsqueeze(0)
            was_training = student.training
            student.eval()  # the head check compares against the forward: no dropout
            chunked = resolve_head(student, probe) is not None
            student.train(was_training)
            self._objectives[key] = DistillObjective(
                student,
                None if ce_only else self.kd_collator.target,
                LossOptions(
                    kind="fkl" if ce_only else self.kd_loss,
                    mu=self.mu,
                    temperature=self.kd_collator.temperature,
                ),
                alpha=self.ce_weight,
                chunk_size=self.chunk_size,
                chunked=chunked,
            )
        return self._objectives[key]

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ):
        """kdcache's loss of one micro-batch (a scalar), averaged over its own positions."""
        from kdcache.trainer.data import IGNORE_INDEX

        student = self.accelerator.unwrap_model(model)
        objective = self.objective_for(student)
        num_distilled = float(inputs["distill_mask"].sum())
        num_labels = float((inputs["labels"] != IGNORE_INDEX).sum())
        # accelerate's mixed precision patches the student's forward, which the fused path
        # does not call (it runs the body and the head itself): autocast here, as kdcache train
        with self.accelerator.autocast():
            if model is student:
                loss = objective(inputs, num_distilled, num_labels)
            else:  # DDP and friends: through the wrapper's forward, which syncs the gradients
                with _forward_is(student, objective):
                    loss = model(inputs, num_distilled, num_labels)
        return (loss, {"loss": loss}) if return_outputs else loss

"""The teacher-target protocol: everything the trainer asks of a teacher, whatever its storage.

A cache stores its teacher in one storage mode (``kdcache.cache.format.modes.storage_mode``): top-k +
tail bucket, top-k + tail samples, samples only; online, the dense teacher itself runs in the
loop. The trainer knows the mode in exactly one place: the ``TeacherTarget`` built once per run
(``kdcache.trainer.targets.target_for_cache``). A target

* collates its own tensors from the cache records (``collate``) and picks the distilled rows of a
  batch (``select``), folding ids the student cannot emit out of the way, once per batch;
* says which loss kinds it trains with (``losses``) and refuses the others (``check_loss``);
* gives its loss per position (``loss``, differentiable: the reference and the autograd path) and,
  for the fused chunked head, the loss with its gradient w.r.t. the chunk's logits
  (``loss_and_grad``: closed form where ``closed_form(kind)``, else autograd per chunk);
* names its held-out measures by the estimator that makes them (``measures`` /
  ``evaluate_rows``): ``fkl_bucket`` is not ``fkl_unbiased``, and a mode that cannot estimate
  a measure does not report it (the evaluator shows "n/a").

The objective (``kdcache.trainer.objective``) has one path for every target: student body ->
chunked lm_head (``kdcache.trainer.chunked``) -> ``target.loss_and_grad`` per chunk, plus the
next-token CE mix, which no target sees. A new target (e.g. a cross-tokenizer one) is one new
module with a ``TeacherTarget`` subclass plus one line in the registry (``targets/__init__.py``).

Tensors: N = distilled rows of a batch, C = rows of one chunk, V = the student's vocabulary.
Teacher rows are a ``dict[str, Tensor]`` whose tensors all have N (or C) rows first, so one
generic ``chunk_rows`` slices them for any target.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from kdcache.cache.errors import ConfigError
from kdcache.cache.records import SequenceRecord

__all__ = ["LossOptions", "TeacherRows", "TeacherTarget", "chunk_rows"]

# The teacher side of N (or C) positions: every tensor has the rows first, e.g. "topk_ids" (N, k).
TeacherRows = dict[str, torch.Tensor]


def chunk_rows(rows: TeacherRows, start: int, end: int) -> TeacherRows:
    """Rows ``start:end`` of every tensor of ``rows`` (views, no copy)."""
    return {name: tensor[start:end] for name, tensor in rows.items()}


@dataclass(frozen=True)
class LossOptions:
    """The divergence settings of a run, validated once at construction (never per chunk)."""

    kind: str = "akl"  # one of kdcache.trainer.divergences.LOSS_KINDS
    mu: float = 0.5  # AKL head mass, in (0, 1)
    temperature: float = 1.0  # the student's logits are divided by it (the cache's temperature)
    skew: float = 0.1  # mixing weight of the skew KLs, in (0, 1)

    def __post_init__(self) -> None:
        from kdcache.trainer.divergences import check_loss_options

        check_loss_options(self.kind, self.mu, "none", self.temperature, self.skew)


class TeacherTarget(ABC):
    """One way of holding the teacher's distribution: collation, loss, gradient, measures.

    Subclasses set the class attributes and implement ``collate``, ``select`` and ``loss``;
    ``loss_and_grad`` defaults to autograd through ``loss`` on one chunk and is overridden by a
    closed form where one exists (then list the kinds in ``closed_form_losses``).
    """

    name: ClassVar[str]  # registry key: the storage mode ("topk_bucket", ...) or "dense"
    losses: ClassVar[tuple[str, ...]]  # loss kinds this target trains with
    closed_form_losses: ClassVar[tuple[str, ...]] = ()  # kinds whose loss_and_grad is closed form
    measures: ClassVar[tuple[str, ...]] = ()  # held-out measures evaluate_rows returns

    def __init__(self, manifest: Mapping[str, Any] | None = None) -> None:
        """``manifest``: the cache manifest the target was chosen from (None for online)."""
        self.manifest = dict(manifest or {})

    # -- what it supports ---------------------------------------------------------------------

    def check_loss(self, kind: str) -> None:
        """Raise ``ConfigError`` (one line, with the fix) when this target cannot train ``kind``."""
        if kind not in self.losses:
            raise ConfigError(
                f"--loss {kind} is not available with a {self.name} teacher; choose one of "
                f"{', '.join(self.losses)} (or ce){self.loss_hint()}"
            )

    def loss_hint(self) -> str:
        """Extra words for the refusal in ``check_loss`` (how to get the other losses)."""
        return ""

    def closed_form(self, kind: str) -> bool:
        """True when ``loss_and_grad`` has a closed form for ``kind`` (the fused fast path)."""
        return kind in self.closed_form_losses

    def fallback_reason(self, kind: str) -> str | None:
        """None on the closed-form path, else one line saying why ``kind`` uses autograd per chunk."""
        if self.closed_form(kind):
            return None
        return (
            f"--loss {kind} on a {self.name} teacher has no closed-form gradient: each chunk "
            "takes the autograd path (slower, same result)"
        )

    # -- data ---------------------------------------------------------------------------------

    @abstractmethod
    def collate(self, records: Sequence[SequenceRecord], length: int) -> dict[str, torch.Tensor]:
        """This target's teacher tensors of a batch, each (B, T, ...) with B = len(records).

        ``length`` = T, the padded length. Positions without a stored distribution hold values
        that ``select`` never picks (the common ``distill_mask`` says which positions count).
        """

    @abstractmethod
    def select(
        self, batch: Mapping[str, torch.Tensor], rows: torch.Tensor, vocab_size: int
    ) -> TeacherRows:
        """The teacher side of the N rows ``rows`` (flat indices into B * T) of ``batch``.

        ``batch`` holds the common tensors (``input_ids``, ``attention_mask`` (B, T) ...) and
        this target's ``collate`` output, on the training device. Teacher ids >= ``vocab_size``
        (a teacher padded to a larger vocabulary) are made absent here, once per batch, so the
        per-chunk math never checks ids (no host syncs per chunk).
        """

    def row_groups(self, rows: TeacherRows) -> torch.Tensor | None:
        """(N,) int64 group of each selected row (-1: none) whose rows the loss couples (e.g.
        a cross-tokenizer likelihood chunk): a fused head chunk never splits a group. None (the
        default): rows are independent."""
        return None

    # -- math ---------------------------------------------------------------------------------

    @abstractmethod
    def loss(self, logits: torch.Tensor, rows: TeacherRows, options: LossOptions) -> torch.Tensor:
        """(C,) divergence per row, differentiable w.r.t. ``logits`` (C, V) float32 raw logits.

        The reference for ``loss_and_grad`` and the loss of the evaluation and autograd paths.
        """

    def loss_and_grad(
        self,
        logits: torch.Tensor,
        rows: TeacherRows,
        weight: torch.Tensor,
        options: LossOptions,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(``weight * loss`` (C,), its sum's gradient w.r.t. ``logits`` (C, V) float32).

        ``weight`` (C,) float32 per-row weights (already normalized by the caller). ``logits``
        must not be modified. The default is autograd through ``loss`` on this one chunk.
        """
        with torch.enable_grad():
            leaf = logits.detach().requires_grad_(True)
            weighted = weight * self.loss(leaf, rows, options)  # (C,)
            (grad,) = torch.autograd.grad(weighted.sum(), leaf)
        return weighted.detach(), grad

    # -- held-out measures --------------------------------------------------------------------

    def evaluate_rows(
        self, logits: torch.Tensor, rows: TeacherRows, temperature: float
    ) -> dict[str, torch.Tensor]:
        """Per-row values (C,) of each of ``measures`` (no gradient), e.g. ``fkl_bucket``.

        A measure the target cannot estimate is absent from ``measures`` (reported as "n/a").
        """
        return {}

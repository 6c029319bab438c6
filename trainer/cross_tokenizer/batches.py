"""Student batches from a cache of another tokenizer: re-tokenized, aligned, mapped, padded.

``student_record`` turns one cached ``SequenceRecord`` (teacher ids) into a ``StudentRecord``
(student ids, the distilled positions and their teacher rows in student ids);
``collate_student_records`` pads them like ``kdcache.trainer.data.collate_records`` with two
differences: CE labels exist at *every* student position that has a next token (unaligned
positions get CE only), and the ULD inputs ride along. With ``distill_inside`` the positions
inside a teacher token get their rows from ``inside_rows`` (no ULD mass). With a chunk-likelihood
objective (``--xtok-loss alm``, ``alm+exact``) each student position also carries its chunk
(``likelihood_chunks``) and the teacher's log-likelihood of it. ``CrossTokenizerDataset`` is the
cache dataset (same shards, order, resume state) that yields such batches.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from kdcache.cache.errors import ConfigError
from kdcache.cache.records import SequenceRecord
from kdcache.trainer.cross_tokenizer.alignment import CrossTokenizer
from kdcache.trainer.cross_tokenizer.chunks import likelihood_chunks
from kdcache.trainer.cross_tokenizer.inside import inside_rows
from kdcache.trainer.cross_tokenizer.mapping import map_teacher_rows
from kdcache.trainer.data import IGNORE_INDEX, CacheDataset


@dataclass(frozen=True)
class StudentRecord:
    """One cached sequence in the student's tokens. S student tokens, A distilled positions."""

    sequence_id: int
    input_ids: np.ndarray  # (S,) int64 student ids
    positions: np.ndarray  # (A,) int64 distilled positions, increasing
    topk_ids: np.ndarray  # (A, k) int64 student ids (0 where unmatched)
    topk_logprobs: np.ndarray  # (A, k) float32, -inf where unmatched
    tail_mass: np.ndarray  # (A,) float32 bucket (tail + unmatched)
    unmatched_probs: np.ndarray  # (A, k) float32 sorted descending, 0-padded
    matched_mass: np.ndarray  # (A,) float32 teacher mass on exact-match ids (0 inside)
    token_bytes: np.ndarray  # (S,) int64 bytes of each student token
    inside: np.ndarray | None = None  # (A,) bool: the position is inside a teacher token
    inside_ce_only: int = 0  # inside positions left CE only (no stored or consistent row)
    alm_chunk: np.ndarray | None = None  # (S,) int64 chunk of each position's next token, -1
    alm_teacher_ll: np.ndarray | None = None  # (n,) float32 teacher log-likelihood per chunk

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])


def check_cross_tokenizer_cache(manifest: dict[str, Any]) -> None:
    """A cache without top-k (a sampled cache) has nothing to match exactly: refused."""
    if int(manifest.get("top_k", 0)) == 0:
        raise ConfigError(
            "--cross-tokenizer needs a cache with a top-k (this one stores only samples, k = 0); "
            "build with --top-k N"
        )


def student_record(record: SequenceRecord, cross: CrossTokenizer) -> StudentRecord:
    """Re-tokenize ``record`` for the student, align it and map its teacher rows (and, for a
    chunk-likelihood objective, cut it into chunks)."""
    aligned = cross.align(record.input_ids, record.positions)
    chunks = {}
    if "alm" in cross.xtok_loss:
        if record.observed_logprobs is None:
            raise ConfigError(missing_observed_message())
        found = likelihood_chunks(
            aligned.ends, aligned.reproduced, aligned.teacher_ends, record.positions,
            record.observed_logprobs,
        )  # fmt: skip
        chunks = {"alm_chunk": found.chunk,
                  "alm_teacher_ll": found.teacher_ll.astype(np.float32)}  # fmt: skip
    rows = aligned.teacher_rows
    mapped = map_teacher_rows(
        record.topk_ids[rows], record.topk_logprobs[rows], record.tail_mass[rows],
        cross.teacher_to_student, cross.exact_to_student,
    )  # fmt: skip
    fields = {
        "positions": aligned.positions,
        "topk_ids": mapped.topk_ids,
        "topk_logprobs": mapped.topk_logprobs,
        "tail_mass": mapped.tail_mass,
        "unmatched_probs": mapped.unmatched_probs,
        "matched_mass": mapped.matched_mass,
        "inside": np.zeros(len(aligned.positions), dtype=bool),
    }
    inside_ce_only = aligned.inside_unstored
    if len(aligned.inside_positions):
        enclosing = aligned.inside_rows
        inside = inside_rows(
            record.topk_ids[enclosing], record.topk_logprobs[enclosing],
            record.tail_mass[enclosing], aligned.inside_emitted, cross.teacher_pieces,
            cross.first_student_token,
        )  # fmt: skip
        keep = inside.has_target
        inside_ce_only += int((~keep).sum())
        count, width = int(keep.sum()), mapped.topk_ids.shape[1]
        extra = {
            "positions": aligned.inside_positions[keep],
            "topk_ids": inside.topk_ids[keep],
            "topk_logprobs": inside.topk_logprobs[keep],
            "tail_mass": inside.tail_mass[keep],
            "unmatched_probs": np.zeros((count, width), np.float32),
            "matched_mass": np.zeros(count, np.float32),
            "inside": np.ones(count, dtype=bool),
        }
        order = np.argsort(np.concatenate([fields["positions"], extra["positions"]]))
        fields = {name: np.concatenate([fields[name], extra[name]])[order] for name in fields}
    return StudentRecord(
        sequence_id=int(record.sequence_id),
        input_ids=aligned.input_ids,
        token_bytes=aligned.token_bytes,
        inside_ce_only=inside_ce_only,
        **chunks,
        **fields,
    )


def missing_observed_message() -> str:
    """Why a chunk-likelihood objective cannot train on a cache without the observed column."""
    return (
        "this cache has no observed-token log-probs (built before kdcache format 2, or with "
        "--no-observed-logprobs): rebuild it with `kdcache build` to use --xtok-loss alm or "
        "alm+exact, or train with --xtok-loss exact"
    )


def collate_student_records(
    records: Sequence[StudentRecord], pad_id: int = 0, xtok_loss: str = "exact"
) -> dict[str, torch.Tensor]:
    """Pad student records to one batch (right padding). B records, T longest, k top-k width.

    ``input_ids``, ``attention_mask``, ``labels`` (B, T) int64 (the next student token wherever
    there is one, else -100); ``distill_mask`` (B, T) bool (aligned positions);
    ``topk_ids`` (B, T, k) int64, ``topk_logprobs`` (B, T, k) float32 (-inf where absent),
    ``tail_mass`` (B, T) float32 (1 where absent), ``unmatched_probs`` (B, T, k) float32,
    ``matched_mass`` (B, T) float32, ``token_bytes`` (B, T) int64 (0 on padding),
    ``inside_mask`` (B, T) bool (distilled positions inside a teacher token),
    ``inside_ce_only`` (B,) int64 (inside positions left CE only), ``sequence_ids`` (B,).
    ``exact_mask`` (B, T) bool: positions with an exact-match row; ``alm_chunk`` (B, T) int64
    the batch-wide chunk of each position (-1: none), ``alm_teacher_ll`` (B, T) float32 the
    teacher's log-likelihood of that chunk, ``alm_size`` (B, T) float32 the student positions
    in it. ``distill_mask`` = what ``xtok_loss`` trains: exact rows, chunk positions or both.
    """
    if not records:
        raise ValueError("collate_student_records needs at least one record")
    batch, length = len(records), max(max(record.num_tokens for record in records), 1)
    top_k = int(records[0].topk_ids.shape[1])
    out = {
        "input_ids": np.full((batch, length), pad_id, dtype=np.int64),
        "attention_mask": np.zeros((batch, length), dtype=np.int64),
        "labels": np.full((batch, length), IGNORE_INDEX, dtype=np.int64),
        "topk_ids": np.zeros((batch, length, top_k), dtype=np.int64),
        "topk_logprobs": np.full((batch, length, top_k), -np.inf, dtype=np.float32),
        "tail_mass": np.ones((batch, length), dtype=np.float32),
        "unmatched_probs": np.zeros((batch, length, top_k), dtype=np.float32),
        "matched_mass": np.zeros((batch, length), dtype=np.float32),
        "distill_mask": np.zeros((batch, length), dtype=bool),
        "inside_mask": np.zeros((batch, length), dtype=bool),
        "token_bytes": np.zeros((batch, length), dtype=np.int64),
        "alm_chunk": np.full((batch, length), -1, dtype=np.int64),
        "alm_teacher_ll": np.zeros((batch, length), dtype=np.float32),
        "alm_size": np.zeros((batch, length), dtype=np.float32),
    }
    chunks_seen = 0
    for row, record in enumerate(records):
        size, positions = record.num_tokens, record.positions
        out["input_ids"][row, :size] = record.input_ids
        out["attention_mask"][row, :size] = 1
        out["labels"][row, : max(size - 1, 0)] = record.input_ids[1:]
        out["token_bytes"][row, :size] = record.token_bytes
        for name in ("topk_ids", "topk_logprobs", "tail_mass", "unmatched_probs", "matched_mass"):
            out[name][row, positions] = getattr(record, name)
        out["distill_mask"][row, positions] = True
        if record.inside is not None:
            out["inside_mask"][row, positions[record.inside]] = True
        if record.alm_chunk is not None and len(record.alm_teacher_ll):
            local = record.alm_chunk  # (S,)
            kept = local >= 0
            sizes = np.bincount(local[kept], minlength=len(record.alm_teacher_ll))
            out["alm_chunk"][row, :size] = np.where(kept, local + chunks_seen, -1)
            out["alm_teacher_ll"][row, :size] = np.where(
                kept, record.alm_teacher_ll[np.maximum(local, 0)], 0.0
            )
            out["alm_size"][row, :size] = np.where(kept, sizes[np.maximum(local, 0)], 0)
            chunks_seen += len(record.alm_teacher_ll)
    out["exact_mask"] = out["distill_mask"].copy()
    if xtok_loss == "alm":
        out["distill_mask"][:] = False
    if "alm" in xtok_loss:
        out["distill_mask"] |= out["alm_chunk"] >= 0
    tensors = {name: torch.from_numpy(value) for name, value in out.items()}
    tensors["inside_ce_only"] = torch.tensor([r.inside_ce_only for r in records], dtype=torch.int64)
    tensors["sequence_ids"] = torch.tensor([r.sequence_id for r in records], dtype=torch.int64)
    return tensors


class CrossTokenizerDataset(CacheDataset):
    """``CacheDataset`` whose batches are in the student's tokens (``collate_student_records``).

    The order, sharding and resume state are the cache dataset's (batches are cut by teacher
    records, then re-tokenized), so ``--resume`` is exact as for a same-tokenizer run.
    """

    def __init__(self, cache: Any, split: str, cross: CrossTokenizer, **options: Any) -> None:
        super().__init__(cache, split, **options)
        self.cross = cross

    def collate(self, group: list[SequenceRecord]) -> dict[str, torch.Tensor]:
        students = [student_record(record, self.cross) for record in group]
        return collate_student_records(students, self.pad_id, self.cross.xtok_loss)


class AlignmentStats:
    """Running counts of a cross-tokenizer run: aligned positions, exact-match teacher mass and
    the positions inside a teacher token (distilled or left CE only)."""

    def __init__(self) -> None:
        self.positions = self.aligned = self.inside = self.inside_ce_only = self.chunked = 0
        self.matched_mass = 0.0

    def update(self, batches: Sequence[dict[str, torch.Tensor]]) -> None:
        for batch in batches:
            inside = batch["inside_mask"]
            self.positions += int(batch["attention_mask"].sum())
            self.aligned += int((batch["exact_mask"] & ~inside).sum())
            self.chunked += int((batch["alm_chunk"] >= 0).sum())
            self.inside += int(inside.sum())
            self.inside_ce_only += int(batch["inside_ce_only"].sum())
            self.matched_mass += float(batch["matched_mass"].sum())

    def as_dict(self) -> dict[str, float]:
        """``aligned_fraction``: share of student positions at a common token boundary
        (distilled); ``matched_mass``: the mean teacher probability on exact-match tokens at
        those; ``inside_fraction``: share distilled inside a teacher token;
        ``inside_ce_only_fraction``: share inside a teacher token but left CE only;
        ``chunk_fraction``: share whose next token lies in a kept likelihood chunk (0 unless
        --xtok-loss uses chunks)."""
        positions = max(self.positions, 1)
        return {
            "aligned_fraction": self.aligned / positions,
            "matched_mass": self.matched_mass / max(self.aligned, 1),
            "inside_fraction": self.inside / positions,
            "inside_ce_only_fraction": self.inside_ce_only / positions,
            "chunk_fraction": self.chunked / positions,
        }

"""Targets for student positions inside a teacher token (``--distill-inside``).

A student position whose next token starts strictly inside teacher token ``t`` has no teacher
position of its own: the teacher predicted ``t`` as a whole at the enclosing position ``j``.
Given that the student has already emitted the first bytes ``e`` of ``t`` (the bytes since the
teacher boundary), the teacher's distribution at ``j`` conditioned on "the next token starts
with ``e``" is what it says about the student's next token:

    C   = { i in S : bytes(i) starts with e, len(bytes(i)) > len(e), i not special,
                     first(bytes(i)[len(e):]) != none }
    P_C = sum_{i in C} p_i
    p'_s = (1 - p_tail) * sum_{i in C, first(bytes(i)[len(e):]) = s} p_i / P_C
    bucket' = p_tail

``first`` is the prefix rule (``kdcache.trainer.cross_tokenizer.prefix``): the remaining string
of each consistent teacher token is mapped to the student's next token. Which tail tokens are
consistent is unknown; assuming the tail is consistent in the same proportion as the top-k
(consistent tail mass p_tail * P_C / (1 - p_tail)), the conditional distribution keeps the
bucket p_tail and the consistent top-k shares the rest in proportion. (A bucket of 0 would make
the reverse KL infinite wherever the student has mass outside C.) A position where no cached
teacher token is consistent (or none maps) stays CE only and is counted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from kdcache.trainer.cross_tokenizer.mapping import merge_duplicate_ids
from kdcache.trainer.cross_tokenizer.prefix import FirstStudentToken
from kdcache.trainer.cross_tokenizer.vocabulary import VocabularyBytes


@dataclass(frozen=True)
class InsideRows:
    """I inside positions' targets in student ids.

    ``topk_ids`` (I, k) int64 distinct student ids, most probable first (0 where absent),
    ``topk_logprobs`` (I, k) float32 (-inf where absent), ``tail_mass`` (I,) float32 the
    bucket (the enclosing row's tail), ``consistent_mass`` (I,)
    float32 the teacher mass on the consistent, mapped tokens before renormalising (0: no
    target, the position stays CE only), ``has_target`` (I,) bool.
    """

    topk_ids: np.ndarray
    topk_logprobs: np.ndarray
    tail_mass: np.ndarray
    consistent_mass: np.ndarray
    has_target: np.ndarray


class TeacherPieces:
    """The teacher's token bytes as one padded matrix, for a vectorised prefix test.

    ``matrix`` (V, L) uint8 (L the longest token, 0-padded), ``lengths`` (V,) int64 (0 for a
    special token, so that it is never consistent), ``pieces`` the bytes themselves.
    """

    def __init__(self, teacher: VocabularyBytes) -> None:
        self.pieces = teacher.pieces
        self.size = teacher.size
        lengths = np.array([len(piece) for piece in teacher.pieces], dtype=np.int64)
        self.lengths = np.where(teacher.special, 0, lengths)
        self.matrix = np.zeros((teacher.size, max(int(lengths.max(initial=0)), 1)), np.uint8)
        for token_id, piece in enumerate(teacher.pieces):
            if not teacher.special[token_id]:
                self.matrix[token_id, : len(piece)] = np.frombuffer(piece, dtype=np.uint8)


def _consistent(ids: np.ndarray, present: np.ndarray, emitted: Sequence[bytes],
                pieces: TeacherPieces) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """(I, k) bool: the cached token starts with ``emitted`` and is longer; (I,) their sizes."""
    width = pieces.matrix.shape[1]
    sizes = np.array([len(prefix) for prefix in emitted], dtype=np.int64)  # (I,)
    prefix = np.zeros((len(emitted), width), dtype=np.uint8)
    for row, data in enumerate(emitted):
        prefix[row, : min(len(data), width)] = np.frombuffer(data[:width], dtype=np.uint8)
    safe = np.where(present, ids, 0)
    candidates = pieces.matrix[safe]  # (I, k, L)
    within = np.arange(width)[None, None, :] < sizes[:, None, None]  # (I, 1, L)
    same = ((candidates == prefix[:, None, :]) | ~within).all(-1)  # (I, k)
    longer = pieces.lengths[safe] > sizes[:, None]
    return present & same & longer, sizes


def inside_rows(
    topk_ids: np.ndarray,
    topk_logprobs: np.ndarray,
    tail_mass: np.ndarray,
    emitted: Sequence[bytes],
    teacher: TeacherPieces,
    first: FirstStudentToken,
) -> InsideRows:
    """The module docstring's target at I inside positions.

    ``topk_ids`` (I, k) teacher ids, ``topk_logprobs`` (I, k) and ``tail_mass`` (I,) of the
    enclosing teacher positions; ``emitted`` (I,) the bytes the student has emitted of the
    enclosing token; ``teacher``: ``TeacherPieces`` of the teacher vocabulary.
    """
    ids = np.asarray(topk_ids, dtype=np.int64)
    logprobs = np.asarray(topk_logprobs, dtype=np.float32)
    count, width = ids.shape
    present = np.isfinite(logprobs) & (ids < teacher.size) & (ids >= 0)
    consistent, sizes = _consistent(ids, present, emitted, teacher)
    rows, columns = np.nonzero(consistent)
    student_ids = np.full((count, width), -1, dtype=np.int64)
    if len(rows):
        pieces = teacher.pieces
        remainders = [
            pieces[ids[r, c]][sizes[r] :]
            for r, c in zip(rows.tolist(), columns.tolist(), strict=True)
        ]
        student_ids[rows, columns] = first.many(remainders)
    probs = np.where(student_ids >= 0, np.exp(logprobs.astype(np.float64)), 0.0)  # (I, k)
    mass = probs.sum(-1)  # (I,)
    merged_ids, merged_probs = merge_duplicate_ids(student_ids, probs)
    has_target = mass > 0
    tail = np.clip(np.asarray(tail_mass, dtype=np.float64), 0.0, 1.0)  # (I,)
    normalised = merged_probs * ((1.0 - tail) / np.where(has_target, mass, 1.0))[:, None]
    with np.errstate(divide="ignore"):
        merged_logprobs = np.where(normalised > 0, np.log(normalised), -np.inf)
    return InsideRows(
        topk_ids=merged_ids,
        topk_logprobs=merged_logprobs.astype(np.float32),
        tail_mass=tail.astype(np.float32),
        consistent_mass=mass.astype(np.float32),
        has_target=has_target,
    )

"""Carry the teacher's sparse distribution into the student's vocabulary.

At one aligned position the cache holds the teacher's top-k ids S (teacher vocabulary), their
probabilities p_S and the tail mass p_tail. With a map m (teacher id -> student id, or none):
the exact-match map (``--vocab-map exact``: the student id with the same bytes) or that map
completed by the prefix rule (``--vocab-map prefix``: else the first student token of the
teacher token's string, ``kdcache.trainer.cross_tokenizer.prefix``):

* a mapped id i gives its probability p_i to the student id m(i); several teacher ids that map
  to one student id add up: p'_s = sum_{i in S, m(i) = s} p_i (a prefix map is many-to-one);
* the mass of unmapped ids joins the tail: bucket = p_tail + sum_{i in S, m(i) = none} p_i;
* the unmapped probabilities, sorted descending, are kept for the ULD term
  (``kdcache.trainer.cross_tokenizer.uld``). They are the exact top of the teacher's
  distribution restricted to its unmapped tokens, because S is the top of the whole.

The result is an ordinary top-k + bucket row in student ids: the chosen divergence (FKL / RKL /
AKL) is computed on it exactly as for a same-tokenizer cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class MappedRows:
    """N teacher rows in student ids.

    ``topk_ids`` (N, k) int64 distinct student ids per row, most probable first (0 where
    absent), ``topk_logprobs`` (N, k) float32 (-inf where absent), ``tail_mass`` (N,) float32
    bucket mass (tail + unmapped), ``unmatched_probs`` (N, k) float32 the unmapped teacher
    probabilities sorted descending, 0-padded, ``matched_mass`` (N,) float32 the teacher mass
    on ids with an *exact* match (whatever the map).
    """

    topk_ids: np.ndarray
    topk_logprobs: np.ndarray
    tail_mass: np.ndarray
    unmatched_probs: np.ndarray
    matched_mass: np.ndarray


def merge_duplicate_ids(ids: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Add up the probabilities of equal ids per row: ((N, k) ids, (N, k) float64 probs).

    ``ids`` (N, k) int64, ``probs`` (N, k) (0 = absent, whatever the id). Returns distinct ids
    per row sorted by probability descending, 0-padded, with their summed probabilities (0 on
    the padding).
    """
    rows, width = ids.shape
    keyed = np.where(probs > 0, ids, -1)  # absent entries form their own group, dropped below
    order = np.argsort(keyed, axis=-1, kind="stable")  # (N, k)
    sorted_ids = np.take_along_axis(keyed, order, -1)
    sorted_probs = np.take_along_axis(np.asarray(probs, np.float64), order, -1)
    starts = np.ones((rows, width), dtype=bool)
    starts[:, 1:] = sorted_ids[:, 1:] != sorted_ids[:, :-1]
    group = np.cumsum(starts, axis=-1) - 1  # (N, k) group index within the row
    summed = np.zeros((rows, width), dtype=np.float64)
    np.add.at(summed, (np.arange(rows)[:, None], group), sorted_probs)
    group_ids = np.zeros((rows, width), dtype=np.int64)
    np.put_along_axis(group_ids, group, sorted_ids, -1)
    summed = np.where(group_ids >= 0, summed, 0.0)
    rank = np.argsort(-summed, axis=-1, kind="stable")
    merged_probs = np.take_along_axis(summed, rank, -1)
    merged_ids = np.where(merged_probs > 0, np.take_along_axis(group_ids, rank, -1), 0)
    return merged_ids, merged_probs


def map_teacher_rows(
    topk_ids: np.ndarray,
    topk_logprobs: np.ndarray,
    tail_mass: np.ndarray,
    teacher_to_student: np.ndarray,
    exact_to_student: np.ndarray | None = None,
) -> MappedRows:
    """Map (N, k) teacher ids / log-probs and (N,) tail mass through ``teacher_to_student``.

    ``teacher_to_student`` (V_teacher,) int64, -1 for none: the exact-match or the prefix map;
    ``exact_to_student`` (V_teacher,) the exact-match map, for ``matched_mass`` only (None:
    ``teacher_to_student``). Absent entries (log-prob -inf) stay absent; teacher ids beyond the
    map (a padded teacher vocabulary) count as unmapped.
    """
    ids = np.asarray(topk_ids, dtype=np.int64)  # (N, k)
    logprobs = np.asarray(topk_logprobs, dtype=np.float32)
    exact = teacher_to_student if exact_to_student is None else exact_to_student
    inside = ids < len(teacher_to_student)
    safe = np.where(inside, ids, 0)
    student_ids = np.where(inside, teacher_to_student[safe], -1)  # (N, k)
    present = np.isfinite(logprobs)
    mapped = present & (student_ids >= 0)
    probs = np.where(present, np.exp(logprobs.astype(np.float64)), 0.0)  # (N, k)
    unmapped = np.where(present & ~mapped, probs, 0.0)
    bucket = np.asarray(tail_mass, dtype=np.float64) + unmapped.sum(-1)
    exact_match = present & inside & (exact[safe] >= 0)
    merged_ids, merged_probs = merge_duplicate_ids(student_ids, np.where(mapped, probs, 0.0))
    with np.errstate(divide="ignore"):
        merged_logprobs = np.where(merged_probs > 0, np.log(merged_probs), -np.inf)
    return MappedRows(
        topk_ids=merged_ids,
        topk_logprobs=merged_logprobs.astype(np.float32),
        tail_mass=bucket.astype(np.float32),
        unmatched_probs=-np.sort(-unmapped, axis=-1).astype(np.float32),
        matched_mass=np.where(exact_match, probs, 0.0).sum(-1).astype(np.float32),
    )

"""Carry the teacher's sparse distribution into the student's vocabulary (exact matches).

At one aligned position the cache holds the teacher's top-k ids S (teacher vocabulary), their
probabilities p_S and the tail mass p_tail. With the exact-match map m (teacher id -> student id
with the same bytes, or none):

* a matched id i becomes the student id m(i) with the same probability p_i;
* the mass of unmatched ids joins the tail: bucket = p_tail + sum_{i in S, m(i) = none} p_i;
* the unmatched probabilities, sorted descending, are kept for the ULD term
  (``kdcache.trainer.cross_tokenizer.uld``). They are the exact top of the teacher's
  distribution restricted to its unmatched tokens, because S is the top of the whole.

The result is an ordinary top-k + bucket row in student ids: the chosen divergence (FKL / RKL /
AKL) is computed on it exactly as for a same-tokenizer cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class MappedRows:
    """N teacher rows in student ids.

    ``topk_ids`` (N, k) int64 student ids (0 where unmatched), ``topk_logprobs`` (N, k) float32
    (-inf where unmatched), ``tail_mass`` (N,) float32 bucket mass (tail + unmatched),
    ``unmatched_probs`` (N, k) float32 the unmatched teacher probabilities sorted descending,
    0-padded, ``matched_mass`` (N,) float32 the teacher mass on matched ids.
    """

    topk_ids: np.ndarray
    topk_logprobs: np.ndarray
    tail_mass: np.ndarray
    unmatched_probs: np.ndarray
    matched_mass: np.ndarray


def map_teacher_rows(
    topk_ids: np.ndarray,
    topk_logprobs: np.ndarray,
    tail_mass: np.ndarray,
    teacher_to_student: np.ndarray,
) -> MappedRows:
    """Map (N, k) teacher ids / log-probs and (N,) tail mass through ``teacher_to_student``.

    ``teacher_to_student`` (V_teacher,) int64, -1 for no match. Absent entries (log-prob -inf)
    stay absent; teacher ids beyond the map (a padded teacher vocabulary) count as unmatched.
    """
    ids = np.asarray(topk_ids, dtype=np.int64)  # (N, k)
    logprobs = np.asarray(topk_logprobs, dtype=np.float32)
    inside = ids < len(teacher_to_student)
    student_ids = np.where(inside, teacher_to_student[np.where(inside, ids, 0)], -1)  # (N, k)
    present = np.isfinite(logprobs)
    matched = present & (student_ids >= 0)
    probs = np.where(present, np.exp(logprobs.astype(np.float64)), 0.0)  # (N, k)
    unmatched = np.where(present & ~matched, probs, 0.0)
    bucket = np.asarray(tail_mass, dtype=np.float64) + unmatched.sum(-1)
    return MappedRows(
        topk_ids=np.where(matched, student_ids, 0),
        topk_logprobs=np.where(matched, logprobs, -np.inf).astype(np.float32),
        tail_mass=bucket.astype(np.float32),
        unmatched_probs=-np.sort(-unmatched, axis=-1).astype(np.float32),
        matched_mass=np.where(matched, probs, 0.0).sum(-1).astype(np.float32),
    )

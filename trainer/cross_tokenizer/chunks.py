"""Chunks of text that start and end at a token boundary of both tokenizations (ALM's chunks).

Both token sequences lie on one offset axis (``kdcache.trainer.cross_tokenizer.alignment``):
student token i ends at ``ends[i]``, teacher token j at ``teacher_ends[j]``. The *common
boundaries* are the offsets that end a token on both sides. Chunk c is the text between two
consecutive common boundaries ``(b_c, b_{c+1}]``: the teacher tokens and the student tokens
that end inside it tile exactly the same bytes, so both sides give a likelihood of the same text:

    teacher:  ll_T(c) = sum_{teacher tokens j in c} log p(t_j | t_<j)   (the cache's observed
              log-probs, row of teacher position j - 1)
    student:  ll_S(c) = sum_{student tokens i in c} log q(s_i | s_<i)   (student position i - 1)

A chunk is kept when every one of its tokens has a predicting position on both sides (not the
first token of the block), every teacher predicting position is stored with a finite observed
log-prob, and every student token lies in a segment the student tokenizer reproduced byte for
byte. Text before the first or after the last common boundary belongs to no chunk.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["LikelihoodChunks", "likelihood_chunks"]


@dataclass(frozen=True)
class LikelihoodChunks:
    """The kept chunks of one sequence.

    ``chunk`` (S,) int64: for each student *position* p (which predicts student token p + 1)
    the index of its token's chunk, -1 when that token is in no kept chunk; ``teacher_ll``
    (n,) float64 the teacher's log-likelihood of each kept chunk, in chunk order.
    """

    chunk: np.ndarray
    teacher_ll: np.ndarray


def _chunk_of(ends: np.ndarray, common: np.ndarray) -> np.ndarray:
    """(len(ends),) index c of the chunk ``(common[c], common[c + 1]]`` each token ends in; -1
    before the first common boundary, len(common) - 1 after the last (both: no chunk)."""
    return np.searchsorted(common, ends, side="left") - 1


def likelihood_chunks(
    ends: np.ndarray,
    reproduced: np.ndarray,
    teacher_ends: np.ndarray,
    teacher_positions: np.ndarray,
    observed_logprobs: np.ndarray,
) -> LikelihoodChunks:
    """The kept chunks of one aligned sequence (module docstring).

    Args:
        ends: (S,) end offset of each student token; reproduced: (S,) bool, the token lies in a
            segment the student tokenizer reproduced byte for byte.
        teacher_ends: (T,) end offset of each teacher token; teacher_positions: (M,) the
            stored teacher positions, increasing; observed_logprobs: (M,) the cache's
            log p(next teacher token) at those rows (NaN: none).
    """
    ends = np.asarray(ends, np.int64)
    teacher_ends = np.asarray(teacher_ends, np.int64)
    common = np.intersect1d(ends, teacher_ends)  # sorted common boundaries
    count = max(len(common) - 1, 0)
    empty = LikelihoodChunks(np.full(len(ends), -1, np.int64), np.zeros(0, np.float64))
    if count == 0:
        return empty
    ok = np.ones(count + 1, dtype=bool)  # index ``count``: the sink of tokens in no chunk
    # student side: token i (i >= 1) is predicted by position i - 1
    s_chunk = _chunk_of(ends, common)
    s_chunk = np.where((s_chunk >= 0) & (s_chunk < count), s_chunk, count)
    bad = np.zeros(len(ends), dtype=bool)
    bad[0] = True  # the block's first token has no predicting position
    bad |= ~np.asarray(reproduced, dtype=bool)
    ok[s_chunk[bad]] = False
    # teacher side: token j (j >= 1) is predicted by position j - 1, whose row must be stored
    t_chunk = _chunk_of(teacher_ends, common)
    t_chunk = np.where((t_chunk >= 0) & (t_chunk < count), t_chunk, count)
    stored = np.asarray(teacher_positions, np.int64)
    predicting = np.arange(len(teacher_ends)) - 1  # (T,) the position predicting token j
    logp = np.full(len(teacher_ends), np.nan)  # (T,) log p of token j, NaN: unknown
    if len(stored):
        rows = np.minimum(np.searchsorted(stored, predicting), len(stored) - 1)
        has_row = (predicting >= 0) & (stored[rows] == predicting)
        logp = np.where(has_row, np.asarray(observed_logprobs, np.float64)[rows], np.nan)
    ok[t_chunk[~np.isfinite(logp)]] = False
    ok[count] = False
    teacher_ll = np.bincount(t_chunk, weights=np.where(np.isfinite(logp), logp, 0.0),
                             minlength=count + 1)  # fmt: skip
    kept = np.flatnonzero(ok)
    renumber = np.full(count + 1, -1, np.int64)
    renumber[kept] = np.arange(len(kept))
    chunk = np.full(len(ends), -1, np.int64)
    chunk[:-1] = renumber[s_chunk[1:]]  # position p predicts token p + 1
    return LikelihoodChunks(chunk, teacher_ll[kept])

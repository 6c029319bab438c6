"""One cached sequence as the reader returns it (numpy arrays, no torch)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class SequenceRecord:
    """The teacher's sparse distributions over one sequence.

    Row ``i`` of the top-k arrays is the teacher's distribution over the token that follows
    position ``positions[i]`` (exactly ``teacher(input_ids).logits[0, positions[i]]`` at the cache
    temperature). For plain text every position is stored: ``positions == arange(T)`` and the
    top-k arrays have ``T`` rows. For chat data only the positions that predict assistant tokens
    are stored (``M < T`` rows); ``distill_mask`` marks them in sequence coordinates.
    """

    sequence_id: int  # stable id in the build's record order (unique within a split)
    input_ids: np.ndarray  # (T,) int32
    topk_ids: np.ndarray  # (M, k) int32, most probable first (k = 0: a sampled cache)
    topk_logprobs: np.ndarray  # (M, k) float32, log p_teacher, descending
    tail_mass: np.ndarray  # (M,) float32, 1 - sum(exp(topk_logprobs)), >= 0
    positions: np.ndarray  # (M,) int32, strictly increasing positions in [0, T)
    # topk+tail mode only (None otherwise): s ids per row drawn with replacement from the
    # teacher's tail p_j / p_tail (j outside the top-k; the whole distribution when k = 0), and
    # the teacher's log p_j of them
    tail_ids: np.ndarray | None = None  # (M, s) int32; id 0 with log-prob -inf = absent
    tail_logprobs: np.ndarray | None = None  # (M, s) float32, full-distribution log p_j
    # caches with the ``observed`` column (format 2, the build default; None otherwise): the
    # teacher's log p of the token that actually follows each stored position, at the cache
    # temperature; NaN where the next token is not in the sequence (the last position)
    observed_logprobs: np.ndarray | None = None  # (M,) float32

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_positions(self) -> int:
        return int(self.positions.shape[0])

    @property
    def distill_mask(self) -> np.ndarray:
        """(T,) bool: True where the teacher's distribution is stored."""
        mask = np.zeros(self.num_tokens, dtype=bool)
        mask[self.positions] = True
        return mask

"""Exact top-k over a large last dimension on the CPU, through group maxima.

``torch.topk`` on the CPU copies every row into a vector of (value, index) pairs and runs a
partial sort over it: ~35 us per row of 16,384 float32 logits at k = 64 on one thread, the
largest single cost of the build's extraction. ``fast_topk`` finds the same entries while
touching most values only once, in one vectorized pass:

1. The row of V values is seen as G = V // B interleaved groups of B values (group j holds
   columns j, j + G, j + 2G, ...; strided, so that the group maxima are B - 1 elementwise
   maxima of contiguous (G,) slices, the fastest reduction there is). The (N, G) group maxima.
2. The k groups with the largest maxima: every one of the row's top-k values lies in one of them
   or ties the k-th largest group maximum ``t`` (there are k values >= t, one per chosen group,
   and a value outside the chosen groups is <= its group's maximum <= t).
3. ``torch.topk`` over the gathered k * B candidates (plus the V - G * B trailing columns when
   V is not a multiple of B), mapped back to column ids.

Ties. Where equal values compete for the last places, or sit inside the top-k, PyTorch does not
specify which ids ``torch.topk`` returns or in what order; on the CPU it is a fixed function of
the row and k (the order its partial sort leaves), not "lowest id first". ``fast_topk`` returns
**exactly torch.topk's values and ids, ties included**: a row whose answer is not unique (the
(k+1)-th largest group maximum equals the k-th, so the chosen groups were one arbitrary choice;
the (k+1)-th candidate equals the k-th; or two of the k values are equal) is recomputed with
``torch.topk`` on that row alone. Such rows are rare in float32 logits (2 of 48,909 positions of
the bench teacher at k = 24; every row once -inf masks reach into the top k + 1), and cost one
``torch.topk`` each on top of the fast pass. Rows holding NaN follow ``torch.topk`` (NaN
largest), as does everything below ``MIN_FAST_VALUES`` values per row, CUDA and other devices,
and k too large for the groups to save work. This is what keeps a cache's shards byte for byte
the same as with ``torch.topk``.

Measured on one CPU thread, process CPU time per row (``bench/bench_topk.py``, load ~3): V = 16,384,
k = 64: 42 -> 34 us; k = 24: 29 -> 21 us; V = 131,072, k = 64: 169 -> 104 us, k = 24: 134 -> 73 us.
"""

from __future__ import annotations

import torch

__all__ = ["MIN_FAST_VALUES", "fast_topk", "group_size"]

# Below this many values per row the gathers cost about what they save (measured, one thread:
# at 8,192 values fast / torch.topk is 0.64 at k 8, 1.06 at k 24, 0.86 at k 64; mixed at 4,096).
MIN_FAST_VALUES = 8192


def group_size(vocab_size: int, top_k: int) -> int:
    """Values per group B for a row of ``vocab_size`` values: 8 for small k at 16k, else 16.

    Measured on one thread (``bench/bench_topk.py``): at V = 16,384, B = 8 is best for k <= 32,
    B = 16 above; from V = 32k on, B = 16 for both k = 24 and k = 64.
    """
    return 8 if top_k <= 32 and vocab_size < 24_576 else 16


def _fast_path(values: torch.Tensor, top_k: int) -> bool:
    vocab_size = values.shape[-1]
    return (
        values.device.type == "cpu"
        and values.is_floating_point()
        and vocab_size >= MIN_FAST_VALUES
        and top_k > 0
        and 4 * top_k * group_size(vocab_size, top_k) <= vocab_size
        and values.numel() > 0
    )


def fast_topk(values: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.topk(values, top_k, dim=-1, largest=True, sorted=True)``, exactly, faster on the CPU.

    Args:
        values: (..., V) floating point (float32, float16, bfloat16 ...), any device.
        top_k: 0 <= top_k <= V.

    Returns:
        ``(top_values (..., k) in values' dtype, ids (..., k) int64)``: what ``torch.topk``
        returns, ids of equal values included (recomputed by it where a tie competes).
    """
    if not 0 <= top_k <= values.shape[-1]:
        raise ValueError(f"top_k must be in [0, {values.shape[-1]}], got {top_k}")
    rows = values.reshape(-1, values.shape[-1])  # (N, V)
    if _fast_path(rows, top_k):
        top_values, ids = _grouped_topk(rows.contiguous(), top_k)
    else:
        top_values, ids = torch.topk(rows, top_k, dim=-1, largest=True, sorted=True)
    shape = (*values.shape[:-1], top_k)
    return top_values.reshape(shape), ids.reshape(shape)


def _grouped_topk(rows: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The fast path of ``fast_topk`` on contiguous (N, V) CPU rows."""
    count, vocab_size = rows.shape
    per_group = group_size(vocab_size, top_k)
    groups = vocab_size // per_group  # G
    body = rows[:, : groups * per_group].view(count, per_group, groups)  # (N, B, G) strided groups
    group_max = body.amax(1)  # (N, G); NaN propagates
    # one entry more than needed at both levels: a (k+1)-th equal to the k-th is a tie that the
    # selection broke arbitrarily (G > k always holds on the fast path)
    chosen_max, chosen = torch.topk(group_max, top_k + 1, dim=-1, sorted=True)  # (N, k+1)
    if bool(chosen_max[:, 0].isnan().any()):  # NaN, largest for torch.topk: its semantics
        return torch.topk(rows, top_k, dim=-1, largest=True, sorted=True)
    suspect = chosen_max[:, top_k] == chosen_max[:, top_k - 1]  # (N,)
    chosen, _ = chosen[:, :top_k].sort(-1)  # ascending group ids: candidates in column order
    candidates = body.gather(2, chosen[:, None, :].expand(-1, per_group, -1))  # (N, B, k)
    candidates = candidates.view(count, per_group * top_k)  # (N, B k); flat c = member * k + slot
    trailing = vocab_size - groups * per_group  # columns past the last whole group: all kept
    if trailing:
        candidates = torch.cat([candidates, rows[:, groups * per_group :]], dim=1)
    top_values, where = torch.topk(candidates, top_k + 1, dim=-1, sorted=True)  # (N, k+1)
    suspect |= top_values[:, top_k] == top_values[:, top_k - 1]
    top_values, where = top_values[:, :top_k].contiguous(), where[:, :top_k]  # (N, k)
    suspect |= (top_values[:, 1:] == top_values[:, :-1]).any(-1)  # equal values inside
    member, slot = where // top_k, where % top_k  # (N, k) each
    ids = member * groups + chosen.gather(1, slot)  # (N, k) column ids
    if trailing:
        past = where - per_group * top_k  # (N, k) >= 0 for a trailing column
        ids = torch.where(past >= 0, groups * per_group + past, ids)
    _fix_ties(rows, top_values, ids, suspect)
    return top_values, ids


def _fix_ties(
    rows: torch.Tensor, top_values: torch.Tensor, ids: torch.Tensor, suspect: torch.Tensor
) -> None:
    """Recompute the ``suspect`` (N,) rows of (N, k) ``top_values`` / ``ids`` with torch.topk."""
    if not bool(suspect.any()):
        return
    which = suspect.nonzero().squeeze(-1)  # (R,)
    exact_values, exact_ids = torch.topk(rows[which], top_values.shape[-1], dim=-1, sorted=True)
    top_values[which] = exact_values
    ids[which] = exact_ids

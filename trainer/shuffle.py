"""The record order of one data partition in one epoch: a two-level, seeded shuffle.

What exactly is shuffled (``kdcache.trainer.data`` builds the plans):

1. the split's shards are permuted with ``rng(seed, epoch)`` (every shard equally likely at every
   place) and dealt to the ``partitions`` in turn (partition ``p`` gets places ``p, p + P, ...``);
2. a partition's shards are cut into *windows* of ``W`` consecutive shards (``--shuffle-window``)
   and the sequences of each window are permuted uniformly with ``rng(seed, epoch, p, window)``:
   any sequence of the window is equally likely at any place of the window.

So a batch draws its sequences from ``W`` random shards (a global step from ``partitions x W``
shards): a cache built from data sorted by source or date gives batches whose source mix is that
of ``W`` (``partitions x W``) shards drawn at random from the split, not of one shard. With fewer
shards than partitions every partition reads the same windows and keeps every ``P``-th place.

Everything is arithmetic on the manifest's per-shard sequence counts: where a partition stands
after ``n`` sequences, which shards it still needs, and in which order, are known without reading
a shard. ``records_from`` therefore resumes at any place by opening only the shards that still
hold a sequence the partition has not handed out. Memory: the decoded shards of one window
(each released after its last sequence of the window is handed out).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

from kdcache.cache.errors import CacheError

DEFAULT_SHUFFLE_WINDOW = 4  # shards whose sequences are shuffled together (see docs/TRAINING.md)


@dataclass(frozen=True)
class PartitionPlan:
    """One partition's sequences in one epoch, before reading anything.

    ``shards``: the shards it reads from, in window order; ``counts``: their sequence counts;
    the partition takes the places ``offset, offset + stride, ...`` of the concatenated windows
    (stride 1: all of them); ``window``: shards per window; ``key``: the windows' rng key
    (None: no shuffle, stored order).
    """

    shards: Sequence[Any]
    counts: Sequence[int]
    stride: int
    offset: int
    window: int
    key: tuple[int, ...] | None

    @cached_property
    def window_bounds(self) -> list[tuple[int, int, int]]:
        """``(first shard, end shard, first global place)`` of each window."""
        bounds, place = [], 0
        for first in range(0, len(self.shards), self.window):
            end = min(first + self.window, len(self.shards))
            bounds.append((first, end, place))
            place += sum(self.counts[first:end])
        return bounds

    def num_sequences(self) -> int:
        """Sequences this partition hands out per epoch."""
        return len(range(self.offset, sum(self.counts), self.stride))

    def window_places(self, number: int, start: int) -> tuple[np.ndarray, np.ndarray] | None:
        """(shard index into ``shards``, record index in its shard) of the partition's places
        ``>= start`` (its own numbering) in window ``number``; None when none is left there."""
        first, end, place = self.window_bounds[number]
        size = sum(self.counts[first:end])
        begin = max(self.offset + start * self.stride, place)  # the first global place wanted
        begin += (self.offset - begin) % self.stride  # ... that is this partition's
        if begin >= place + size:
            return None
        local = np.arange(begin - place, size, self.stride)
        if self.key is not None:
            local = np.random.default_rng([*self.key, number]).permutation(size)[local]
        ends = np.cumsum(self.counts[first:end])
        shard = np.searchsorted(ends, local, side="right")
        record = local - (ends[shard] - np.asarray(self.counts[first:end])[shard])
        return shard + first, record


def shards_needed(plan: PartitionPlan, start: int) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """The windows a partition still reads from place ``start``: ``(window, shards, records)``."""
    needed = []
    for number in range(len(plan.window_bounds)):
        places = plan.window_places(number, start)
        if places is not None:
            needed.append((number, *places))
    return needed


def records_from(
    plan: PartitionPlan,
    start: int,
    read_shards: Callable[[list[Any]], Iterator[Iterator[Any]]],
) -> Iterator[Any]:
    """The partition's records from its place ``start`` on (``start`` = sequences handed out).

    ``read_shards(infos)`` yields one record iterator per shard, in that order (a remote cache
    downloads ahead). Only shards holding a wanted record are opened, each once per window, in
    the order of their first wanted record; a decoded shard is dropped after its last one.
    """
    windows = shards_needed(plan, start)
    opening_order = []
    for _, shards, _ in windows:
        _, first_seen = np.unique(shards, return_index=True)
        opening_order.extend(int(shards[index]) for index in sorted(first_seen))
    opened = read_shards([plan.shards[index] for index in opening_order])
    for _, shards, records in windows:
        last_use = {int(shard): place for place, shard in enumerate(shards.tolist())}
        decoded: dict[int, list[Any]] = {}
        for place, (shard, record) in enumerate(
            zip(shards.tolist(), records.tolist(), strict=True)
        ):
            if shard not in decoded:
                decoded[shard] = _decode(next(opened), plan, shard)
            yield decoded[shard][record]
            decoded[shard][record] = None  # handed out: its memory can go
            if last_use[shard] == place:
                del decoded[shard]


def _decode(records: Iterator[Any], plan: PartitionPlan, shard: int) -> list[Any]:
    decoded = list(records)
    if len(decoded) != plan.counts[shard]:
        name = getattr(plan.shards[shard], "name", shard)
        raise CacheError(
            f"shard {name} holds {len(decoded)} sequences, the manifest says "
            f"{plan.counts[shard]}: the cache is damaged; run `kdcache verify` on it"
        )
    return decoded


def buffered_records(
    shards: Iterator[Iterator[Any]],
    stride: int,
    offset: int,
    rng: np.random.Generator | None,
    buffer_size: int,
) -> Iterator[Any]:
    """The order of data cursors written before the windows: the records of ``shards`` in stored
    order (every ``stride``-th from ``offset``), through a ``buffer_size``-record shuffle buffer
    drawn with ``rng`` (None: no shuffle). A resume re-reads it and skips what was handed out."""

    def stream() -> Iterator[Any]:
        counter = 0
        for shard_records in shards:
            for record in shard_records:
                if counter % stride == offset:
                    yield record
                counter += 1

    if rng is None:
        yield from stream()
        return
    records: list[Any] = []
    for record in stream():
        if len(records) < buffer_size:
            records.append(record)
            continue
        index = int(rng.integers(len(records)))
        yield records[index]
        records[index] = record
    rng.shuffle(records)
    yield from records

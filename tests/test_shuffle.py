"""The two-level shuffle (kdcache.trainer.shuffle): sources mix in proportion, resume by arithmetic.

A cache built from data sorted by source (all of source A, then all of B) is the worst case for a
shard-order stream; these tests measure the batches' source mix against its binomial bound, and
instrument the shard reader to show what a resumed run opens.
"""

from __future__ import annotations

import numpy as np
import pytest

from kdcache.cache.errors import CacheError
from kdcache.trainer.data import BUFFER_ORDER, CacheDataset
from kdcache.trainer.shuffle import PartitionPlan, records_from
from tests.test_loader import FakeCache


class SortedCache(FakeCache):
    """``num_shards`` shards written in source order: the first ``share_a`` of them are source A
    (sequence ids below ``self.first_b``), the rest B. Logs every shard it opens."""

    def __init__(self, num_shards: int, per_shard: int, share_a: float) -> None:
        super().__init__(num_shards=num_shards, per_shard=per_shard)
        self.first_b = round(num_shards * share_a) * per_shard
        self.opened: list[str] = []

    def read_shard(self, info):
        self.opened.append(info.name)
        yield from super().read_shard(info)


def _ids(batches) -> list[list[int]]:
    return [batch["sequence_ids"].tolist() for batch in batches]


def _share_a(ids: list[int], first_b: int) -> float:
    return float(np.mean(np.asarray(ids) < first_b))


def test_batches_of_a_source_sorted_cache_mix_the_sources_in_proportion():
    """Source A is 3/4 of a cache whose shards hold one source each, sorted A then B.

    Bound: a batch of ``b`` sequences drawn from a window of ``W`` random shards has an A share
    with variance at most ``p(1-p) (1/W + 1/b)`` (window composition + draw within it): the
    expected mean squared deviation of the epoch's batches from ``p`` is below that, and the
    test allows twice it (the mean runs over 8 independent windows: exceeding 2x its
    expectation has probability ~1e-3 per seed; seeds are fixed, so the test is deterministic).
    A shard-order stream (the buffer order before windows: 64-record buffer, 64-record shards)
    has nearly one source per batch and fails the same check.
    """
    p, window, batch = 0.75, 8, 16
    cache = SortedCache(num_shards=64, per_shard=64, share_a=p)
    bound = 2 * p * (1 - p) * (1 / window + 1 / batch)
    for seed in range(3):
        dataset = CacheDataset(cache, batch_size=batch, seed=seed, shuffle_window=window)
        shares = [_share_a(ids, cache.first_b) for ids in _ids(dataset.epoch_batches())]
        assert len(shares) == 64 * 64 // batch
        deviation = float(np.mean((np.asarray(shares) - p) ** 2))
        assert deviation < bound, (seed, deviation, bound)
    legacy = CacheDataset(cache, batch_size=batch, seed=0)
    legacy.order = BUFFER_ORDER
    shares = [_share_a(ids, cache.first_b) for ids in _ids(legacy.epoch_batches())]
    assert float(np.mean((np.asarray(shares) - p) ** 2)) > bound  # the check can fail


def test_each_sequence_once_per_epoch_and_a_new_order_each_epoch():
    cache = SortedCache(num_shards=10, per_shard=7, share_a=0.5)
    for partitions in (1, 3, 16):  # 16 > 10 shards: split by record
        datasets = [
            CacheDataset(cache, batch_size=4, rank=rank, world_size=1, partitions=partitions)
            for rank in range(1)
        ]
        first = [i for ids in _ids(datasets[0].epoch_batches()) for i in ids]
        second = [i for ids in _ids(datasets[0].epoch_batches()) for i in ids]
        assert sorted(first) == sorted(second) == list(range(70))
        assert first != second


def test_plan_places_skip_by_arithmetic_and_match_the_full_order():
    """``records_from(plan, start)`` is the full order with its first ``start`` places dropped."""
    counts = [5, 3, 7, 1, 6]
    shards = [[f"s{shard}r{record}" for record in range(n)] for shard, n in enumerate(counts)]
    for stride, offset in ((1, 0), (3, 1)):
        plan = PartitionPlan(list(range(5)), counts, stride, offset, window=2, key=(1, 2))

        def read(infos):
            return (iter(shards[info]) for info in infos)

        full = list(records_from(plan, 0, read))
        assert len(full) == plan.num_sequences() == len(range(offset, sum(counts), stride))
        assert len(set(full)) == len(full)
        for start in range(len(full) + 1):
            assert list(records_from(plan, start, read)) == full[start:]


@pytest.mark.parametrize("max_tokens", [None, 30])
@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_at_90_percent_opens_only_the_shards_still_needed(max_tokens, num_workers):
    """A resume late in a 20-shard epoch opens the shards of the last window(s) only, and hands
    out exactly the batches the uninterrupted run did (batches by count or by token budget)."""
    cache = SortedCache(num_shards=20, per_shard=6, share_a=0.5)
    options = dict(batch_size=4, max_tokens=max_tokens, seed=3, shuffle_window=4, partitions=1)
    full = CacheDataset(cache, **options)
    expected = _ids(full.epoch_batches())
    stop = int(0.9 * len(expected))
    interrupted = CacheDataset(cache, **options)
    stream = interrupted.epoch_batches()
    head = [next(stream)["sequence_ids"].tolist() for _ in range(stop)]
    state = interrupted.state_dict()
    stream.close()

    plan = interrupted.partition_plan(0, 0)
    handed_out = sum(len(ids) for ids in head)
    still_needed = set()
    for number, (first, end, place) in enumerate(plan.window_bounds):
        if place + sum(plan.counts[first:end]) > handed_out:  # a window not finished yet
            places = plan.window_places(number, handed_out)
            still_needed |= {plan.shards[int(index)].name for index in set(places[0].tolist())}
    cache.opened.clear()
    resumed = CacheDataset(cache, **{**options, "num_workers": num_workers})
    resumed.load_state_dict(state)
    tail = _ids(resumed.epoch_batches())
    assert head + tail == expected
    if num_workers == 0:  # (workers log in their own process)
        assert sorted(cache.opened) == sorted(still_needed)
        assert len(cache.opened) <= 4 < 20  # at most one window of 4 shards of 20


def test_a_shard_holding_fewer_sequences_than_the_manifest_says_is_refused():
    cache = SortedCache(num_shards=3, per_shard=4, share_a=0.5)
    cache._records["shard-1"] = cache._records["shard-1"][:2]
    dataset = CacheDataset(cache, batch_size=2)
    dataset.shard_infos = [info if info.name != "shard-1" else type(info)("shard-1", 4)
                           for info in cache.shards("train")]  # fmt: skip
    with pytest.raises(CacheError, match="shard-1 holds 2 sequences, the manifest says 4"):
        list(dataset.epoch_batches())


def test_another_world_size_continues_the_windows_exactly():
    """2 ranks -> 1 rank mid-epoch: each remaining sequence once, same global batches."""
    cache = SortedCache(num_shards=8, per_shard=6, share_a=0.5)

    def ranks(world_size):
        return [
            CacheDataset(cache, batch_size=2, rank=r, world_size=world_size, partitions=2, seed=1)
            for r in range(world_size)
        ]

    two = ranks(2)
    streams = [dataset.epoch_batches() for dataset in two]
    head = [next(stream)["sequence_ids"].tolist() for _ in range(5) for stream in streams]
    states = [dataset.state_dict() for dataset in two]
    (one,) = ranks(1)
    one.load_state_dicts(states)
    rest = [i for ids in _ids(one.epoch_batches()) for i in ids]
    seen = [i for ids in head for i in ids] + rest
    assert sorted(seen) == list(range(48))


def test_a_cursor_written_before_the_windows_continues_in_its_own_order():
    """A checkpoint of the shard-order + buffer era (partitions, no ``order``) resumes exactly in
    that order, although new runs default to the windows."""
    cache = SortedCache(num_shards=6, per_shard=5, share_a=0.5)
    old = CacheDataset(cache, batch_size=3, seed=2, shuffle_buffer=4)
    old.order = BUFFER_ORDER  # as the runs of that era read
    expected = _ids(old.epoch_batches())
    interrupted = CacheDataset(cache, batch_size=3, seed=2, shuffle_buffer=4)
    interrupted.order = BUFFER_ORDER
    stream = interrupted.epoch_batches()
    head = [next(stream)["sequence_ids"].tolist() for _ in range(4)]
    state = {key: value for key, value in interrupted.state_dict().items()
             if key not in ("order", "shuffle_window", "sequences")}  # fmt: skip
    stream.close()
    resumed = CacheDataset(cache, batch_size=3, seed=2, shuffle_buffer=4)
    resumed.load_state_dict(state)
    assert resumed.order == BUFFER_ORDER
    assert head + _ids(resumed.epoch_batches()) == expected
    assert resumed.order == BUFFER_ORDER and resumed.epoch == 1

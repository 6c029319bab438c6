"""CacheDataset: every record once per epoch, seeded shuffle, rank/worker split, exact resume."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch

from kdcache.cache.errors import CacheError, ConfigError
from kdcache.cache.records import SequenceRecord
from kdcache.trainer.data import CacheDataset, collate_records
from kdcache.trainer.targets import TopkBucketTarget


@dataclass
class _Info:
    name: str
    num_sequences: int


class FakeCache:
    """The reader interface (``shards`` / ``read_shard``) over in-memory records."""

    def __init__(self, num_shards: int = 5, per_shard: int = 7, top_k: int = 3, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.manifest = {"top_k": top_k, "vocab_size": 50, "temperature": 1.0}
        self._records: dict[str, list[SequenceRecord]] = {}
        sequence_id = 0
        for shard in range(num_shards):
            records = []
            for _ in range(per_shard):
                length = int(rng.integers(2, 12))
                logits = rng.normal(size=(length, 50))
                logprobs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
                ids = np.argsort(-logprobs, axis=-1)[:, :top_k]
                top = np.take_along_axis(logprobs, ids, -1).astype(np.float32)
                records.append(
                    SequenceRecord(
                        sequence_id=sequence_id,
                        input_ids=rng.integers(0, 50, length).astype(np.int32),
                        topk_ids=ids.astype(np.int32),
                        topk_logprobs=top,
                        tail_mass=(1 - np.exp(top).sum(-1)).astype(np.float32),
                        positions=np.arange(length, dtype=np.int32),
                    )
                )
                sequence_id += 1
            self._records[f"shard-{shard}"] = records

    def shards(self, split):
        return [_Info(name, len(records)) for name, records in self._records.items()]

    def read_shard(self, info):
        yield from self._records[info.name]

    def read_shards(self, infos):  # Cache.read_shards without prefetch
        return (self.read_shard(info) for info in infos)


def _ids(batches) -> list[int]:
    return [int(i) for batch in batches for i in batch["sequence_ids"]]


def test_collate_pads_and_shifts_labels():
    first = SequenceRecord(
        sequence_id=3,
        input_ids=np.array([5, 6, 7], dtype=np.int32),
        topk_ids=np.array([[6, 1], [7, 2], [9, 0]], dtype=np.int32),
        topk_logprobs=np.array(
            [[np.log(0.5), np.log(0.25)], [np.log(0.9), np.log(0.05)], [0.0, -np.inf]],
            dtype=np.float32,
        ),
        tail_mass=np.array([0.25, 0.05, 0.0], dtype=np.float32),
        positions=np.arange(3, dtype=np.int32),
    )
    chat = SequenceRecord(  # only positions 1 and 3 are distilled (assistant tokens)
        sequence_id=4,
        input_ids=np.array([1, 2, 3, 4, 8], dtype=np.int32),
        topk_ids=np.array([[3, 4], [8, 1]], dtype=np.int32),
        topk_logprobs=np.log(np.array([[0.6, 0.3], [0.7, 0.2]], dtype=np.float32)),
        tail_mass=np.array([0.1, 0.1], dtype=np.float32),
        positions=np.array([1, 3], dtype=np.int32),
    )
    target = TopkBucketTarget({"top_k": 2})  # the width comes from the manifest
    batch = collate_records([first, chat], target, pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0, 0], [1, 2, 3, 4, 8]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch["labels"].tolist() == [[6, 7, -100, -100, -100], [-100, 3, -100, 8, -100]]
    assert batch["distill_mask"].tolist() == [
        [True, True, True, False, False],
        [False, True, False, True, False],
    ]
    assert batch["topk_ids"].dtype == torch.int64 and batch["topk_ids"].shape == (2, 5, 2)
    assert batch["topk_ids"][1, 3].tolist() == [8, 1]
    assert batch["topk_logprobs"].dtype == torch.float32
    assert torch.isinf(batch["topk_logprobs"][0, 3]).all()  # padding: -inf
    assert torch.isneginf(batch["topk_logprobs"][0, 2, 1])  # absent entry stays -inf
    assert batch["tail_mass"][1].tolist() == pytest.approx([1.0, 0.1, 1.0, 0.1, 1.0])
    assert batch["sequence_ids"].tolist() == [3, 4]


@pytest.mark.parametrize("num_workers", [0, 1, 2])
def test_epoch_reads_every_record_once(num_workers):
    cache = FakeCache()
    dataset = CacheDataset(cache, batch_size=4, num_workers=num_workers, seed=1)
    batches = list(dataset.epoch_batches())
    assert sorted(_ids(batches)) == list(range(35))
    assert len(batches) == dataset.num_batches()
    assert dataset.epoch == 1 and dataset.consumed == [0] * max(1, num_workers)
    second = _ids(dataset.epoch_batches())
    assert sorted(second) == list(range(35)) and second != _ids(batches)  # reshuffled


@pytest.mark.parametrize("num_shards", [5, 1])  # by shard, and by record when shards are few
def test_ranks_are_disjoint_and_cover_the_split(num_shards):
    cache = FakeCache(num_shards=num_shards, per_shard=35 // num_shards)
    seen = []
    for rank in range(2):
        dataset = CacheDataset(cache, batch_size=3, rank=rank, world_size=2, num_workers=2)
        ids = _ids(dataset.epoch_batches())
        assert len(ids) == len(set(ids))
        assert dataset.num_batches() == dataset.num_batches(rank)
        seen.extend(ids)
    assert sorted(seen) == list(range(35))


def test_same_seed_same_order_other_seed_other_order():
    cache = FakeCache()
    first = _ids(CacheDataset(cache, batch_size=4, seed=3).epoch_batches())
    again = _ids(CacheDataset(cache, batch_size=4, seed=3).epoch_batches())
    other = _ids(CacheDataset(cache, batch_size=4, seed=4).epoch_batches())
    plain = _ids(CacheDataset(cache, batch_size=4, shuffle=False).epoch_batches())
    assert first == again and first != other and plain == list(range(35))


@pytest.mark.parametrize("num_workers", [0, 1, 2])
@pytest.mark.parametrize("stop_after", [3, 9])  # mid-epoch, and just past the first epoch's end
def test_resume_mid_epoch_is_exact(num_workers, stop_after):
    cache = FakeCache()

    def make():
        return CacheDataset(cache, batch_size=4, num_workers=num_workers, seed=7, shuffle_buffer=5)

    def take(dataset, count):
        out = []
        while len(out) < count:
            for batch in dataset.epoch_batches():
                out.append(batch)
                if len(out) == count:
                    break
        return out

    expected = _ids(take(make(), 20))
    interrupted = make()
    head = take(interrupted, stop_after)
    state = interrupted.state_dict()
    resumed = make()
    resumed.load_state_dict(state)
    assert _ids(head) + _ids(take(resumed, 20 - stop_after)) == expected


def test_resume_with_other_worker_count_is_refused():
    cache = FakeCache()
    state = CacheDataset(cache, num_workers=2).state_dict()
    with pytest.raises(ConfigError, match="same --workers"):
        CacheDataset(cache, num_workers=1).load_state_dict(state)


def test_token_budget_batches():
    cache = FakeCache()
    dataset = CacheDataset(cache, batch_size=100, max_tokens=24, num_workers=0)
    batches = list(dataset.epoch_batches())
    for batch in batches:
        rows, length = batch["input_ids"].shape
        assert rows * length <= 24 or rows == 1
    assert sorted(_ids(batches)) == list(range(35))
    assert len(batches) == dataset.num_batches()


@pytest.mark.parametrize(
    "kwargs, match",
    [({"batch_size": 0}, "batch size"), ({"rank": 2, "world_size": 2}, "rank 2")],
)
def test_bad_settings_are_refused(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        CacheDataset(FakeCache(), **kwargs)


class CorruptCache(FakeCache):
    def read_shard(self, info):
        if info.name == "shard-2":
            raise CacheError("shard shard-2 fails its checksum: rebuild the cache")
        yield from super().read_shard(info)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_corrupt_shard_surfaces_as_one_clean_cache_error(num_workers):
    dataset = CacheDataset(CorruptCache(), batch_size=4, num_workers=num_workers)
    with pytest.raises(CacheError) as caught:
        list(dataset.epoch_batches())
    assert str(caught.value) == "shard shard-2 fails its checksum: rebuild the cache"

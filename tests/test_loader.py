"""CacheDataset: every record once per epoch, seeded shuffle, rank/worker split, exact resume."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch

from kdcache.cache.errors import CacheError, ConfigError
from kdcache.cache.records import SequenceRecord
from kdcache.trainer.data import BUFFER_ORDER, CacheDataset, collate_records
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


def _ranks(cache, world_size, partitions, **options):
    return [
        CacheDataset(
            cache, rank=rank, world_size=world_size, partitions=partitions, seed=5, **options
        )
        for rank in range(world_size)
    ]


def _steps(datasets, per_rank, count):
    """``count`` data-parallel steps: each rank hands out ``per_rank`` batches per step.

    Returns one sorted list of sequence ids per step (the step's global batch), stopping early
    when a rank's epoch ends (as ``--epochs`` training does).
    """
    streams = [dataset.epoch_batches() for dataset in datasets]
    steps = []
    for _ in range(count):
        step = []
        for stream in streams:
            for _ in range(per_rank):
                batch = next(stream, None)
                if batch is None:
                    return steps
                step.extend(batch["sequence_ids"].tolist())
        steps.append(sorted(step))
    return steps


@pytest.mark.parametrize("workers", [(2, 0), (0, 2), (1, 3)])
def test_resume_with_another_worker_count_is_exact(workers):
    """The order depends on the partitions, not on the workers that read them."""
    cache = FakeCache()
    before, after = workers
    full = CacheDataset(cache, batch_size=3, num_workers=before, partitions=2, seed=7)
    expected = _ids(full.epoch_batches())
    other = CacheDataset(cache, batch_size=3, num_workers=after, partitions=2, seed=7)
    assert _ids(other.epoch_batches()) == expected  # same order whatever the workers
    interrupted = CacheDataset(cache, batch_size=3, num_workers=before, partitions=2, seed=7)
    stream = interrupted.epoch_batches()
    head = [next(stream) for _ in range(4)]
    resumed = CacheDataset(cache, batch_size=3, num_workers=after, partitions=2, seed=7)
    resumed.load_state_dict(interrupted.state_dict())
    assert _ids(head) + _ids(resumed.epoch_batches()) == expected


@pytest.mark.parametrize(
    ("before", "after", "partitions"),
    [(2, 1, 2), (1, 2, 2), (2, 4, 4), (4, 2, 4), (4, 3, 4)],
)
def test_resume_with_another_world_size_sees_each_sequence_once(before, after, partitions):
    """Steps keep their global batch (ranks x batch x accumulation unchanged); every remaining
    sequence of the epoch comes exactly once after the change of world size."""
    cache = FakeCache(num_shards=8, per_shard=6)  # 48 sequences, 6 per partition of 8 shards
    options = dict(batch_size=2, shuffle_buffer=3)
    per_rank_before, per_rank_after = 12 // before, 12 // after  # global batch: 12 batches
    uninterrupted = _steps(_ranks(cache, before, partitions, **options), per_rank_before, 100)
    assert sorted(i for step in uninterrupted for i in step) == list(range(48))

    first = _ranks(cache, before, partitions, **options)
    head = _steps(first, per_rank_before, 1)
    states = [dataset.state_dict() for dataset in first]  # what a checkpoint gathers
    resumed = _ranks(cache, after, partitions, **options)
    for dataset in resumed:
        dataset.load_state_dicts(states)
    if partitions % after == 0:  # every new rank owns as many partitions: the same steps
        tail = _steps(resumed, per_rank_after, 100)
        assert head + tail == uninterrupted
        seen = [i for step in head + tail for i in step]
    else:  # ranks own unequal parts: each hands out the rest of its own
        rest = [_ids(dataset.epoch_batches()) for dataset in resumed]
        seen = [i for step in head for i in step] + [i for ids in rest for i in ids]
    assert sorted(seen) == list(range(48))  # nothing repeated, nothing skipped


def test_another_world_size_refusals():
    cache = FakeCache()
    with pytest.raises(ConfigError, match=r"at most 2 ranks.*--data-partitions >= 3"):
        CacheDataset(cache, rank=0, world_size=3, partitions=2)
    two = _ranks(cache, 2, 2, batch_size=2)
    streams = [dataset.epoch_batches() for dataset in two]
    for _ in range(20):  # rank 0 only: it runs into its next epoch, rank 1 does not
        next(streams[0], None)
    states = [dataset.state_dict() for dataset in two]
    assert states[0]["epoch"] != states[1]["epoch"]
    with pytest.raises(ConfigError, match=r"different epochs .*resume with 2 ranks"):
        CacheDataset(cache, partitions=2, seed=5).load_state_dicts(states)
    with pytest.raises(ConfigError, match="saved partitions=2, now 4"):
        _ranks(cache, 1, 4, batch_size=2)[0].load_state_dicts(states)
    with pytest.raises(ConfigError, match="saved seed=5, now 6"):
        CacheDataset(cache, partitions=2, seed=6).load_state_dicts(states)


def test_a_cursor_of_the_format_before_partitions_resumes():
    """Checkpoints written before partitions (one stream per rank x worker) still load, and
    continue in the order they were written in (shard order + shuffle buffer)."""
    cache = FakeCache()
    full = CacheDataset(cache, batch_size=3, num_workers=2, seed=7)
    full.order = BUFFER_ORDER  # how the runs of that time read
    expected = _ids(full.epoch_batches())
    interrupted = CacheDataset(cache, batch_size=3, num_workers=2, seed=7)
    interrupted.order = BUFFER_ORDER
    stream = interrupted.epoch_batches()
    head = [next(stream) for _ in range(3)]
    state = interrupted.state_dict()
    old = {key: state[key] for key in ("epoch", "consumed", "finished", "seed", "rank")}
    old.update(next_stream=state["next"], num_streams=2, world_size=1)
    resumed = CacheDataset(cache, batch_size=3, num_workers=2, seed=7)
    resumed.load_state_dict(old)
    assert _ids(head) + _ids(resumed.epoch_batches()) == expected


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

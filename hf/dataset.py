"""``cache_dataset``: a cache's sequences as a torch ``IterableDataset`` for Hugging Face Trainer.

Every item is one ``SequenceRecord`` (token ids plus the teacher's stored distribution at each
distilled position); ``KDCollator`` pads a list of them into a batch. The order follows
``kdcache train``'s data order (``kdcache.trainer.data.CacheDataset``): each epoch permutes the
shards with ``(seed, epoch)`` and every reader shuffles the sequences of each window of
``shuffle_window`` of its shards (``kdcache.trainer.shuffle``).

Readers are split when iteration starts, not when the dataset is made: reader ``rank *
workers + worker`` of ``world_size * workers`` (``torch.distributed``'s rank and world size when
a process group is up, as under torchrun or accelerate, and the DataLoader worker) reads the
shards ``i`` of the epoch's permutation with ``i % readers == reader`` (every reader reads every
shard and keeps every ``readers``-th record when the split has fewer shards than readers). Each
sequence of the split is read by exactly one reader per epoch.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

from torch.utils.data import IterableDataset, get_worker_info

from kdcache.cache.errors import ConfigError
from kdcache.cache.records import SequenceRecord
from kdcache.trainer.shuffle import DEFAULT_SHUFFLE_WINDOW

__all__ = ["CacheSequences", "cache_dataset", "process_rank"]


def process_rank() -> tuple[int, int]:
    """(rank, world_size) of this process: torch.distributed's, else torchrun's environment."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


class CacheSequences(IterableDataset):
    """One split of a cache, sequence by sequence, split between ranks and DataLoader workers.

    ``rank`` / ``world_size`` None: read from the process group when iteration starts.
    ``set_epoch`` (called by Trainer / accelerate each epoch) changes the order.
    """

    def __init__(
        self,
        cache: Any,
        split: str = "train",
        *,
        shuffle: bool = True,
        seed: int = 0,
        shuffle_buffer: int = 64,
        rank: int | None = None,
        world_size: int | None = None,
        shuffle_window: int = DEFAULT_SHUFFLE_WINDOW,
    ) -> None:
        if split not in cache.manifest["splits"]:
            raise ConfigError(
                f"the cache has no {split!r} split (it has {', '.join(cache.manifest['splits'])})"
            )
        if (rank is None) != (world_size is None):
            raise ConfigError("give both rank and world_size, or neither (the process group's)")
        self.cache, self.split = cache, split
        self.shuffle, self.seed, self.shuffle_buffer = shuffle, seed, max(1, shuffle_buffer)
        self.rank, self.world_size = rank, world_size
        self.shuffle_window = shuffle_window  # shuffle_buffer: kept for callers, unused now
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose order the next iteration follows."""
        self.epoch = int(epoch)

    def reader(self) -> tuple[int, int]:
        """(this reader's index, number of readers): rank x DataLoader workers."""
        rank, world_size = (self.rank, self.world_size) if self.rank is not None else process_rank()
        worker = get_worker_info()
        workers, worker_id = (1, 0) if worker is None else (worker.num_workers, worker.id)
        return rank * workers + worker_id, world_size * workers

    def __iter__(self) -> Iterator[SequenceRecord]:
        from kdcache.trainer.data import CacheDataset

        reader, readers = self.reader()
        plan = CacheDataset(
            self.cache, self.split, batch_size=1, seed=self.seed, shuffle=self.shuffle,
            shuffle_buffer=self.shuffle_buffer, partitions=readers,
            shuffle_window=self.shuffle_window,
        )  # fmt: skip
        yield from plan.partition_records(self.epoch, reader)  # kdcache train's, one partition


def cache_dataset(
    cache: Any,
    split: str = "train",
    *,
    shuffle: bool = True,
    seed: int = 0,
    shuffle_buffer: int = 64,
    rank: int | None = None,
    world_size: int | None = None,
    shuffle_window: int = DEFAULT_SHUFFLE_WINDOW,
    **open_options: Any,
) -> CacheSequences:
    """The sequences of ``split`` of ``cache`` (a path, URL or opened ``Cache``) for Trainer.

    ``open_options`` go to ``kdcache.cache.open_cache`` (``storage_options``, ``cache_dir`` ...).
    Use it with ``KDCollator`` and ``TrainingArguments(max_steps=...)`` (the dataset has no
    length). Shapes: each item is a ``SequenceRecord`` of T tokens (``input_ids`` (T,),
    ``topk_ids`` / ``topk_logprobs`` (P, k), ``tail_mass`` (P,) ..., P distilled positions).
    """
    if isinstance(cache, str | os.PathLike):
        from kdcache.cache import open_cache

        cache = open_cache(os.fspath(cache), **open_options)
    elif open_options:
        raise ConfigError("open options apply to a cache path or URL, not an opened Cache")
    return CacheSequences(
        cache, split, shuffle=shuffle, seed=seed, shuffle_buffer=shuffle_buffer,
        rank=rank, world_size=world_size, shuffle_window=shuffle_window,
    )  # fmt: skip

"""Stream a teacher cache as padded training batches, with exact mid-epoch resume.

The order of the batches is a pure function of ``(seed, epoch, rank, world_size, num_workers)``:

* every epoch the split's shards are permuted with ``rng(seed, epoch)``;
* the epoch is cut into ``world_size * num_streams`` *streams* (``num_streams = max(1,
  num_workers)``, one per DataLoader worker): stream ``g = rank * num_streams + worker`` reads the
  shards ``i`` of the permutation with ``i % num_streams_total == g``. A cache with fewer shards
  than streams is split by record instead (every stream decodes every shard and keeps every
  ``num_streams_total``-th record);
* each stream shuffles its records through a bounded buffer (``rng(seed, epoch, g)``) and groups
  them into batches of ``batch_size`` sequences (or up to ``max_tokens`` padded tokens);
* the main process takes one batch from each stream in turn (round-robin, skipping streams that
  have ended), whatever order the DataLoader delivers them in.

The state is therefore small: the epoch, the number of batches handed out per stream, and whose
turn is next. On resume each worker re-reads its stream and skips (without collating) the batches
it already handed out, so the resumed run sees exactly the batches the uninterrupted one would.
Memory is bounded by the shuffle buffer and the DataLoader prefetch, whatever the cache size.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from kdcache.cache.errors import ConfigError, KdcacheError
from kdcache.cache.records import SequenceRecord
from kdcache.trainer.targets import TeacherTarget, target_for_cache

IGNORE_INDEX = -100


class _CacheLike(Protocol):
    manifest: dict

    def shards(self, split: str) -> list[Any]: ...

    def read_shards(self, infos: Sequence[Any]) -> Iterator[Iterator[SequenceRecord]]: ...


def collate_records(
    records: Sequence[SequenceRecord], target: TeacherTarget, pad_id: int = 0
) -> dict[str, torch.Tensor]:
    """Pad a list of records to one batch (right padding); the target collates its own tensors.

    Returns a dict of tensors, B = len(records), T = longest record:

    * ``input_ids`` (B, T) int64, ``pad_id`` after the end of each record
    * ``attention_mask`` (B, T) int64, 1 on real tokens
    * ``labels`` (B, T) int64: the next token at distilled positions that have one, else -100
      (the last token of a record has a teacher distribution but no label)
    * ``distill_mask`` (B, T) bool: True where the teacher's distribution is stored
    * ``sequence_ids`` (B,) int64
    * the target's tensors (``target.collate``), e.g. ``topk_ids`` (B, T, k) for a top-k cache
    """
    if not records:
        raise ValueError("collate_records needs at least one record")
    batch, length = len(records), max(record.num_tokens for record in records)
    input_ids = np.full((batch, length), pad_id, dtype=np.int64)
    attention_mask = np.zeros((batch, length), dtype=np.int64)
    labels = np.full((batch, length), IGNORE_INDEX, dtype=np.int64)
    distill_mask = np.zeros((batch, length), dtype=bool)
    for row, record in enumerate(records):
        num_tokens, positions = record.num_tokens, np.asarray(record.positions, dtype=np.int64)
        input_ids[row, :num_tokens] = record.input_ids
        attention_mask[row, :num_tokens] = 1
        distill_mask[row, positions] = True
        with_label = positions[positions < num_tokens - 1]  # the last token has no next token
        labels[row, with_label] = record.input_ids[with_label + 1]
    return {
        "input_ids": torch.from_numpy(input_ids),
        "attention_mask": torch.from_numpy(attention_mask),
        "labels": torch.from_numpy(labels),
        "distill_mask": torch.from_numpy(distill_mask),
        "sequence_ids": torch.tensor([record.sequence_id for record in records], dtype=torch.int64),
        **target.collate(records, length),
    }


class CacheDataset(IterableDataset):
    """Padded batches from one split of a cache, for one rank, resumable mid-epoch.

    ``target`` collates the teacher's tensors (default: the one of the cache's storage mode).
    Use ``epoch_batches()`` in the training process: it runs a DataLoader with ``num_workers``
    workers (decode + collation in parallel) and tracks what it handed out, so ``state_dict()``
    is exact however far the workers have prefetched. Iterating the dataset itself yields
    ``(stream, index, batch)`` items of the calling worker's stream (``batch`` None at its end,
    or the ``KdcacheError`` that stopped it).
    """

    def __init__(
        self,
        cache: _CacheLike,
        split: str = "train",
        *,
        batch_size: int = 8,
        max_tokens: int | None = None,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        seed: int = 0,
        shuffle: bool = True,
        shuffle_buffer: int = 64,
        pad_id: int = 0,
        target: TeacherTarget | None = None,
    ) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch size must be >= 1, got {batch_size}")
        if max_tokens is not None and max_tokens < 1:
            raise ConfigError(f"max tokens per batch must be >= 1, got {max_tokens}")
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} is outside world size {world_size}")
        if num_workers < 0:
            raise ConfigError(f"num_workers must be >= 0, got {num_workers}")
        self.cache, self.split = cache, split
        self.batch_size, self.max_tokens = batch_size, max_tokens
        self.rank, self.world_size = rank, world_size
        self.num_workers, self.num_streams = num_workers, max(1, num_workers)
        self.seed, self.shuffle, self.shuffle_buffer = seed, shuffle, max(1, shuffle_buffer)
        self.pad_id = pad_id
        # the teacher target collates its own tensors (default: the cache's storage mode)
        self.target = target if target is not None else target_for_cache(cache.manifest)
        self.shard_infos = list(cache.shards(split))
        self._reset_epoch(0)

    # -- state ----------------------------------------------------------------------------------

    def _reset_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.consumed = [0] * self.num_streams  # batches handed out per stream this epoch
        self.finished = [False] * self.num_streams
        self.next_stream = 0

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its beginning."""
        self._reset_epoch(epoch)

    def state_dict(self) -> dict[str, Any]:
        """The data cursor: enough to continue exactly where the main process stopped."""
        return {
            "epoch": self.epoch,
            "consumed": list(self.consumed),
            "finished": list(self.finished),
            "next_stream": self.next_stream,
            "num_streams": self.num_streams,
            "world_size": self.world_size,
            "rank": self.rank,
            "seed": self.seed,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a ``state_dict()`` taken with the same workers, world size and seed."""
        for key, mine in (
            ("num_streams", self.num_streams),
            ("world_size", self.world_size),
            ("seed", self.seed),
        ):
            if state[key] != mine:
                hint = " (resume with the same --workers)" if key == "num_streams" else ""
                raise ConfigError(
                    f"cannot resume the data stream: saved {key}={state[key]}, now {mine}{hint}"
                )
        self.epoch = int(state["epoch"])
        self.consumed = [int(count) for count in state["consumed"]]
        self.finished = [bool(flag) for flag in state["finished"]]
        self.next_stream = int(state["next_stream"])

    # -- the deterministic streams -------------------------------------------------------------

    def _stream_plan(self, epoch: int, stream: int) -> tuple[list[Any], int, int]:
        """(shards to read, record stride, record offset) of local stream ``stream``."""
        total = self.world_size * self.num_streams
        global_stream = self.rank * self.num_streams + stream
        order = np.arange(len(self.shard_infos))
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.shard_infos))
        shards = [self.shard_infos[index] for index in order]
        if len(shards) >= total:
            return shards[global_stream::total], 1, 0
        return shards, total, global_stream  # too few shards: split by record

    def _records(self, epoch: int, stream: int) -> Iterator[SequenceRecord]:
        shards, stride, offset = self._stream_plan(epoch, stream)
        counter = 0
        for shard_records in self.cache.read_shards(shards):  # a remote cache fetches ahead
            for record in shard_records:
                if counter % stride == offset:
                    yield record
                counter += 1

    def _shuffled(self, epoch: int, stream: int) -> Iterator[SequenceRecord]:
        records = self._records(epoch, stream)
        if not self.shuffle:
            yield from records
            return
        global_stream = self.rank * self.num_streams + stream
        rng = np.random.default_rng([self.seed, epoch, global_stream, 1])
        buffer: list[SequenceRecord] = []
        for record in records:
            if len(buffer) < self.shuffle_buffer:
                buffer.append(record)
                continue
            index = int(rng.integers(len(buffer)))
            yield buffer[index]
            buffer[index] = record
        rng.shuffle(buffer)
        yield from buffer

    def _batched(self, epoch: int, stream: int) -> Iterator[list[SequenceRecord]]:
        group: list[SequenceRecord] = []
        longest = 0
        for record in self._shuffled(epoch, stream):
            longest_with = max(longest, record.num_tokens)
            too_many_tokens = (
                self.max_tokens is not None and (len(group) + 1) * longest_with > self.max_tokens
            )
            if group and (len(group) >= self.batch_size or too_many_tokens):
                yield group
                group, longest_with = [], record.num_tokens
            group.append(record)
            longest = longest_with
        if group:
            yield group

    def stream_batches(self, stream: int, skip: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        """The collated batches of local stream ``stream`` this epoch, the first ``skip`` left out."""
        for index, group in enumerate(self._batched(self.epoch, stream)):
            if index >= skip:
                yield collate_records(group, self.target, self.pad_id)

    def num_batches(self, rank: int | None = None) -> int:
        """Batches in one epoch for ``rank`` (default: this one), summed over its streams.

        Exact from the shard counts when batching by sequences; with ``max_tokens`` it reads the
        split once (decoding only).
        """
        rank = self.rank if rank is None else rank
        probe = CacheDataset.__new__(CacheDataset)
        probe.__dict__.update(self.__dict__)
        probe.rank = rank
        total = 0
        for stream in range(self.num_streams):
            shards, stride, offset = probe._stream_plan(0, stream)
            if self.max_tokens is None:
                sequences = sum(int(info.num_sequences) for info in shards)
                if stride > 1:
                    sequences = len(range(offset, sequences, stride))
                total += math.ceil(sequences / self.batch_size)
            else:
                total += sum(1 for _ in probe._batched(0, stream))
        return total

    # -- iteration ------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[tuple[int, int, dict[str, torch.Tensor] | None]]:
        info = get_worker_info()
        stream = 0 if info is None else info.id
        if (1 if info is None else info.num_workers) != self.num_streams:
            raise ConfigError(
                f"CacheDataset was built for num_workers={self.num_workers}; "
                "use epoch_batches() or a DataLoader with that many workers"
            )
        if self.finished[stream]:
            return
        index = self.consumed[stream]
        try:
            for batch in self.stream_batches(stream, skip=index):
                yield stream, index, batch
                index += 1
        except KdcacheError as error:  # e.g. a corrupt shard: re-raised as is in the main process
            yield stream, index, error
            return
        yield stream, index, None  # end of this stream

    def epoch_batches(self) -> Iterator[dict[str, torch.Tensor]]:
        """The rest of the current epoch, in the fixed round-robin order; then the next epoch begins.

        The cursor advances as each batch is handed out, so ``state_dict()`` between two batches
        describes exactly what the caller has consumed.
        """
        if self.num_workers == 0:
            source: Iterator = iter(self)
        else:
            source = iter(
                DataLoader(self, batch_size=None, num_workers=self.num_workers, prefetch_factor=2)
            )
        pending: dict[int, list] = {stream: [] for stream in range(self.num_streams)}
        try:
            while not all(self.finished):
                stream = self.next_stream
                if self.finished[stream]:
                    self.next_stream = (stream + 1) % self.num_streams
                    continue
                while not pending[stream]:
                    item_stream, index, batch = next(source)
                    if isinstance(batch, KdcacheError):
                        raise batch  # one clean line, not the DataLoader's wrapped traceback
                    pending[item_stream].append((index, batch))
                index, batch = pending[stream].pop(0)
                if index != self.consumed[stream]:
                    raise RuntimeError(
                        f"stream {stream}: got batch {index}, expected {self.consumed[stream]}"
                    )  # invariant, not user input
                self.next_stream = (stream + 1) % self.num_streams
                if batch is None:
                    self.finished[stream] = True
                    continue
                self.consumed[stream] += 1
                yield batch
        finally:
            del source
        self._reset_epoch(self.epoch + 1)

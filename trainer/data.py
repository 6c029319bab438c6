"""Stream a teacher cache as padded training batches, with exact mid-epoch resume.

The order of the batches is a pure function of ``(seed, epoch, partitions, shuffle window)``; the
world size and the DataLoader workers only decide who reads what:

* the epoch is cut into ``partitions`` parts (default: ``world_size * max(1, num_workers)`` of the
  run's first start; ``--data-partitions`` fixes it);
* every epoch the split's shards are permuted with ``rng(seed, epoch)`` and dealt to the
  partitions in turn; each partition shuffles the sequences of each window of ``shuffle_window``
  consecutive shards of its own (``kdcache.trainer.shuffle``: what exactly is shuffled). A cache
  with fewer shards than partitions is split by record instead (every partition reads the same
  windows and keeps every ``partitions``-th place);
* each partition groups its sequences into batches of ``batch_size`` sequences (or up to
  ``max_tokens`` padded tokens);
* rank ``r`` of ``world_size`` owns a contiguous range of partitions (``p * world_size //
  partitions == r``) and takes one batch from each of them in turn (round-robin, skipping
  partitions that have ended); its DataLoader workers split its partitions between them, and
  the main process restores the round-robin order whatever order the workers deliver in.

The state is therefore small: the epoch, the batches and sequences handed out per partition, and
whose turn is next. On resume each partition starts at its sequence count by arithmetic on the
manifest's per-shard counts: shards whose sequences were all handed out are neither read nor
downloaded. With another world size (``load_state_dicts`` with every rank's state) the partitions
change owners and continue from their own cursors: every remaining sequence of the epoch is seen
exactly once; with the same global batch (ranks x batch x accumulation) a step takes the same
batches as the uninterrupted run while the partitions hold equally many batches (at the end of an
epoch, partitions that run out at different times can make a step's batches differ).
Memory: the decoded shards of one shuffle window per partition, plus the DataLoader prefetch.

A cursor written before the shuffle windows (no ``order`` in it) continues in the order it was
written in: shard order plus a ``shuffle_buffer``-record buffer, re-read and skipped on resume.
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
from kdcache.trainer.shuffle import (
    DEFAULT_SHUFFLE_WINDOW,
    PartitionPlan,
    buffered_records,
    records_from,
)
from kdcache.trainer.targets import TeacherTarget, target_for_cache

IGNORE_INDEX = -100
WINDOW_ORDER = "window"  # the cursor's ``order``: shuffle windows (kdcache.trainer.shuffle)
BUFFER_ORDER = "buffer"  # a cursor without ``order``: shard order + a shuffle buffer


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


def owned_partitions(partitions: int, rank: int, world_size: int) -> list[int]:
    """The partitions rank ``rank`` of ``world_size`` reads: a contiguous range, in order."""
    return [part for part in range(partitions) if part * world_size // partitions == rank]


def _upgraded(state: dict[str, Any]) -> dict[str, Any]:
    """A data cursor of the format before partitions (one stream per rank x worker)."""
    if "partitions" in state:
        return state
    streams, rank = int(state["num_streams"]), int(state["rank"])
    return {
        **state,
        "partitions": int(state["world_size"]) * streams,
        "owned": list(range(rank * streams, (rank + 1) * streams)),
        "next": int(state["next_stream"]),
    }


class CacheDataset(IterableDataset):
    """Padded batches from one split of a cache, for one rank, resumable mid-epoch.

    ``target`` collates the teacher's tensors (default: the one of the cache's storage mode).
    ``partitions`` fixes the data order (default ``world_size * max(1, num_workers)``); a run
    resumed from its checkpoint passes the checkpoint's. Use ``epoch_batches()`` in the training
    process: it runs a DataLoader with ``num_workers`` workers (decode + collation in parallel)
    and tracks what it handed out, so ``state_dict()`` is exact however far the workers have
    prefetched. Iterating the dataset itself yields ``(slot, index, batch)`` items of the calling
    worker's partitions (``slot``: the partition's place among this rank's; ``batch`` None at the
    partition's end, or the ``KdcacheError`` that stopped it).
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
        shuffle_window: int = DEFAULT_SHUFFLE_WINDOW,
        pad_id: int = 0,
        target: TeacherTarget | None = None,
        partitions: int | None = None,
    ) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch size must be >= 1, got {batch_size}")
        if max_tokens is not None and max_tokens < 1:
            raise ConfigError(f"max tokens per batch must be >= 1, got {max_tokens}")
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} is outside world size {world_size}")
        if num_workers < 0:
            raise ConfigError(f"num_workers must be >= 0, got {num_workers}")
        if shuffle_window < 1:
            raise ConfigError(f"--shuffle-window must be >= 1 shard, got {shuffle_window}")
        self.num_workers, self.num_streams = num_workers, max(1, num_workers)
        self.partitions = world_size * self.num_streams if partitions is None else partitions
        if self.partitions < world_size:
            raise ConfigError(
                f"the data is cut into {self.partitions} partitions (the run's world size x "
                f"workers when it started, or --data-partitions), which {world_size} ranks "
                f"cannot share: run on at most {self.partitions} ranks, or start the run with "
                f"--data-partitions >= {world_size}"
            )
        self.cache, self.split = cache, split
        self.batch_size, self.max_tokens = batch_size, max_tokens
        self.rank, self.world_size = rank, world_size
        self.seed, self.shuffle, self.shuffle_buffer = seed, shuffle, max(1, shuffle_buffer)
        self.order, self.shuffle_window = WINDOW_ORDER, shuffle_window
        self.pad_id = pad_id
        # the teacher target collates its own tensors (default: the cache's storage mode)
        self.target = target if target is not None else target_for_cache(cache.manifest)
        self.shard_infos = list(cache.shards(split))
        self.owned = owned_partitions(self.partitions, rank, world_size)
        self._reset_epoch(0)

    # -- state ----------------------------------------------------------------------------------

    def _reset_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.consumed = [0] * len(self.owned)  # batches handed out per owned partition
        self.sequences = [0] * len(self.owned)  # sequences handed out per owned partition
        self.finished = [False] * len(self.owned)
        self.next_slot = 0

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its beginning."""
        self._reset_epoch(epoch)

    def state_dict(self) -> dict[str, Any]:
        """The data cursor: enough to continue exactly where the main process stopped."""
        return {
            "epoch": self.epoch,
            "partitions": self.partitions,
            "owned": list(self.owned),
            "consumed": list(self.consumed),
            "finished": list(self.finished),
            "next": self.next_slot,
            "num_streams": self.num_streams,
            "world_size": self.world_size,
            "rank": self.rank,
            "seed": self.seed,
            "order": self.order,
            "shuffle_window": self.shuffle_window,
            "sequences": list(self.sequences),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from this rank's ``state_dict()`` (same partitions, any number of workers)."""
        mine = _upgraded(state)
        self._check_compatible([mine])
        if list(mine["owned"]) != self.owned:
            raise ConfigError(
                f"cannot resume the data stream: the saved cursor is of partitions "
                f"{mine['owned']}, this rank reads {self.owned}"
            )
        self._adopt_order(mine)
        self.epoch = int(mine["epoch"])
        self.consumed = [int(count) for count in mine["consumed"]]
        self.sequences = [int(count) for count in mine.get("sequences", [0] * len(self.owned))]
        self.finished = [bool(flag) for flag in mine["finished"]]
        self.next_slot = int(mine["next"])

    def _adopt_order(self, state: dict[str, Any]) -> None:
        """The order the cursor was written in (a cursor from before windows: the buffer order)."""
        self.order = str(state.get("order", BUFFER_ORDER))
        self.shuffle_window = int(state.get("shuffle_window", self.shuffle_window))

    def load_state_dicts(self, states: Sequence[dict[str, Any]]) -> None:
        """Continue from every rank's ``state_dict()`` of a checkpoint, at any world size.

        With the checkpoint's world size each rank takes its own cursor; with another one the
        partitions' cursors are regrouped by their new owners, which needs every rank to have
        been in the same epoch when the checkpoint was written.
        """
        if len(states) == self.world_size:
            self.load_state_dict(states[self.rank])
            return
        states = [_upgraded(state) for state in states]
        self._check_compatible(states)
        epochs = sorted({int(state["epoch"]) for state in states})
        if len(epochs) != 1:
            raise ConfigError(
                f"cannot resume on {self.world_size} ranks: when the checkpoint was written its "
                f"{len(states)} ranks were in different epochs ({', '.join(map(str, epochs))}); "
                f"resume with {len(states)} ranks"
            )
        cursors = {
            int(part): (int(count), bool(flag), int(sequences))
            for state in states
            for part, count, flag, sequences in zip(
                state["owned"],
                state["consumed"],
                state["finished"],
                state.get("sequences", [0] * len(state["owned"])),
                strict=True,
            )
        }
        missing = [part for part in self.owned if part not in cursors]
        if missing:
            raise ConfigError(f"the checkpoint holds no data cursor for partitions {missing}")
        self._adopt_order(states[0])
        self.epoch = epochs[0]
        self.consumed = [cursors[part][0] for part in self.owned]
        self.finished = [cursors[part][1] for part in self.owned]
        self.sequences = [cursors[part][2] for part in self.owned]
        self.next_slot = self._first_behind()

    def _check_compatible(self, states: Sequence[dict[str, Any]]) -> None:
        for state in states:
            for key, mine in (("partitions", self.partitions), ("seed", self.seed)):
                if int(state[key]) != mine:
                    hint = " (resume with the run's --data-partitions)" * (key == "partitions")
                    raise ConfigError(
                        f"cannot resume the data stream: saved {key}={state[key]}, now {mine}{hint}"
                    )

    def _first_behind(self) -> int:
        """The round-robin turn implied by the counts: the first open partition that is behind."""
        open_slots = [slot for slot, done in enumerate(self.finished) if not done]
        if not open_slots:
            return 0
        fewest = min(self.consumed[slot] for slot in open_slots)
        return next(slot for slot in open_slots if self.consumed[slot] == fewest)

    # -- the deterministic partitions ----------------------------------------------------------

    def _shard_places(self, epoch: int, part: int) -> tuple[list[Any], int, int]:
        """(shards to read, record stride, record offset) of partition ``part``."""
        order = np.arange(len(self.shard_infos))
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.shard_infos))
        shards = [self.shard_infos[index] for index in order]
        if len(shards) >= self.partitions:
            return shards[part :: self.partitions], 1, 0
        return shards, self.partitions, part  # too few shards: split by record

    def partition_plan(self, epoch: int, part: int) -> PartitionPlan:
        """Partition ``part``'s sequences in ``epoch`` (``kdcache.trainer.shuffle``)."""
        shards, stride, offset = self._shard_places(epoch, part)
        key = None
        if self.shuffle:  # with too few shards the partitions share their windows
            key = (self.seed, epoch, part if stride == 1 else self.partitions, 2)
        counts = [int(info.num_sequences) for info in shards]
        return PartitionPlan(shards, counts, stride, offset, self.shuffle_window, key)

    def partition_records(self, epoch: int, part: int) -> Iterator[SequenceRecord]:
        """Partition ``part``'s records in ``epoch``, in order (what its batches are cut from)."""
        return self._records(epoch, part)

    def _records(self, epoch: int, part: int, start: int = 0) -> Iterator[SequenceRecord]:
        if self.order == WINDOW_ORDER:
            yield from records_from(self.partition_plan(epoch, part), start, self.cache.read_shards)
            return
        yield from self._buffered(epoch, part)  # a cursor from before the windows

    def _buffered(self, epoch: int, part: int) -> Iterator[SequenceRecord]:
        """The order before shuffle windows: shard order, records through a bounded buffer."""
        shards, stride, offset = self._shard_places(epoch, part)
        rng = np.random.default_rng([self.seed, epoch, part, 1]) if self.shuffle else None
        records = self.cache.read_shards(shards)
        yield from buffered_records(records, stride, offset, rng, self.shuffle_buffer)

    def _batched(self, epoch: int, part: int, start: int = 0) -> Iterator[list[SequenceRecord]]:
        """Partition ``part``'s batches from its sequence ``start`` on (a batch boundary)."""
        group: list[SequenceRecord] = []
        longest = 0
        for record in self._records(epoch, part, start):
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

    def partition_batches(
        self, part: int, skip: int = 0, sequences: int | None = None
    ) -> Iterator[dict[str, torch.Tensor]]:
        """The collated batches of partition ``part`` this epoch, the first ``skip`` left out.

        ``sequences``: how many sequences those ``skip`` batches held; the shuffle-window order
        then starts there by arithmetic (nothing before it is read). Without it, or in the
        buffer order of an old cursor, the skipped batches are re-read and dropped.
        """
        if self.order == WINDOW_ORDER and (sequences is not None or self.max_tokens is None):
            start = skip * self.batch_size if sequences is None else sequences
            groups: Iterator[list[SequenceRecord]] = self._batched(self.epoch, part, start)
        else:
            groups = (
                group
                for index, group in enumerate(self._batched(self.epoch, part))
                if index >= skip
            )
        for group in groups:
            yield self.collate(group)

    def collate(self, group: list[SequenceRecord]) -> dict[str, torch.Tensor]:
        """One batch of tensors from a group of records (``collate_records``)."""
        return collate_records(group, self.target, self.pad_id)

    def num_batches(self, rank: int | None = None) -> int:
        """Batches in one epoch for ``rank`` (default: this one), summed over its partitions.

        Exact from the shard counts when batching by sequences; with ``max_tokens`` it reads the
        split once (decoding only).
        """
        rank = self.rank if rank is None else rank
        total = 0
        for part in owned_partitions(self.partitions, rank, self.world_size):
            if self.max_tokens is None:
                sequences = self.partition_plan(0, part).num_sequences()
                total += math.ceil(sequences / self.batch_size)
            else:
                total += sum(1 for _ in self._batched(0, part))
        return total

    # -- iteration ------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[tuple[int, int, dict[str, torch.Tensor] | None]]:
        info = get_worker_info()
        worker = 0 if info is None else info.id
        if (1 if info is None else info.num_workers) != self.num_streams:
            raise ConfigError(
                f"CacheDataset was built for num_workers={self.num_workers}; "
                "use epoch_batches() or a DataLoader with that many workers"
            )
        # this worker's partitions, in the round-robin order starting at the main process's turn
        slots = [slot for slot in range(len(self.owned)) if slot % self.num_streams == worker]
        slots = sorted(slots, key=lambda slot: (slot < self.next_slot, slot))
        streams = {
            slot: (
                self.consumed[slot],
                self.partition_batches(self.owned[slot], self.consumed[slot], self.sequences[slot]),
            )
            for slot in slots
            if not self.finished[slot]
        }
        while streams:
            for slot in list(streams):
                index, batches = streams[slot]
                try:
                    batch = next(batches, None)
                except KdcacheError as error:  # e.g. a corrupt shard: re-raised in the main process
                    yield slot, index, error
                    return
                yield slot, index, batch
                if batch is None:  # end of this partition
                    del streams[slot]
                else:
                    streams[slot] = (index + 1, batches)

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
        pending: dict[int, list] = {slot: [] for slot in range(len(self.owned))}
        try:
            while not all(self.finished):
                slot = self.next_slot
                if self.finished[slot]:
                    self.next_slot = (slot + 1) % len(self.owned)
                    continue
                while not pending[slot]:
                    item_slot, index, batch = next(source)
                    if isinstance(batch, KdcacheError):
                        raise batch  # one clean line, not the DataLoader's wrapped traceback
                    pending[item_slot].append((index, batch))
                index, batch = pending[slot].pop(0)
                if index != self.consumed[slot]:
                    raise RuntimeError(
                        f"partition slot {slot}: got batch {index}, expected {self.consumed[slot]}"
                    )  # invariant, not user input
                self.next_slot = (slot + 1) % len(self.owned)
                if batch is None:
                    self.finished[slot] = True
                    continue
                self.consumed[slot] += 1
                self.sequences[slot] += int(batch["sequence_ids"].shape[0])
                yield batch
        finally:
            del source
        self._reset_epoch(self.epoch + 1)

"""Writing shards: a background encoder thread, atomic files, and a per-shard journal.

Layout inside a cache directory::

    manifest.json                          # the commit point (written last, by the builder)
    shards/train-r00000-00000.arrow        # shard data (docs/FORMAT.md)
    shards/train-r00000-00000.json         # its journal entry: counts, bytes, checksum

A shard is written to a temp file in ``shards/``, flushed, fsynced and renamed, then the directory
is fsynced; only then is its journal entry written (atomically, the same way). A shard without a
journal entry, or whose size differs from it, is not complete and is ignored (and overwritten by a
resumed build).
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa

from kdcache.cache.errors import CacheError, ConfigError
from kdcache.cache.format.blocks import BlockCodec
from kdcache.cache.format.manifest import (
    SHARDS_DIR,
    TEMP_PREFIX,
    ShardInfo,
    atomic_write_bytes,
    file_checksum,
    fsync_dir,
)
from kdcache.cache.records import SequenceRecord

DEFAULT_MAX_SHARD_TOKENS = 1 << 20
DEFAULT_BLOCK_POSITIONS = 8192
DEFAULT_QUEUE_SIZE = 64
_SPLIT_NAME = re.compile(r"^[A-Za-z0-9_]+$")


def shard_name(split: str, rank: int, index: int) -> str:
    """``<split>-r<rank:05d>-<index:05d>.arrow``."""
    return f"{split}-r{rank:05d}-{index:05d}.arrow"


def shard_path(cache_dir: str | os.PathLike, name: str) -> Path:
    return Path(cache_dir) / SHARDS_DIR / name


def remove_incomplete(cache_dir: str | os.PathLike, split: str, rank: int) -> list[str]:
    """Delete one (split, rank)'s leftovers of a killed build: its temp files and its shard files
    without a valid journal entry. Other ranks' files are never touched. Returns the names."""
    directory = Path(cache_dir) / SHARDS_DIR
    if not directory.is_dir():
        return []
    complete = {info.name for info in list_complete_shards(cache_dir)}
    stem = f"{split}-r{rank:05d}-"
    removed = []
    for path in sorted(directory.iterdir()):
        name = path.name
        leftover = name.startswith(f"{TEMP_PREFIX}{stem}") or (
            name.startswith(stem) and name.endswith(".arrow") and name not in complete
        )
        if leftover:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            removed.append(name)
    return removed


def list_complete_shards(cache_dir: str | os.PathLike) -> list[ShardInfo]:
    """Complete shards of a cache directory: journal entries whose shard exists with that size.

    Sorted by (split, rank, index). Temp files and shards without a journal entry are ignored.
    """
    directory = Path(cache_dir) / SHARDS_DIR
    if not directory.is_dir():
        return []
    shards = []
    for journal in directory.glob("*.json"):
        if journal.name.startswith(TEMP_PREFIX):
            continue
        try:
            info = ShardInfo.from_dict(json.loads(journal.read_text(encoding="utf-8")))
        except (OSError, ValueError, CacheError):
            continue  # a torn journal cannot exist (atomic), but never trust the disk blindly
        data = directory / info.name
        if data.is_file() and data.stat().st_size == info.bytes:
            shards.append(info)
    return sorted(shards, key=lambda info: (info.split, info.rank, info.index))


class ShardWriter:
    """Encode and write one (split, rank)'s records into shards on a background thread.

    ``write`` only validates shapes and puts the record on a bounded queue; a thread groups records
    into blocks, encodes them (numpy + zstd, which releases the GIL), appends them to the open
    shard, and rolls to a new shard once it holds ``max_shard_tokens`` tokens. ``close`` flushes
    and returns the shards written by this writer; it re-raises any error of the thread. Leaving
    the ``with`` block by an exception still writes the records already handed over (shards
    they fill are completed) and drops the last, unfinished shard (its temp file is removed);
    complete shards and their journal entries stay, so a resumed build can skip them.
    ``on_shard(info)``, if given, runs on the writer thread after each shard is complete (a
    remote build queues its upload there).
    """

    def __init__(
        self,
        cache_dir: str | os.PathLike,
        split: str,
        *,
        rank: int = 0,
        top_k: int,
        vocab_size: int,
        start_index: int = 0,
        max_shard_tokens: int = DEFAULT_MAX_SHARD_TOKENS,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        mode: str = "exact",
        block_positions: int = DEFAULT_BLOCK_POSITIONS,
        tail_samples: int = 0,
        observed_logprobs: bool = False,
        on_shard: Callable[[ShardInfo], None] | None = None,
    ) -> None:
        problems = []
        if not _SPLIT_NAME.match(split):
            problems.append(f"split name {split!r} must match [A-Za-z0-9_]+")
        if rank < 0 or start_index < 0:
            problems.append(f"rank ({rank}) and start_index ({start_index}) must be >= 0")
        if max_shard_tokens < 1 or queue_size < 1 or block_positions < 1:
            problems.append("max_shard_tokens, queue_size and block_positions must be >= 1")
        if problems:
            raise ConfigError("; ".join(problems))
        self.codec = BlockCodec(
            mode=mode, top_k=top_k, vocab_size=vocab_size, tail_samples=tail_samples,
            observed_logprobs=observed_logprobs,
        )  # fmt: skip
        self.directory = Path(cache_dir) / SHARDS_DIR
        self.split, self.rank = split, rank
        self.max_shard_tokens, self.block_positions = max_shard_tokens, block_positions
        self._next_index = start_index
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._error: BaseException | None = None
        self._abort = threading.Event()
        self._closed = False
        self._written: list[ShardInfo] = []
        self._on_shard = on_shard  # called on the writer thread after each complete shard
        self.directory.mkdir(parents=True, exist_ok=True)
        self._thread = threading.Thread(
            target=self._run, name=f"kdcache-shards-{split}-r{rank}", daemon=True
        )
        self._thread.start()

    # ------------------------------------------------------------------ caller side
    def write(self, record: SequenceRecord) -> None:
        """Queue one record (blocks only while the queue is full).

        The writer keeps a reference to the record's arrays until it is encoded: do not modify
        them after ``write``. Records must come in the stream's deterministic order.
        """
        if self._closed:
            raise CacheError("ShardWriter.write after close(): open a new writer")
        if self._error is not None:
            self.close()  # re-raises the thread's error
        self.codec.check(record)  # every column group checks its own arrays
        while True:
            try:
                self._queue.put(record, timeout=0.5)
                return
            except queue.Full:
                if self._error is not None or not self._thread.is_alive():
                    self.close()

    def close(self) -> list[ShardInfo]:
        """Finish the open shard, stop the thread; returns this writer's shards in order."""
        self._stop()
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        return list(self._written)

    def abort(self) -> None:
        """Stop after an error of the producer: the records already handed over are still
        written and complete their shards; the last, unfinished shard is dropped."""
        self._abort.set()
        self._stop()
        self._error = None

    def _stop(self) -> None:
        if self._closed:
            return
        self._closed = True
        while self._thread.is_alive():
            try:
                self._queue.put(None, timeout=0.5)
                break
            except queue.Full:
                continue
        self._thread.join()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is not None:
            self.abort()
        else:
            self.close()

    # ------------------------------------------------------------------ thread side
    def _run(self) -> None:
        shard: _OpenShard | None = None
        block: list[SequenceRecord] = []
        block_positions = 0
        try:
            while True:
                record = self._queue.get()
                if record is None:
                    break
                if shard is None:
                    shard = _OpenShard(self, self._next_index, record.sequence_id)
                block.append(record)
                block_positions += max(record.num_positions, 1)
                shard.add_counts(record)
                if block_positions >= self.block_positions:
                    shard.write_block(block)
                    block, block_positions = [], 0
                if shard.num_tokens >= self.max_shard_tokens:
                    shard.write_block(block)
                    block, block_positions = [], 0
                    self._finished(shard.finish())
                    shard = None
            if shard is not None and not self._abort.is_set():
                shard.write_block(block)
                self._finished(shard.finish())
                shard = None
        except BaseException as error:  # handed to the caller by close()/write()
            self._error = error
            self._drain()
        finally:
            if shard is not None:
                shard.discard()

    def _finished(self, info: ShardInfo) -> None:
        self._written.append(info)
        self._next_index += 1
        if self._on_shard is not None:
            self._on_shard(info)

    def _drain(self) -> None:
        """After an error: consume the queue until the sentinel so a producer never blocks."""
        while True:
            try:
                if self._queue.get(timeout=1.0) is None:
                    return
            except queue.Empty:
                if self._closed:
                    return


class _OpenShard:
    """A shard being written: temp file + Arrow IPC writer; finished or discarded exactly once."""

    def __init__(self, writer: ShardWriter, index: int, first_sequence_id: int) -> None:
        self.writer, self.index = writer, index
        self.name = shard_name(writer.split, writer.rank, index)
        self.first_sequence_id = int(first_sequence_id)
        self.num_sequences = self.num_tokens = self.num_positions = 0
        fd, self.temp = tempfile.mkstemp(
            prefix=f"{TEMP_PREFIX}{self.name.removesuffix('.arrow')}-",
            suffix=".arrow",
            dir=writer.directory,
        )
        self.handle = os.fdopen(fd, "wb")
        schema = writer.codec.schema.with_metadata(writer.codec.schema_metadata())
        self.ipc = pa.ipc.new_file(self.handle, schema)

    def add_counts(self, record: SequenceRecord) -> None:
        self.num_sequences += 1
        self.num_tokens += record.num_tokens
        self.num_positions += record.num_positions

    def write_block(self, block: list[SequenceRecord]) -> None:
        if block:
            self.ipc.write_batch(self.writer.codec.encode(block))

    def finish(self) -> ShardInfo:
        self.ipc.close()
        self.handle.flush()
        os.fsync(self.handle.fileno())
        self.handle.close()
        final = self.writer.directory / self.name
        journal = final.with_suffix(".json")
        with contextlib.suppress(FileNotFoundError):
            journal.unlink()  # a stale entry from an earlier build must never describe new data
        checksum = file_checksum(self.temp)
        size = os.path.getsize(self.temp)
        os.replace(self.temp, final)
        self.temp = None
        fsync_dir(self.writer.directory)
        info = ShardInfo(
            name=self.name,
            split=self.writer.split,
            rank=self.writer.rank,
            index=self.index,
            num_sequences=self.num_sequences,
            num_tokens=self.num_tokens,
            num_positions=self.num_positions,
            first_sequence_id=self.first_sequence_id,
            bytes=size,
            checksum=checksum,
            mode=self.writer.codec.mode,
        )
        atomic_write_bytes(journal, json.dumps(info.to_dict(), indent=1).encode())
        return info

    def discard(self) -> None:
        if self.temp is None:
            return
        with contextlib.suppress(Exception):
            self.ipc.close()
        with contextlib.suppress(Exception):
            self.handle.close()
        with contextlib.suppress(OSError):
            os.unlink(self.temp)
        self.temp = None

"""ShardWriter: round trips, shard rolling, the journal, atomicity and error hand-off."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kdcache.cache import (
    CacheError,
    ConfigError,
    SequenceRecord,
    ShardWriter,
    canonical_order,
    list_complete_shards,
    open_cache,
    shard_summary,
    write_manifest,
)
from kdcache.cache.format.blocks import synthetic_records
from kdcache.cache.format.shards import TEMP_PREFIX, remove_incomplete

TOP_K, VOCAB = 8, 3000


def commit(cache_dir, shards, **overrides):
    """Write the manifest a builder would write (settings + shard summary)."""
    manifest = {
        "teacher": "tiny",
        "vocab_size": VOCAB,
        "top_k": TOP_K,
        "temperature": 1.0,
        "tokenizer_fingerprint": "sha256:test",
        **shard_summary(shards),
        **overrides,
    }
    write_manifest(cache_dir, manifest)
    return open_cache(cache_dir)


def assert_exact_equal(written: SequenceRecord, read: SequenceRecord) -> None:
    """Read == written after fp16 rounding of the log-probs, rows in canonical order."""
    assert read.sequence_id == written.sequence_id
    np.testing.assert_array_equal(read.input_ids, written.input_ids)
    np.testing.assert_array_equal(read.positions, written.positions)
    lp16 = written.topk_logprobs.astype(np.float16).astype(np.float32)
    order = canonical_order(written.topk_ids, lp16)
    np.testing.assert_array_equal(read.topk_ids, np.take_along_axis(written.topk_ids, order, 1))
    np.testing.assert_array_equal(read.topk_logprobs, np.take_along_axis(lp16, order, 1))
    np.testing.assert_array_equal(read.tail_mass, written.tail_mass)
    assert read.topk_ids.dtype == np.int32 and read.topk_logprobs.dtype == np.float32
    assert read.tail_mass.dtype == np.float32 and read.positions.dtype == np.int32


def file_names(cache_dir) -> list[str]:
    return sorted(p.name for p in (cache_dir / "shards").iterdir())


def test_round_trip_many_shards_and_blocks(tmp_path):
    records = synthetic_records(120, top_k=TOP_K, vocab_size=VOCAB, seed=1)
    with ShardWriter(
        tmp_path, "train", top_k=TOP_K, vocab_size=VOCAB, max_shard_tokens=700, block_positions=90
    ) as writer:
        for record in records:
            writer.write(record)
    shards = writer.close()
    assert len(shards) > 3
    assert [s.index for s in shards] == list(range(len(shards)))
    assert sum(s.num_sequences for s in shards) == len(records)
    assert sum(s.num_tokens for s in shards) == sum(r.num_tokens for r in records)
    assert sum(s.num_positions for s in shards) == sum(r.num_positions for r in records)
    assert all(s.num_tokens >= 700 for s in shards[:-1])
    assert list_complete_shards(tmp_path) == shards
    cache = commit(tmp_path, shards)
    read = list(cache.sequences("train"))
    assert len(read) == len(records)
    for written, got in zip(records, read, strict=True):
        assert_exact_equal(written, got)
    # shards are a prefix stream: first_sequence_id + counts chain up
    assert [s.first_sequence_id for s in shards] == list(
        np.cumsum([0] + [s.num_sequences for s in shards[:-1]])
    )


def test_padding_rows_and_ties_use_the_convention(tmp_path):
    ids = np.array([[5, 9, 2, 0], [7, 3, 0, 0], [0, 0, 0, 0]], np.int32)
    logprobs = np.array(
        [[-0.5, -1.25, -1.25, -np.inf], [-0.1, -3.0, -np.inf, -np.inf], [-2.0, -2.0, -2.0, -2.0]],
        np.float32,
    )
    record = SequenceRecord(
        sequence_id=7,
        input_ids=np.array([1, 2, 3], np.int32),
        topk_ids=ids,
        topk_logprobs=logprobs,
        tail_mass=np.array([0.1, 0.2, 0.3], np.float32),
        positions=np.arange(3, dtype=np.int32),
    )
    with ShardWriter(tmp_path, "train", top_k=4, vocab_size=16) as writer:
        writer.write(record)
    cache = commit(tmp_path, writer.close(), top_k=4, vocab_size=16)
    (got,) = list(cache.sequences())
    # ties (-1.25) come back by ascending id; padding stays at the end as (0, -inf)
    np.testing.assert_array_equal(got.topk_ids, [[5, 2, 9, 0], [7, 3, 0, 0], [0, 0, 0, 0]])
    expected = logprobs.copy()
    expected[0] = [-0.5, -1.25, -1.25, -np.inf]
    np.testing.assert_array_equal(got.topk_logprobs, expected.astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(got.tail_mass, record.tail_mass)


def test_empty_writer_writes_no_shard(tmp_path):
    with ShardWriter(tmp_path, "train", top_k=TOP_K, vocab_size=VOCAB) as writer:
        pass
    assert writer.close() == []
    assert list_complete_shards(tmp_path) == []


def test_exception_inside_with_keeps_complete_shards_only(tmp_path):
    records = synthetic_records(60, top_k=TOP_K, vocab_size=VOCAB, seed=2)
    writer = ShardWriter(tmp_path, "train", top_k=TOP_K, vocab_size=VOCAB, max_shard_tokens=400)
    with pytest.raises(RuntimeError, match="teacher crashed"), writer:
        for record in records:
            writer.write(record)
        raise RuntimeError("teacher crashed")
    complete = list_complete_shards(tmp_path)
    # every record handed over before the crash is written; only the last shard is unfinished
    tokens = np.cumsum([r.num_tokens for r in records])
    full_shards = 0
    while tokens.size and tokens[-1] >= 400:
        end = int(np.argmax(tokens >= 400))
        full_shards, tokens = full_shards + 1, tokens[end + 1 :] - tokens[end]
    assert len(complete) == full_shards > 0
    names = file_names(tmp_path)
    assert not [n for n in names if n.startswith(TEMP_PREFIX)]
    assert sorted(n for n in names if n.endswith(".arrow")) == [s.name for s in complete]
    assert [s.index for s in complete] == list(range(len(complete)))
    # the complete shards hold a prefix of the stream: resume from there
    done = sum(s.num_sequences for s in complete)
    with ShardWriter(
        tmp_path,
        "train",
        top_k=TOP_K,
        vocab_size=VOCAB,
        max_shard_tokens=400,
        start_index=len(complete),
    ) as writer:
        for record in records[done:]:
            writer.write(record)
    cache = commit(tmp_path, list_complete_shards(tmp_path))
    read = list(cache.sequences())
    assert [r.sequence_id for r in read] == [r.sequence_id for r in records]
    for written, got in zip(records, read, strict=True):
        assert_exact_equal(written, got)


def test_orphans_and_bad_journals_are_ignored(tmp_path):
    records = synthetic_records(10, top_k=TOP_K, vocab_size=VOCAB, seed=3)
    with ShardWriter(tmp_path, "train", top_k=TOP_K, vocab_size=VOCAB) as writer:
        for record in records:
            writer.write(record)
    (info,) = writer.close()
    shards = tmp_path / "shards"
    (shards / f"{TEMP_PREFIX}abc.arrow").write_bytes(b"half a shard")
    (shards / "train-r00000-00001.arrow").write_bytes(b"renamed but no journal")
    (shards / "train-r00000-00002.json").write_text("{not json")
    assert list_complete_shards(tmp_path) == [info]
    (shards / f"{TEMP_PREFIX}train-r00000-00001-xyz.arrow").write_bytes(b"killed mid-write")
    (shards / f"{TEMP_PREFIX}train-r00001-00000-xyz.arrow").write_bytes(b"another rank's")
    assert remove_incomplete(tmp_path, "train", 0) == [
        f"{TEMP_PREFIX}train-r00000-00001-xyz.arrow",
        "train-r00000-00001.arrow",
    ]
    assert (shards / f"{TEMP_PREFIX}train-r00001-00000-xyz.arrow").exists()
    assert (shards / info.name).exists()
    # a journal whose shard has another size is not complete
    journal = json.loads((shards / "train-r00000-00000.json").read_text())
    assert journal["bytes"] == info.bytes and journal["checksum"].startswith("sha256:")
    with open(shards / info.name, "ab") as handle:
        handle.write(b"x")
    assert list_complete_shards(tmp_path) == []


def test_thread_error_is_reraised_by_close(tmp_path, monkeypatch):
    from kdcache.cache.format.blocks import BlockCodec

    def broken(self, block):
        raise OSError("disk full")

    monkeypatch.setattr(BlockCodec, "encode", broken)
    writer = ShardWriter(tmp_path, "train", top_k=TOP_K, vocab_size=VOCAB, block_positions=1)
    records = synthetic_records(50, top_k=TOP_K, vocab_size=VOCAB, seed=4)
    with pytest.raises(OSError, match="disk full"):
        for record in records:
            writer.write(record)
        writer.close()
    assert not [n for n in file_names(tmp_path) if n.startswith(TEMP_PREFIX)]
    assert list_complete_shards(tmp_path) == []


def test_bad_settings_and_records_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="mode 'lossy' is not one of exact, compact"):
        ShardWriter(tmp_path, "train", top_k=4, vocab_size=16, mode="lossy")
    with pytest.raises(ConfigError, match="vocab_size 3 must be >= top_k 4"):
        ShardWriter(tmp_path, "train", top_k=4, vocab_size=3)
    with pytest.raises(ConfigError, match="split name"):
        ShardWriter(tmp_path, "train/x", top_k=4, vocab_size=16)
    (record,) = synthetic_records(1, top_k=4, vocab_size=16, chat_every=0)
    with (
        ShardWriter(tmp_path, "train", top_k=8, vocab_size=16) as writer,
        pytest.raises(ConfigError, match=r"expected topk arrays \(M, 8\)"),
    ):
        writer.write(record)
    with ShardWriter(tmp_path, "train", top_k=4, vocab_size=16) as writer:
        record.topk_ids[0, 0] = 16
        with pytest.raises(ConfigError, match=r"ids must lie in \[0, 16\)"):
            writer.write(record)
    with ShardWriter(tmp_path, "train", top_k=4, vocab_size=16) as writer:
        record.topk_ids[0, 0] = 1
        record.topk_logprobs[0] = record.topk_logprobs[0, ::-1].copy()
        with pytest.raises(ConfigError, match="sorted by log-prob, descending"):
            writer.write(record)
        record.topk_logprobs[0, 0] = np.nan
        with pytest.raises(ConfigError, match="must not be NaN"):
            writer.write(record)
    with pytest.raises(CacheError, match="after close"):
        writer.write(record)


def test_write_hands_records_to_the_thread_without_waiting_for_encoding(tmp_path, monkeypatch):
    import threading

    from kdcache.cache.format.blocks import BlockCodec

    release = threading.Event()
    encoder_threads = set()
    real_encode = BlockCodec.encode

    def slow_encode(self, block):
        encoder_threads.add(threading.current_thread().name)
        release.wait(timeout=30)  # the "compression" is stuck until the producer is done
        return real_encode(self, block)

    monkeypatch.setattr(BlockCodec, "encode", slow_encode)
    records = synthetic_records(6, top_k=TOP_K, vocab_size=VOCAB, seed=6)
    writer = ShardWriter(
        tmp_path, "train", top_k=TOP_K, vocab_size=VOCAB, block_positions=1, queue_size=8
    )
    for record in records:  # returns although no block could be encoded yet
        writer.write(record)
    assert not release.is_set()
    release.set()
    (info,) = writer.close()
    assert info.num_sequences == 6
    assert encoder_threads == {"kdcache-shards-train-r0"}


def test_ranks_write_side_by_side_and_read_in_rank_order(tmp_path):
    records = synthetic_records(40, top_k=TOP_K, vocab_size=VOCAB, seed=8)
    writers = [
        ShardWriter(
            tmp_path, "train", rank=rank, top_k=TOP_K, vocab_size=VOCAB, max_shard_tokens=300
        )
        for rank in (1, 0)
    ]
    for record in records:  # sequence_id % 2 == rank, interleaved like two processes
        writers[1 - record.sequence_id % 2].write(record)
    shards = writers[0].close() + writers[1].close()
    assert {s.name.split("-")[1] for s in shards} == {"r00000", "r00001"}
    cache = commit(tmp_path, list_complete_shards(tmp_path))
    assert [(s.rank, s.index) for s in cache.shards("train")] == sorted(
        (s.rank, s.index) for s in shards
    )
    ids = [r.sequence_id for r in cache.sequences("train")]
    assert ids == list(range(0, 40, 2)) + list(range(1, 40, 2))

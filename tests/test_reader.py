"""open_cache / Cache: manifest validation, splits, corruption detection naming the shard."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kdcache.cache import CacheError, ShardWriter, open_cache, read_manifest, shard_summary
from kdcache.cache.format.blocks import synthetic_records
from kdcache.cache.format.manifest import REQUIRED_KEYS, write_manifest

TOP_K, VOCAB = 4, 500


def build(cache_dir, splits=("train", "holdout"), num_records=30, mode="exact"):
    shards = []
    for offset, split in enumerate(splits):
        records = synthetic_records(num_records, top_k=TOP_K, vocab_size=VOCAB, seed=offset)
        with ShardWriter(
            cache_dir, split, top_k=TOP_K, vocab_size=VOCAB, max_shard_tokens=300, mode=mode
        ) as writer:
            for record in records:
                writer.write(record)
        shards += writer.close()
    manifest = {
        "teacher": "tiny",
        "vocab_size": VOCAB,
        "top_k": TOP_K,
        "temperature": 1.0,
        "tokenizer_fingerprint": "sha256:test",
        **shard_summary(shards),
    }
    write_manifest(cache_dir, manifest)
    return manifest


@pytest.mark.parametrize("mode", ["exact", "compact"])
def test_open_cache_exposes_manifest_splits_and_shards(tmp_path, mode):
    manifest = build(tmp_path, mode=mode)
    assert manifest["mode"] == mode
    cache = open_cache(tmp_path)
    assert cache.manifest == manifest == read_manifest(tmp_path)
    assert cache.path == tmp_path and set(cache.splits) == {"train", "holdout"}
    for split in cache.splits:
        shards = cache.shards(split)
        assert [(s.rank, s.index) for s in shards] == sorted((s.rank, s.index) for s in shards)
        records = list(cache.sequences(split))
        assert len(records) == manifest["splits"][split]["num_sequences"] == 30
        assert sum(r.num_tokens for r in records) == manifest["splits"][split]["num_tokens"]
        for record in records:
            assert record.topk_ids.shape == (record.num_positions, TOP_K)
            lp = record.topk_logprobs
            assert np.all(record.tail_mass >= 0)
            assert not np.any(lp[:, 1:] > lp[:, :-1])  # descending, padding (-inf) last
        fast = list(cache.sequences(split, verify=False))
        assert all(
            np.array_equal(a.topk_ids, b.topk_ids) for a, b in zip(records, fast, strict=True)
        )
    assert cache.manifest["num_sequences"] == 60


def test_unknown_split_lists_the_splits(tmp_path):
    build(tmp_path)
    with pytest.raises(
        CacheError, match="has no split 'validation'; its splits are: holdout, train"
    ):
        open_cache(tmp_path).shards("validation")


def test_missing_paths_and_manifest_are_refused(tmp_path):
    with pytest.raises(CacheError, match="does not exist: run `kdcache build` first"):
        open_cache(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(CacheError, match="is a file, not a cache directory"):
        open_cache(tmp_path / "file")
    with pytest.raises(
        CacheError, match=r"is not a kdcache cache \(no manifest\.json and no trace"
    ):
        open_cache(tmp_path)  # a directory with other files: no build ever ran there
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CacheError, match="is an empty directory, not a cache: no `kdcache build`"):
        open_cache(empty)


def test_bad_manifests_are_refused(tmp_path):
    manifest = build(tmp_path)
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(CacheError, match="format_version 99, this kdcache reads"):
        open_cache(tmp_path)
    path.write_text(json.dumps({**manifest, "mode": "sampled-v9"}))
    with pytest.raises(CacheError, match="storage mode 'sampled-v9' is unknown"):
        open_cache(tmp_path)
    incomplete = {k: v for k, v in manifest.items() if k != "tokenizer_fingerprint"}
    path.write_text(json.dumps(incomplete))
    with pytest.raises(CacheError, match="missing key 'tokenizer_fingerprint'"):
        open_cache(tmp_path)
    path.write_text("{torn")
    with pytest.raises(CacheError, match="cannot be read"):
        open_cache(tmp_path)
    with pytest.raises(CacheError, match="missing key"):
        write_manifest(tmp_path, {"format_version": 1})
    assert set(REQUIRED_KEYS) <= set(manifest)


@pytest.mark.parametrize("verify", [True, False])
def test_flipped_byte_names_the_shard(tmp_path, verify):
    build(tmp_path, splits=("train",))
    cache = open_cache(tmp_path)
    info = cache.shards("train")[1]
    path = tmp_path / "shards" / info.name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))
    with pytest.raises(CacheError, match=f"shard {info.name} .*(kdcache verify|rebuild)"):
        list(cache.sequences("train", verify=verify))


def test_truncated_and_missing_shards_name_the_shard(tmp_path):
    build(tmp_path, splits=("train",))
    cache = open_cache(tmp_path)
    first, second = cache.shards("train")[:2]
    path = tmp_path / "shards" / first.name
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(CacheError, match=f"shard {first.name} is .* bytes, the manifest says"):
        list(cache.read_shard(first))
    (tmp_path / "shards" / second.name).unlink()
    with pytest.raises(CacheError, match=f"shard {second.name} is missing"):
        list(cache.read_shard(second))


def test_unknown_shard_mode_is_refused(tmp_path, monkeypatch):
    from kdcache.cache.format import blocks as fmt

    build(tmp_path, splits=("train",))
    cache = open_cache(tmp_path)
    monkeypatch.setattr(fmt, "MODES", ("exact",))
    info = cache.shards("train")[0]
    monkeypatch.setattr(fmt, "SUPPORTED_FORMAT_VERSIONS", (3,))
    with pytest.raises(CacheError, match=f"shard {info.name} has format_version 2"):
        list(cache.read_shard(info))


def test_empty_split_listed_by_the_summary_reads_as_empty(tmp_path):
    records = synthetic_records(5, top_k=TOP_K, vocab_size=VOCAB, seed=9)
    with ShardWriter(tmp_path, "train", top_k=TOP_K, vocab_size=VOCAB) as writer:
        for record in records:
            writer.write(record)
    summary = shard_summary(writer.close(), splits=["train", "holdout"])
    assert summary["splits"]["holdout"] == {
        "num_sequences": 0, "num_tokens": 0, "num_positions": 0, "num_shards": 0, "bytes": 0
    }  # fmt: skip
    manifest = {"teacher": "t", "vocab_size": VOCAB, "top_k": TOP_K, "temperature": 2.0,
                "tokenizer_fingerprint": "f", **summary}  # fmt: skip
    write_manifest(tmp_path, manifest)
    cache = open_cache(tmp_path)
    assert cache.shards("holdout") == [] and list(cache.sequences("holdout")) == []
    assert [r.sequence_id for r in cache.sequences("train")] == list(range(5))


def test_shard_from_another_build_is_refused(tmp_path):
    build(tmp_path, splits=("train",))
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    write_manifest(tmp_path, {**manifest, "top_k": TOP_K + 1})
    cache = open_cache(tmp_path)
    info = cache.shards("train")[0]
    with pytest.raises(
        CacheError,
        match=f"shard {info.name} holds top_k {TOP_K}, the manifest says top_k {TOP_K + 1}",
    ):
        list(cache.read_shard(info))

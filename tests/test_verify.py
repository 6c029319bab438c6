"""verify_cache and `kdcache verify`: OK on a sound cache, each bad shard by name, exit codes."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from kdcache.cache import CacheError, ShardWriter, shard_summary, verify_cache, write_manifest
from kdcache.cache.format.blocks import synthetic_records
from kdcache.cli.app import app

TOP_K, VOCAB = 4, 500


@pytest.fixture
def cache_dir(tmp_path):
    records = synthetic_records(40, top_k=TOP_K, vocab_size=VOCAB, seed=5)
    with ShardWriter(tmp_path, "train", top_k=TOP_K, vocab_size=VOCAB, max_shard_tokens=250) as w:
        for record in records:
            w.write(record)
    shards = w.close()
    assert len(shards) >= 3
    manifest = {
        "teacher": "tiny",
        "vocab_size": VOCAB,
        "top_k": TOP_K,
        "temperature": 1.0,
        "tokenizer_fingerprint": "sha256:test",
        **shard_summary(shards),
    }
    write_manifest(tmp_path, manifest)
    return tmp_path


def shard_names(cache_dir):
    return sorted(p.name for p in (cache_dir / "shards").glob("*.arrow"))


def test_verify_reports_each_bad_shard(cache_dir):
    assert verify_cache(cache_dir) == []
    names = shard_names(cache_dir)
    flipped = cache_dir / "shards" / names[0]
    data = bytearray(flipped.read_bytes())
    data[100] ^= 1
    flipped.write_bytes(bytes(data))
    truncated = cache_dir / "shards" / names[1]
    truncated.write_bytes(truncated.read_bytes()[:50])
    (cache_dir / "shards" / names[2]).unlink()
    assert verify_cache(cache_dir) == names[:3]


def test_verify_cli_exit_codes(cache_dir, tmp_path_factory):
    runner = CliRunner()
    result = runner.invoke(app, ["verify", str(cache_dir)])
    assert result.exit_code == 0, result.output
    assert f"OK {cache_dir}: all {len(shard_names(cache_dir))} shards match" in result.output
    name = shard_names(cache_dir)[1]
    path = cache_dir / "shards" / name
    data = bytearray(path.read_bytes())
    data[-20] ^= 0xFF
    path.write_bytes(bytes(data))
    result = runner.invoke(app, ["verify", str(cache_dir)])
    assert result.exit_code == 1
    assert f"BAD {name}: fails its sha256 checksum (corrupt)" in result.output
    assert f"1 of {len(shard_names(cache_dir))} shards of {cache_dir} are bad" in result.output
    assert shard_names(cache_dir)[0] not in result.output
    empty = tmp_path_factory.mktemp("not_a_cache")
    result = runner.invoke(app, ["verify", str(empty)])
    assert result.exit_code == 2
    assert "error:" in result.output and "is an empty directory, not a cache" in result.output
    assert "Traceback" not in result.output


def test_verify_refuses_a_non_cache(tmp_path):
    with pytest.raises(CacheError, match="is an empty directory, not a cache"):
        verify_cache(tmp_path)
    (tmp_path / "build_state.json").write_text("{}")  # what an interrupted build leaves
    with pytest.raises(CacheError, match=r"has no manifest\.json: the build did not finish"):
        verify_cache(tmp_path)

"""The column-group codecs: registry, unchanged bytes, and the settings every shard must match.

* The encoded blocks equal the golden digests of the encoder before the codec split
  (``tests/format_golden.py`` says how they were made).
* The registry gives each storage mode its groups; a shard's schema is theirs, in order.
* Compact mode refuses top-k + tail samples (its dropped mass would join the tail after the
  samples were drawn from it) at BuildConfig, in the CLI, in the writer and on read.
* The reader checks every group's settings (tail_samples too) against the manifest.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from kdcache.cache import CacheError, ConfigError, ShardWriter, open_cache, shard_summary
from kdcache.cache.format.blocks import FORMAT_VERSION, BlockCodec, synthetic_records
from kdcache.cache.format.codecs import CODECS, MODES, ShardSettings, codecs_for
from kdcache.cache.format.manifest import write_manifest
from kdcache.cache.format.modes import describe_storage, storage_mode
from kdcache.cli.app import app
from tests import format_golden

TOP_K, VOCAB, SAMPLES = 4, 300, 3


@pytest.mark.parametrize("case", sorted(format_golden.CASES))
def test_encoded_blocks_equal_the_golden_digests_of_the_old_encoder(case):
    golden = json.loads(format_golden.GOLDEN_PATH.read_text(encoding="utf-8"))[case]
    mode, top_k, vocab_size, tail_samples = format_golden.CASES[case]
    records = format_golden.golden_records(top_k, vocab_size, tail_samples)
    assert format_golden.inputs_digest(records) == golden["inputs"], (
        "the golden inputs changed (numpy's generator?): regenerate format_golden.json with the "
        "encoder of b7736fd, as tests/format_golden.py says"
    )
    codec = BlockCodec(mode, top_k=top_k, vocab_size=vocab_size, tail_samples=tail_samples)
    encoded = json.loads(json.dumps(format_golden.encoded_digest(codec, records)))
    expected = {key: golden[key] for key in ("schema", "metadata", "blocks")}
    # format_version 2 (issue 25) changed only the version key: every column's bytes are v1's
    expected["metadata"] = [
        [key, str(FORMAT_VERSION) if key == "format_version" else value]
        for key, value in expected["metadata"]
    ]
    assert encoded == expected


def test_the_registry_gives_each_storage_mode_its_column_groups():
    assert list(CODECS) == ["tokens", "topk", "tail_samples", "tail_counts", "observed"]
    assert MODES[:4] == ("exact", "compact", "q8", "unique")
    expected = {
        "topk_bucket": ["tokens", "topk"],
        "topk_samples": ["tokens", "topk", "tail_samples"],
        "samples": ["tokens", "topk", "tail_samples"],
    }
    for top_k, tail_samples in [(8, 0), (8, 4), (0, 4)]:
        settings = ShardSettings("exact", top_k, 50, tail_samples)
        mode = storage_mode({"top_k": top_k, "tail_samples": tail_samples})
        groups = codecs_for(settings)
        assert [group.name for group in groups] == expected[mode]
        codec = BlockCodec("exact", top_k, 50, tail_samples=tail_samples)
        assert codec.schema.names == [name for g in groups for name, _ in g.fields]
    assert describe_storage({"top_k": 24, "tail_samples": 16}) == "top-24 + 16 tail samples"
    assert describe_storage({"top_k": 0, "tail_samples": 8}) == "sampled, 8 draws"
    assert describe_storage({"top_k": 64}) == "top-64"


def _records_with_samples(num_records: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    records = synthetic_records(num_records, top_k=TOP_K, vocab_size=VOCAB, seed=seed)
    for record in records:
        shape = (record.num_positions, SAMPLES)
        record.tail_ids = rng.integers(0, VOCAB, shape).astype(np.int32)
        record.tail_logprobs = (-1 - 5 * rng.random(shape)).astype(np.float32)
    return records


def _cache(tmp_path, stored_samples: int, **manifest_overrides):
    """A one-split cache written by ShardWriter; the manifest can be made to disagree."""
    records = (
        _records_with_samples(8)
        if stored_samples
        else synthetic_records(8, top_k=TOP_K, vocab_size=VOCAB)
    )
    with ShardWriter(
        tmp_path, "train", top_k=TOP_K, vocab_size=VOCAB, tail_samples=stored_samples
    ) as writer:
        for record in records:
            writer.write(record)
    manifest = {
        "teacher": "t",
        "vocab_size": VOCAB,
        "top_k": TOP_K,
        "temperature": 1.0,
        "tokenizer_fingerprint": "f",
        **({"tail_samples": stored_samples} if stored_samples else {}),
        **shard_summary(writer.close()),
    }
    write_manifest(tmp_path, {**manifest, **manifest_overrides})
    return records


def test_reader_checks_tail_samples_against_the_manifest(tmp_path):
    written = _cache(tmp_path / "good", SAMPLES)
    read = list(open_cache(tmp_path / "good").sequences())
    for before, after in zip(written, read, strict=True):
        np.testing.assert_array_equal(np.sort(before.tail_ids, axis=1), after.tail_ids)

    _cache(tmp_path / "more", SAMPLES, tail_samples=SAMPLES + 2)
    cache = open_cache(tmp_path / "more")
    name = cache.shards("train")[0].name
    message = f"shard {name} holds tail_samples {SAMPLES}, the manifest says tail_samples 5"
    with pytest.raises(CacheError, match=message):
        list(cache.sequences())

    _cache(tmp_path / "none", SAMPLES, tail_samples=0)
    with pytest.raises(
        CacheError, match=f"shard {name} holds tail_samples 3, .* tail_samples none"
    ):
        list(open_cache(tmp_path / "none").sequences())

    _cache(tmp_path / "absent", 0, tail_samples=SAMPLES)
    with pytest.raises(CacheError, match=f"shard {name} holds tail_samples none, .* says tail_sa"):
        list(open_cache(tmp_path / "absent").sequences())


def test_reader_checks_the_mode_against_the_manifest(tmp_path):
    _cache(tmp_path, 0, mode="compact")
    cache = open_cache(tmp_path)
    name = cache.shards("train")[0].name
    with pytest.raises(CacheError, match=f"shard {name} holds mode exact, the manifest says mode"):
        list(cache.sequences())


COMPACT_SAMPLES = "--mode compact cannot store tail samples"


def test_compact_with_tail_samples_is_refused_by_the_build_config(tmp_path):
    from kdcache.cache.build.pipeline import BuildConfig

    settings = dict(teacher="t", data="d", out=tmp_path / "c", mode="compact")
    with pytest.raises(ConfigError, match=rf"{COMPACT_SAMPLES} \(top-k 8 \+ 4 samples\)"):
        BuildConfig(**settings, top_k=8, tail_samples=4)
    with pytest.raises(ConfigError, match=rf"{COMPACT_SAMPLES} \(top-k 8 \+ 8 samples\)"):
        BuildConfig(**settings)  # the defaults: top-8 + 8 samples
    assert BuildConfig(**settings, tail_samples=0).tail_samples == 0  # compact top-k
    assert BuildConfig(**settings, top_k=0, tail_samples=8).top_k == 0  # sampled: nothing dropped
    assert not (tmp_path / "c").exists()


def test_compact_with_tail_samples_is_refused_by_the_cli_and_writes_nothing(tmp_path):
    out = tmp_path / "c"
    args = ["build", "--teacher", "t", "--data", "d", "--out", str(out), "--mode", "compact"]
    result = CliRunner().invoke(app, [*args, "--top-k", "8", "--tail-samples", "4"])
    assert result.exit_code == 2, result.output
    assert f"error: {COMPACT_SAMPLES} (top-k 8 + 4 samples)" in result.output
    assert "--tail-samples 0 for a compact top-k cache" in result.output
    assert "Traceback" not in result.output and not out.exists()


def test_compact_with_tail_samples_is_refused_by_the_writer_and_on_read(tmp_path):
    with pytest.raises(ConfigError, match=COMPACT_SAMPLES):
        BlockCodec("compact", top_k=TOP_K, vocab_size=VOCAB, tail_samples=SAMPLES)
    with pytest.raises(ConfigError, match=COMPACT_SAMPLES):
        ShardWriter(tmp_path / "c", "train", top_k=4, vocab_size=9, mode="compact", tail_samples=2)
    assert not (tmp_path / "c").exists()
    # a shard of that combination (older kdcache wrote them) is refused, naming the shard
    exact = BlockCodec("exact", top_k=TOP_K, vocab_size=VOCAB, tail_samples=SAMPLES)
    compact = BlockCodec("compact", top_k=TOP_K, vocab_size=VOCAB)
    metadata = {**exact.schema_metadata(), **compact.schema_metadata()}  # mode, scheme, samples
    assert metadata[b"mode"] == b"compact" and metadata[b"tail_samples"] == b"3"
    with pytest.raises(CacheError, match=f"shard s-2 cannot be read: {COMPACT_SAMPLES}"):
        BlockCodec.from_schema_metadata(metadata, "s-2")


def test_compact_drops_mass_into_the_tail_that_samples_would_not_see():
    """Why the combination is refused: compaction raises tail_mass after the draw."""
    (record,) = synthetic_records(1, top_k=TOP_K, vocab_size=VOCAB, chat_every=0)
    record.topk_logprobs[:] = np.log([0.99995, 4e-5, 5e-6, 4e-6], dtype=np.float32)
    record.tail_mass[:] = 1e-6
    codec = BlockCodec("compact", top_k=TOP_K, vocab_size=VOCAB)
    (decoded,) = codec.decode(codec.encode([record]))
    kept = np.isfinite(decoded.topk_logprobs[0]).sum()
    dropped = np.exp(record.topk_logprobs[0, kept:].astype(np.float64)).sum()
    assert kept == 1 and dropped > 10 * record.tail_mass[0]  # the tail grew 40-fold
    np.testing.assert_allclose(decoded.tail_mass, record.tail_mass + dropped, rtol=1e-3)


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        # the settings as older caches recorded them (the encoding was always exact then)
        ({"top_k": 24, "tail_samples": 16, "mode": "exact"}, "9f9f7e17ac757ab0"),  # old default
        ({"top_k": 64, "mode": "exact"}, "e2e8866846868dc0"),
        ({"top_k": 0, "tail_samples": 8, "mode": "exact"}, "f594d3af799109c1"),
        ({"top_k": 16, "mode": "compact"}, "215a544d1807a2b3"),
    ],
)
def test_build_settings_hash_is_the_one_older_caches_recorded(
    monkeypatch, tmp_path, settings, expected
):
    """The settings fingerprint now comes from the codecs' settings; the hashes (first 16 hex
    digits) are those that ``fingerprints_for`` of b7736fd computed, so older caches resume
    (built without the observed column of format 2: with it the settings, and the hash, differ)."""
    from kdcache.cache.build import pipeline as build

    for name in ("teacher_fingerprint", "tokenizer_details", "data_fingerprint"):
        monkeypatch.setattr(build, name, lambda *args: {})
    config = build.BuildConfig(
        teacher="t", data="d", out=tmp_path, observed_logprobs=False, **settings
    )
    fingerprints = build.fingerprints_for(config, None, None, [], "torch.float32", 1000)
    assert fingerprints["settings"]["hash"][:16] == expected

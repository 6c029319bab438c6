"""The ``observed`` column (format 2): the teacher's log-prob of the token that follows.

Computed in the teacher pass against the model's own dense forward, for the head path, the
full-logits path and the tail-sampling path; round trip through the writer and reader; caches
without it (format 1, ``--no-observed-logprobs``) still read; ``kdcache inspect`` reports the
teacher's held-out CE from it.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from kdcache.cache import ShardWriter, open_cache, shard_summary
from kdcache.cache.build.teacher import TeacherRunner, load_model
from kdcache.cache.errors import ConfigError
from kdcache.cache.format.blocks import (
    FORMAT_VERSION,
    SUPPORTED_FORMAT_VERSIONS,
    BlockCodec,
    synthetic_records,
)
from kdcache.cache.format.manifest import write_manifest
from kdcache.cache.read.inspect import inspect_cache
from kdcache.cli.app import app

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_format_version_two_reads_one():
    assert FORMAT_VERSION == 2 and SUPPORTED_FORMAT_VERSIONS == (1, 2)


@pytest.mark.parametrize(("use_head", "tail_samples"), [(True, 0), (False, 0), (True, 3)])
def test_observed_logprobs_equal_the_dense_forward(tiny_teacher_dir, use_head, tail_samples):
    model = load_model(str(tiny_teacher_dir), torch.float32, torch.device("cpu"))
    runner = TeacherRunner(model, top_k=4, temperature=1.5, use_head=use_head,
                           tail_samples=tail_samples, observed_logprobs=True)  # fmt: skip
    rng = np.random.default_rng(0)
    lengths = (1, 6, 17, 9)
    sequences = [rng.integers(0, model.config.vocab_size, n).astype(np.int32) for n in lengths]
    positions = [np.arange(n) for n in lengths]
    positions[2] = np.array([0, 3, 16])  # a subset (chat); 16 is the last: no next token
    results = runner.run(sequences, positions, sequence_ids=list(range(len(lengths))))
    for seq, pos, rows in zip(sequences, positions, results, strict=True):
        with torch.no_grad():
            logits = model(input_ids=torch.as_tensor(seq[None], dtype=torch.long)).logits[0]
        reference = torch.log_softmax(logits.double() / 1.5, -1)  # (T, V)
        want = np.full(len(pos), np.nan)
        inside = pos + 1 < len(seq)
        want[inside] = reference[pos[inside], seq[pos[inside] + 1]].numpy()
        assert rows.observed_logprobs.shape == (len(pos),)
        np.testing.assert_allclose(rows.observed_logprobs, want, atol=2e-5)  # NaN where none
    plain = TeacherRunner(model, top_k=4, temperature=1.5, use_head=use_head,
                          tail_samples=tail_samples)  # fmt: skip
    assert plain.run(sequences, positions, list(range(4)))[1].observed_logprobs is None


def _with_observed(records):
    rng = np.random.default_rng(1)
    for record in records:
        values = -rng.exponential(3.0, record.num_positions).astype(np.float32)
        if record.num_positions:
            values[-1] = np.nan
        record.observed_logprobs = values
    return records


def test_round_trip_and_caches_without_the_column(tmp_path):
    records = _with_observed(synthetic_records(12, top_k=4, vocab_size=300, seed=3))
    for observed in (True, False):
        directory = tmp_path / str(observed)
        with ShardWriter(directory, "holdout", top_k=4, vocab_size=300,
                         observed_logprobs=observed) as writer:  # fmt: skip
            for record in records:
                if not observed:
                    record = type(record)(**{**record.__dict__, "observed_logprobs": None})
                writer.write(record)
        manifest = shard_summary(writer.close(), ["holdout"])
        manifest.update(vocab_size=300, top_k=4, temperature=1.0, teacher="t",
                        tokenizer_fingerprint="x")  # fmt: skip
        if observed:
            manifest["observed_logprobs"] = True
        write_manifest(directory, manifest)
        read = list(open_cache(directory).sequences("holdout"))
        for got, want in zip(read, records, strict=True):
            if observed:
                np.testing.assert_array_equal(
                    got.observed_logprobs,
                    want.observed_logprobs.astype(np.float16).astype(np.float32),
                )
            else:
                assert got.observed_logprobs is None
        report = inspect_cache(directory, full=True)
        if observed:
            values = np.concatenate([r.observed_logprobs for r in read]).astype(np.float64)
            ce = -np.nanmean(values)
            assert report.teacher["positions"] == int(np.isfinite(values).sum())
            assert report.teacher["ce_nats"] == pytest.approx(ce)
            assert report.teacher["perplexity"] == pytest.approx(math.exp(ce))
        else:
            assert report.teacher is None


def test_a_version_one_cache_still_reads(tmp_path):
    records = synthetic_records(4, top_k=3, vocab_size=50)
    with ShardWriter(tmp_path, "train", top_k=3, vocab_size=50) as writer:
        for record in records:
            writer.write(record)
    manifest = shard_summary(writer.close())
    manifest.update(vocab_size=50, top_k=3, temperature=1.0, teacher="t", tokenizer_fingerprint="x",
                    format_version=1)  # fmt: skip
    write_manifest(tmp_path, manifest)
    # a version-1 shard states format_version 1 in its schema: the reader takes it
    codec = BlockCodec.from_schema_metadata(
        {**BlockCodec("exact", 3, 50).schema_metadata(), b"format_version": b"1"}, "s"
    )
    assert [group.name for group in codec.groups] == ["tokens", "topk"]
    assert len(list(open_cache(tmp_path).sequences("train"))) == 4


def test_the_writer_checks_the_column(tmp_path):
    record = synthetic_records(1, top_k=3, vocab_size=50)[0]
    writer = ShardWriter(tmp_path, "train", top_k=3, vocab_size=50, observed_logprobs=True)
    with pytest.raises(ConfigError, match="observed_logprobs"), writer:
        writer.write(record)  # none given
    record.observed_logprobs = np.zeros(record.num_positions, np.float32)
    writer = ShardWriter(tmp_path / "b", "train", top_k=3, vocab_size=50)
    with pytest.raises(ConfigError, match="writer stores none"), writer:
        writer.write(record)


def test_build_cli_flag_and_inspect(tmp_path, tiny_teacher_dir, text_jsonl):
    runner = CliRunner()
    for flag in ("--observed-logprobs", "--no-observed-logprobs"):
        out = tmp_path / flag
        result = runner.invoke(app, ["build", "--teacher", str(tiny_teacher_dir), "--data",
                                     str(text_jsonl), "--out", str(out), "--top-k", "4",
                                     "--max-length", "32", "--limit", "6", "--holdout", "0.5",
                                     flag])  # fmt: skip
        assert result.exit_code == 0, result.output
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["format_version"] == 2
        assert manifest.get("observed_logprobs", False) == (flag == "--observed-logprobs")
        shown = runner.invoke(app, ["inspect", str(out)])
        assert shown.exit_code == 0, shown.output
        assert ("perplexity" in shown.output) == (flag == "--observed-logprobs")

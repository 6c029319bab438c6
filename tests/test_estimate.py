"""`build --estimate`: projected size within 20% of the real cache; nothing written."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from kdcache.cache.build.estimate import estimate_build, k_primes, kept_mass
from kdcache.cache.build.pipeline import BuildConfig, build_cache
from kdcache.cache.read.reader import open_cache
from kdcache.cli.app import app
from tests.conftest import text_rows, write_jsonl

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_k_primes():
    assert k_primes(1) == [1]
    assert k_primes(8) == [1, 2, 4, 8]
    assert k_primes(12) == [1, 2, 4, 8, 12]


@pytest.mark.parametrize("mode", ["exact", "compact"])
def test_estimate_is_within_20_percent_of_the_real_cache(tiny_llama_dir, tmp_path, mode):
    data = write_jsonl(tmp_path / "docs.jsonl", text_rows(60, seed=5))
    out = tmp_path / "cache"
    settings = dict(top_k=16, max_length=64, holdout=0.1, batch_tokens=512, mode=mode)
    config = BuildConfig(
        teacher=str(tiny_llama_dir), data=str(data), out=out, progress=False, **settings
    )
    report = estimate_build(config, sample_sequences=12)
    assert not out.exists()  # the estimate writes nothing
    build_cache(config)
    manifest = open_cache(out).manifest
    assert report.total_tokens == manifest["num_tokens"]  # counted exactly (small dataset)
    for split, entry in manifest["splits"].items():
        assert report.split_sequences[split] == entry["num_sequences"]
    real_bytes = manifest["bytes"]
    assert abs(report.projected_bytes - real_bytes) <= 0.2 * real_bytes, (
        report.projected_bytes,
        real_bytes,
    )
    assert report.tokens_per_second > 0 and report.sample_sequences == 12
    # kept mass equals a direct computation over the same (first 12) cached sequences
    first = list(open_cache(out).sequences("train"))[:12]
    direct = kept_mass(first, 16)
    for k in (1, 16):
        assert report.kept_mass[k]["p50"] == pytest.approx(direct[k]["p50"], abs=2e-3)
    tail = np.concatenate([r.tail_mass for r in first])
    assert report.kept_mass[16]["mean"] == pytest.approx(1 - tail.mean(), abs=2e-3)


@pytest.mark.parametrize("top_k", [8, 0])
def test_estimate_counts_the_tail_samples(tiny_llama_dir, tmp_path, top_k):
    """topk+tail and sampled (top-k 0) builds: the estimate writes the samples like the build."""
    data = write_jsonl(tmp_path / "docs.jsonl", text_rows(40, seed=7))
    out = tmp_path / "cache"
    config = BuildConfig(
        teacher=str(tiny_llama_dir), data=str(data), out=out, progress=False, top_k=top_k,
        tail_samples=12, max_length=64, holdout=0.0, batch_tokens=512,
    )  # fmt: skip
    report = estimate_build(config, sample_sequences=12)
    build_cache(config)
    real_bytes = open_cache(out).manifest["bytes"]
    assert abs(report.projected_bytes - real_bytes) <= 0.2 * real_bytes, (
        report.projected_bytes,
        real_bytes,
    )
    text = report.text()
    assert ("sampled, 12 draws" if top_k == 0 else "top-8 + 12 tail samples") in text
    assert (report.kept_mass == {}) == (top_k == 0)


def test_estimate_extrapolates_large_datasets(tiny_llama_dir, tmp_path):
    data = write_jsonl(tmp_path / "docs.jsonl", text_rows(40, seed=6))
    config = BuildConfig(
        teacher=str(tiny_llama_dir),
        data=str(data),
        out=tmp_path / "c",
        top_k=4,
        max_length=32,
        holdout=0.0,
        pack=False,
        progress=False,
    )
    exact = estimate_build(config, sample_sequences=4)
    rough = estimate_build(config, sample_sequences=4, count_rows=20)
    assert not exact.extrapolated and rough.extrapolated and rough.counted_rows == 20
    assert rough.split_sequences["train"] == 40
    assert abs(rough.total_tokens - exact.total_tokens) < 0.5 * exact.total_tokens


def test_estimate_cli(tiny_llama_dir, tmp_path):
    data = write_jsonl(tmp_path / "docs.jsonl", text_rows(10, seed=7))
    out = tmp_path / "cache"
    args = ["build", "--teacher", str(tiny_llama_dir), "--data", str(data), "--out", str(out)]
    result = CliRunner().invoke(
        app, [*args, "--top-k", "8", "--max-length", "32", "--estimate", "--sample-sequences", "4"]
    )
    assert result.exit_code == 0, result.output
    assert "projected cache size" in result.output and "projected teacher time" in result.output
    assert "top k' entries" in result.output
    assert not out.exists()
    result = CliRunner().invoke(app, [*args, "--estimate", "--sample-sequences", "0"])
    assert result.exit_code == 2 and "--sample-sequences must be >= 1" in result.output

"""``kdcache inspect``: statistics equal a direct computation over the cache's own records.

Until the storage layer is used, the cache is a small in-memory object with the pinned reader API
(``manifest``, ``shards``, ``read_shard``, ``sequences``) filled from a tiny teacher's real forward
(log_softmax, topk, fp16-rounded log-probs, tail mass from the full distribution).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from kdcache.cache.errors import CacheError, ConfigError
from kdcache.cache.read.inspect import PERCENTILES, inspect_cache, kprime_values
from kdcache.cache.records import SequenceRecord

TOP_K = 12


@dataclass
class FakeShard:
    name: str
    split: str
    index: int
    num_sequences: int
    num_tokens: int
    num_positions: int
    bytes: int


class FakeCache:
    """The pinned reader API over records held in memory."""

    def __init__(self, manifest: dict, shards: dict[str, list[list[SequenceRecord]]]):
        self.manifest = manifest
        self.path = "fake-cache"
        self._records = {}
        self._shards: dict[str, list[FakeShard]] = {}
        for split, groups in shards.items():
            self._shards[split] = []
            for index, records in enumerate(groups):
                info = FakeShard(
                    name=f"{split}-{index:05d}.arrow",
                    split=split,
                    index=index,
                    num_sequences=len(records),
                    num_tokens=sum(r.num_tokens for r in records),
                    num_positions=sum(r.num_positions for r in records),
                    bytes=1000 + 10 * index,
                )
                self._shards[split].append(info)
                self._records[info.name] = records

    def shards(self, split: str) -> list[FakeShard]:
        return list(self._shards.get(split, []))

    def read_shard(self, info: FakeShard):
        yield from self._records[info.name]

    def sequences(self, split: str = "train"):
        for info in self.shards(split):
            yield from self.read_shard(info)


def _teacher_records(model_dir: Path, tokenizer, texts: list[str], start_id: int):
    """Records from the model's own forward: top-k of log_softmax, fp16-rounded, exact tail."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    records = []
    with torch.inference_mode():
        for offset, text in enumerate(texts):
            ids = tokenizer(text)["input_ids"][:48]
            logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
            top = logprobs.topk(TOP_K, dim=-1)  # (T, k)
            tail = (-torch.expm1(torch.logsumexp(top.values, dim=-1))).clamp_min(0.0)  # (T,)
            positions = np.arange(len(ids), dtype=np.int32)
            if offset % 3 == 2:  # chat-like: only some positions stored
                positions = positions[len(ids) // 2 :]
            records.append(
                SequenceRecord(
                    sequence_id=start_id + offset,
                    input_ids=np.asarray(ids, dtype=np.int32),
                    topk_ids=top.indices.numpy().astype(np.int32)[positions],
                    topk_logprobs=top.values.half().float().numpy()[positions],
                    tail_mass=tail.numpy().astype(np.float32)[positions],
                    positions=positions,
                )
            )
    return records


def _pad_rows(record: SequenceRecord, keep: int) -> None:
    """Compact-mode rows: keep ``keep`` entries in every other row, the rest padding (-inf, id 0)."""
    rows = np.arange(0, record.num_positions, 2)
    dropped = np.exp(record.topk_logprobs[rows, keep:].astype(np.float64)).sum(axis=1)
    record.tail_mass[rows] += dropped.astype(np.float32)
    record.topk_logprobs[rows, keep:] = -np.inf
    record.topk_ids[rows, keep:] = 0


@pytest.fixture(scope="module")
def teacher_cache(tiny_llama_dir, tiny_tokenizer, text_jsonl) -> FakeCache:
    lines = text_jsonl.read_text(encoding="utf-8").splitlines()
    texts = [json.loads(line)["text"] for line in lines][:14]
    train = _teacher_records(tiny_llama_dir, tiny_tokenizer, texts[:11], start_id=0)
    holdout = _teacher_records(tiny_llama_dir, tiny_tokenizer, texts[11:], start_id=0)
    _pad_rows(train[1], keep=5)
    manifest = {
        "format_version": 1,
        "teacher": {"name": str(tiny_llama_dir), "config_hash": "ab" * 32},
        "vocab_size": len(tiny_tokenizer),
        "top_k": TOP_K,
        "temperature": 1.0,
        "tokenizer_fingerprint": "cd" * 32,
        "num_sequences": 14,
        "num_tokens": sum(r.num_tokens for r in train + holdout),
        "splits": {"train": {}, "holdout": {}},
        "build": {"tokens_per_s": 1234.5},
    }
    return FakeCache(manifest, {"train": [train[:4], train[4:7], train[7:]], "holdout": [holdout]})


def _direct_rows(cache, splits=("train", "holdout")) -> dict[str, np.ndarray]:
    """Independent per-position values straight from ``cache.sequences``."""
    vocab = cache.manifest["vocab_size"]
    logprobs = np.concatenate(
        [s.topk_logprobs for split in splits for s in cache.sequences(split)]
    ).astype(np.float64)
    tail = np.concatenate([s.tail_mass for split in splits for s in cache.sequences(split)])
    probs = np.exp(logprobs)
    out = {"mass": probs.sum(axis=1), "tail": tail.astype(np.float64)}
    for k in kprime_values(TOP_K):
        out[f"kept{k}"] = probs[:, :k].sum(axis=1)
    support = np.concatenate([probs, tail[:, None].astype(np.float64)], axis=1)
    support /= support.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        out["entropy"] = -np.nansum(support * np.log(support), axis=1)
    stored = np.isfinite(logprobs).sum(axis=1)
    out["upper"] = out["entropy"] + support[:, -1] * np.log(vocab - stored)
    return out


def _assert_matches(distribution, values: np.ndarray) -> None:
    assert distribution.mean == pytest.approx(values.mean(), rel=1e-5, abs=1e-6)
    expected = np.percentile(values, PERCENTILES)
    for p, value in zip(PERCENTILES, expected, strict=True):
        assert distribution.percentiles[p] == pytest.approx(value, rel=1e-5, abs=1e-6), p


def test_full_report_equals_direct_computation(teacher_cache):
    report = inspect_cache(teacher_cache, full=True)
    direct = _direct_rows(teacher_cache)
    stats = report.stats
    assert stats.num_positions == len(direct["mass"]) == report.sample["sampled_positions"]
    _assert_matches(stats.topk_mass, direct["mass"])
    _assert_matches(stats.tail_mass, direct["tail"])
    _assert_matches(stats.entropy, direct["entropy"])
    _assert_matches(stats.entropy_upper, direct["upper"])
    assert sorted(stats.kept_mass) == [1, 2, 4, 8, 12]
    for k, distribution in stats.kept_mass.items():
        _assert_matches(distribution, direct[f"kept{k}"])
    holdout = _direct_rows(teacher_cache, splits=("holdout",))
    _assert_matches(report.split_stats["holdout"].topk_mass, holdout["mass"])
    assert sum(s.num_positions for s in report.split_stats.values()) == stats.num_positions
    assert sum(stats.topk_mass_histogram.counts) == stats.num_positions


def test_manifest_summary_is_readable(teacher_cache):
    report = inspect_cache(teacher_cache, full=True)
    summary = report.summary
    assert summary["teacher"].startswith(str(teacher_cache.manifest["teacher"]["name"]))
    assert summary["tokenizer"] == "cd" * 6  # hashes are shortened
    assert summary["top_k"] == TOP_K and summary["splits"] == "train, holdout"
    assert summary["bytes"] == 1000 + 1010 + 1020 + 1000
    assert summary["bytes_per_token"] == pytest.approx(4030 / summary["tokens"], abs=0.01)
    assert summary["build_tokens_per_s"] == 1234.5
    assert [s.shards for s in report.splits] == [3, 1]
    assert summary["positions"] == report.stats.num_positions


def test_hand_checked_values():
    """k = 2, V = 4: p = (1/2, 1/4), tail 1/4 -> entropy 1.5 bits; a padded row keeps 0.9."""
    record = SequenceRecord(
        sequence_id=0,
        input_ids=np.array([1, 2], dtype=np.int32),
        topk_ids=np.array([[3, 1], [2, 0]], dtype=np.int32),
        topk_logprobs=np.array([[np.log(0.5), np.log(0.25)], [np.log(0.9), -np.inf]], np.float32),
        tail_mass=np.array([0.25, 0.1], dtype=np.float32),
        positions=np.array([0, 1], dtype=np.int32),
    )
    manifest = {"top_k": 2, "vocab_size": 4, "splits": ["train"]}
    stats = inspect_cache(FakeCache(manifest, {"train": [[record]]}), full=True).stats
    assert stats.kept_mass[1].percentiles[1] == pytest.approx(0.5 + 0.01 * 0.4)
    assert stats.kept_mass[2].mean == pytest.approx((0.75 + 0.9) / 2)
    entropy_row0 = 1.5 * math.log(2)
    entropy_row1 = -(0.9 * math.log(0.9) + 0.1 * math.log(0.1))
    assert stats.entropy.mean == pytest.approx((entropy_row0 + entropy_row1) / 2, rel=1e-6)
    upper = (entropy_row0 + 0.25 * math.log(2) + entropy_row1 + 0.1 * math.log(3)) / 2
    assert stats.entropy_upper.mean == pytest.approx(upper, rel=1e-6)


def test_sample_is_deterministic_and_sized(teacher_cache):
    full = inspect_cache(teacher_cache, full=True)
    total = full.stats.num_positions
    first = inspect_cache(teacher_cache, sample_positions=60, seed=5)
    again = inspect_cache(teacher_cache, sample_positions=60, seed=5)
    other = inspect_cache(teacher_cache, sample_positions=60, seed=6)
    assert first.stats.num_positions == 60 and first.sample["sampled_positions"] == 60
    assert first.to_dict() == again.to_dict()
    assert first.to_dict()["stats"] != other.to_dict()["stats"]
    assert first.sample["shards_read"] < first.sample["shards_total"]
    low, high = full.stats.topk_mass.percentiles[1], full.stats.topk_mass.percentiles[99]
    assert low - 0.05 <= first.stats.topk_mass.percentiles[50] <= high + 0.05
    # a sample at least as large as the cache reads every position: the same numbers as --full
    whole = inspect_cache(teacher_cache, sample_positions=total + 10, seed=1)
    assert whole.to_dict()["stats"] == full.to_dict()["stats"]


def test_bad_sample_size_is_refused(teacher_cache):
    with pytest.raises(ConfigError, match="--sample"):
        inspect_cache(teacher_cache, sample_positions=0)


def test_manifest_without_top_k_is_refused():
    with pytest.raises(CacheError, match="top_k"):
        inspect_cache(FakeCache({"splits": ["train"]}, {"train": []}))


def test_empty_cache_reports_no_statistics():
    report = inspect_cache(FakeCache({"top_k": 4, "splits": ["train"]}, {"train": []}))
    assert report.stats is None
    assert json.loads(json.dumps(report.to_dict()))["stats"] is None


# --- CLI ------------------------------------------------------------------------------------


@pytest.fixture
def cli_cache(monkeypatch, teacher_cache):
    """Route ``kdcache inspect fake-cache`` to the in-memory cache."""
    import kdcache.cache.read.reader as reader_module

    real_open = reader_module.open_cache

    def fake_open(path, **options):
        return teacher_cache if str(path) == "fake-cache" else real_open(path, **options)

    monkeypatch.setattr(reader_module, "open_cache", fake_open)
    return "fake-cache"


def _invoke(args: list[str]):
    from kdcache.cli.app import app

    return CliRunner().invoke(app, ["inspect", *args])


def test_cli_text_report(cli_cache, teacher_cache):
    result = _invoke([cli_cache, "--full"])
    assert result.exit_code == 0, result.output
    assert f"top-{TOP_K} mass" in result.output
    assert "mass kept by the top k' entries" in result.output
    assert "holdout" in result.output and "teacher" in result.output
    stats = inspect_cache(teacher_cache, full=True).stats
    enough = min(k for k, d in stats.kept_mass.items() if d.mean >= 0.99 * stats.topk_mass.mean)
    assert f"k' = {enough} keeps 99% of the stored top-{TOP_K} mass" in result.output


def test_cli_json_parses_and_matches_library(cli_cache, teacher_cache):
    result = _invoke([cli_cache, "--json", "--sample", "50", "--seed", "2"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    expected = inspect_cache(teacher_cache, sample_positions=50, seed=2).to_dict()
    assert data == json.loads(json.dumps(expected))
    assert data["stats"]["num_positions"] == 50
    assert set(data["stats"]["kept_mass"]) == {"1", "2", "4", "8", "12"}


def test_cli_plot_is_a_valid_png(cli_cache, tmp_path):
    from matplotlib.image import imread

    out = tmp_path / "plots" / "inspect.png"
    result = _invoke([cli_cache, "--plot", str(out)])
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = imread(out)
    assert image.ndim == 3 and image.shape[0] > 400 and image.shape[1] > 600


def test_cli_bad_flags_exit_2(cli_cache, tmp_path):
    (tmp_path / "a-file").write_text("not a directory")
    for args in (
        [cli_cache, "--sample", "0"],
        [cli_cache, "--plot", str(tmp_path / "x.jpg")],
        [cli_cache, "--plot", str(tmp_path / "a-file" / "x.png")],
    ):
        result = _invoke(args)
        assert result.exit_code == 2, result.output
        assert "error:" in result.output and "Traceback" not in result.output


def test_cli_not_a_cache_exits_2(tmp_path):
    pytest.importorskip("kdcache.cache.read.reader")
    for path in (tmp_path / "missing", tmp_path):  # absent; a directory without a manifest
        result = _invoke([str(path)])
        assert result.exit_code == 2, result.output
        assert result.output.startswith("error:") and "Traceback" not in result.output


# --- the real storage layer ----------------------------------------------------------------


@pytest.fixture(scope="module")
def stored_cache(tmp_path_factory, teacher_cache) -> Path:
    """The teacher records written through ``ShardWriter`` + ``write_manifest`` (several shards)."""
    shards = pytest.importorskip("kdcache.cache.format.shards")
    manifest_module = pytest.importorskip("kdcache.cache.format.manifest")
    out = tmp_path_factory.mktemp("stored-cache")
    manifest = teacher_cache.manifest
    written = []
    for split in ("train", "holdout"):
        with shards.ShardWriter(
            out, split, top_k=TOP_K, vocab_size=manifest["vocab_size"], max_shard_tokens=100
        ) as writer:
            for record in teacher_cache.sequences(split):
                writer.write(record)
        written += writer.close()
    keep = ("teacher", "vocab_size", "top_k", "temperature", "tokenizer_fingerprint")
    summary = manifest_module.shard_summary(written)
    manifest_module.write_manifest(out, {**{k: manifest[k] for k in keep}, **summary})
    return out


def test_stored_cache_report_equals_direct_computation(stored_cache):
    from kdcache.cache.read.reader import open_cache

    cache = open_cache(stored_cache)
    report = inspect_cache(stored_cache, full=True)
    direct = _direct_rows(cache)
    assert report.stats.num_positions == len(direct["mass"])
    _assert_matches(report.stats.topk_mass, direct["mass"])
    _assert_matches(report.stats.entropy, direct["entropy"])
    for k, distribution in report.stats.kept_mass.items():
        _assert_matches(distribution, direct[f"kept{k}"])
    total_bytes = sum(info.bytes for s in ("train", "holdout") for info in cache.shards(s))
    assert report.summary["bytes"] == total_bytes
    assert report.summary["tokens"] == cache.manifest["num_tokens"]
    assert len(cache.shards("train")) > 1 and "shards" not in report.manifest


def test_stored_cache_sample_reads_fewer_shards(stored_cache):
    report = inspect_cache(stored_cache, sample_positions=30, seed=3)
    assert report.stats.num_positions == 30
    assert report.sample["shards_read"] < report.sample["shards_total"]


def test_cli_incomplete_cache_exits_2(stored_cache, tmp_path):
    import shutil

    broken = tmp_path / "no-manifest"
    shutil.copytree(stored_cache, broken)
    (broken / "manifest.json").unlink()
    result = _invoke([str(broken)])
    assert result.exit_code == 2 and result.output.startswith("error:")
    assert "manifest" in result.output


def test_built_cache_end_to_end(tiny_gpt2_dir, text_jsonl, tmp_path):
    """``kdcache build`` output: the CLI's JSON equals a direct computation from open_cache."""
    build = pytest.importorskip("kdcache.cache.build.pipeline")
    from kdcache.cache.read.reader import open_cache

    out = tmp_path / "built"
    build.build_cache(
        build.BuildConfig(
            teacher=str(tiny_gpt2_dir),
            data=str(text_jsonl),
            out=out,
            top_k=8,
            max_length=48,
            holdout=0.25,
            batch_tokens=400,
            shard_tokens=300,
            limit=10,
            progress=False,
        )
    )
    result = _invoke([str(out), "--json", "--full"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    cache = open_cache(out)
    splits = tuple(cache.manifest["splits"])
    logprobs = np.concatenate([s.topk_logprobs for sp in splits for s in cache.sequences(sp)])
    mass = np.exp(logprobs.astype(np.float64)).sum(axis=1)
    assert data["stats"]["num_positions"] == len(mass)
    assert data["stats"]["topk_mass"]["mean"] == pytest.approx(mass.mean(), rel=1e-5)
    expected = np.percentile(mass, PERCENTILES)
    got = [data["stats"]["topk_mass"]["percentiles"][str(p)] for p in PERCENTILES]
    assert got == pytest.approx(expected, rel=1e-5)
    summary = data["summary"]
    assert summary["teacher"] == str(tiny_gpt2_dir) and summary["top_k"] == 8
    assert summary["bytes"] == cache.manifest["bytes"] and summary["build_tokens_per_s"] > 0
    assert "max_length=48" in summary["settings"]

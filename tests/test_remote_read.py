"""Reading caches from s3:// (moto server): push/pull, train/eval through a bounded read-through
cache with eviction, corrupt downloads, a shared cache directory, refusals in one line."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from kdcache.cache.errors import CacheError
from kdcache.cache.read.reader import open_cache
from kdcache.cache.read.verify import verify_cache
from kdcache.cache.storage.location import resolve_location
from kdcache.cache.storage.shard_sources import RemoteShards
from kdcache.cache.transfer import pull_cache, push_cache
from kdcache.cli.app import app
from kdcache.trainer import TrainConfig, train
from tests import train_helpers as helpers

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def local_cache(tmp_path_factory, tiny_llama_dir, text_jsonl) -> Path:
    torch.manual_seed(0)
    return helpers.make_cache(
        tmp_path_factory.mktemp("cache"), tiny_llama_dir, helpers.read_texts(text_jsonl)
    )


@pytest.fixture(scope="module")
def student_json(tmp_path_factory, tiny_tokenizer) -> Path:
    return helpers.student_config(tmp_path_factory.mktemp("student") / "s.json", tiny_tokenizer)


@pytest.fixture
def remote_cache(s3, local_cache) -> str:
    url = f"s3://{s3.bucket}/pushed"
    push_cache(local_cache, url, storage_options=s3.options)
    return url


def _assert_same_records(a, b) -> None:
    for split in b.splits:
        pairs = list(zip(a.sequences(split), b.sequences(split), strict=True))
        assert pairs
        for x, y in pairs:
            assert x.sequence_id == y.sequence_id
            for name in ("input_ids", "positions", "topk_ids", "topk_logprobs", "tail_mass"):
                np.testing.assert_array_equal(getattr(x, name), getattr(y, name), err_msg=name)


def _weights(path) -> dict[str, torch.Tensor]:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).state_dict()


def test_push_then_pull_round_trip(s3, local_cache, tmp_path):
    url = f"s3://{s3.bucket}/published"
    first = push_cache(local_cache, url, storage_options=s3.options)
    num_shards = len(open_cache(local_cache).manifest["shards"])
    assert (first.copied, first.skipped) == (num_shards, 0) and num_shards >= 3
    again = push_cache(local_cache, url, storage_options=s3.options)
    assert (again.copied, again.skipped) == (0, num_shards)  # verified in place, not re-sent
    assert verify_cache(url, storage_options=s3.options) == []
    pulled = pull_cache(url, tmp_path / "pulled", storage_options=s3.options)
    assert pulled.copied == num_shards
    assert (tmp_path / "pulled" / "manifest.json").read_bytes() == (
        local_cache / "manifest.json"
    ).read_bytes()
    assert (tmp_path / "pulled" / "tokenizer" / "tokenizer.json").is_file()
    assert verify_cache(tmp_path / "pulled") == []
    _assert_same_records(open_cache(tmp_path / "pulled"), open_cache(local_cache))
    runner = CliRunner(env=s3.env())
    result = runner.invoke(app, ["pull", url, str(tmp_path / "cli"), *s3.cli_options])
    assert result.exit_code == 0 and f"{num_shards} shards copied" in result.output, result.output
    result = runner.invoke(app, ["push", str(local_cache), url, *s3.cli_options])
    assert result.exit_code == 0 and f"{num_shards} already there" in result.output


def test_push_refuses_a_different_cache_at_the_url(s3, local_cache, tmp_path, tiny_llama_dir):
    url = f"s3://{s3.bucket}/taken"
    push_cache(local_cache, url, storage_options=s3.options)
    other = helpers.make_cache(
        tmp_path / "other", tiny_llama_dir, ["a different text " * 50], num_train=8, num_holdout=2
    )
    result = CliRunner(env=s3.env()).invoke(app, ["push", str(other), url, *s3.cli_options])
    assert result.exit_code == 2 and "already holds a different cache" in result.output


def test_train_and_eval_from_s3_equal_local_with_eviction(
    s3, remote_cache, local_cache, student_json, tmp_path
):
    """A --cache-limit of about one shard: shards are evicted and fetched again (2 epochs); the
    weights and the eval equal a run on the local copy."""
    shards = open_cache(local_cache).manifest["shards"]
    limit = max(s["bytes"] for s in shards) + 1
    read_cache = tmp_path / "read-cache"
    common = dict(student=str(student_json), epochs=2, batch_size=8, lr=3e-3, progress=False)
    local = train(TrainConfig(cache=str(local_cache), out=str(tmp_path / "local"), **common))
    args = [
        "train", "--cache", remote_cache, "--student", str(student_json),
        "--out", str(tmp_path / "remote"), "--epochs", "2", "--batch-size", "8", "--lr", "3e-3",
        "--no-progress", "--cache-dir", str(read_cache), "--cache-limit", str(limit),
        *s3.cli_options,
    ]  # fmt: skip
    result = CliRunner(env=s3.env()).invoke(app, args)
    assert result.exit_code == 0, result.output
    expected, actual = _weights(local.final), _weights(tmp_path / "remote" / "final")
    for name, tensor in expected.items():
        torch.testing.assert_close(actual[name], tensor, atol=0, rtol=0)
    kept = list((read_cache / "shards").glob("*.arrow"))
    assert 1 <= len(kept) < len(shards)  # least recently used shards were evicted
    assert sum(path.stat().st_size for path in kept) <= limit + max(s["bytes"] for s in shards)
    run = json.loads((tmp_path / "remote" / "run.json").read_text())
    assert "storage_options" not in run  # credentials never land in run.json

    evals = {}
    for name, cache in (("local", str(local_cache)), ("remote", remote_cache)):
        out = tmp_path / f"eval-{name}.json"
        extra = [*s3.cli_options, "--cache-dir", str(read_cache)] if name == "remote" else []
        args = ["eval", "--cache", cache, "--student", str(local.final), "--json", str(out)]
        result = CliRunner(env=s3.env()).invoke(app, [*args, *extra])
        assert result.exit_code == 0, result.output
        evals[name] = json.loads(out.read_text())["students"][str(local.final)]
    assert evals["remote"] == evals["local"]


def test_mid_epoch_resume_from_s3_equals_an_uninterrupted_run(
    s3, remote_cache, student_json, tmp_path, monkeypatch
):
    from kdcache.trainer.objective import DistillObjective

    common = dict(
        cache=remote_cache, student=str(student_json), steps=6, batch_size=4, lr=3e-3,
        save_every=2, progress=False, storage_options=s3.options,
        cache_dir=str(tmp_path / "rc"), cache_limit="1MB",
    )  # fmt: skip
    whole = train(TrainConfig(out=str(tmp_path / "whole"), **common))
    original, calls = DistillObjective.forward, {"n": 0}

    def crashing(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:  # step 5, mid-epoch
            raise RuntimeError("simulated crash")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(DistillObjective, "forward", crashing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(TrainConfig(out=str(tmp_path / "run"), **common))
    monkeypatch.setattr(DistillObjective, "forward", original)
    resumed = train(TrainConfig(out=str(tmp_path / "run"), resume=True, **common))
    assert resumed.resumed_from == 4
    expected, actual = _weights(whole.final), _weights(resumed.final)
    for name, tensor in expected.items():
        torch.testing.assert_close(actual[name], tensor, atol=0, rtol=0)


def _train_rank(rank: int, world_size: int, config: TrainConfig) -> int:
    from kdcache.trainer import loop

    return loop.train(config).steps


def test_resume_from_s3_on_another_world_size(s3, remote_cache, student_json, tmp_path):
    """A 1-rank run (2 data partitions, accumulation 2) from s3, resumed after its step-4
    checkpoint on 2 gloo ranks (accumulation 1: the same global batch), ends with the weights
    of the uninterrupted run; each rank reads its partition through its own read-through cache."""
    import shutil

    from tests.test_distributed_build import run_ranks

    common = dict(
        cache=remote_cache, student=str(student_json), steps=6, batch_size=4, lr=3e-3,
        save_every=2, progress=False, storage_options=s3.options, data_partitions=2,
        cache_dir=str(tmp_path / "rc"), cache_limit="1MB", out=str(tmp_path / "run"),
    )  # fmt: skip
    whole = train(TrainConfig(grad_accum=2, **common))
    expected = _weights(whole.final)
    for name in ("final", "step-6"):
        shutil.rmtree(tmp_path / "run" / name, ignore_errors=True)
    steps = run_ranks(_train_rank, 2, TrainConfig(resume=True, **common))
    assert steps == [6, 6], steps
    actual = _weights(tmp_path / "run" / "final")
    for name, tensor in expected.items():
        torch.testing.assert_close(actual[name], tensor, rtol=1e-4, atol=1e-5, msg=name)


def _flip_a_byte(s3, url: str) -> str:
    fs = s3.filesystem()
    victim = sorted(fs.glob(f"{url.removeprefix('s3://')}/shards/*.arrow"))[1]
    data = bytearray(fs.cat_file(victim))
    data[len(data) // 2] ^= 0x40
    fs.pipe_file(victim, bytes(data))
    return victim.rsplit("/", 1)[-1]


def test_a_flipped_byte_in_a_remote_shard_is_caught_naming_the_shard(s3, remote_cache, tmp_path):
    name = _flip_a_byte(s3, remote_cache)
    cache = open_cache(remote_cache, storage_options=s3.options, cache_dir=tmp_path / "rc")
    with pytest.raises(CacheError, match=rf"shard {name} downloaded from .* fails its sha256 "
                       r"checksum \(corrupt\) \(3 attempts\)"):  # fmt: skip
        for split in cache.splits:
            list(cache.sequences(split))
    assert not list((tmp_path / "rc" / "shards").glob(".tmp-*"))  # no half download left
    assert verify_cache(remote_cache, storage_options=s3.options) == [name]
    result = CliRunner(env=s3.env()).invoke(app, ["verify", remote_cache, *s3.cli_options])
    assert result.exit_code == 1 and f"BAD {name}: fails its sha256" in result.output


def test_a_damaged_download_is_retried(s3, remote_cache, local_cache, tmp_path, monkeypatch):
    """The first transfer arrives truncated (as a dropped connection would leave it)."""
    cache = open_cache(remote_cache, storage_options=s3.options, cache_dir=tmp_path / "rc")
    original, attempts = RemoteShards._stream, []

    def truncated_once(self, info, sink=None):
        attempts.append(info.name)
        if len(attempts) == 1:

            class Truncating:
                def write(self, chunk):
                    sink.write(chunk[: len(chunk) // 2])

            size, _ = original(self, info, Truncating())
            return size // 2, "sha256:truncated"
        return original(self, info, sink)

    monkeypatch.setattr(RemoteShards, "_stream", truncated_once)
    info = cache.shards("train")[0]
    records = list(cache.read_shard(info))
    assert attempts == [info.name, info.name] and cache.source.downloads == 1
    expected = list(open_cache(local_cache).read_shard(info))
    assert [r.sequence_id for r in records] == [r.sequence_id for r in expected]
    for x, y in zip(records, expected, strict=True):
        np.testing.assert_array_equal(x.topk_logprobs, y.topk_logprobs)


def test_runs_sharing_a_cache_dir_download_each_shard_once(s3, remote_cache, tmp_path):
    location = resolve_location(remote_cache, s3.options)
    cache = open_cache(remote_cache, storage_options=s3.options, cache_dir=tmp_path / "rc")
    info = cache.shards("train")[0]
    readers = [RemoteShards(location, tmp_path / "rc", 1 << 30) for _ in range(4)]
    results: list[bytes] = [b""] * len(readers)

    def load(index: int) -> None:
        results[index] = bytes(readers[index].load(info))

    threads = [threading.Thread(target=load, args=(i,)) for i in range(len(readers))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(reader.downloads for reader in readers) == 1
    expected = s3.filesystem().cat_file(f"{location.path}/shards/{info.name}")
    assert all(result == expected for result in results)


def test_prefetch_reads_shards_in_the_given_order(s3, remote_cache, local_cache, tmp_path):
    cache = open_cache(remote_cache, storage_options=s3.options, cache_dir=tmp_path / "rc")
    infos = cache.shards("train")[::-1]
    got = [[r.sequence_id for r in records] for records in cache.read_shards(infos)]
    local = open_cache(local_cache)
    assert got == [[r.sequence_id for r in local.read_shard(info)] for info in infos]
    assert cache.source.downloads == len(infos)


def test_inspect_and_file_urls(s3, remote_cache, local_cache):
    runner = CliRunner(env=s3.env())
    result = runner.invoke(app, ["inspect", remote_cache, "--json", *s3.cli_options])
    assert result.exit_code == 0, result.output
    remote_report = json.loads(result.output)
    local_report = json.loads(runner.invoke(app, ["inspect", str(local_cache), "--json"]).output)
    assert remote_report["path"] == remote_cache
    assert remote_report["summary"] == local_report["summary"]
    result = runner.invoke(app, ["verify", f"file://{local_cache}"])
    assert result.exit_code == 0 and "OK" in result.output


def test_missing_bucket_and_bad_credentials_are_refused_in_one_line(s3, remote_cache, tmp_path):
    missing = CliRunner(env=s3.env()).invoke(
        app, ["inspect", "s3://no-such-bucket-kd/c", *s3.cli_options]
    )
    assert missing.exit_code == 2 and missing.output.count("\n") == 1
    assert "bucket 'no-such-bucket-kd' does not exist" in missing.output
    wrong = ["--storage-option", f"key={s3.key}", "--storage-option", "secret=wrong-secret"]
    for args in (["verify", remote_cache], ["pull", remote_cache, str(tmp_path / "p")]):
        result = CliRunner(env=s3.env()).invoke(app, [*args, *s3.cli_options, *wrong])
        assert result.exit_code == 2, result.output
        assert result.output.startswith("error: ") and result.output.count("\n") == 1
        assert "access denied" in result.output and "credentials" in result.output
    empty = CliRunner(env=s3.env()).invoke(
        app, ["verify", f"s3://{s3.bucket}/nothing-here", *s3.cli_options]
    )
    assert empty.exit_code == 2 and "holds no kdcache cache" in empty.output


def test_dataloader_workers_read_from_s3_in_the_local_order(
    s3, remote_cache, local_cache, tmp_path
):
    """Two forked DataLoader workers, each fetching its own shards through one small cache dir."""
    from kdcache.trainer.data import CacheDataset

    remote = open_cache(
        remote_cache, storage_options=s3.options, cache_dir=tmp_path / "rc", cache_limit="4KB"
    )
    batches = {}
    for name, cache in (("local", open_cache(local_cache)), ("remote", remote)):
        dataset = CacheDataset(cache, batch_size=4, num_workers=2, seed=3)
        batches[name] = [batch["sequence_ids"].tolist() for batch in dataset.epoch_batches()]
    assert batches["remote"] == batches["local"] and len(batches["local"]) > 4


def test_cross_tokenizer_defaults_read_the_manifest_of_an_s3_cache(s3, remote_cache, local_cache):
    """A plain --cross-tokenizer picks its objective from the cache's manifest, also at a URL."""
    from kdcache.cache.format.manifest import read_manifest
    from kdcache.cli._xtok_defaults import cache_has_observed_logprobs

    expected = bool(read_manifest(local_cache).get("observed_logprobs"))
    reader = {"storage_options": s3.options}
    assert cache_has_observed_logprobs(remote_cache, reader) is expected
    assert cache_has_observed_logprobs(str(local_cache), {}) is expected

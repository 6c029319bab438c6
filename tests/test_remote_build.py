"""Building to s3:// against a real S3 API (moto server): result, kill -9 mid-upload, lock."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from kdcache.cache.build.pipeline import BuildConfig, build_cache
from kdcache.cache.errors import CacheError
from kdcache.cache.read.reader import open_cache
from kdcache.cache.storage.location import resolve_location
from kdcache.cache.storage.remote_lock import RemoteLock
from kdcache.cli.app import app
from tests.conftest import crash_shard_writes_at, text_rows, write_jsonl

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SETTINGS = dict(top_k=8, max_length=48, holdout=0.25, batch_tokens=60, shard_tokens=150)
SETTINGS["group_rows"] = 4  # 16 rows: 4 row groups, the units of work of ranks


@pytest.fixture(scope="module")
def docs_jsonl(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("docs") / "docs.jsonl", text_rows(16, seed=1))


@pytest.fixture(scope="module")
def local_build(tiny_llama_dir, docs_jsonl, tmp_path_factory) -> Path:
    """The reference: the same build into a local directory, uninterrupted."""
    out = tmp_path_factory.mktemp("local") / "cache"
    build_cache(_config(tiny_llama_dir, docs_jsonl, out))
    return out


def _config(teacher, data, out, **overrides) -> BuildConfig:
    settings = {**SETTINGS, **overrides}
    return BuildConfig(teacher=str(teacher), data=str(data), out=out, progress=False, **settings)


def _records(cache) -> dict[str, list]:
    return {split: list(cache.sequences(split)) for split in cache.splits}


def _assert_same_cache(remote, local) -> None:
    """Same shards (names, counts, sha256) and the same records, split by split."""
    shards = lambda cache: [  # noqa: E731
        (s["name"], s["num_sequences"], s["checksum"]) for s in cache.manifest["shards"]
    ]
    assert shards(remote) == shards(local)
    a, b = _records(remote), _records(local)
    assert a.keys() == b.keys()
    for split in a:
        assert [r.sequence_id for r in a[split]] == [r.sequence_id for r in b[split]]
        for x, y in zip(a[split], b[split], strict=True):
            for name in ("input_ids", "positions", "topk_ids", "topk_logprobs", "tail_mass"):
                np.testing.assert_array_equal(getattr(x, name), getattr(y, name), err_msg=name)


def test_cli_build_to_s3_equals_a_local_build(s3, tiny_llama_dir, docs_jsonl, local_build):
    url = f"s3://{s3.bucket}/caches/c1"
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in SETTINGS.items() if k != "shard_tokens"]
    args = ["build", "--teacher", str(tiny_llama_dir), "--data", str(docs_jsonl), "--out", url]
    result = CliRunner().invoke(app, [*args, *flags, *s3.cli_options])
    assert result.exit_code == 0, result.output
    assert url in result.output and not Path("s3:").exists()  # no local directory named s3:
    fs = s3.filesystem()
    keys = {path.split("/caches/c1/", 1)[1] for path in fs.find(f"{s3.bucket}/caches/c1")}
    assert {"manifest.json", "build_state.json"} <= keys and not any("tmp" in k for k in keys)
    assert ".lock" not in keys  # released
    remote = open_cache(url, storage_options={"endpoint_url": s3.endpoint})
    # the CLI wrote with the default shard size; compare records with a build of the same shards
    reference = open_cache(local_build)
    assert remote.manifest["num_sequences"] == reference.manifest["num_sequences"]
    assert [r.sequence_id for r in remote.sequences("train")] == [
        r.sequence_id for r in reference.sequences("train")
    ]
    for x, y in zip(remote.sequences("holdout"), reference.sequences("holdout"), strict=True):
        np.testing.assert_array_equal(x.topk_ids, y.topk_ids)
        np.testing.assert_array_equal(x.topk_logprobs, y.topk_logprobs)
    again = CliRunner().invoke(app, [*args, *flags, *s3.cli_options])
    assert again.exit_code == 0 and "nothing to do" in again.output


_KILLABLE_BUILD = """
import json, sys
import torch
torch.set_num_threads(1)
from kdcache.cache.build.pipeline import BuildConfig, build_cache
settings = json.loads(sys.argv[4])
build_cache(BuildConfig(teacher=sys.argv[1], data=sys.argv[2], out=sys.argv[3], progress=False,
    storage_options=json.loads(sys.argv[5]), **settings))
"""


def test_kill_9_during_an_upload_resumes_to_the_uninterrupted_build(
    s3, tiny_llama_dir, docs_jsonl, local_build
):
    """SIGKILL while a shard object is uploaded but its journal is not: resume == uninterrupted."""
    import json

    url = f"s3://{s3.bucket}/killed"
    fs = s3.filesystem()
    env = {**os.environ, **s3.env(KDCACHE_TEST_PAUSE_IN_UPLOAD="60")}
    argv = [str(tiny_llama_dir), str(docs_jsonl), url, json.dumps(SETTINGS)]
    argv.append(json.dumps({"endpoint_url": s3.endpoint}))
    process = subprocess.Popen(
        [sys.executable, "-c", _KILLABLE_BUILD, *argv],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline, arrows = time.monotonic() + 180, []
    while time.monotonic() < deadline and not arrows:
        assert process.poll() is None, "the build ended before it could be killed"
        time.sleep(0.1)
        arrows = fs.glob(f"{s3.bucket}/killed/shards/*.arrow", refresh=True)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    fs.invalidate_cache()
    assert arrows, "no upload started within the deadline"
    assert not fs.exists(f"{s3.bucket}/killed/shards/{Path(arrows[0]).stem}.json")  # mid-upload
    assert not fs.exists(f"{s3.bucket}/killed/manifest.json")
    assert fs.exists(f"{s3.bucket}/killed/.lock")  # the dead builder's lock object is left over
    with pytest.raises(CacheError, match="build did not finish"):
        open_cache(url, storage_options=s3.options)

    summary = build_cache(_config(tiny_llama_dir, docs_jsonl, url, storage_options=s3.options))
    assert summary.status == "resumed" and summary.out == url
    _assert_same_cache(open_cache(url, storage_options=s3.options), open_cache(local_build))
    assert not fs.exists(f"{s3.bucket}/killed/.lock")


def test_a_second_builder_on_the_same_prefix_is_refused(s3, tiny_llama_dir, docs_jsonl):
    url = f"s3://{s3.bucket}/locked"
    location = resolve_location(url, s3.options)
    with RemoteLock(location):  # a live builder (this process) holds the prefix
        with pytest.raises(CacheError, match=rf"is being built by PID {os.getpid()}"):
            build_cache(_config(tiny_llama_dir, docs_jsonl, url, storage_options=s3.options))
        # the conditional put: a second lock on the same object cannot be created either
        with pytest.raises(CacheError, match="is being built by"):
            RemoteLock(location).acquire()
    assert not s3.filesystem().exists(f"{s3.bucket}/locked/shards")


def test_a_different_build_into_the_same_url_is_refused_then_overwritten(
    s3, tiny_llama_dir, docs_jsonl
):
    from kdcache.cache.errors import ConfigError

    url = f"s3://{s3.bucket}/changed"
    build_cache(_config(tiny_llama_dir, docs_jsonl, url, storage_options=s3.options))
    with pytest.raises(ConfigError, match="was built differently"):
        build_cache(_config(tiny_llama_dir, docs_jsonl, url, top_k=4, storage_options=s3.options))
    summary = build_cache(
        _config(
            tiny_llama_dir, docs_jsonl, url, top_k=4, overwrite=True, storage_options=s3.options
        )
    )
    assert summary.status == "built"
    cache = open_cache(url, storage_options=s3.options)
    assert cache.top_k == 4 and next(cache.sequences()).topk_ids.shape[1] == 4


def test_a_crashed_build_resumes_from_the_remote_alone(
    s3, tiny_llama_dir, docs_jsonl, local_build, monkeypatch
):
    """The staging directory is lost (another machine resumes): the remote's complete shards are
    kept, the rest is computed again, and the cache equals the uninterrupted build."""
    import shutil

    from kdcache.cache.build.output import RemoteTarget

    url = f"s3://{s3.bucket}/crashed"
    restore = crash_shard_writes_at(monkeypatch, 9)
    with pytest.raises(RuntimeError, match="simulated crash"):
        build_cache(_config(tiny_llama_dir, docs_jsonl, url, storage_options=s3.options))
    restore()
    target = RemoteTarget(resolve_location(url, s3.options), rank=0)
    uploaded = target.complete_shards()
    assert 0 < len(uploaded) < len(open_cache(local_build).manifest["shards"])
    shutil.rmtree(target.local_dir)  # nothing staged survives
    summary = build_cache(_config(tiny_llama_dir, docs_jsonl, url, storage_options=s3.options))
    assert summary.status == "resumed" and 0 < summary.tokens_this_run < summary.num_tokens
    _assert_same_cache(open_cache(url, storage_options=s3.options), open_cache(local_build))


def test_two_gloo_ranks_build_to_s3_equal_one_process(
    s3, tiny_llama_dir, docs_jsonl, local_build, monkeypatch
):
    """torchrun's layout (2 forked gloo ranks): each rank uploads its own shards from its own
    staging directory, rank 0 the manifest; the endpoint comes from AWS_ENDPOINT_URL."""
    from tests.test_distributed_build import _build_rank, assert_same_record_sets, run_ranks

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint)
    url = f"s3://{s3.bucket}/two-ranks"
    results = run_ranks(_build_rank, 2, _config(tiny_llama_dir, docs_jsonl, url))
    assert [status for status, _ in results] == ["built", "written"], results
    manifest = open_cache(url).manifest
    assert manifest["world_size"] == 2  # a shard's "rank" is its row group (2 per rank here)
    assert {s["rank"] for s in manifest["shards"]} == {0, 1, 2, 3}
    assert_same_record_sets(url, local_build)

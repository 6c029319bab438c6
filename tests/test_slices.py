"""Elastic builds: independent slices (``--num-shards N --shard-index I``), ``--finalize``.

Each slice runs in its own forked process (torch and transformers already imported, so a slice
starts in well under a second) with no process group, exactly what ``kdcache build --num-shards N
--shard-index I`` runs; one slice is killed with SIGKILL after its first shard and re-run. The
records are compared with a one-process build of the same settings. The CLI itself (fresh
interpreters) is exercised by the ``slow`` test at the end and by the refusal tests.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kdcache.cache.build.pipeline import BuildConfig, build_cache, finalize_build
from kdcache.cache.build.slices import PARTS_DIR
from kdcache.cache.errors import ConfigError
from kdcache.cache.format.shards import list_complete_shards
from kdcache.cache.read.reader import open_cache
from kdcache.cache.read.verify import verify_cache
from kdcache.cli.app import app
from tests.conftest import text_rows, write_jsonl
from tests.test_distributed_build import assert_same_record_sets

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SETTINGS = dict(top_k=8, max_length=48, holdout=0.25, batch_tokens=200, shard_tokens=120)
GROUP_ROWS = 2  # 16 rows: 8 row groups, slice I of 3 builds groups I, I + 3, ...
SLICE_TIMEOUT_S = 180


@pytest.fixture(scope="module")
def docs_jsonl(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("docs") / "docs.jsonl", text_rows(16, seed=1))


def _config(teacher, data, out, **overrides) -> BuildConfig:
    settings = {**SETTINGS, "group_rows": GROUP_ROWS, **overrides}
    return BuildConfig(teacher=str(teacher), data=str(data), out=out, progress=False, **settings)


@pytest.fixture(scope="module")
def single(tmp_path_factory, tiny_llama_dir, docs_jsonl) -> Path:
    out = tmp_path_factory.mktemp("single") / "cache"
    build_cache(_config(tiny_llama_dir, docs_jsonl, out))
    return out


def _slice_main(config: BuildConfig, kill_after_first_shard: bool) -> None:
    """Body of one forked slice; SIGKILLs itself once its first shard is complete if asked."""
    import torch

    torch.set_num_threads(1)
    if kill_after_first_shard:
        from kdcache.cache.build import output

        publish = output.LocalTarget.publish

        def publish_then_die(self, info):
            publish(self, info)
            os.kill(os.getpid(), signal.SIGKILL)  # mid-build: no cleanup, no exception

        output.LocalTarget.publish = publish_then_die
    summary = build_cache(config)
    os._exit(0 if summary.status in ("built", "resumed", "written", "complete") else 3)


def run_slices(configs: list[BuildConfig], kill: set[int] = frozenset()) -> list[int]:
    """Run each config in its own forked process, all at once; their exit codes."""
    context = multiprocessing.get_context("fork")
    processes = [
        context.Process(target=_slice_main, args=(config, index in kill))
        for index, config in enumerate(configs)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=SLICE_TIMEOUT_S)
        if process.is_alive():
            process.kill()
            process.join()
            pytest.fail("a slice did not finish")
    return [process.exitcode for process in processes]


def test_three_slices_one_killed_and_rerun_equal_one_build(
    single, tiny_llama_dir, docs_jsonl, tmp_path
):
    out = tmp_path / "slices"
    configs = [
        _config(tiny_llama_dir, docs_jsonl, out, num_shards=3, shard_index=index)
        for index in range(3)
    ]
    codes = run_slices(configs, kill={1})
    assert codes[0] == 0 and codes[2] == 0 and codes[1] == -signal.SIGKILL, codes
    assert not (out / "manifest.json").exists()  # slice 1 is not complete
    assert any(info.rank % 3 == 1 for info in list_complete_shards(out))  # it had begun
    with pytest.raises(ConfigError, match=r"slices 1 of 3 \(--shard-index\) are not complete"):
        finalize_build(out)
    summary = build_cache(configs[1])  # the re-run: the last slice writes the manifest
    assert summary.status == "resumed"
    assert_same_record_sets(out, single)
    ours, reference = open_cache(out).manifest, open_cache(single).manifest
    assert [s["name"] for s in ours["shards"]] == [s["name"] for s in reference["shards"]]
    assert [s["num_tokens"] for s in ours["shards"]] == [
        s["num_tokens"] for s in reference["shards"]
    ]
    assert ours["fingerprints"] == reference["fingerprints"]
    assert verify_cache(out) == []
    assert build_cache(configs[0]).status == "complete"
    assert finalize_build(out).status == "complete"


def test_slices_one_after_another_and_finalize(single, tiny_llama_dir, docs_jsonl, tmp_path):
    """Slices in sequence (any order); the manifest comes with the last; --finalize also works
    on slices whose last one finished without seeing the others (here: its marker removed)."""
    out = tmp_path / "sequence"
    for index in (2, 0, 1):
        config = _config(tiny_llama_dir, docs_jsonl, out, num_shards=3, shard_index=index)
        summary = build_cache(config)
        if index != 1:
            assert summary.status == "written" and summary.waiting_for is not None
            assert "slices" in summary.line() and not (out / "manifest.json").exists()
    assert summary.status == "built"
    assert_same_record_sets(out, single)
    (out / "manifest.json").unlink()
    assert finalize_build(out).status == "built"
    assert_same_record_sets(out, single)
    assert verify_cache(out) == []


def _cli(*args: str):
    return CliRunner().invoke(app, ["build", *args])


def _build_args(teacher, data, out, *extra: str) -> list[str]:
    args = ["--teacher", str(teacher), "--data", str(data), "--out", str(out)]
    for key, value in SETTINGS.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return [*args, "--group-rows", str(GROUP_ROWS), *extra]


def _one_error_line(result, text: str) -> None:
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and text in errors[0], result.output
    assert "Traceback" not in result.output


def test_slice_refusals_are_one_line(tiny_llama_dir, docs_jsonl, tmp_path):
    out = tmp_path / "refused"
    result = _cli(*_build_args(tiny_llama_dir, docs_jsonl, out, "--num-shards", "3",
                               "--shard-index", "3"))  # fmt: skip
    _one_error_line(result, "--shard-index 3 is out of range for --num-shards 3")
    assert not out.exists()
    result = _cli(*_build_args(tiny_llama_dir, docs_jsonl, out, "--shard-index", "1"))
    _one_error_line(result, "--num-shards and --shard-index go together")

    result = _cli(*_build_args(tiny_llama_dir, docs_jsonl, out, "--num-shards", "3",
                               "--shard-index", "0"))  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "the manifest comes with the last slice" in result.output
    before = sorted(p.name for p in (out / "shards").iterdir())
    other = _build_args(tiny_llama_dir, docs_jsonl, out, "--num-shards", "3", "--shard-index", "1")
    other[other.index("--top-k") + 1] = "4"  # a slice of another build's settings
    _one_error_line(_cli(*other), "was built differently (settings.top_k: 8 -> 4)")
    groups = _build_args(tiny_llama_dir, docs_jsonl, out, "--num-shards", "3", "--shard-index", "1")
    groups[groups.index("--group-rows") + 1] = "auto"  # 16 rows: one group of 16, not 2
    _one_error_line(_cli(*groups), "cuts the rows into groups of 2 (this run: 16)")
    count = _build_args(tiny_llama_dir, docs_jsonl, out, "--num-shards", "4", "--shard-index", "1")
    _one_error_line(_cli(*count), "is being built in 3 independent slices")
    _one_error_line(
        _cli("--out", str(out), "--finalize"),
        "cannot finalize",
    )
    result = _cli("--out", str(out), "--finalize")
    assert "slices 1, 2 of 3 (--shard-index) are not complete" in result.output
    assert sorted(p.name for p in (out / "shards").iterdir()) == before  # nothing lost
    _one_error_line(_cli("--out", str(tmp_path / "nothing"), "--finalize"), "no unfinished build")


def test_shard_tokens_sets_the_tokens_per_shard(tiny_llama_dir, docs_jsonl, tmp_path):
    """--shard-tokens N: a shard closes at the first sequence boundary at or past N tokens."""
    counts = {}
    for tokens in (100, 10**6):
        out = tmp_path / f"shards-{tokens}"
        args = _build_args(tiny_llama_dir, docs_jsonl, out)
        args[args.index("--shard-tokens") + 1] = str(tokens)
        result = _cli(*args)
        assert result.exit_code == 0, result.output
        streams: dict[tuple[str, int], list] = {}
        for info in list_complete_shards(out):
            streams.setdefault((info.split, info.rank), []).append(info)
        for shards in streams.values():
            assert all(info.num_tokens >= tokens for info in shards[:-1])
        counts[tokens] = sum(len(shards) for shards in streams.values())
        assert counts[tokens] >= len(streams)
    assert counts[10**6] == len(streams)  # one shard per (split, row group)
    assert counts[100] > counts[10**6]


def test_slices_into_s3_equal_one_build(s3, single, tiny_llama_dir, docs_jsonl, tmp_path):
    url = f"s3://{s3.bucket}/caches/sliced"
    options = {"endpoint_url": s3.endpoint}
    for index in (1, 0):
        config = _config(tiny_llama_dir, docs_jsonl, url, num_shards=2, shard_index=index,
                         storage_options=options, staging_dir=str(tmp_path / "staging"))  # fmt: skip
        summary = build_cache(config)
    assert summary.status == "built"
    fs = s3.filesystem()
    keys = {path.split("/caches/sliced/", 1)[1] for path in fs.find(f"{s3.bucket}/caches/sliced")}
    assert "manifest.json" in keys and any(k.startswith(f"{PARTS_DIR}/") for k in keys)
    cache = open_cache(url, storage_options=options)
    reference = open_cache(single)
    assert [s["name"] for s in cache.manifest["shards"]] == [
        s["name"] for s in reference.manifest["shards"]
    ]
    for split in reference.splits:
        ours = {r.sequence_id: r.topk_ids.tobytes() for r in cache.sequences(split)}
        assert ours == {r.sequence_id: r.topk_ids.tobytes() for r in reference.sequences(split)}


_PAUSING_SLICE = """
import sys, time
from kdcache.cache.build import output

publish = output.LocalTarget.publish


def publish_then_pause(self, info):  # mid-build, long enough for the test's SIGKILL
    publish(self, info)
    time.sleep(600)


output.LocalTarget.publish = publish_then_pause
from kdcache.cli.app import main

sys.argv = ["kdcache", *sys.argv[1:]]
main()
"""


@pytest.mark.slow  # fresh interpreters: ~1 min on 2 busy cores
def test_cli_slices_as_separate_jobs(single, tiny_llama_dir, docs_jsonl, tmp_path):
    """The documented commands: 3 `kdcache build --num-shards 3 --shard-index I` jobs at once,
    one SIGKILLed by the test mid-build and started again, then `--finalize` (a no-op)."""
    import time

    out = tmp_path / "jobs"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    script = tmp_path / "pausing_slice.py"
    script.write_text(_PAUSING_SLICE, encoding="utf-8")

    def job(index: int, *program: str) -> subprocess.Popen:
        args = [sys.executable, *(program or ("-m", "kdcache.cli")), "build"]
        args += _build_args(tiny_llama_dir, docs_jsonl, out, "--num-shards", "3",
                            "--shard-index", str(index))  # fmt: skip
        return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)  # fmt: skip

    jobs = [job(0), job(1), job(2, str(script))]
    deadline = time.monotonic() + 300
    while not any(s.rank % 3 == 2 for s in list_complete_shards(out)):
        assert time.monotonic() < deadline and jobs[2].poll() is None, "slice 2 never started"
        time.sleep(0.05)
    jobs[2].send_signal(signal.SIGKILL)
    outputs = [j.communicate(timeout=600)[0] for j in jobs]
    assert jobs[2].returncode == -signal.SIGKILL
    assert [j.returncode for j in jobs[:2]] == [0, 0], outputs
    rerun = job(2)
    output = rerun.communicate(timeout=600)[0]
    assert rerun.returncode == 0 and "resumed:" in output, output
    finalize = subprocess.run(
        [sys.executable, "-m", "kdcache.cli", "build", "--out", str(out), "--finalize"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert finalize.returncode == 0 and "complete" in finalize.stdout, finalize.stdout
    assert_same_record_sets(out, single)
    assert verify_cache(out) == []


def test_two_slices_starting_together_on_s3_compare_states(s3, tmp_path):
    """The race of two first slices: the remote state another slice created between our look and
    our write is compared by fingerprints (the same: kept; other settings: refused)."""
    import json

    from kdcache.cache.build.output import RemoteTarget
    from kdcache.cache.format.manifest import BUILD_STATE_NAME
    from kdcache.cache.storage.location import resolve_location

    location = resolve_location(f"s3://{s3.bucket}/race", s3.options)
    target = RemoteTarget(location, 0, tmp_path / "staging")
    fingerprints = {"teacher": {"hash": "t"}, "tokenizer": {"hash": "k"}, "data": {"hash": "d"},
                    "settings": {"hash": "s", "top_k": 8}}  # fmt: skip
    ours = {**fingerprints, "num_shards": 3, "partition": {"num_groups": 8}}
    target.local_dir.mkdir(parents=True)
    remote = location.filesystem()
    same = {**ours, "manifest": {"created": "elsewhere"}}  # other bytes, same fingerprints
    remote.pipe_file(location.child(BUILD_STATE_NAME), json.dumps(same).encode())
    (target.local_dir / BUILD_STATE_NAME).write_text(json.dumps(ours))
    target._put_state(exclusive=True)
    assert json.loads((target.local_dir / BUILD_STATE_NAME).read_text()) == same
    other = {**ours, "settings": {"hash": "x", "top_k": 4}}
    remote.pipe_file(location.child(BUILD_STATE_NAME), json.dumps(other).encode())
    (target.local_dir / BUILD_STATE_NAME).write_text(json.dumps(ours))
    with pytest.raises(ConfigError, match=r"started at the same moment .*settings.top_k: 4 -> 8"):
        target._put_state(exclusive=True)
    assert not (target.local_dir / BUILD_STATE_NAME).exists()  # the refused state is not kept

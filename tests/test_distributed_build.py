"""``build_cache`` under torch.distributed: 2 gloo processes on CPU, as torchrun would run them.

The ranks are forked from the test process (torch and transformers already imported, so a rank
starts in well under a second) with torchrun's environment; each joins the group with the CLI's own
``_distributed()`` and calls ``build_cache(config, rank=r, world_size=2)`` -- exactly what
``python -m kdcache.cli build`` does under torchrun. The torchrun command itself is exercised by
the ``slow`` test at the end.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import socket
import subprocess
import sys
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch

from kdcache.cache.build.data import group_of, owned_groups
from kdcache.cache.build.pipeline import BuildConfig, build_cache
from kdcache.cache.build.slices import PARTS_DIR, marker_name
from kdcache.cache.errors import ConfigError
from kdcache.cache.format.shards import SHARDS_DIR, list_complete_shards, shard_name
from kdcache.cache.read.reader import open_cache
from kdcache.cache.read.verify import verify_cache
from tests.conftest import text_rows, write_jsonl

GROUP_ROWS = 4
RANK_TIMEOUT_S = 180  # a hung rank fails the test instead of hanging the suite


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_main(fn, rank: int, world_size: int, port: int, queue, args: tuple) -> None:
    """Body of one forked rank: torchrun's environment variables, ``fn``, its result back."""
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    try:
        queue.put((rank, "ok", fn(rank, world_size, *args)))
    except BaseException as error:  # handed to the test process, which checks it
        queue.put((rank, type(error).__name__, f"{error}\n{traceback.format_exc()}"))


def run_ranks(fn, world_size: int, *args) -> list:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` forked processes; results by rank.

    A rank that raises is reported as ``(error type name, message)`` in place of its result. A
    rank still running after ``RANK_TIMEOUT_S`` is killed and fails the test.
    """
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    port = free_port()
    processes = [
        context.Process(target=_rank_main, args=(fn, rank, world_size, port, queue, args))
        for rank in range(world_size)
    ]
    for process in processes:
        process.start()
    results: dict[int, object] = {}
    try:
        for _ in range(world_size):
            rank, status, value = queue.get(timeout=RANK_TIMEOUT_S)
            results[rank] = value if status == "ok" else (status, value)
    except Exception:
        pytest.fail(f"ranks {sorted(set(range(world_size)) - set(results))} did not finish")
    finally:
        for process in processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
                process.join()
    return [results[rank] for rank in range(world_size)]


def _build_rank(rank: int, world_size: int, config: BuildConfig):
    """What ``kdcache build`` does on one torchrun rank (its own process-group setup included)."""
    import torch.distributed as dist

    from kdcache.cli.build import _distributed

    assert _distributed() == (rank, world_size)
    assert dist.get_backend() == "gloo"
    try:
        summary = build_cache(config, rank=rank, world_size=world_size)
    finally:
        dist.destroy_process_group()
    return summary.status, summary.tokens_this_run


@pytest.fixture(scope="module")
def docs_jsonl(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("docs") / "docs.jsonl", text_rows(16, seed=1))


def _config(teacher, data, out, **overrides) -> BuildConfig:
    settings = dict(top_k=8, max_length=48, holdout=0.25, batch_tokens=200, shard_tokens=120)
    settings["group_rows"] = GROUP_ROWS  # 16 rows: 4 row groups, the units of work
    settings.update(overrides)
    return BuildConfig(teacher=str(teacher), data=str(data), out=out, progress=False, **settings)


@pytest.fixture(scope="module")
def single(tmp_path_factory, tiny_llama_dir, docs_jsonl) -> Path:
    """The reference: the same build in one process."""
    out = tmp_path_factory.mktemp("single") / "cache"
    torch.set_num_threads(1)
    build_cache(_config(tiny_llama_dir, docs_jsonl, out))
    return out


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, tiny_llama_dir, docs_jsonl) -> Path:
    """The same build by 2 gloo ranks."""
    out = tmp_path_factory.mktemp("ranks") / "cache"
    results = run_ranks(_build_rank, 2, _config(tiny_llama_dir, docs_jsonl, out))
    assert results[0][0] == "built", results
    assert results[1][0] == "written", results
    return out


def _records(path: Path) -> dict[str, dict[int, object]]:
    cache = open_cache(path)
    return {
        split: {record.sequence_id: record for record in cache.sequences(split)}
        for split in cache.manifest["splits"]
    }


def assert_same_record_sets(path: Path, reference: Path) -> None:
    """Same splits, same sequence ids and tokens, same top-k values (to fp16 rounding)."""
    got, expected = _records(path), _records(reference)
    assert got.keys() == expected.keys()
    for split, records in expected.items():
        assert sorted(got[split]) == sorted(records), split
        for sequence_id, record in records.items():
            other = got[split][sequence_id]
            np.testing.assert_array_equal(other.input_ids, record.input_ids)
            np.testing.assert_array_equal(other.positions, record.positions)
            np.testing.assert_array_equal(other.topk_ids, record.topk_ids)
            np.testing.assert_allclose(other.topk_logprobs, record.topk_logprobs, atol=2e-3)
            np.testing.assert_allclose(other.tail_mass, record.tail_mass, atol=1e-3)


def test_two_rank_build_equals_one_rank_build(two_ranks, single):
    assert_same_record_sets(two_ranks, single)
    manifest, reference = open_cache(two_ranks).manifest, open_cache(single).manifest
    assert manifest["world_size"] == 2 and reference["world_size"] == 1
    for key in ("num_sequences", "num_tokens", "num_positions"):
        assert manifest[key] == reference[key], key
    for split, counts in reference["splits"].items():
        got = manifest["splits"][split]
        assert (got["num_sequences"], got["num_tokens"]) == (
            counts["num_sequences"],
            counts["num_tokens"],
        )
    assert manifest["fingerprints"] == reference["fingerprints"]
    shards = list_complete_shards(two_ranks)
    assert {info.rank for info in shards} == {0, 1, 2, 3}  # a shard's "rank" is its row group
    assert len(manifest["shards"]) == len(shards)
    assert sorted(s.name for s in shards) == sorted(s.name for s in list_complete_shards(single))
    cache = open_cache(two_ranks)
    for info in shards:  # each shard holds the sequences of its own row group
        ids = [record.sequence_id for record in cache.read_shard(info)]
        assert ids and all(group_of(sequence_id) == info.rank for sequence_id in ids), ids
    assert verify_cache(two_ranks) == []


def _drop_shards(cache: Path, split: str, rank: int, first_index: int) -> list[str]:
    """Delete the shards (and journal entries) of (split, rank) from ``first_index`` on."""
    dropped = []
    for info in list_complete_shards(cache):
        if info.split == split and info.rank == rank and info.index >= first_index:
            stem = shard_name(split, rank, info.index)
            for path in (cache / SHARDS_DIR).glob(f"{Path(stem).stem}.*"):
                path.unlink()
            dropped.append(info.name)
    return dropped


def _crashed_copy(source: Path, target: Path, rank: int, world_size: int = 2) -> Path:
    """``source`` as a crash of ``rank`` (of ``world_size``) left it: no manifest, the rank's
    first row group cut short (no marker, one train shard kept), its later groups not built.

    The other ranks finished, so only ``rank`` has work left; a torn temp file is left behind too.
    """
    shutil.copytree(source, target)
    (target / "manifest.json").unlink()
    groups = owned_groups(16 // GROUP_ROWS, rank, world_size)
    for position, group in enumerate(groups):
        (target / PARTS_DIR / marker_name(group)).unlink()
        first = 1 if position == 0 else 0
        dropped = _drop_shards(target, "train", group, first)
        assert dropped or first == 0, "the group had a single train shard"
        _drop_shards(target, "holdout", group, 0)
    (target / SHARDS_DIR / ".tmp-crash").write_bytes(b"half a shard")
    return target


def test_resume_after_one_rank_crashed(two_ranks, single, tiny_llama_dir, docs_jsonl, tmp_path):
    out = _crashed_copy(two_ranks, tmp_path / "crashed", rank=1)
    kept = {info.name for info in list_complete_shards(out)}
    results = run_ranks(_build_rank, 2, _config(tiny_llama_dir, docs_jsonl, out))
    assert results[0] == ("resumed", 0), results  # rank 0 had finished: it runs no teacher
    assert results[1][0] == "written" and results[1][1] > 0, results
    assert kept <= {info.name for info in list_complete_shards(out)}
    assert_same_record_sets(out, single)
    assert verify_cache(out) == []


def test_resume_with_another_number_of_processes(
    two_ranks, single, tiny_llama_dir, docs_jsonl, tmp_path
):
    """A 2-rank build resumed by 1 process, and a 1-process build resumed by 2 (or 3) ranks:
    the completed row groups are kept, the rest built; the records are the one-process build's."""
    partial = _crashed_copy(two_ranks, tmp_path / "from-two", rank=1)
    kept = {info.name for info in list_complete_shards(partial)}
    summary = build_cache(_config(tiny_llama_dir, docs_jsonl, partial))
    assert summary.status == "resumed" and summary.tokens_this_run > 0
    assert kept <= {info.name for info in list_complete_shards(partial)}
    assert_same_record_sets(partial, single)
    assert verify_cache(partial) == []

    partial = _crashed_copy(single, tmp_path / "from-one", rank=0, world_size=1)
    results = run_ranks(_build_rank, 3, _config(tiny_llama_dir, docs_jsonl, partial))
    assert results[0][0] == "resumed", results
    assert [status for status, _ in results[1:]] == ["written", "written"], results
    assert_same_record_sets(partial, single)
    assert verify_cache(partial) == []


def _build_rank_logging_groups(rank: int, world_size: int, config: BuildConfig):
    """``_build_rank`` that also returns the row groups whose rows this rank read (tokenized)."""
    from kdcache.cache.build import data

    read: list[int] = []
    group_rows = data.RecordStream.group_rows

    def logged(self, group: int):
        read.append(group)
        return group_rows(self, group)

    data.RecordStream.group_rows = logged
    return (*_build_rank(rank, world_size, config), sorted(set(read)))


def test_three_rank_build_equals_one_rank_build(single, tiny_llama_dir, docs_jsonl, tmp_path):
    """3 ranks, 4 row groups: rank 0 builds groups 0 and 3, ranks 1 and 2 one each; no rank reads
    (tokenizes) a row of a group it does not own."""
    out = tmp_path / "three"
    results = run_ranks(_build_rank_logging_groups, 3, _config(tiny_llama_dir, docs_jsonl, out))
    assert results[0][0] == "built", results
    assert [groups for *_, groups in results] == [[0, 3], [1], [2]], results
    assert_same_record_sets(out, single)
    shards = {s.name: s for s in list_complete_shards(out)}
    reference = {s.name: s for s in list_complete_shards(single)}
    assert shards.keys() == reference.keys()  # the same files, with the same records
    for name, info in reference.items():
        assert shards[name].num_sequences == info.num_sequences, name
        assert shards[name].num_tokens == info.num_tokens, name


def test_cli_resume_with_one_process_after_two(
    two_ranks, single, tiny_llama_dir, docs_jsonl, tmp_path
):
    from typer.testing import CliRunner

    from kdcache.cli.app import app

    partial = _crashed_copy(two_ranks, tmp_path / "partial", rank=1)
    args = ["build", "--teacher", str(tiny_llama_dir), "--data", str(docs_jsonl), "--out"]
    args += [str(partial), "--top-k", "8", "--max-length", "48", "--holdout", "0.25"]
    args += ["--batch-tokens", "200", "--shard-tokens", "120", "--group-rows", str(GROUP_ROWS)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "resumed:" in result.output
    assert_same_record_sets(partial, single)


def _build_rank_blind(rank: int, world_size: int, config: BuildConfig):
    """A rank 0 that cannot see the other ranks' shards, as with a node-local --out."""
    if rank == 0:
        from kdcache.cache.format import shards

        real = shards.list_complete_shards
        shards.list_complete_shards = lambda path: [s for s in real(path) if s.rank == 0]
    return _build_rank(rank, world_size, config)


def test_out_not_shared_by_the_ranks_is_refused(tiny_llama_dir, docs_jsonl, tmp_path):
    out = tmp_path / "local"
    results = run_ranks(_build_rank_blind, 2, _config(tiny_llama_dir, docs_jsonl, out))
    assert results[1][0] == "written", results
    status, message = results[0]
    assert status == "CacheError", message
    assert "filesystem shared by every rank" in message.splitlines()[0], message
    assert not (out / "manifest.json").exists()


@pytest.mark.slow  # torchrun starts fresh interpreters: ~30-60 s on 2 busy cores
def test_torchrun_build_command(single, tiny_llama_dir, docs_jsonl, tmp_path):
    """The documented command: ``python -m torch.distributed.run --nproc-per-node 2 -m kdcache.cli``."""
    out = tmp_path / "torchrun"
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    args += ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"localhost:{free_port()}"]
    args += ["-m", "kdcache.cli", "build", "--teacher", str(tiny_llama_dir), "--data"]
    args += [str(docs_jsonl), "--out", str(out), "--top-k", "8", "--max-length", "48"]
    args += ["--holdout", "0.25", "--batch-tokens", "200", "--group-rows", str(GROUP_ROWS)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "built:" in result.stdout
    assert open_cache(out).manifest["world_size"] == 2
    assert_same_record_sets(out, single)


_CRASHING_RANK = """
import os, sys
import torch
torch.set_num_threads(1)
from kdcache.cache.format import shards
from kdcache.cache.build import teacher

init = shards.ShardWriter.__init__


def small_shards(self, *args, **kwargs):  # several shards per rank, so a crash leaves some
    init(self, *args, **{**kwargs, "max_shard_tokens": 120})


shards.ShardWriter.__init__ = small_shards
if os.environ["RANK"] == os.environ["CRASH_RANK"]:
    run = teacher.TeacherRunner.run

    def run_then_die(self, *args, **kwargs):
        done = [s for s in shards.list_complete_shards(os.environ["OUT"]) if s.rank == 1]
        if done:
            os._exit(9)  # as if killed: no cleanup, no exception handling
        return run(self, *args, **kwargs)

    teacher.TeacherRunner.run = run_then_die
from kdcache.cli.app import main

sys.argv = ["kdcache", *sys.argv[1:]]
main()
"""


@pytest.mark.slow  # two torchrun jobs of fresh interpreters: ~1-2 min on 2 busy cores
def test_torchrun_build_resumes_after_a_rank_dies(single, tiny_llama_dir, docs_jsonl, tmp_path):
    """Rank 1 dies after its first shard; torchrun stops rank 0; the same command then resumes."""
    out = tmp_path / "crashed"
    script = tmp_path / "crashing_rank.py"
    script.write_text(_CRASHING_RANK, encoding="utf-8")
    build = ["build", "--teacher", str(tiny_llama_dir), "--data", str(docs_jsonl), "--out"]
    build += [str(out), "--top-k", "8", "--max-length", "48", "--holdout", "0.25"]
    build += ["--batch-tokens", "200", "--group-rows", str(GROUP_ROWS)]

    def torchrun(*target: str) -> subprocess.CompletedProcess:
        args = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
        args += ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"localhost:{free_port()}"]
        env = dict(os.environ, OMP_NUM_THREADS="1", CRASH_RANK="1", OUT=str(out))
        return subprocess.run(
            [*args, *target, *build], env=env, capture_output=True, text=True, timeout=600
        )

    crashed = torchrun(str(script))
    assert crashed.returncode != 0, crashed.stdout + crashed.stderr
    assert not (out / "manifest.json").exists()
    assert any(info.rank == 1 for info in list_complete_shards(out))
    resumed = torchrun("-m", "kdcache.cli")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resumed:" in resumed.stdout
    assert_same_record_sets(out, single)
    assert verify_cache(out) == []


@pytest.mark.slow  # two torchrun agents of fresh interpreters: ~1 min on 2 busy cores
def test_two_node_torchrun_command(single, tiny_llama_dir, docs_jsonl, tmp_path):
    """README's several-node command, both "nodes" on this machine: c10d rendezvous, 2 agents."""
    out = tmp_path / "nodes"
    args = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2"]
    args += ["--nproc-per-node", "1", "--rdzv-id", "kd-test-build", "--rdzv-backend", "c10d"]
    args += ["--rdzv-endpoint", f"localhost:{free_port()}", "-m", "kdcache.cli", "build"]
    args += ["--teacher", str(tiny_llama_dir), "--data", str(docs_jsonl), "--out", str(out)]
    args += ["--top-k", "8", "--max-length", "48", "--holdout", "0.25", "--batch-tokens", "200"]
    args += ["--group-rows", str(GROUP_ROWS)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    nodes = [
        subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(2)
    ]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs
    assert open_cache(out).manifest["world_size"] == 2
    assert {info.rank for info in list_complete_shards(out)} == {0, 1, 2, 3}
    assert_same_record_sets(out, single)


def test_partial_build_cut_by_rank_by_an_older_kdcache_is_refused(
    two_ranks, tiny_llama_dir, docs_jsonl, tmp_path
):
    """A build state without a partition and of several processes: its shards were named by
    rank, not row group, so they cannot be reused; refused, nothing deleted, --overwrite works."""
    import json

    from kdcache.cache.format.manifest import BUILD_STATE_NAME

    partial = _crashed_copy(two_ranks, tmp_path / "old", rank=1)
    state = json.loads((partial / BUILD_STATE_NAME).read_text())
    state.pop("partition"), state.pop("manifest")
    (partial / BUILD_STATE_NAME).write_text(json.dumps({**state, "world_size": 2}))
    before = sorted(info.name for info in list_complete_shards(partial))
    with pytest.raises(
        ConfigError, match=r"started by an older kdcache \(shards by rank, 2 processes\)"
    ):
        build_cache(_config(tiny_llama_dir, docs_jsonl, partial))
    assert sorted(info.name for info in list_complete_shards(partial)) == before
    summary = build_cache(_config(tiny_llama_dir, docs_jsonl, partial, overwrite=True))
    assert summary.status == "built"

"""build_cache end to end: values equal the model's own forward; resume, refusal, lock, no-op."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from kdcache.cache.build.data import group_of
from kdcache.cache.build.fingerprint import tokenizer_fingerprint
from kdcache.cache.build.lock import STATE_NAME, BuildLock
from kdcache.cache.build.pipeline import BuildConfig, build_cache
from kdcache.cache.errors import CacheError, ConfigError
from kdcache.cache.format.shards import SHARDS_DIR, list_complete_shards
from kdcache.cache.read.reader import open_cache
from tests.conftest import crash_shard_writes_at, text_rows, write_jsonl

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def docs_jsonl(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("docs") / "docs.jsonl", text_rows(16, seed=1))


def _config(teacher, data, out, **overrides) -> BuildConfig:
    # exact storage: these tests compare the stored values with the model's forward at fp16
    settings = dict(top_k=8, max_length=48, holdout=0.25, batch_tokens=200, shard_tokens=150,
                    mode="exact")  # fmt: skip
    settings.update(overrides)
    return BuildConfig(teacher=str(teacher), data=str(data), out=out, progress=False, **settings)


def _records(path: Path) -> dict[str, list]:
    cache = open_cache(path)
    return {split: list(cache.sequences(split)) for split in cache.manifest["splits"]}


def _assert_same_records(a: dict[str, list], b: dict[str, list]) -> None:
    assert a.keys() == b.keys()
    for split in a:
        assert len(a[split]) == len(b[split])
        for x, y in zip(a[split], b[split], strict=True):
            assert x.sequence_id == y.sequence_id
            for name in ("input_ids", "positions", "topk_ids", "topk_logprobs", "tail_mass"):
                np.testing.assert_array_equal(getattr(x, name), getattr(y, name), err_msg=name)


def _check_against_forward(model, record, temperature: float = 1.0) -> None:
    ids = torch.as_tensor(record.input_ids[None].astype(np.int64))
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0]  # (T, V)
    reference = torch.log_softmax(logits.double() / temperature, -1)[record.positions]  # (M, V)
    k = record.topk_ids.shape[1]
    values, _ = reference.topk(k, dim=-1)
    gathered = reference.gather(1, torch.as_tensor(record.topk_ids, dtype=torch.long))
    # stored log-probs are fp16-exact: compare to the dense reference at fp16 rounding
    np.testing.assert_allclose(record.topk_logprobs, gathered.numpy(), rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(record.topk_logprobs, values.numpy(), rtol=2e-3, atol=2e-3)
    tail = 1.0 - values.exp().sum(-1)
    np.testing.assert_allclose(record.tail_mass, tail.numpy(), rtol=1e-3, atol=1e-5)


def test_build_equals_model_forward(tiny_teacher_dir, docs_jsonl, tmp_path):
    out = tmp_path / "cache"
    summary = build_cache(_config(tiny_teacher_dir, docs_jsonl, out, temperature=1.5))
    assert summary.status == "built" and summary.num_tokens > 0
    cache = open_cache(out)
    manifest = cache.manifest
    assert set(manifest["splits"]) == {"train", "holdout"}
    assert manifest["top_k"] == 8 and manifest["temperature"] == 1.5
    assert (
        summary.num_tokens
        == manifest["num_tokens"]
        == sum(s["num_tokens"] for s in manifest["splits"].values())
    )
    from transformers import AutoTokenizer

    saved = AutoTokenizer.from_pretrained(out / "tokenizer")
    assert manifest["tokenizer_fingerprint"] == tokenizer_fingerprint(saved)
    assert {"teacher", "tokenizer", "data", "settings"} <= set(manifest["fingerprints"])
    assert manifest["build"]["tokens_per_second"] > 0 and manifest["created_at"]
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir).eval()
    for split in ("train", "holdout"):
        records = list(cache.sequences(split))
        ids = [r.sequence_id for r in records]  # group << 32 | n: n counts from 0 per group
        assert ids == sorted(set(ids))
        for group in {group_of(i) for i in ids}:
            local = [i - (group << 32) for i in ids if group_of(i) == group]
            assert local == list(range(len(local)))
        for record in records:
            np.testing.assert_array_equal(record.positions, np.arange(record.num_tokens))
            _check_against_forward(model, record, temperature=1.5)


def test_chat_build_stores_assistant_positions(
    tiny_llama_dir, chat_jsonl, tiny_tokenizer, tmp_path
):
    from kdcache.cache.build.data import render_chat
    from tests.conftest import chat_rows

    out = tmp_path / "chat"
    build_cache(
        _config(
            tiny_llama_dir,
            chat_jsonl,
            out,
            messages_field="messages",
            pack=False,
            holdout=0,
            max_length=256,
        )
    )
    records = _records(out)["train"]
    assert len(records) == len(chat_rows())
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    for record, row in zip(records, chat_rows(), strict=True):
        ids, assistant = render_chat(tiny_tokenizer, row["messages"])
        np.testing.assert_array_equal(record.input_ids, ids)
        np.testing.assert_array_equal(record.positions, np.flatnonzero(assistant) - 1)
        _check_against_forward(model, record)


def test_rerun_is_a_noop_and_different_settings_are_refused(tiny_llama_dir, docs_jsonl, tmp_path):
    out = tmp_path / "cache"
    build_cache(_config(tiny_llama_dir, docs_jsonl, out))
    manifest_before = (out / "manifest.json").read_bytes()
    again = build_cache(_config(tiny_llama_dir, docs_jsonl, out))
    assert again.status == "complete"
    assert (out / "manifest.json").read_bytes() == manifest_before
    with pytest.raises(ConfigError, match=r"settings\.top_k: 8 -> 4.*--overwrite"):
        build_cache(_config(tiny_llama_dir, docs_jsonl, out, top_k=4))
    with pytest.raises(ConfigError, match=r"data\.max_length: 48 -> 32"):
        build_cache(_config(tiny_llama_dir, docs_jsonl, out, max_length=32))
    assert (out / "manifest.json").read_bytes() == manifest_before  # nothing damaged
    (out / "notes.txt").write_text("mine")
    summary = build_cache(_config(tiny_llama_dir, docs_jsonl, out, top_k=4, overwrite=True))
    assert summary.status == "built" and open_cache(out).manifest["top_k"] == 4
    assert (out / "notes.txt").read_text() == "mine"  # only kdcache's own files were removed


def test_resume_after_a_crash_equals_an_uninterrupted_build(
    tiny_gpt2_dir, docs_jsonl, tmp_path, monkeypatch
):
    fresh = tmp_path / "fresh"
    build_cache(_config(tiny_gpt2_dir, docs_jsonl, fresh))
    out = tmp_path / "crashed"
    restore = crash_shard_writes_at(monkeypatch, 9)
    with pytest.raises(RuntimeError, match="simulated crash"):
        build_cache(_config(tiny_gpt2_dir, docs_jsonl, out))
    restore()
    assert not (out / "manifest.json").exists() and (out / STATE_NAME).exists()
    with pytest.raises(CacheError, match="the build did not finish; re-run the same"):
        open_cache(out)  # an interrupted build is told apart from a directory that is no cache
    partial = list_complete_shards(out)
    assert 0 < len(partial) < len(list_complete_shards(fresh))
    summary = build_cache(_config(tiny_gpt2_dir, docs_jsonl, out))
    assert summary.status == "resumed"
    assert 0 < summary.tokens_this_run < summary.num_tokens
    _assert_same_records(_records(out), _records(fresh))
    with pytest.raises(ConfigError, match="unfinished build"):
        (out / "manifest.json").unlink()
        build_cache(_config(tiny_gpt2_dir, docs_jsonl, out, temperature=2.0))


_SLOW_BUILD = """
import sys, time
import torch
torch.set_num_threads(1)
from kdcache.cache.build import teacher
from kdcache.cache.build.pipeline import BuildConfig, build_cache
run = teacher.TeacherRunner.run
def slow_run(self, *args, **kwargs):
    time.sleep(0.3)
    return run(self, *args, **kwargs)
teacher.TeacherRunner.run = slow_run
build_cache(BuildConfig(teacher=sys.argv[1], data=sys.argv[2], out=sys.argv[3], top_k=8,
    max_length=48, holdout=0.25, batch_tokens=60, shard_tokens=150, progress=False, mode="exact"))
"""


def test_resume_after_sigkill(tiny_llama_dir, docs_jsonl, tmp_path):
    out = tmp_path / "killed"
    process = subprocess.Popen(
        [sys.executable, "-c", _SLOW_BUILD, str(tiny_llama_dir), str(docs_jsonl), str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list_complete_shards(out)) < 2:
        assert process.poll() is None, "the build finished before it could be killed"
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (out / "manifest.json").exists()
    with BuildLock(out):  # the kernel released the dead builder's lock
        pass
    build_cache(_config(tiny_llama_dir, docs_jsonl, out, batch_tokens=60))
    fresh = tmp_path / "fresh"
    build_cache(_config(tiny_llama_dir, docs_jsonl, fresh, batch_tokens=60))
    _assert_same_records(_records(out), _records(fresh))


def test_second_builder_is_refused(tiny_llama_dir, docs_jsonl, tmp_path):
    out = tmp_path / "locked"
    out.mkdir()
    with BuildLock(out), pytest.raises(CacheError, match=rf"another process \(PID {os.getpid()}\)"):
        build_cache(_config(tiny_llama_dir, docs_jsonl, out))
    assert not (out / SHARDS_DIR).exists()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow  # two fresh interpreters importing torch: ~40 s on 2 busy cores
def test_two_rank_build_equals_single_process(tiny_llama_dir, docs_jsonl, tmp_path):
    """Two gloo processes through the CLI (as torchrun starts them): union == one process."""
    single = tmp_path / "single"
    build_cache(_config(tiny_llama_dir, docs_jsonl, single))
    out = tmp_path / "ranks"
    port = _free_port()
    args = [sys.executable, "-m", "kdcache.cli", "build", "--teacher", str(tiny_llama_dir)]
    args += ["--data", str(docs_jsonl), "--out", str(out), "--top-k", "8", "--max-length", "48"]
    args += ["--holdout", "0.25", "--batch-tokens", "200"]
    processes = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        processes.append(
            subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        )
    outputs = [p.communicate(timeout=300)[0].decode() for p in processes]
    assert [p.returncode for p in processes] == [0, 0], outputs
    assert "built:" in outputs[0]
    ranked, expected = _records(out), _records(single)
    assert open_cache(out).manifest["world_size"] == 2
    assert {s.rank for s in list_complete_shards(out)} == {0, 1}
    for split in expected:
        by_id = {r.sequence_id: r for r in ranked[split]}
        assert sorted(by_id) == [r.sequence_id for r in expected[split]]
        for record in expected[split]:
            np.testing.assert_array_equal(by_id[record.sequence_id].input_ids, record.input_ids)
            np.testing.assert_array_equal(by_id[record.sequence_id].topk_ids, record.topk_ids)
            np.testing.assert_allclose(
                by_id[record.sequence_id].topk_logprobs, record.topk_logprobs, atol=2e-3
            )


def test_fingerprints_follow_content_not_paths(tiny_llama_dir, tiny_tokenizer, tmp_path):
    import shutil

    from kdcache.cache.build.fingerprint import differences, teacher_fingerprint

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    copy = Path(shutil.copytree(tiny_llama_dir, tmp_path / "copy"))
    original = teacher_fingerprint(str(tiny_llama_dir), model)
    copied = teacher_fingerprint(str(copy), model)
    assert original["hash"] == copied["hash"] and original["path"] != copied["path"]
    with torch.no_grad():
        model.lm_head.weight.mul_(1.01)
    model.save_pretrained(copy)
    changed = teacher_fingerprint(str(copy), model)
    assert [
        line.split(":")[0] for line in differences({"teacher": original}, {"teacher": changed})
    ] == [
        "teacher.weight_files",
        "teacher.weights",
    ]
    assert tokenizer_fingerprint(tiny_tokenizer) == tokenizer_fingerprint(
        type(tiny_tokenizer).from_pretrained(tiny_llama_dir)
    )

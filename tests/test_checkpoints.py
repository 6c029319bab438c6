"""Checkpoints for multi-day runs: save intervals, retention, model-only final/ in bf16, atomic
saves that survive a SIGKILL mid-save, --dist-timeout."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kdcache.cache.errors import ConfigError
from kdcache.trainer import TrainConfig, train
from kdcache.trainer import checkpoint_policy as policy
from kdcache.trainer.checkpoint import latest_checkpoint, load_training_state
from tests import train_helpers as helpers

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def cache(tmp_path_factory, tiny_llama_dir, text_jsonl) -> Path:
    out = tmp_path_factory.mktemp("ckpt") / "cache"
    texts = helpers.read_texts(text_jsonl)
    return helpers.make_cache(out, tiny_llama_dir, texts, num_train=16, num_holdout=2)


@pytest.fixture(scope="module")
def student(tmp_path_factory, tiny_tokenizer) -> Path:
    return helpers.student_config(tmp_path_factory.mktemp("student") / "s.json", tiny_tokenizer)


SETTINGS = dict(steps=6, batch_size=2, lr=3e-3, warmup_steps=0, save_every=2, seed=0)


def _config(cache, student, out, **overrides) -> TrainConfig:
    settings = dict(SETTINGS, progress=False, device="cpu")
    settings.update(overrides)
    return TrainConfig(cache=str(cache), student=str(student), out=str(out), **settings)


def _cli(cache, student, out, *extra) -> list[str]:
    flags = [f"--{key.replace('_', '-')}={value}" for key, value in SETTINGS.items()]
    return [sys.executable, "-m", "kdcache.cli", "train", f"--cache={cache}",
            f"--student={student}", f"--out={out}", "--device=cpu", "--no-progress",
            *flags, *extra]  # fmt: skip


def test_a_sigkill_during_a_save_leaves_the_previous_checkpoint_resumable(
    cache, student, tmp_path, capfd
):
    """A real ``kill -9`` while ``step-4`` is half written: ``step-2`` stays the latest
    checkpoint, the resume removes the half-written directory and ends with the weights of the
    uninterrupted run."""
    reference = tmp_path / "reference"
    train(_config(cache, student, reference))
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", **{policy.SAVE_SLEEP_ENV: "step-4:300"})
    process = subprocess.Popen(
        _cli(cache, student, out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 240
        while not any((path / "model.safetensors").is_file() for path in out.glob(".tmp-step-4-*")):
            assert process.poll() is None, process.stderr.read().decode()
            assert time.monotonic() < deadline, "the run never reached its step-4 save"
            time.sleep(0.2)
        process.send_signal(signal.SIGKILL)  # inside the save: model written, state not, no rename
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == -signal.SIGKILL
    assert not (out / "step-4").exists() and not (out / "final").exists()
    assert latest_checkpoint(out) == out / "step-2"
    assert list(out.glob(".tmp-step-4-*"))  # the half-written save is still there ...

    capfd.readouterr()
    resumed = train(_config(cache, student, out, resume=True))
    assert resumed.resumed_from == 2 and resumed.steps == 6
    assert "removed .tmp-step-4-" in capfd.readouterr().err
    assert not list(out.glob(".tmp-*"))  # ... and gone after the resume
    expected = load_file(str(reference / "final" / "model.safetensors"))
    got = load_file(str(out / "final" / "model.safetensors"))
    for name, weight in expected.items():
        torch.testing.assert_close(got[name], weight, rtol=0, atol=1e-6, msg=name)


def test_retention_final_is_model_only_and_exports_bf16(cache, student, tmp_path):
    from transformers import AutoModelForCausalLM

    fp32 = tmp_path / "fp32"
    train(_config(cache, student, fp32, save_every=1, save_total_limit=2))
    assert sorted(p.name for p in fp32.iterdir() if p.is_dir()) == ["final", "step-4", "step-5"]
    assert "optimizer" in load_training_state(fp32 / "step-5")
    final_state = load_training_state(fp32 / "final")
    assert "optimizer" not in final_state and final_state["step"] == 6

    bf16 = tmp_path / "bf16"
    train(_config(cache, student, bf16, save_every=0, export_dtype="bf16"))
    assert sorted(p.name for p in bf16.iterdir() if p.is_dir()) == ["final"]
    model = AutoModelForCausalLM.from_pretrained(bf16 / "final")
    reference = AutoModelForCausalLM.from_pretrained(fp32 / "final")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    for (name, got), (_, full) in zip(
        model.state_dict().items(), reference.state_dict().items(), strict=True
    ):
        assert torch.equal(got, full.to(torch.bfloat16)), name
    size = (bf16 / "final" / "model.safetensors").stat().st_size
    assert size < 0.6 * (fp32 / "final" / "model.safetensors").stat().st_size


def test_a_finished_run_resumes_to_nothing_from_its_model_only_final(cache, student, tmp_path):
    out = tmp_path / "run"
    train(_config(cache, student, out, steps=2, save_every=0))
    again = train(_config(cache, student, out, steps=2, save_every=0, resume=True))
    assert again.resumed_from == 2 and again.steps == 2


def test_save_clock_by_steps_and_by_minutes(monkeypatch):
    from kdcache.trainer.distributed import DistInfo

    now = [1000.0]
    monkeypatch.setattr(policy.time, "monotonic", lambda: now[0])
    clock = policy.SaveClock(every_steps=0, every_minutes=30, check_every=10)
    info = DistInfo()
    assert not any(clock.due(step, info) for step in range(1, 30))
    now[0] += 30 * 60
    assert not clock.due(11, info)  # the clock is read at log steps only
    assert clock.due(20, info)
    clock.saved()
    assert not clock.due(30, info)
    steps = policy.SaveClock(every_steps=5, every_minutes=0, check_every=1)
    assert [step for step in range(1, 16) if steps.due(step, info)] == [5, 10, 15]
    assert TrainConfig.__dataclass_fields__["save_every_minutes"].default > 0  # on by default


def test_dist_timeout_reaches_init_process_group(monkeypatch):
    from kdcache.trainer import distributed

    seen = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda **kw: seen.update(kw))
    distributed.init_distributed("cpu", timeout_minutes=90)
    assert seen == {"backend": "gloo", "timeout": timedelta(minutes=90)}


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"save_total_limit": -1}, "--save-total-limit must be >= 0"),
        ({"save_every_minutes": -5}, "--save-every-minutes must be >= 0"),
        ({"export_dtype": "fp8"}, "--export-dtype must be one of float32, bf16"),
        ({"dist_timeout": 0}, "--dist-timeout must be a positive number of minutes"),
    ],
)
def test_bad_checkpoint_flags_are_refused(overrides, match, tmp_path):
    with pytest.raises(ConfigError, match=match):
        TrainConfig(cache="c", student="s", out=str(tmp_path), **overrides)


def test_prune_and_partial_directories(tmp_path):
    for name in ("step-2", "step-10", "step-4", ".tmp-step-12-77", "final", ".old-final-3"):
        (tmp_path / name).mkdir()
    assert [p.name for p in policy.prune_checkpoints(tmp_path, 2)] == ["step-2"]
    assert sorted(policy.remove_partial_saves(tmp_path)) == [".old-final-3", ".tmp-step-12-77"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final", "step-10", "step-4"]


def test_the_cli_refuses_a_bad_export_dtype_in_one_line(tmp_path):
    from typer.testing import CliRunner

    from kdcache.cli.app import app

    result = CliRunner().invoke(app, ["train", "--cache", "c", "--student", "s", "--out",
                                      str(tmp_path / "o"), "--export-dtype", "fp8"])  # fmt: skip
    assert result.exit_code == 2
    assert "error: --export-dtype must be one of float32, bf16" in result.output
    assert not (tmp_path / "o").exists()

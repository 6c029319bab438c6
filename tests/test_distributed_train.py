"""``train`` under DDP: 2 gloo processes on CPU make the update of 1 process with the global batch.

The ranks are forked from the test process by ``run_ranks`` (see test_distributed_build.py) with
torchrun's environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``) and call
``train(config)``, which joins the gloo group itself -- what ``torchrun -m kdcache.cli train`` does.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kdcache.cache import open_cache
from kdcache.trainer import TrainConfig, train
from kdcache.trainer.student import load_student_model
from tests import train_helpers as helpers
from tests.test_distributed_build import free_port, run_ranks

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def texts(text_jsonl) -> list[str]:
    return helpers.read_texts(text_jsonl)


@pytest.fixture(scope="module")
def four_sequences(tmp_path_factory, tiny_llama_dir, texts) -> Path:
    """4 train sequences of different lengths in one shard: one global batch of 4 = 2 x 2."""
    out = tmp_path_factory.mktemp("four") / "cache"
    return helpers.make_cache(
        out, tiny_llama_dir, texts, num_train=4, num_holdout=2, max_shard_tokens=10_000
    )


@pytest.fixture(scope="module")
def twelve_sequences(tmp_path_factory, tiny_llama_dir, texts) -> Path:
    """12 train sequences in several shards: 3 batches of 2 per rank and epoch."""
    out = tmp_path_factory.mktemp("twelve") / "cache"
    return helpers.make_cache(
        out, tiny_llama_dir, texts, num_train=12, num_holdout=2, max_shard_tokens=100
    )


@pytest.fixture(scope="module")
def twelve_in_one_shard(tmp_path_factory, tiny_llama_dir, texts) -> Path:
    """12 train sequences in one shard: 2 partitions split it by record, 6 sequences each."""
    out = tmp_path_factory.mktemp("twelve-one") / "cache"
    return helpers.make_cache(
        out, tiny_llama_dir, texts, num_train=12, num_holdout=2, max_shard_tokens=100_000
    )


@pytest.fixture(scope="module")
def student_json(tmp_path_factory, tiny_tokenizer) -> Path:
    return helpers.student_config(tmp_path_factory.mktemp("student") / "s.json", tiny_tokenizer)


def _config(cache: Path, student: Path, out: Path, **overrides) -> TrainConfig:
    settings = dict(
        cache=str(cache),
        student=str(student),
        out=str(out),
        loss="akl",
        ce_weight=0.25,  # both normalizations (distilled positions, labels) are exercised
        steps=1,
        warmup_steps=0,
        lr=3e-3,
        progress=False,
        log_every=1,
        device="cpu",
    )
    settings.update(overrides)
    return TrainConfig(**settings)


def _sgd(model, config):
    """Plain SGD: the update is -lr x gradient, so the gradient's scale shows in the weights."""
    return torch.optim.SGD(model.parameters(), lr=config.lr)


def _train_rank(rank: int, world_size: int, config: TrainConfig, sgd: bool = False):
    from kdcache.trainer import loop

    if sgd:
        loop.build_optimizer = _sgd  # this forked process only
    result = loop.train(config)
    return result.steps, result.loss, str(result.final)


def _weights(checkpoint: Path | str) -> dict[str, torch.Tensor]:
    return load_file(str(Path(checkpoint) / "model.safetensors"))


def _distilled_positions(cache: Path, rank: int, world_size: int) -> int:
    from kdcache.trainer.data import CacheDataset

    dataset = CacheDataset(open_cache(cache), batch_size=64, rank=rank, world_size=world_size)
    return sum(int(batch["distill_mask"].sum()) for batch in dataset.epoch_batches())


@pytest.mark.parametrize(
    ("sgd", "batch_size", "grad_accum", "workers", "online"),
    [
        (True, 2, 1, 0, False),
        (False, 2, 1, 0, False),
        (True, 1, 2, 0, False),
        (True, 2, 2, 2, False),
        (True, 2, 1, 0, True),
    ],
    ids=["sgd", "adamw", "sgd-grad-accum", "sgd-2-workers-per-rank", "sgd-online-teacher"],
)
def test_two_ranks_make_the_update_of_one_rank_with_the_global_batch(
    four_sequences,
    student_json,
    tiny_llama_dir,
    tmp_path,
    monkeypatch,
    sgd,
    batch_size,
    grad_accum,
    workers,
    online,
):
    """2 ranks x 2 sequences == 1 rank x batch 4 over the same 4 sequences, after one step.

    The ranks hold different numbers of distilled positions, so a per-rank mean (instead of the
    global one) would weight the ranks' positions differently and fail this test. With SGD the
    update is the averaged gradient itself; with the real AdamW it is the update users get. The
    ranks' 2 sequences come as one batch of 2 or as 2 accumulated batches of 1 (DDP ``no_sync``;
    with 2 DataLoader workers per rank each worker's stream holds one sequence), from the cache or
    with the full teacher in the loop (``--teacher``).
    """
    counts = [_distilled_positions(four_sequences, rank, 2) for rank in range(2)]
    assert counts[0] != counts[1], counts
    assert sum(counts) == _distilled_positions(four_sequences, 0, 1)
    extra = {"max_grad_norm": 0.0, "lr": 1.0, "weight_decay": 0.0} if sgd else {}
    if online:
        extra["teacher"] = str(tiny_llama_dir)

    if sgd:
        from kdcache.trainer import loop

        monkeypatch.setattr(loop, "build_optimizer", _sgd)
    one = train(_config(four_sequences, student_json, tmp_path / "one", batch_size=4, **extra))
    ranks = run_ranks(
        _train_rank,
        2,
        _config(
            four_sequences,
            student_json,
            tmp_path / "two",
            batch_size=batch_size,
            grad_accum=grad_accum,
            num_workers=workers,
            **extra,
        ),
        sgd,
    )
    assert [result[0] for result in ranks] == [1, 1], ranks
    assert ranks[0][1] == pytest.approx(one.loss, rel=1e-5)  # the global loss, on every rank
    assert ranks[1][1] == pytest.approx(one.loss, rel=1e-5)

    initial = load_student_model(str(student_json), seed=0)[0].state_dict()
    after_one, after_two = _weights(one.final), _weights(ranks[0][2])
    largest = 0.0
    for name, weight in after_one.items():
        update_one = weight - initial[name]
        update_two = after_two[name] - initial[name]
        largest = max(largest, float(update_one.abs().max()))
        torch.testing.assert_close(update_two, update_one, rtol=1e-4, atol=1e-5, msg=name)
    assert largest > 1e-3  # the step did move the weights


def test_only_rank_zero_writes_and_resume_with_the_same_world_size(
    twelve_sequences, student_json, tmp_path
):
    """A 2-rank run stopped after its step-2 checkpoint and resumed ends as the uninterrupted run."""
    settings = dict(steps=5, batch_size=2, save_every=2)
    full = tmp_path / "full"
    ranks = run_ranks(_train_rank, 2, _config(twelve_sequences, student_json, full, **settings))
    assert [result[0] for result in ranks] == [5, 5], ranks
    metrics = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in metrics if entry["kind"] == "train"] == [1, 2, 3, 4, 5]
    assert sorted(path.name for path in full.iterdir() if path.is_dir()) == [
        "final",
        "step-2",
        "step-4",
    ]
    state = torch.load(full / "final" / "trainer_state.pt", weights_only=False)
    assert state["world_size"] == 2 and len(state["data"]) == 2

    expected = _weights(full / "final")
    shutil.rmtree(full / "final")  # as a crash during step 3 leaves the run directory
    shutil.rmtree(full / "step-4")
    resumed = run_ranks(
        _train_rank, 2, _config(twelve_sequences, student_json, full, resume=True, **settings)
    )
    assert [result[0] for result in resumed] == [5, 5], resumed
    got = _weights(full / "final")
    for name, weight in expected.items():
        torch.testing.assert_close(got[name], weight, rtol=0, atol=1e-6, msg=name)
    lines = (full / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4, 5]


def _cut_back_to_step_2(out: Path) -> None:
    """What a crash during step 3 leaves of a run with checkpoints every 2 steps."""
    shutil.rmtree(out / "final")
    shutil.rmtree(out / "step-4")


def test_resume_on_another_world_size_keeps_the_global_batch(
    twelve_in_one_shard, student_json, tmp_path, capfd
):
    """2 ranks x batch 2 stopped after step 2 and resumed on 1 rank x batch 2 x accumulation 2
    (the same global batch) end with the uninterrupted 2-rank run's weights; and a 1-rank run
    with 2 data partitions resumed on 2 ranks ends as the uninterrupted 1-rank run. The
    partitions hold equally many batches (3 of 2 sequences): the step after the epoch's end
    takes the same batches too (docs/SCALING.md says when it may not)."""
    settings = dict(steps=5, batch_size=2, save_every=2)
    two = tmp_path / "two"
    run_ranks(_train_rank, 2, _config(twelve_in_one_shard, student_json, two, **settings))
    expected = _weights(two / "final")
    _cut_back_to_step_2(two)
    resumed = train(
        _config(twelve_in_one_shard, student_json, two, resume=True, grad_accum=2, **settings)
    )
    assert resumed.steps == 5 and resumed.resumed_from == 2
    assert "resuming a 2-rank checkpoint on 1 rank(s)" in capfd.readouterr().err
    got = _weights(two / "final")
    for name, weight in expected.items():
        torch.testing.assert_close(got[name], weight, rtol=1e-4, atol=1e-5, msg=name)
    lines = (two / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4, 5]

    one = tmp_path / "one"
    single = dict(settings, data_partitions=2)
    train(_config(twelve_in_one_shard, student_json, one, grad_accum=2, **single))
    expected = _weights(one / "final")
    _cut_back_to_step_2(one)
    again = run_ranks(
        _train_rank, 2, _config(twelve_in_one_shard, student_json, one, resume=True, **single)
    )
    assert [result[0] for result in again] == [5, 5], again
    got = _weights(one / "final")
    for name, weight in expected.items():
        torch.testing.assert_close(got[name], weight, rtol=1e-4, atol=1e-5, msg=name)


def test_resume_on_more_ranks_than_data_partitions_is_refused(
    twelve_sequences, student_json, tmp_path
):
    """A 1-rank run has 1 partition: resuming it on 2 ranks is refused on every rank, in one
    line naming --data-partitions, and the run directory is left as it was."""
    out = tmp_path / "run"
    train(_config(twelve_sequences, student_json, out, steps=2, batch_size=2))
    before = sorted(path.name for path in out.rglob("*"))
    config = _config(twelve_sequences, student_json, out, steps=2, batch_size=2, resume=True)
    results = run_ranks(_train_rank, 2, config)
    for kind, message in results:  # a rank that raised: (error type, message)
        assert kind == "ConfigError", results
        assert "at most 1 ranks" in message and "--data-partitions >= 2" in message, message
    assert sorted(path.name for path in out.rglob("*")) == before


def _fsdp_recipe() -> str:
    """The FSDP script of docs/SCALING.md (its first python block after the FSDP heading)."""
    text = (Path(__file__).parents[1] / "docs" / "SCALING.md").read_text(encoding="utf-8")
    section = text[text.index("## Students that do not fit") :]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def _recipe_rank(rank: int, world_size: int, source: str, *args) -> str:
    namespace = {"__name__": "fsdp_recipe"}
    exec(compile(source, "docs/SCALING.md", "exec"), namespace)
    namespace["main"](*args)  # cache, student, out, steps, batch_size, lr
    return "done"


def test_fsdp_recipe_of_scaling_md_runs_on_two_gloo_ranks(four_sequences, student_json, tmp_path):
    """2 FSDP ranks x batch 2 == 1 rank x batch 4: same weights after 2 AdamW steps."""
    student = tmp_path / "student"
    load_student_model(str(student_json), seed=0)[0].save_pretrained(student)
    source, cache = _fsdp_recipe(), str(four_sequences)
    steps, lr = 2, 1e-2
    two = run_ranks(
        _recipe_rank, 2, source, cache, str(student), str(tmp_path / "two"), steps, 2, lr
    )
    assert two == ["done", "done"], two
    one = run_ranks(
        _recipe_rank, 1, source, cache, str(student), str(tmp_path / "one"), steps, 4, lr
    )
    assert one == ["done"], one
    initial, after_one = _weights(student), _weights(tmp_path / "one")
    after_two = _weights(tmp_path / "two")
    assert after_two.keys() == after_one.keys() == initial.keys()
    for name, weight in after_one.items():
        assert not torch.equal(weight, initial[name]), name
        torch.testing.assert_close(after_two[name], weight, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.slow  # torchrun starts fresh interpreters: ~30-60 s on 2 busy cores
def test_torchrun_train_command(four_sequences, student_json, tmp_path):
    """The documented command: ``python -m torch.distributed.run --nproc-per-node 2 -m kdcache.cli``."""
    out = tmp_path / "torchrun"
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    args += ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"localhost:{free_port()}"]
    args += ["-m", "kdcache.cli", "train", "--cache", str(four_sequences), "--student"]
    args += [str(student_json), "--out", str(out), "--steps", "2", "--batch-size", "2"]
    args += ["--device", "cpu", "--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (out / "final" / "model.safetensors").is_file()
    state = torch.load(out / "final" / "trainer_state.pt", weights_only=False)
    assert state["world_size"] == 2 and state["step"] == 2

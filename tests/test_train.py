"""End to end on CPU: a cache of a tiny teacher trains students; resume is exact."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from kdcache.cache import open_cache
from kdcache.trainer import TrainConfig, evaluate_model, train
from tests import train_helpers as helpers

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def teacher_cache(tmp_path_factory, tiny_llama_dir, text_jsonl) -> Path:
    torch.manual_seed(0)
    return helpers.make_cache(
        tmp_path_factory.mktemp("cache"), tiny_llama_dir, helpers.read_texts(text_jsonl)
    )


@pytest.fixture(scope="module")
def student_json(tmp_path_factory, tiny_tokenizer) -> Path:
    return helpers.student_config(tmp_path_factory.mktemp("student") / "s.json", tiny_tokenizer)


def _config(cache, student, out, **overrides) -> TrainConfig:
    settings = dict(
        cache=str(cache),
        student=str(student),
        out=str(out),
        steps=4,
        batch_size=4,
        lr=3e-3,
        progress=False,
        log_every=1,
    )
    settings.update(overrides)
    return TrainConfig(**settings)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).state_dict()


def _holdout_kl(model, cache_dir) -> dict[str, float]:
    return evaluate_model(model, open_cache(cache_dir), split="holdout", batch_size=8)


@pytest.mark.parametrize("loss", ["fkl", "rkl", "akl", "ce"])
def test_each_loss_trains_and_holdout_kl_falls(loss, teacher_cache, student_json, tmp_path):
    from kdcache.trainer.student import load_student_model

    before = _holdout_kl(load_student_model(str(student_json), seed=0)[0], teacher_cache)
    result = train(_config(teacher_cache, student_json, tmp_path / loss, loss=loss, steps=40))
    assert result.steps == 40 and result.final == tmp_path / loss / "final"
    model = AutoModelForCausalLM.from_pretrained(result.final)  # loads with transformers
    after = _holdout_kl(model, teacher_cache)
    print(loss, before, after)
    if loss == "ce":  # the random tiny teacher does not predict the real text: CE is the goal
        assert after["ce"] < 0.9 * before["ce"], (before, after)
    else:
        assert after["fkl_bucket"] < 0.7 * before["fkl_bucket"], (before, after)
        assert after["rkl_bucket"] < before["rkl_bucket"] and after["top1"] > before["top1"]
    metrics = [json.loads(line) for line in (result.out / "metrics.jsonl").open()]
    assert [m["step"] for m in metrics if m["kind"] == "train"] == list(range(1, 41))
    assert metrics[-1]["loss"] < metrics[0]["loss"]
    assert json.loads((result.out / "run.json").read_text())["loss"] == loss
    assert (result.final / "model.safetensors").is_file()
    assert (result.final / "tokenizer.json").is_file()


@pytest.mark.parametrize("num_workers", [0, 2])
def test_interrupted_and_resumed_run_ends_with_the_same_weights(
    num_workers, teacher_cache, student_json, tmp_path
):
    common = dict(steps=6, grad_accum=2, num_workers=num_workers, warmup_steps=2, save_every=3)
    whole = train(_config(teacher_cache, student_json, tmp_path / "whole", **common))
    # The "interrupted" run: same settings, stopped after its step-3 checkpoint.
    part = tmp_path / "part"
    train(_config(teacher_cache, student_json, part, **common))
    for name in ("final", "step-6"):
        if (part / name).exists():
            import shutil

            shutil.rmtree(part / name)
    resumed = train(_config(teacher_cache, student_json, part, resume=True, **common))
    assert resumed.resumed_from == 3 and resumed.steps == 6
    expected, actual = _weights(whole.final), _weights(resumed.final)
    for name, tensor in expected.items():
        torch.testing.assert_close(actual[name], tensor, atol=1e-6, rtol=0)
    train_steps = [json.loads(line)["step"] for line in (part / "metrics.jsonl").open()]
    assert train_steps == list(range(1, 7))  # lines after the checkpoint were redone, not doubled


@pytest.mark.parametrize("architecture", ["llama", "gpt2"])  # gpt2: tied lm_head
def test_chunked_and_full_logits_paths_agree(
    architecture, teacher_cache, student_json, tiny_tokenizer, tmp_path, monkeypatch, capsys
):
    from kdcache.trainer import loop

    student = student_json
    if architecture == "gpt2":
        student = tmp_path / "gpt2.json"
        student.write_text(
            json.dumps({"model_type": "gpt2", "vocab_size": len(tiny_tokenizer), "n_embd": 32,
                        "n_layer": 1, "n_head": 4, "n_positions": 128})
        )  # fmt: skip
    settings = dict(steps=2, ce_weight=0.3)
    chunked = train(_config(teacher_cache, student, tmp_path / "a", chunk_size=7, **settings))
    assert "note:" not in capsys.readouterr().err  # the fused closed-form path, silently
    monkeypatch.setattr(loop, "resolve_head", lambda *_args: None)  # a head that does not split
    full = train(_config(teacher_cache, student, tmp_path / "b", **settings))
    assert capsys.readouterr().err.count("does not split off exactly") == 1  # one start-up line
    expected, actual = _weights(chunked.final), _weights(full.final)
    for name, tensor in expected.items():
        torch.testing.assert_close(actual[name], tensor, atol=1e-5, rtol=1e-4)


def test_epochs_and_eval_every(teacher_cache, student_json, tmp_path):
    result = train(
        _config(
            teacher_cache,
            student_json,
            tmp_path / "run",
            steps=None,
            epochs=2,
            batch_size=16,
            eval_every=2,
            eval_sequences=8,
        )
    )
    assert result.steps == 8  # 64 train sequences / 16 per batch, two epochs
    evals = [json.loads(line) for line in (result.out / "metrics.jsonl").open()]
    evals = [m for m in evals if m["kind"] == "eval"]
    assert [m["step"] for m in evals] == [2, 4, 6, 8]
    assert {"ce", "ppl", "fkl_bucket", "rkl_bucket", "top1", "fkl_unbiased"} <= set(evals[0])
    assert evals[0]["fkl_unbiased"] is None  # a top-k + bucket cache has no samples
    assert evals[-1]["fkl_bucket"] < evals[0]["fkl_bucket"]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_crash_mid_run_then_resume(num_workers, teacher_cache, student_json, tmp_path, monkeypatch):
    from kdcache.trainer.objective import DistillObjective

    common = dict(steps=6, grad_accum=2, num_workers=num_workers, save_every=2)
    whole = train(_config(teacher_cache, student_json, tmp_path / "whole", **common))
    original, calls = DistillObjective.forward, {"n": 0}

    def crashing(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 10:  # second micro-batch of step 5
            raise RuntimeError("simulated crash")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(DistillObjective, "forward", crashing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(_config(teacher_cache, student_json, tmp_path / "run", **common))
    monkeypatch.setattr(DistillObjective, "forward", original)
    assert not (tmp_path / "run" / "final").exists()
    resumed = train(_config(teacher_cache, student_json, tmp_path / "run", resume=True, **common))
    assert resumed.resumed_from == 4
    expected, actual = _weights(whole.final), _weights(resumed.final)
    for name, tensor in expected.items():
        torch.testing.assert_close(actual[name], tensor, atol=1e-6, rtol=0)


def test_grad_accumulation_equals_one_big_batch(teacher_cache, student_json, tmp_path):
    big = train(_config(teacher_cache, student_json, tmp_path / "big", steps=1, batch_size=4))
    accum = train(
        _config(teacher_cache, student_json, tmp_path / "acc", steps=1, batch_size=2, grad_accum=2)
    )
    expected, actual = _weights(big.final), _weights(accum.final)
    for name, tensor in expected.items():
        torch.testing.assert_close(actual[name], tensor, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("chunked", [True, False])
@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_objective_is_the_mean_over_distilled_positions(teacher_cache, chunked, alpha):
    """(1 - alpha) * mean KD over distilled positions + alpha * mean CE over labels, by hand."""
    import numpy as np

    from kdcache.cache.records import SequenceRecord
    from kdcache.trainer.data import collate_records
    from kdcache.trainer.losses import sparse_kd_loss
    from kdcache.trainer.objective import DistillObjective
    from kdcache.trainer.targets import LossOptions, target_for_cache

    cache = open_cache(teacher_cache)
    records = list(cache.sequences("holdout"))[:3]
    chat = records[1]  # keep only some positions, as a chat record would
    keep = np.arange(2, chat.num_tokens, 3)
    records[1] = SequenceRecord(
        chat.sequence_id, chat.input_ids, chat.topk_ids[keep], chat.topk_logprobs[keep],
        chat.tail_mass[keep], keep.astype(np.int32),
    )  # fmt: skip
    target = target_for_cache(cache.manifest)
    batch = collate_records(records, target)
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(vocab_size=384, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                    num_attention_heads=2, num_key_value_heads=1)
    )  # fmt: skip
    distilled = batch["distill_mask"]
    labelled = batch["labels"] != -100
    options = LossOptions(kind="akl", mu=0.5, temperature=1.0)
    objective = DistillObjective(model, target, options, alpha=alpha, chunk_size=5, chunked=chunked)
    loss = objective(batch, float(distilled.sum()), float(labelled.sum()))
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    kd = sparse_kd_loss(
        logits[distilled], batch["topk_ids"][distilled], batch["topk_logprobs"][distilled],
        batch["tail_mass"][distilled], kind="akl", mu=0.5,
    )  # fmt: skip
    ce = torch.nn.functional.cross_entropy(logits[labelled], batch["labels"][labelled])
    expected = (1 - alpha) * kd.mean() + alpha * ce
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
    assert int(distilled.sum()) < int(batch["attention_mask"].sum())  # padding + masked prompt


def test_online_teacher_in_the_loop(teacher_cache, student_json, tiny_llama_dir, tmp_path):
    from kdcache.trainer.student import load_student_model

    before = _holdout_kl(load_student_model(str(student_json), seed=0)[0], teacher_cache)
    result = train(
        _config(teacher_cache, student_json, tmp_path / "online", loss="fkl", steps=40,
                teacher=str(tiny_llama_dir))
    )  # fmt: skip
    after = _holdout_kl(AutoModelForCausalLM.from_pretrained(result.final), teacher_cache)
    assert after["fkl_bucket"] < 0.7 * before["fkl_bucket"], (before, after)


@pytest.mark.parametrize("chunked", [True, False])
def test_online_objective_is_the_dense_mean(teacher_cache, tiny_llama_dir, chunked):
    from transformers import LlamaConfig, LlamaForCausalLM

    from kdcache.cache.extraction.heads import split_head
    from kdcache.trainer.data import collate_records
    from kdcache.trainer.losses import dense_kd_loss
    from kdcache.trainer.objective import DistillObjective
    from kdcache.trainer.targets import DenseTeacherTarget, LossOptions

    teacher = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    target = DenseTeacherTarget(teacher, split_head(teacher) if chunked else None, 384)
    batch = collate_records(list(open_cache(teacher_cache).sequences("holdout"))[:3], target)
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(vocab_size=384, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                    num_attention_heads=2, num_key_value_heads=1)
    )  # fmt: skip
    mask, labelled = batch["distill_mask"], batch["labels"] != -100
    options = LossOptions(kind="akl", mu=0.5, temperature=2.0)
    objective = DistillObjective(model, target, options, alpha=0.25, chunk_size=5, chunked=chunked)
    loss = objective(batch, float(mask.sum()), float(labelled.sum()))
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    logits = model(**inputs).logits
    with torch.no_grad():
        teacher_logits = teacher(**inputs).logits
    kd = dense_kd_loss(logits[mask], teacher_logits[mask], kind="akl", mu=0.5, temperature=2.0)
    ce = torch.nn.functional.cross_entropy(logits[labelled], batch["labels"][labelled])
    torch.testing.assert_close(loss, 0.75 * kd.mean() + 0.25 * ce, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("chat", [False, True])
def test_a_cache_from_build_cache_trains(
    chat, tiny_llama_dir, text_jsonl, chat_jsonl, student_json, tmp_path
):
    """Stage one's real build (text, and chat with assistant-only positions) feeds stage two."""
    from kdcache.cache.build.pipeline import BuildConfig, build_cache

    build_cache(
        BuildConfig(
            teacher=str(tiny_llama_dir),
            data=str(chat_jsonl if chat else text_jsonl),
            out=tmp_path / "cache",
            messages_field="messages" if chat else None,
            top_k=8,
            max_length=64,
            holdout=0.25,
            progress=False,
        )
    )
    result = train(
        _config(tmp_path / "cache", student_json, tmp_path / "run", steps=3, ce_weight=0.5,
                eval_every=3, eval_split="train" if chat else "holdout")
    )  # fmt: skip
    assert result.steps == 3 and math.isfinite(result.loss)
    assert result.eval is not None and math.isfinite(result.eval["fkl_bucket"])
    if chat:  # only assistant tokens are distilled
        assert result.eval["positions"] < result.eval["sequences"] * 64


def _torchrun_train(cache, student, out, *extra: str) -> None:
    import os
    import subprocess
    import sys

    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "kdcache.cli", "train", "--cache", str(cache),
        "--student", str(student), "--out", str(out), "--steps", "4", "--batch-size", "2",
        "--grad-accum", "2", "--save-every", "2", "--log-every", "1", "--no-progress", "--device", "cpu", *extra,
    ]  # fmt: skip
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    finished = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=300)
    assert finished.returncode == 0, finished.stderr[-3000:]


@pytest.mark.slow
def test_two_gloo_ranks_train_and_resume(teacher_cache, student_json, tmp_path):
    """torchrun with 2 CPU processes (gloo): rank 0 writes; resume ends with the same weights."""
    _torchrun_train(teacher_cache, student_json, tmp_path / "whole")
    _torchrun_train(teacher_cache, student_json, tmp_path / "part")
    import shutil

    shutil.rmtree(tmp_path / "part" / "final")
    _torchrun_train(teacher_cache, student_json, tmp_path / "part", "--resume")
    expected, actual = _weights(tmp_path / "whole" / "final"), _weights(tmp_path / "part" / "final")
    for name, tensor in expected.items():
        torch.testing.assert_close(actual[name], tensor, atol=1e-6, rtol=0)
    state = torch.load(tmp_path / "whole" / "final" / "trainer_state.pt", weights_only=False)
    assert len(state["data"]) == 2 and state["world_size"] == 2
    lines = (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4]


def test_resume_accepts_the_same_paths_spelled_differently(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    stored = TrainConfig(cache="cache", student="s.json", out="run", steps=2).to_dict()
    same = TrainConfig(cache=str(tmp_path / "cache"), student="./s.json", out="run/", steps=2)
    assert same.differences(stored) == []
    other = TrainConfig(cache="other", student="s.json", out="run", steps=3, device="cpu")
    assert other.differences(stored) == ["cache: 'cache' -> 'other'", "steps: 2 -> 3"]


def test_teacher_ids_beyond_the_student_vocabulary_move_to_the_tail():
    from kdcache.trainer.targets.topk_bucket import fold_out_of_vocab

    ids = torch.tensor([[3, 9, 1], [2, 1, 0]])
    logprobs = torch.log(torch.tensor([[0.5, 0.2, 0.1], [0.6, 0.3, 0.0]]))
    tail = torch.tensor([0.2, 0.1])
    new_ids, new_logprobs, new_tail = fold_out_of_vocab(ids, logprobs, tail, vocab_size=8)
    assert new_ids.tolist() == [[3, 0, 1], [2, 1, 0]]
    assert torch.isneginf(new_logprobs[0, 1]) and new_logprobs[1].equal(logprobs[1])
    assert new_tail.tolist() == pytest.approx([0.4, 0.1])

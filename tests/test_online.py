"""Online distillation (``kdcache train --teacher``): the ceiling the cache study compares against.

The loop and objective are tested in tests/test_train.py with a Llama teacher. Here: a GPT-2
teacher (another architecture than the student) gives exactly the dense reference on its own
logits, a real train() run with it finishes, and a teacher with another tokenizer is refused.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch


def _load(name: str):
    """A module next to this file (the tests run with --import-mode=importlib)."""
    spec = importlib.util.spec_from_file_location(
        f"kdcache_online_{name}", Path(__file__).with_name(f"{name}.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory, tiny_llama_dir, text_jsonl) -> Path:
    from kdcache.cache.build.pipeline import BuildConfig, build_cache

    out = tmp_path_factory.mktemp("online") / "cache"
    build_cache(
        BuildConfig(teacher=str(tiny_llama_dir), data=str(text_jsonl), out=out, top_k=8,
                    max_length=32, limit=8, holdout=0.0, progress=False)
    )  # fmt: skip
    return out


@pytest.mark.parametrize("chunked", [True, False])
def test_online_loss_with_a_gpt2_teacher_is_dense_kd_on_its_logits(
    cache_dir, tiny_gpt2_dir, chunked
):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from kdcache.cache.extraction.heads import split_head
    from kdcache.cache.read.reader import open_cache
    from kdcache.trainer.data import collate_records
    from kdcache.trainer.losses import dense_kd_loss
    from kdcache.trainer.objective import DistillObjective
    from kdcache.trainer.targets import DenseTeacherTarget, LossOptions

    teacher = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir).eval()
    target = DenseTeacherTarget(teacher, split_head(teacher) if chunked else None, 384)
    batch = collate_records(list(open_cache(cache_dir).sequences("train"))[:3], target)
    torch.manual_seed(0)
    student = LlamaForCausalLM(
        LlamaConfig(vocab_size=384, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                    num_attention_heads=2, num_key_value_heads=1)
    )  # fmt: skip
    objective = DistillObjective(
        student, target, LossOptions(kind="rkl"), alpha=0.0, chunk_size=6, chunked=chunked
    )
    mask = batch["distill_mask"]
    labelled = float((batch["labels"] != -100).sum())
    loss = objective(batch, float(mask.sum()), labelled)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        teacher_logits = teacher(**inputs).logits  # the teacher's own forward, not its head split
    reference = dense_kd_loss(student(**inputs).logits[mask], teacher_logits[mask], kind="rkl")
    torch.testing.assert_close(loss, reference.mean(), atol=1e-5, rtol=1e-5)
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())  # the teacher is never trained


def test_train_with_a_teacher_in_the_loop_runs(cache_dir, tiny_gpt2_dir, tiny_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    from kdcache.trainer.config import TrainConfig
    from kdcache.trainer.loop import train

    student = _load("train_helpers").student_config(tmp_path / "s.json", tiny_tokenizer)
    result = train(
        TrainConfig(cache=str(cache_dir), student=str(student), out=str(tmp_path / "run"),
                    teacher=str(tiny_gpt2_dir), loss="akl", ce_weight=0.2, steps=3, batch_size=2,
                    progress=False)
    )  # fmt: skip
    assert result.steps == 3 and torch.isfinite(torch.tensor(result.loss))
    AutoModelForCausalLM.from_pretrained(result.final)  # a loadable checkpoint


def test_a_teacher_with_another_tokenizer_is_refused(cache_dir, tiny_tokenizer, tmp_path):
    from kdcache.cache.errors import ConfigError
    from kdcache.trainer.config import TrainConfig
    from kdcache.trainer.loop import train

    fixtures = _load("conftest")
    other = fixtures.make_tokenizer(tmp_path / "other-tokenizer", vocab_size=320)
    teacher = fixtures.make_llama(tmp_path / "other-teacher", other)
    student = _load("train_helpers").student_config(tmp_path / "s.json", tiny_tokenizer)
    config = TrainConfig(cache=str(cache_dir), student=str(student), out=str(tmp_path / "run"),
                         teacher=str(teacher), loss="fkl", steps=1, progress=False)  # fmt: skip
    with pytest.raises(ConfigError, match="--teacher"):
        train(config)
    assert not (tmp_path / "run").exists()  # refused before anything was written

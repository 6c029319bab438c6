"""`kdcache eval` metrics equal a dense computation from the model's own forward."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from kdcache.cache import open_cache
from kdcache.cli.app import app
from kdcache.trainer import EvalConfig, evaluate, evaluate_model
from tests import train_helpers as helpers

TEMPERATURE = 2.0


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory, tiny_llama_dir, text_jsonl) -> Path:
    return helpers.make_cache(
        tmp_path_factory.mktemp("cache"),
        tiny_llama_dir,
        helpers.read_texts(text_jsonl),
        num_train=4,
        num_holdout=10,
        temperature=TEMPERATURE,
    )


@pytest.fixture(scope="module")
def random_student(tmp_path_factory, tiny_tokenizer) -> Path:
    from kdcache.trainer.student import load_student_model

    root = tmp_path_factory.mktemp("random-student")
    model, _ = load_student_model(str(helpers.student_config(root / "s.json", tiny_tokenizer)))
    model.save_pretrained(root / "model")
    tiny_tokenizer.save_pretrained(root / "model")
    return root / "model"


@torch.no_grad()
def dense_reference(model, cache_dir: Path) -> dict[str, float]:
    """Bucket FKL / RKL, CE and top-1 from full logits, one sequence at a time, in float64."""
    sums = {"ce": 0.0, "fkl_bucket": 0.0, "rkl_bucket": 0.0, "top1": 0.0}
    positions = labels = 0
    for record in open_cache(cache_dir).sequences("holdout"):
        input_ids = torch.tensor(record.input_ids, dtype=torch.long).unsqueeze(0)
        logits = model(input_ids=input_ids).logits[0].double()  # (T, V)
        q = torch.softmax(logits / TEMPERATURE, dim=-1)
        p_top = torch.from_numpy(record.topk_logprobs).double().exp()  # (T, k)
        p_tail = torch.from_numpy(record.tail_mass).double()
        total = p_top.sum(-1) + p_tail  # renormalize rounded values
        p_top, p_tail = p_top / total[:, None], p_tail / total
        q_top = q.gather(-1, torch.from_numpy(record.topk_ids).long())
        q_tail = (1 - q_top.sum(-1)).clamp(min=1e-300)

        def kl(a, b):
            return torch.where(a > 0, a * (a.clamp(min=1e-300).log() - b.log()), 0.0).sum(-1)

        fkl = kl(p_top, q_top) + kl(p_tail[:, None], q_tail[:, None])
        rkl = kl(q_top, p_top.clamp(min=1e-300)) + kl(
            q_tail[:, None], p_tail[:, None].clamp(min=1e-300)
        )
        sums["fkl_bucket"] += float(fkl.sum())
        sums["rkl_bucket"] += float(rkl.sum())
        sums["top1"] += float((logits.argmax(-1) == torch.from_numpy(record.topk_ids[:, 0])).sum())
        log_q1 = torch.log_softmax(logits, dim=-1)  # CE at temperature 1
        targets = input_ids[0, 1:]
        sums["ce"] -= float(log_q1[:-1].gather(-1, targets[:, None]).sum())
        positions += record.num_tokens
        labels += record.num_tokens - 1
    return {
        "ce": sums["ce"] / labels,
        "fkl_bucket": sums["fkl_bucket"] / positions,
        "rkl_bucket": sums["rkl_bucket"] / positions,
        "top1": sums["top1"] / positions,
        "positions": positions,
    }


@pytest.mark.parametrize("batch_size, chunk_size", [(1, 1024), (4, 7)])
def test_metrics_equal_dense_reference(cache_dir, random_student, batch_size, chunk_size):
    model = AutoModelForCausalLM.from_pretrained(random_student, dtype=torch.float32).eval()
    expected = dense_reference(model, cache_dir)
    actual = evaluate_model(
        model,
        open_cache(cache_dir),
        split="holdout",
        temperature=TEMPERATURE,
        batch_size=batch_size,
        chunk_size=chunk_size,
    )
    assert actual["positions"] == expected["positions"]
    for key in ("ce", "fkl_bucket", "rkl_bucket", "top1"):
        assert actual[key] == pytest.approx(expected[key], rel=1e-4, abs=1e-6), key
    assert actual["ppl"] == pytest.approx(math.exp(expected["ce"]), rel=1e-4)


def test_teacher_against_its_own_cache(cache_dir, tiny_llama_dir):
    """The teacher itself: KL ~ 0 (fp16 storage only) and top-1 agreement 1."""
    report = evaluate(EvalConfig(cache=str(cache_dir), students=[str(tiny_llama_dir)],
                                 json_path=str(cache_dir.parent / "t.json")))  # fmt: skip
    metrics = report["students"][str(tiny_llama_dir)]
    assert metrics["fkl_bucket"] < 1e-4 and metrics["rkl_bucket"] < 1e-4
    assert metrics["top1"] > 0.99


def test_cli_compares_students_side_by_side(cache_dir, tiny_llama_dir, random_student, tmp_path):
    out = tmp_path / "eval.json"
    result = CliRunner().invoke(
        app,
        ["eval", "--cache", str(cache_dir), "--student", str(tiny_llama_dir),
         "--student", str(random_student), "--json", str(out), "--max-sequences", "5"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    header = result.stdout.splitlines()[0]
    assert str(tiny_llama_dir) in header and str(random_student) in header
    assert "FKL, top-k + bucket" in result.stdout and "top-1 agreement" in result.stdout
    report = json.loads(out.read_text())
    assert report["split"] == "holdout"
    assert set(report["students"]) == {str(tiny_llama_dir), str(random_student)}
    assert report["students"][str(random_student)]["sequences"] == 5
    teacher, student = (report["students"][str(s)] for s in (tiny_llama_dir, random_student))
    assert teacher["fkl_bucket"] < student["fkl_bucket"] and teacher["top1"] > student["top1"]


def test_default_json_next_to_the_student(cache_dir, random_student):
    result = CliRunner().invoke(
        app, ["eval", "--cache", str(cache_dir), "--student", str(random_student)]
    )
    assert result.exit_code == 0, result.output
    written = json.loads((random_student / "eval-holdout.json").read_text())
    assert str(random_student) in written["students"]


def test_kl_to_the_full_teacher(cache_dir, tiny_llama_dir, random_student, tmp_path):
    """--teacher adds full-vocabulary FKL / RKL; equal to a dense float64 computation."""
    teacher = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    student = AutoModelForCausalLM.from_pretrained(random_student, dtype=torch.float32).eval()
    metrics = evaluate_model(
        student, open_cache(cache_dir), temperature=TEMPERATURE, batch_size=3, chunk_size=11,
        teacher=teacher,
    )  # fmt: skip
    fkl = rkl = 0.0
    with torch.no_grad():
        for record in open_cache(cache_dir).sequences("holdout"):
            input_ids = torch.tensor(record.input_ids, dtype=torch.long).unsqueeze(0)
            log_p = torch.log_softmax(
                teacher(input_ids=input_ids).logits[0].double() / TEMPERATURE, -1
            )
            log_q = torch.log_softmax(
                student(input_ids=input_ids).logits[0].double() / TEMPERATURE, -1
            )
            fkl += float((log_p.exp() * (log_p - log_q)).sum())
            rkl += float((log_q.exp() * (log_q - log_p)).sum())
    assert metrics["fkl_full"] == pytest.approx(fkl / metrics["positions"], rel=1e-4)
    assert metrics["rkl_full"] == pytest.approx(rkl / metrics["positions"], rel=1e-4)
    assert metrics["fkl_full"] >= metrics["fkl_bucket"] - 1e-6  # the bucket KL is a lower bound

    result = CliRunner().invoke(
        app,
        ["eval", "--cache", str(cache_dir), "--student", str(tiny_llama_dir),
         "--teacher", str(tiny_llama_dir), "--json", str(tmp_path / "e.json")],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "FKL to full teacher" in result.stdout
    itself = json.loads((tmp_path / "e.json").read_text())["students"][str(tiny_llama_dir)]
    assert itself["fkl_full"] < 1e-6 and itself["rkl_full"] < 1e-6

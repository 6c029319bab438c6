"""The embedded demo: corpus split, demo dataset, shipped teacher, student config, `kdcache demo`."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kdcache.demo import (
    DEFAULT_CACHE_DIR,
    DEFAULT_RUN_DIR,
    corpus,
    demo_student_config_path,
    demo_teacher_dir,
    write_demo_dataset,
)


def _fake_stdlib(root: Path) -> list[str]:
    """A small tree with files to keep and files to skip; returns the kept relative paths."""
    kept = [f"mod{i}.py" for i in range(40)] + ["pkg/a.py", "pkg/sub/b.py"]
    skipped = ["test/test_x.py", "pkg/tests/t.py", "idlelib/x.py", "site-packages/s.py"]
    for rel in kept + skipped + ["notes.txt"]:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"# {rel}\nx = 1\n", encoding="utf-8")
    return kept


def test_corpus_split_is_deterministic_disjoint_and_complete(tmp_path):
    kept = _fake_stdlib(tmp_path)
    splits = {s: corpus.list_files(s, tmp_path) for s in corpus.SPLITS}
    again = {s: corpus.list_files(s, tmp_path) for s in corpus.SPLITS}
    assert splits == again
    rel = {s: [p.relative_to(tmp_path).as_posix() for p in files] for s, files in splits.items()}
    for names in rel.values():
        assert names == sorted(names)
    union = [n for names in rel.values() for n in names]
    assert sorted(union) == sorted(kept)  # skipped dirs and non-.py files are out, nothing twice
    for name in kept:  # the split is the documented hash rule, computed independently here
        bucket = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") % 100
        expected = "teacher-train" if bucket < 90 else "teacher-val" if bucket < 95 else "demo"
        assert name in rel[expected]


def test_real_stdlib_splits_are_disjoint_and_non_empty():
    files = {s: {p.as_posix() for p in corpus.list_files(s)} for s in corpus.SPLITS}
    assert all(files.values())
    assert not files["teacher-train"] & files["demo"]
    assert not files["teacher-train"] & files["teacher-val"]
    assert not files["teacher-val"] & files["demo"]
    assert not any("/test/" in f or "/idlelib/" in f for names in files.values() for f in names)


def test_unknown_split_is_a_config_error():
    from kdcache.cache.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown corpus split"):
        corpus.list_files("nope")


def test_chunk_text_keeps_every_character():
    text = "".join(f"line {i} " + "x" * (i % 50) + "\n" for i in range(500)) + "y" * 9000
    pieces = corpus.chunk_text(text, 1000)
    assert "".join(pieces) == text
    assert all(len(p) <= 1000 for p in pieces)


def test_write_demo_dataset_is_the_held_out_split(tmp_path):
    path = write_demo_dataset(tmp_path / "d")
    assert path == tmp_path / "d" / "demo.jsonl"
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert rows and all(set(r) == {"text"} and len(r["text"]) <= 4000 for r in rows)
    expected = "".join("".join(corpus.chunk_text(t, 4000)) for t in corpus.iter_texts("demo"))
    assert "".join(r["text"] for r in rows) == expected
    small = write_demo_dataset(tmp_path / "small.jsonl", max_tokens=2000)
    chars = sum(len(json.loads(x)["text"]) for x in small.read_text().splitlines())
    assert 0 < chars <= 2000 * 3.5 + 4000
    assert not list(tmp_path.rglob("*.tmp"))


def test_default_dirs():
    assert Path("kdcache-demo/cache") == DEFAULT_CACHE_DIR
    assert Path("kdcache-demo/runs") == DEFAULT_RUN_DIR


def test_shipped_teacher_loads_and_predicts_code():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = demo_teacher_dir()
    assert (path / "model.safetensors").stat().st_size <= 10_000_000
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert model.dtype == torch.float32  # stored in fp16, run in fp32
    assert model.config.vocab_size == len(tokenizer) == 16384
    assert tokenizer.eos_token == tokenizer.bos_token == "<|endoftext|>"
    assert tokenizer.pad_token == "<|pad|>"
    text = "def add(a, b):\n    return a + b\n"
    ids = tokenizer(text, return_tensors="pt").input_ids
    assert tokenizer.decode(ids[0]) == text
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}], tokenize=False
    )
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nok<|im_end|>\n"
    report = json.loads((path / "training.json").read_text())
    with torch.no_grad():  # a trained teacher: held-out code is far from uniform (ln 16384 = 9.7)
        x = tokenizer("import os\nimport sys\n\n\ndef main():\n    return 0\n", return_tensors="pt")
        loss = model(**x, labels=x.input_ids).loss.item()
    assert loss < 7.0
    assert report["perplexity"]["demo"] < 1000


def test_student_config_is_a_smaller_model_with_the_teacher_vocab():
    from transformers import AutoConfig, AutoModelForCausalLM

    student = AutoModelForCausalLM.from_config(
        AutoConfig.from_pretrained(demo_student_config_path())
    )
    teacher = AutoConfig.from_pretrained(demo_teacher_dir())
    assert student.config.vocab_size == teacher.vocab_size
    n_student = sum(p.numel() for p in student.parameters())
    n_teacher = AutoModelForCausalLM.from_config(teacher).num_parameters()
    assert n_student < 0.6 * n_teacher


def test_demo_end_to_end_quick(tmp_path):
    """The CLI on the demo defaults at tiny size: build, two students, eval, plot."""
    from kdcache.cli.app import app

    out = tmp_path / "demo"
    result = CliRunner().invoke(app, ["demo", "--quick", "--out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    first = result.output.splitlines()[0]
    assert "demo defaults" in first
    assert "AKL student" in result.output and "CE student" in result.output
    runs = out / "runs"
    plot = runs / "loss_curves.png"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"loss curves: {plot}" in result.output
    report = json.loads((runs / "eval.json").read_text())
    assert len(report["students"]) == 2
    for metrics in report["students"].values():
        assert all(k in metrics for k in ("ce", "ppl", "fkl_bucket", "rkl_bucket", "top1"))
    for name in ("akl", "ce"):
        assert (runs / name / "final" / "model.safetensors").is_file()
        assert json.loads((runs / name / "run.json").read_text())["loss"] == name
    from kdcache.cache import open_cache

    cache = open_cache(out / "cache")
    assert cache.manifest["teacher"]  # built from the shipped teacher
    assert sum(1 for _ in cache.sequences("holdout")) > 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--steps", "0"], "--steps must be >= 1"),
        (["--threads", "0"], "--threads must be >= 1"),
    ],
)
def test_demo_bad_flags_exit_2(tmp_path, args, message):
    from kdcache.cli.app import app

    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path / "d"), *args])
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "d").exists()


def test_demo_out_is_a_file_exit_2(tmp_path):
    from kdcache.cli.app import app

    target = tmp_path / "file"
    target.write_text("x")
    result = CliRunner().invoke(app, ["demo", "--out", str(target), "--quick"])
    assert result.exit_code == 2
    assert "is a file" in result.output
    assert target.read_text() == "x"


def test_missing_teacher_is_a_config_error(tmp_path, monkeypatch):
    import kdcache.demo as demo
    from kdcache.cache.errors import ConfigError

    monkeypatch.setattr(demo, "_HERE", tmp_path)
    with pytest.raises(ConfigError, match="demo teacher is missing"):
        demo.demo_teacher_dir()


def test_train_with_no_flags_uses_the_demo_cache_and_settings(tmp_path, monkeypatch):
    """`kdcache train` with no --cache/--student trains the demo student on the default cache."""
    from kdcache.cli.app import app
    from kdcache.demo.run import DemoSettings

    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    built = runner.invoke(app, ["demo", "--quick", "--no-progress"])  # writes kdcache-demo/cache
    assert built.exit_code == 0, built.output
    for loss, ce_weight in (("akl", DemoSettings().ce_weight), ("ce", 0.0)):
        args = ["train", "--loss", loss, "--steps", "1", "--batch-size", "1", "--no-progress"]
        result = runner.invoke(app, [*args, "--out", f"runs/{loss}"])
        assert result.exit_code == 0, result.output
        assert result.output.splitlines()[0].startswith("Using the demo defaults: cache ")
        run = json.loads((tmp_path / "runs" / loss / "run.json").read_text())
        assert run["loss"] == loss and run["ce_weight"] == ce_weight

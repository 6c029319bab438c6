"""Bad input to `kdcache train` / `kdcache eval`: one line on stderr, exit 2, nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kdcache.cache.errors import ConfigError
from kdcache.cli.app import app
from kdcache.trainer import TrainConfig
from tests import train_helpers as helpers

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def small_cache(tmp_path_factory, tiny_llama_dir, text_jsonl) -> Path:
    return helpers.make_cache(
        tmp_path_factory.mktemp("cache"),
        tiny_llama_dir,
        helpers.read_texts(text_jsonl),
        num_train=8,
        num_holdout=4,
        temperature=2.0,
    )


@pytest.fixture(scope="module")
def student_json(tmp_path_factory, tiny_tokenizer) -> Path:
    return helpers.student_config(tmp_path_factory.mktemp("student") / "s.json", tiny_tokenizer)


@pytest.fixture(scope="module")
def other_tokenizer_student(tmp_path_factory, tiny_tokenizer) -> Path:
    """A config-only student directory that ships a different (smaller) BPE tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(["def other(x):\n    return x * 2\n"] * 50, trainer=trainer)
    directory = tmp_path_factory.mktemp("other-student")
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>").save_pretrained(
        directory
    )
    config = json.loads(helpers.student_config(directory / "c.json", tiny_tokenizer).read_text())
    config["vocab_size"] = 400
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "c.json").unlink()
    return directory


def _snapshot(directory: Path) -> dict[str, bytes]:
    if not directory.exists():
        return {}
    return {str(p): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def _run(args: list[str]):
    return CliRunner().invoke(app, args)


def _assert_refused(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def _train_args(cache, student, out, *extra: str) -> list[str]:
    return ["train", "--cache", str(cache), "--student", str(student), "--out", str(out),
            "--steps", "1", "--no-progress", *extra]  # fmt: skip


def test_missing_cache(tmp_path, student_json):
    result = _run(_train_args(tmp_path / "nope", student_json, tmp_path / "out"))
    _assert_refused(result, "does not exist")
    assert not (tmp_path / "out").exists()


def test_incomplete_cache_without_manifest(tmp_path, student_json):
    (tmp_path / "cache" / "shards").mkdir(parents=True)
    result = _run(_train_args(tmp_path / "cache", student_json, tmp_path / "out"))
    _assert_refused(result, "no manifest.json")
    assert not (tmp_path / "out").exists()


def test_student_not_found(tmp_path, small_cache):
    result = _run(_train_args(small_cache, tmp_path / "missing-student", tmp_path / "out"))
    _assert_refused(result, "not found")
    assert not (tmp_path / "out").exists()


def test_tokenizer_mismatch(tmp_path, small_cache, other_tokenizer_student):
    result = _run(_train_args(small_cache, other_tokenizer_student, tmp_path / "out"))
    _assert_refused(result, "tokenizer does not match", "of the cache's ids differ", "the first is id",
                    "pass --cross-tokenizer")  # fmt: skip
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "extra, fragment",
    [
        (["--loss", "kld"], "unknown --loss 'kld'"),
        (["--mu", "1.5"], "--mu must be in (0, 1)"),
        (["--mu", "0"], "--mu must be in (0, 1)"),
        (["--ce-weight", "1.5"], "--ce-weight must be in [0, 1]"),
        (["--ce-weight", "-0.1"], "--ce-weight must be in [0, 1]"),
        (["--steps", "0"], "--steps must be >= 1"),
        (["--data-partitions", "0"], "--data-partitions must be >= 1"),
        (["--temperature", "1.0"], "differs from the cache's 2.0"),
        (["--teacher", "./no-such-teacher"], "--teacher './no-such-teacher' could not be loaded"),
        (["--teacher", "./t", "--loss", "ce"], "drop --teacher"),
        (["--device", "tpu"], "unknown device"),
    ],
)
def test_bad_flags(tmp_path, small_cache, student_json, extra, fragment):
    result = _run(_train_args(small_cache, student_json, tmp_path / "out", *extra))
    _assert_refused(result, fragment)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("epochs", [[], ["--epochs", "2"]])
def test_max_tokens_without_steps_is_refused_before_decoding(tmp_path, small_cache, student_json,
                                                             epochs, monkeypatch):  # fmt: skip
    """It used to decode the whole split (once per rank) to count batches before training."""
    from kdcache.cache.read.reader import Cache

    def no_decoding(*_args, **_kwargs):
        raise AssertionError("a shard was decoded before the refusal")

    monkeypatch.setattr(Cache, "read_shard", no_decoding)
    args = ["train", "--cache", str(small_cache), "--student", str(student_json), "--out",
            str(tmp_path / "out"), "--max-tokens", "64", "--no-progress", *epochs]  # fmt: skip
    _assert_refused(_run(args), "--max-tokens needs --steps N")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match="--max-tokens needs --steps N"):
        TrainConfig(cache="c", student="s", out="o", max_tokens=64)
    TrainConfig(cache="c", student="s", out="o", max_tokens=64, steps=3)  # with --steps: fine


def test_all_problems_in_one_message():
    with pytest.raises(ConfigError, match=r"--mu .*; --ce-weight .*; --steps"):
        TrainConfig(cache="c", student="s", out="o", mu=2.0, ce_weight=3.0, steps=0)


def test_out_dir_with_another_run_is_refused_and_kept(tmp_path, small_cache, student_json):
    out = tmp_path / "out"
    assert _run(_train_args(small_cache, student_json, out)).exit_code == 0
    before = _snapshot(out)
    result = _run(_train_args(small_cache, student_json, out, "--loss", "fkl"))
    _assert_refused(result, "already holds a training run", "--resume", "--overwrite")
    result = _run(_train_args(small_cache, student_json, out, "--loss", "fkl", "--resume"))
    _assert_refused(result, "other settings", "loss: 'akl' -> 'fkl'")
    assert _snapshot(out) == before
    result = _run(_train_args(small_cache, student_json, out, "--loss", "fkl", "--overwrite"))
    assert result.exit_code == 0, result.output
    assert json.loads((out / "run.json").read_text())["loss"] == "fkl"


def test_out_dir_with_other_files_and_out_file(tmp_path, small_cache, student_json):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    result = _run(_train_args(small_cache, student_json, tmp_path / "busy"))
    _assert_refused(result, "already holds other files")
    result = _run(_train_args(small_cache, student_json, tmp_path / "busy", "--overwrite"))
    _assert_refused(result, "already holds other files")  # --overwrite deletes only runs
    assert _snapshot(tmp_path / "busy") == {str(tmp_path / "busy" / "notes.txt"): b"mine"}
    (tmp_path / "file").write_text("x")
    _assert_refused(_run(_train_args(small_cache, student_json, tmp_path / "file")), "is a file")
    result = _run(_train_args(small_cache, student_json, tmp_path / "fresh", "--resume"))
    _assert_refused(result, "nothing to resume")


def test_cache_or_student_alone_is_refused(tmp_path, small_cache):
    result = _run(["train", "--cache", str(small_cache), "--out", str(tmp_path / "o")])
    _assert_refused(result, "pass both --cache and --student")


def test_eval_refusals(tmp_path, small_cache, student_json, other_tokenizer_student):
    result = _run(["eval", "--cache", str(tmp_path / "nope"), "--student", str(student_json)])
    _assert_refused(result, "does not exist")
    result = _run(["eval", "--cache", str(small_cache), "--student", str(tmp_path / "nope")])
    _assert_refused(result, "not found")
    result = _run(["eval", "--cache", str(small_cache), "--student", str(student_json),
                   "--split", "validation"])  # fmt: skip
    _assert_refused(result, "no 'validation' split")
    result = _run(["eval", "--cache", str(small_cache), "--student", str(other_tokenizer_student)])
    _assert_refused(result, "tokenizer does not match")


def test_demo_defaults_are_announced_first(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no demo cache here yet
    result = _run(["train", "--steps", "1", "--no-progress"])
    assert result.stdout.splitlines()[0].startswith("Using the demo defaults: cache ")
    _assert_refused(result, "does not exist", "kdcache build")
    assert not (tmp_path / "kdcache-demo" / "runs").exists()


def test_flags_left_out_take_the_config_or_demo_defaults():
    from kdcache.cli.train import resolve_defaults
    from kdcache.demo.run import DemoSettings

    plain = resolve_defaults(False, {"lr": 0.5})
    assert plain["lr"] == 0.5 and plain["batch_size"] == TrainConfig.batch_size
    assert plain["steps"] is None and plain["eval_every"] == 0
    demo = resolve_defaults(True, {"batch_size": 3})
    assert demo["batch_size"] == 3
    assert demo["steps"] == DemoSettings().steps and demo["lr"] == DemoSettings().lr
    assert plain["ce_weight"] == 0.0 and demo["ce_weight"] == DemoSettings().ce_weight
    assert resolve_defaults(True, {"ce_weight": 0.0})["ce_weight"] == 0.0

"""``--config FILE`` for build, train and eval: the same run as by flags, flags override, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from kdcache.cli.app import app
from tests import train_helpers as helpers
from tests.conftest import text_rows, write_jsonl

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def small_cache(tmp_path_factory, tiny_llama_dir, text_jsonl) -> Path:
    return helpers.make_cache(tmp_path_factory.mktemp("cache"), tiny_llama_dir,
                              helpers.read_texts(text_jsonl), num_train=12, num_holdout=4)  # fmt: skip


@pytest.fixture(scope="module")
def student_json(tmp_path_factory, tiny_tokenizer) -> Path:
    return helpers.student_config(tmp_path_factory.mktemp("student") / "s.json", tiny_tokenizer)


def _invoke(*args: str):
    return CliRunner().invoke(app, [str(arg) for arg in args])


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "final" / "model.safetensors")


def _assert_same_weights(a: Path, b: Path) -> None:
    first, second = _weights(a), _weights(b)
    assert first.keys() == second.keys()
    for name in first:
        torch.testing.assert_close(first[name], second[name], rtol=0, atol=0, msg=name)


TRAIN_FLAGS = ["--loss", "fkl", "--ce-weight", "0.25", "--steps", "3", "--batch-size", "4",
               "--lr", "3e-3", "--seed", "3", "--no-progress"]  # fmt: skip


@pytest.fixture(scope="module")
def flag_run(tmp_path_factory, small_cache, student_json) -> Path:
    out = tmp_path_factory.mktemp("flags") / "run"
    result = _invoke("train", "--cache", small_cache, "--student", student_json, "--out", out,
                     *TRAIN_FLAGS)  # fmt: skip
    assert result.exit_code == 0, result.output
    return out


def test_train_from_a_yaml_file_equals_the_run_by_flags(tmp_path, flag_run, small_cache,
                                                       student_json):  # fmt: skip
    config = tmp_path / "train.yaml"
    config.write_text(
        f"cache: {small_cache}\nstudent: {student_json}\nloss: fkl\n"
        "ce-weight: 0.25\n"  # the flag's spelling ...
        "batch_size: 4\n"  # ... and the Python name
        "--steps: 3\nlr: 3.0e-3\nseed: 3\nprogress: false\n"
    )
    out = tmp_path / "run"
    result = _invoke("train", "--config", config, "--out", out)
    assert result.exit_code == 0, result.output
    _assert_same_weights(out, flag_run)
    assert json.loads((out / "run.json").read_text()) | {"out": str(flag_run)} == json.loads(
        (flag_run / "run.json").read_text()
    )


def test_a_runs_run_json_repeats_the_run(tmp_path, flag_run):
    out = tmp_path / "again"
    result = _invoke("train", "--config", flag_run / "run.json", "--out", out)
    assert result.exit_code == 0, result.output
    _assert_same_weights(out, flag_run)


def test_command_line_flags_override_the_file(tmp_path, small_cache, student_json):
    config = tmp_path / "train.json"
    config.write_text(json.dumps({"cache": str(small_cache), "student": str(student_json),
                                  "out": str(tmp_path / "from-file"), "steps": 5,
                                  "ce_weight": 0.5, "progress": True}))  # fmt: skip
    out = tmp_path / "from-flags"
    result = _invoke("train", "--config", config, "--out", out, "--steps", "1", "--no-progress",
                     "--batch-size", "2")  # fmt: skip
    assert result.exit_code == 0, result.output
    run = json.loads((out / "run.json").read_text())
    assert (run["steps"], run["progress"], run["batch_size"]) == (1, False, 2)  # the flags
    assert run["ce_weight"] == 0.5  # the file
    assert not (tmp_path / "from-file").exists()


def test_a_list_for_a_single_value_option_is_comma_joined(tmp_path, small_cache, student_json):
    config = tmp_path / "c.yaml"
    config.write_text(f"cache: {small_cache}\nstudent: {student_json}\nsteps: 1\n"
                      "report-to: [none]\nprogress: false\n")  # fmt: skip
    result = _invoke("train", "--config", config, "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "run" / "run.json").read_text())["report_to"] == "none"
    config.write_text(
        f"cache: {small_cache}\nstudent: {student_json}\nreport-to: [none, wandb, tensorbord]\n"
    )
    refused = _invoke("train", "--config", config, "--out", tmp_path / "run2")
    assert refused.exit_code == 2 and "unknown --report-to 'tensorbord'" in refused.stderr


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "ce_wieght: 0.5\n",
            r"unknown option 'ce_wieght' for `kdcache train`; did you mean 'ce-weight'\?",
        ),
        ("--stpes: 3\n", r"unknown option '--stpes' .* did you mean 'steps'\?"),
        (
            "shuffle_buffer: 3\n",
            r"'shuffle_buffer' = 3 cannot be set by `kdcache train` \(it is always 64\)",
        ),
        ("- steps\n- 3\n", r"must hold a mapping of option names to values"),
        ("steps: [1\n", r"is not valid YAML/JSON"),
    ],
)
def test_bad_config_files_are_refused_in_one_line(tmp_path, text, message):
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    result = _invoke("train", "--config", config, "--out", tmp_path / "run")
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --config ")
    import re

    assert re.search(message, lines[0]), lines[0]
    assert not (tmp_path / "run").exists()


def test_a_missing_config_file_is_refused(tmp_path):
    result = _invoke("train", "--config", tmp_path / "nope.yaml")
    assert result.exit_code == 2 and "cannot read it" in result.stderr


def test_a_bad_value_in_the_file_is_refused_by_the_flags_own_check(tmp_path, small_cache,
                                                                  student_json):  # fmt: skip
    config = tmp_path / "c.yaml"
    config.write_text(f"cache: {small_cache}\nstudent: {student_json}\nsteps: many\n")
    result = _invoke("train", "--config", config, "--out", tmp_path / "run")
    assert result.exit_code == 2 and "steps" in result.output


# -- build and eval -------------------------------------------------------------------------------

BUILD_FLAGS = ["--top-k", "4", "--max-length", "32", "--holdout", "0.25", "--limit", "6"]


def _shards(out: Path) -> list[tuple[str, str]]:
    manifest = json.loads((out / "manifest.json").read_text())
    return sorted((shard["name"], shard["checksum"]) for shard in manifest["shards"])


def test_build_from_a_config_equals_the_build_by_flags_and_its_manifest_repeats_it(
    tmp_path, tiny_llama_dir
):
    data = write_jsonl(tmp_path / "docs.jsonl", text_rows(8))
    by_flags = tmp_path / "flags"
    result = _invoke("build", "--teacher", tiny_llama_dir, "--data", data, "--out", by_flags,
                     *BUILD_FLAGS)  # fmt: skip
    assert result.exit_code == 0, result.output
    config = tmp_path / "build.yaml"
    config.write_text(f"teacher: {tiny_llama_dir}\ndata: {data}\ntop-k: 4\nmax_length: 32\n"
                      "holdout: 0.25\nlimit: 6\n")  # fmt: skip
    by_file = tmp_path / "file"
    result = _invoke("build", "--config", config, "--out", by_file)
    assert result.exit_code == 0, result.output
    assert _shards(by_file) == _shards(by_flags) and _shards(by_flags)
    replayed = tmp_path / "replayed"
    result = _invoke("build", "--config", by_flags / "manifest.json", "--out", replayed)
    assert result.exit_code == 0, result.output
    assert _shards(replayed) == _shards(by_flags)


def test_build_refuses_an_unknown_key(tmp_path):
    config = tmp_path / "build.yaml"
    config.write_text("tpo_k: 4\n")
    result = _invoke("build", "--config", config, "--out", tmp_path / "c")
    assert result.exit_code == 2 and "did you mean 'top-k'?" in result.stderr


def test_eval_from_a_config_equals_eval_by_flags(tmp_path, flag_run, small_cache):
    by_flags, by_file = tmp_path / "flags.json", tmp_path / "file.json"
    result = _invoke("eval", "--cache", small_cache, "--student", flag_run / "final",
                     "--max-sequences", "2", "--json", by_flags)  # fmt: skip
    assert result.exit_code == 0, result.output
    config = tmp_path / "eval.yaml"
    config.write_text(f"cache: {small_cache}\nstudent: {flag_run / 'final'}\nmax-sequences: 2\n"
                      f"json: {by_file}\n")  # fmt: skip
    result = _invoke("eval", "--config", config)
    assert result.exit_code == 0, result.output
    assert json.loads(by_file.read_text()) == json.loads(by_flags.read_text())


def test_the_readme_config_file_is_accepted_by_train(tmp_path, small_cache, student_json):
    import re

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    (text,) = [block for block in re.findall(r"```yaml\n(.*?)```", readme, re.S)
               if "ce-weight" in block]  # fmt: skip
    text = text.replace("caches/qwen-1.5b", str(small_cache))
    text = text.replace("Qwen/Qwen2.5-0.5B", str(student_json)).replace("wandb", "none")
    (tmp_path / "akl.yaml").write_text(text)
    result = _invoke("train", "--config", tmp_path / "akl.yaml", "--out", tmp_path / "run",
                     "--steps", "1", "--no-progress")  # fmt: skip
    assert result.exit_code == 0, result.output
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert (run["loss"], run["ce_weight"], run["report_to"]) == ("akl", 0.2, "none")

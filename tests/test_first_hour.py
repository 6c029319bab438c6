"""What a new user meets first: refusals of directories that are no cache, the padded-vocab note."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from kdcache.cli.app import app
from kdcache.trainer.student import vocab_coverage_notice
from tests import train_helpers as helpers

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def teacher_cache(tmp_path_factory, tiny_llama_dir, text_jsonl) -> Path:
    torch.manual_seed(0)
    return helpers.make_cache(
        tmp_path_factory.mktemp("cache"),
        tiny_llama_dir,
        helpers.read_texts(text_jsonl),
        num_train=8,
        num_holdout=4,
    )


@pytest.mark.parametrize("command", ["train", "inspect", "verify", "eval"])
def test_an_empty_directory_is_not_called_an_unfinished_build(command, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    args = {
        "train": ["train", "--cache", str(empty), "--student", "x", "--out", str(tmp_path / "r")],
        "inspect": ["inspect", str(empty)],
        "verify": ["verify", str(empty)],
        "eval": ["eval", "--cache", str(empty), "--student", "x"],
    }[command]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "is an empty directory, not a cache: no `kdcache build` ran there" in result.output
    assert "did not finish" not in result.output
    assert list(empty.iterdir()) == [] and not (tmp_path / "r").exists()


def test_vocab_coverage_notice_counts_the_rows_only_one_side_has():
    assert vocab_coverage_notice(16384, 16384) is None
    wider = vocab_coverage_notice(32000, 16384)
    assert "15616 rows the teacher never covers (ids 16384..31999)" in wider
    assert "teacher probability 0" in wider
    narrower = vocab_coverage_notice(151936, 152064)
    assert "ids 151936..152063" in narrower and "folded into the tail bucket" in narrower


def test_a_padded_student_vocabulary_trains_with_a_one_line_note(
    teacher_cache, tiny_tokenizer, tmp_path
):
    manifest = json.loads((teacher_cache / "manifest.json").read_text())
    student = helpers.student_config(tmp_path / "s.json", tiny_tokenizer)
    config = json.loads(student.read_text())
    padded_rows = manifest["vocab_size"] + 64
    config["vocab_size"] = padded_rows
    student.write_text(json.dumps(config))
    args = ["train", "--cache", str(teacher_cache), "--student", str(student)]
    args += ["--out", str(tmp_path / "run"), "--steps", "1", "--batch-size", "2", "--no-progress"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    notes = [line for line in result.output.splitlines() if line.startswith("note: ")]
    assert len(notes) == 1, result.output
    assert (
        f"the student has {padded_rows} vocabulary rows, the cache {manifest['vocab_size']}"
        in notes[0]
    )
    assert "64 rows the teacher never covers" in notes[0]


def test_demo_plot_says_which_positions_its_curves_and_final_points_measure(tmp_path):
    from kdcache.demo.plot import draw_runs

    run = tmp_path / "akl"
    run.mkdir()
    lines = [{"kind": "train", "step": s, "loss": 3.0 - 0.1 * s} for s in (1, 2, 3, 4)]
    lines += [
        {
            "kind": "eval",
            "step": s,
            "fkl_bucket": 1.0 / s,
            "rkl_bucket": 0.9 / s,
            "ce": 5.0,
            "positions": 4096,
        }
        for s in (2, 4)
    ]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    final = {"AKL student": {"fkl_bucket": 0.4, "rkl_bucket": 0.3, "ce": 4.9, "positions": 17052}}
    figure = draw_runs({"AKL student": run}, final=final)
    fkl_axis = figure.axes[0]
    labels = [text.get_text() for text in fkl_axis.get_legend().get_texts()]
    assert labels == [
        "AKL student (4,096 held-out positions)",
        "AKL student, final eval (17,052 held-out positions)",
    ]
    star = fkl_axis.get_lines()[1]
    assert list(star.get_xdata()) == [4] and list(star.get_ydata()) == [0.4]

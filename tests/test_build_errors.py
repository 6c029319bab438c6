"""`kdcache build` bad input: one clean line, exit 2, no traceback, the existing cache untouched."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kdcache.cli.app import app
from tests.conftest import make_llama, make_tokenizer, text_rows, write_jsonl

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_llama_dir) -> tuple[Path, Path]:
    """A complete cache (and its data file) that every bad run below points at."""
    root = tmp_path_factory.mktemp("built")
    data = write_jsonl(root / "docs.jsonl", text_rows(6))
    out = root / "cache"
    result = _build(tiny_llama_dir, data, out)
    assert result.exit_code == 0, result.output
    return data, out


def _build(teacher, data, out, *extra: str):
    args = ["build", "--teacher", str(teacher), "--data", str(data), "--out", str(out)]
    args += ["--top-k", "4", "--max-length", "32", "--holdout", "0", *extra]
    return CliRunner().invoke(app, args)


def _assert_refused(result, message: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and message in lines[0], result.output


def _snapshot(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_build_cli_success_and_noop(built, tiny_llama_dir):
    data, out = built
    result = _build(tiny_llama_dir, data, out)
    assert result.exit_code == 0, result.output
    assert "cache is complete, nothing to do" in result.output
    assert "sequences" in result.output and "B/token" in result.output


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--top-k", "0"], "--top-k must be >= 1"),
        (["--top-k", "100000"], "exceeds the teacher's vocabulary"),
        (["--temperature", "0"], "--temperature must be > 0"),
        (["--temperature", "-1"], "--temperature must be > 0"),
        (["--max-length", "1"], "--max-length must be >= 2"),
        (["--text-field", "body"], "has no field 'body'"),
        (["--mode", "lossy"], "--mode must be one of"),
        (["--dtype", "int4"], "--dtype must be one of"),
        (["--top-k", "8"], "settings.top_k: 4 -> 8"),
    ],
)
def test_bad_settings_are_refused(built, tiny_llama_dir, extra, message):
    data, out = built
    before = _snapshot(out)
    _assert_refused(_build(tiny_llama_dir, data, out, *extra), message)
    assert _snapshot(out) == before


def test_bad_teacher_is_refused(built, tmp_path):
    data, out = built
    before = _snapshot(out)
    _assert_refused(_build(tmp_path / "missing", data, out), "does not exist")
    _assert_refused(_build(tmp_path, data, out), "has no config.json")
    _assert_refused(_build(data, data, out), "is a file")
    assert _snapshot(out) == before


def test_bad_data_is_refused(built, tiny_llama_dir, tmp_path):
    _, out = built
    before = _snapshot(out)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    _assert_refused(_build(tiny_llama_dir, empty, out), "is empty")
    _assert_refused(_build(tiny_llama_dir, tmp_path / "nope.jsonl", out), "does not exist")
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "x"}]}])
    no_template = make_tokenizer(tmp_path / "tok", chat_template=None)
    plain_teacher = make_llama(tmp_path / "plain", no_template)
    result = _build(plain_teacher, chat, out, "--messages-field", "messages")
    _assert_refused(result, "needs a chat template")
    assert _snapshot(out) == before


def test_bad_out_is_refused(built, tiny_llama_dir, tmp_path):
    data, _ = built
    a_file = tmp_path / "file"
    a_file.write_text("keep me")
    _assert_refused(_build(tiny_llama_dir, data, a_file), "is a file")
    assert a_file.read_text() == "keep me"
    result = CliRunner().invoke(app, ["build", "--teacher", str(tiny_llama_dir)])
    _assert_refused(result, "pass both --teacher and --data")


def test_unwritable_out_is_refused(built, tiny_llama_dir, tmp_path, monkeypatch):
    data, _ = built
    locked = tmp_path / "readonly"
    locked.mkdir()
    locked.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        if os.access(locked, os.W_OK):
            # root (as in CI) may write anywhere: the permission check then sees what an
            # ordinary user would, a directory that access(2) reports as not writable
            real_access = os.access
            monkeypatch.setattr(
                os,
                "access",
                lambda path, mode, **kw: (
                    False if Path(path) == locked and mode & os.W_OK else real_access(path, mode)
                ),
            )
        _assert_refused(_build(tiny_llama_dir, data, locked / "cache"), "no write permission")
        assert not (locked / "cache").exists()
    finally:
        locked.chmod(stat.S_IRWXU)


def test_demo_defaults_are_announced_and_used(tiny_llama_dir, tmp_path, monkeypatch):
    import kdcache.demo as demo

    def write_small(path, max_tokens=None):
        path.parent.mkdir(parents=True, exist_ok=True)
        return write_jsonl(path, text_rows(4, seed=9))

    monkeypatch.setattr(demo, "demo_teacher_dir", lambda: tiny_llama_dir)
    monkeypatch.setattr(demo, "write_demo_dataset", write_small)
    out = tmp_path / "demo" / "cache"
    result = CliRunner().invoke(app, ["build", "--out", str(out), "--top-k", "4"])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0].startswith("Using the demo defaults: ")
    from kdcache.cache.read.reader import open_cache

    manifest = open_cache(out).manifest
    assert manifest["top_k"] == 4  # explicit flags win
    assert manifest["settings"]["max_length"] == demo.DEMO_BUILD_SETTINGS["max_length"]
    assert (tmp_path / "demo" / "data" / "demo.jsonl").exists()


def test_build_config_reports_every_problem_at_once(tmp_path):
    from kdcache.cache.build.pipeline import BuildConfig
    from kdcache.cache.errors import ConfigError

    with pytest.raises(ConfigError) as error:
        BuildConfig(teacher="t", data="d", out=tmp_path, top_k=0, temperature=0, max_length=1)
    message = str(error.value)
    assert "--top-k must be >= 1" in message and "--temperature must be > 0" in message
    assert "--max-length must be >= 2" in message and "\n" not in message

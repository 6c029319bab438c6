"""transformers: the declared floor is checked before a model loads; the dtype keyword fits the
installed version (``dtype=`` since 4.56, ``torch_dtype=`` before)."""

from __future__ import annotations

import json
import re
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
import torch

from kdcache.cache.errors import ConfigError
from kdcache.cache.requirements import TRANSFORMERS_MIN, transformers_dtype_kwargs

ROOT = Path(__file__).resolve().parents[1]


def _pretend_transformers(monkeypatch, version: str) -> None:
    real = metadata.version
    monkeypatch.setattr(
        metadata, "version", lambda name: version if name == "transformers" else real(name)
    )


@pytest.mark.parametrize(
    ("version", "keyword"),
    [("4.44.2", "torch_dtype"), ("4.55.4", "torch_dtype"), ("4.56.0", "dtype"), ("5.2.0", "dtype")],
)
def test_the_dtype_keyword_follows_the_installed_transformers(monkeypatch, version, keyword):
    _pretend_transformers(monkeypatch, version)
    assert transformers_dtype_kwargs(torch.bfloat16) == {keyword: torch.bfloat16}


def test_the_student_loader_refuses_an_old_transformers_in_one_line(monkeypatch, tmp_path):
    from kdcache.trainer.student import load_student_model

    _pretend_transformers(monkeypatch, "4.30.0")
    config = tmp_path / "s.json"
    config.write_text(json.dumps({"model_type": "llama", "vocab_size": 32}))
    with pytest.raises(ConfigError) as caught:
        load_student_model(str(config))
    assert str(caught.value) == (
        "kdcache needs transformers >= 4.44, found 4.30.0: pip install -U 'transformers>=4.44'"
    )


def test_the_teacher_loader_refuses_an_old_transformers(monkeypatch, tmp_path):
    from kdcache.cache.build.teacher import load_model

    _pretend_transformers(monkeypatch, "4.40.0")
    with pytest.raises(ConfigError, match=r"kdcache needs transformers >= 4\.44, found 4\.40\.0"):
        load_model(str(tmp_path), torch.float32, torch.device("cpu"))


def test_the_floor_checked_is_the_declared_floor():
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    floor = next(re.match(r"transformers>=([\d.]+)", d) for d in declared if "transformers" in d)
    assert floor is not None and floor.group(1) == TRANSFORMERS_MIN

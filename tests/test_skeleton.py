"""The package layout promised by the design: namespace packages, console script, no stray names."""

from __future__ import annotations

import importlib
import importlib.metadata
import tomllib
from pathlib import Path

from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]


def test_every_subpackage_folder_is_listed_in_pyproject():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    mapping = config["tool"]["setuptools"]["package-dir"]
    packages = set(config["tool"]["setuptools"]["packages"])
    assert packages == set(mapping)
    folders = {p.parent.name for p in ROOT.glob("*/__init__.py")}
    assert folders == {folder for folder in mapping.values()}
    for name in packages:
        importlib.import_module(name)


def test_version_and_no_generic_top_level_names():
    assert importlib.metadata.version("kdcache")
    for generic in ("cache", "trainer", "cli"):
        try:
            module = importlib.import_module(generic)
        except ImportError:
            continue
        assert "kdcache" not in str(getattr(module, "__file__", "")), generic


def test_cli_help_lists_commands():
    from kdcache.cli.app import app

    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("build", "verify", "inspect", "train", "eval", "demo"):
        assert command in result.output


def test_reading_side_does_not_import_torch():
    """`kdcache --help`, `kdcache verify` and cache readers stay fast: torch loads on first use."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "import kdcache.cli.app\n"
        "from kdcache.cache import open_cache, verify_cache, CacheError\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "from kdcache.cache import BuildConfig\n"
        "assert 'torch' in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr

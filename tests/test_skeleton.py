"""The package layout promised by the design: namespace packages, console script, no stray names."""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]


def test_every_subpackage_folder_is_listed_in_pyproject():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    mapping = config["tool"]["setuptools"]["package-dir"]
    packages = set(config["tool"]["setuptools"]["packages"])
    assert packages == set(mapping)
    folders = {
        p.parent.relative_to(ROOT).as_posix()
        for p in ROOT.glob("**/__init__.py")
        if p.parts[len(ROOT.parts)] in GENERIC_NAMES  # the package folders, sub-packages too
    }
    assert folders == {folder for folder in mapping.values()}
    for name in packages:
        importlib.import_module(name)


GENERIC_NAMES = ("cache", "trainer", "cli", "demo", "hf")

# Run from a folder outside the checkout, so that the repository root (where folders named
# cache/, cli/ ... exist) is not on sys.path: what is importable there is what the installed
# distribution gives a user, whatever the checkout's folder is called.
_FIND_GENERIC = """
import importlib.util, json, sys
found = {}
for name in sys.argv[1:]:
    spec = importlib.util.find_spec(name)
    found[name] = None if spec is None else (spec.origin or "namespace")
print(json.dumps(found))
"""


def test_version_and_no_generic_top_level_names(tmp_path):
    assert importlib.metadata.version("kdcache")
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, "-c", _FIND_GENERIC, *GENERIC_NAMES],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    for name, origin in json.loads(result.stdout).items():
        if origin is None:
            continue  # the usual case: nothing of that name on a user's path
        # something else on this machine may own the name; it must not be our sub-package
        ours = ROOT / name / "__init__.py"
        assert origin == "namespace" or not (
            Path(origin).name == "__init__.py" and Path(origin).read_bytes() == ours.read_bytes()
        ), f"the kdcache distribution installs a top-level '{name}' package ({origin})"
    top_level = importlib.metadata.distribution("kdcache").read_text("top_level.txt")
    if top_level is not None:  # setuptools' record of the names the distribution installs
        assert set(top_level.split()) <= {"kdcache"}, top_level


def test_cli_help_lists_commands():
    from kdcache.cli.app import app

    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("build", "verify", "inspect", "train", "eval", "demo"):
        assert command in result.output


def test_reading_side_does_not_import_torch():
    """`kdcache --help`, `kdcache verify` and cache readers stay fast: torch loads on first use."""
    code = (
        "import sys\n"
        "import kdcache.cli.app\n"
        "from kdcache.cache import open_cache, verify_cache, CacheError\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "from kdcache.cache.build.config import BuildConfig\n"
        "assert 'torch' not in sys.modules, 'BuildConfig imported torch'\n"
        "import kdcache.cache.build.teacher\n"
        "assert 'torch' in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_public_names_stay_functions_after_their_modules_are_imported():
    """A lazily exported name never shares its name with a sub-module: importing the module (as
    training does before ``kdcache eval`` in one process) would replace the function with it."""
    import pkgutil
    import types

    for package_name in ("kdcache.cache", "kdcache.trainer"):
        package = importlib.import_module(package_name)
        for module in pkgutil.iter_modules(package.__path__):
            importlib.import_module(f"{package_name}.{module.name}")
        for name in package.__all__:
            value = getattr(package, name)
            assert not isinstance(value, types.ModuleType), f"{package_name}.{name} is a module"

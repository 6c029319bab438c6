"""Every option's --help states its effective default, and that default is the code's."""

from __future__ import annotations

import dataclasses
import re

import pytest
import typer
from typer.testing import CliRunner

from kdcache.cache.build.config import DEFAULT_TAIL_SAMPLES, DEFAULT_TOP_K, BuildConfig
from kdcache.cli.app import app
from kdcache.demo import DEMO_BUILD_SETTINGS
from kdcache.demo.run import QUICK, DemoSettings
from kdcache.trainer.config import EvalConfig, TrainConfig

COMMAND = typer.main.get_command(app)
COMMANDS = sorted(COMMAND.commands)
# The dataclass whose fields define each command's defaults; CLI names that differ from the field.
CONFIGS = {"build": BuildConfig, "train": TrainConfig, "eval": EvalConfig}
RENAMED = {("train", "workers"): "num_workers", ("eval", "student"): "students"}


def _defaults(config_cls: type) -> dict[str, object]:
    return {
        f.name: f.default
        for f in dataclasses.fields(config_cls)
        if f.default is not dataclasses.MISSING
    }


def _help_rows(command: str) -> dict[str, str]:
    """Rendered ``--help``: option name -> the text of its row(s) in the options panel."""
    result = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    rows: dict[str, str] = {}
    current = None
    for line in result.output.splitlines():
        match = re.match(r"│\s*\*?\s*(--[a-z0-9-]+|[a-z_]+\s)", line)
        if match and not line.startswith("│" + " " * 30):
            current = match.group(1).strip()
            rows[current] = ""
        if current is not None:
            rows[current] += " " + line.strip("│ ")
    return {name: re.sub(r"\s+", " ", text) for name, text in rows.items()}


def _options(command: str) -> list:
    """The command's options (typer's own click: test by kind, not by class)."""
    params = COMMAND.commands[command].params
    options = [p for p in params if p.param_type_name == "option" and p.name != "help"]
    assert options or command == "verify", command
    return options


@pytest.mark.parametrize("command", COMMANDS)
def test_every_option_states_its_default(command):
    rows = _help_rows(command)
    for option in _options(command):
        name = max(option.opts, key=len)
        row = rows[name]
        assert "default" in row or "[required]" in row, f"{command} {name}: {row}"
        assert not re.search(r" \.($| )", row) and "[default: ]" not in row, (
            f"{command} {name}: {row}"
        )
        if option.is_flag and not option.secondary_opts:  # an on-only flag: "off" unless given
            assert option.default is False and "(default: off)" in row, f"{command} {name}"


@pytest.mark.parametrize("command", sorted(CONFIGS))
def test_plain_defaults_are_the_config_dataclass_defaults(command):
    defaults = _defaults(CONFIGS[command])
    checked = 0
    for option in _options(command):
        field = RENAMED.get((command, option.name), option.name)
        if option.default is None or field not in defaults:
            continue
        assert option.default == defaults[field], f"{command} --{option.name}"
        checked += 1
    assert checked >= 5


def test_resolved_defaults_name_the_code_values():
    build, train, demo = _help_rows("build"), _help_rows("train"), _help_rows("demo")
    build_defaults, train_defaults = _defaults(BuildConfig), _defaults(TrainConfig)
    demo_settings = DemoSettings()
    assert (
        f"(default: {DEFAULT_TOP_K}, with {DEFAULT_TAIL_SAMPLES} tail samples; "
        f"demo: {DEMO_BUILD_SETTINGS['top_k']})" in build["--top-k"]
    )
    assert f"(default: {DEFAULT_TAIL_SAMPLES} when --top-k is not given" in build["--tail-samples"]
    for name in ("max_length", "holdout"):
        flag = "--" + name.replace("_", "-")
        expected = f"(default: {build_defaults[name]}; demo: {DEMO_BUILD_SETTINGS[name]})"
        assert expected in build[flag]
    for name in ("ce_weight", "batch_size", "lr", "warmup_steps", "eval_every"):
        flag = "--" + name.replace("_", "-")
        expected = f"(default: {train_defaults[name]}; demo: {getattr(demo_settings, name)})"
        assert expected in train[flag], train[flag]
    assert f"demo: {demo_settings.steps})" in train["--steps"]
    assert f"(default: {demo_settings.steps}; --quick: {QUICK.steps})" in demo["--steps"]
    for command, rows in (("build", build), ("train", train)):
        for flag in ("--teacher", "--data") if command == "build" else ("--cache", "--student"):
            assert "demo" in rows[flag], (
                f"{command} {flag} does not say leaving it out uses the demo"
            )

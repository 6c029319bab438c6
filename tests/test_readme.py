"""The README's set-up commands and the defaults it states are the ones the code has."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from kdcache.cache.build.config import DEFAULT_TAIL_SAMPLES, DEFAULT_TOP_K
from kdcache.cli._defaults import field_default
from kdcache.demo import DEMO_BUILD_SETTINGS
from kdcache.demo.run import DemoSettings
from kdcache.trainer.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
DEMO_DOC = (ROOT / "docs" / "DEMO.md").read_text(encoding="utf-8")


def _fresh_machine_commands() -> list[str]:
    section = README.split("## Fresh machine", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", section, re.S)]


def test_exactly_two_setup_commands_and_ci_runs_the_test_command():
    demo_command, test_command = _fresh_machine_commands()
    assert demo_command.endswith("kdcache demo") and "\n" not in demo_command
    assert test_command.endswith("python -m pytest") and "\n" not in test_command
    for command in (demo_command, test_command):
        assert command.startswith("python3 -m venv .venv && . .venv/bin/activate && ")
    ci_lines = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert test_command in ci_lines, ".ci/run must run the README's test command verbatim"
    assert "--quick" in README.split("## Use it", 1)[0]  # next to the main command


def _claims(text: str, pattern: str) -> list[tuple[str, ...]]:
    found = re.findall(pattern, text)
    assert found, f"the docs no longer state {pattern!r}: update this test with them"
    return [match if isinstance(match, tuple) else (match,) for match in found]


DEMO = DemoSettings()
# (text, pattern stating a default, the values the code has)
CLAIMS = [
    (README, r"Default: top-(\d+) \+ (\d+) tail samples", (DEFAULT_TOP_K, DEFAULT_TAIL_SAMPLES)),
    (README, r"`(\w+)` \(the default", (field_default(TrainConfig, "loss"),)),
    (
        README,
        r"both students (\d+) steps of (\d+) x (\d+) tokens",
        (DEMO.steps, DEMO.batch_size, DEMO.max_length),
    ),
    (README, r"AKL student \((\S+) AKL \+ (\S+) CE\)", (1 - DEMO.ce_weight, DEMO.ce_weight)),
    (
        README,
        r"first (\d+) held-out sequences every (\d+)\s+steps",
        (DEMO.eval_sequences, DEMO.eval_every),
    ),
    (
        DEMO_DOC,
        r"(\d+) steps x (\d+) x (\d+) tokens",
        (DEMO.steps, DEMO.batch_size, DEMO.max_length),
    ),
    (DEMO_DOC, r"lr (\S+), (\d+) warmup steps", (DEMO.lr, DEMO.warmup_steps)),
    (
        DEMO_DOC,
        r"(\d+)-token sequences, top-(\d+), (\d+)% holdout",
        (
            DEMO_BUILD_SETTINGS["max_length"],
            DEMO_BUILD_SETTINGS["top_k"],
            round(100 * DEMO_BUILD_SETTINGS["holdout"]),
        ),
    ),
    (
        DEMO_DOC,
        r"`ce_weight` (\S+), also the default of `kdcache train` with no flags",
        (DEMO.ce_weight,),
    ),
]


@pytest.mark.parametrize(("text", "pattern", "expected"), CLAIMS, ids=[c[1] for c in CLAIMS])
def test_every_stated_default_is_the_code_default(text, pattern, expected):
    for claim in _claims(text, pattern):
        assert tuple(type(value)(raw) for value, raw in zip(expected, claim, strict=True)) == (
            expected
        ), f"docs say {claim} for {pattern!r}, the code has {expected}"

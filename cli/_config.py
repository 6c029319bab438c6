"""``--config FILE``: any command's options from a YAML or JSON file, flags on the command line win.

The file maps option names to values, spelled as the flag (``ce-weight``, ``--ce-weight``) or as
the Python name (``ce_weight``). It fills click's ``default_map`` from an eager callback, before
any other option is read, so every command that declares ``config_file: ... = config_option()``
gets it for all of its options with no per-flag code, and whatever the command line gives
overrides the file. An unknown key is refused naming it and the nearest valid one.

A run's ``run.json`` and a cache's ``manifest.json`` (its ``settings``) replay the run or the
build: their field names map to the flags (``num_workers`` -> ``--workers``), and the few fields
that have no flag (``shuffle_buffer``, ``shard_tokens`` ...) are accepted while they hold the value
the command uses anyway, refused otherwise.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from pathlib import Path
from typing import Any

import click
import typer

from kdcache.cli._errors import fail

__all__ = ["config_option", "read_config_file"]

CONFIG_HELP = (
    "YAML or JSON file of options by flag name, e.g. ce-weight: 0.5; flags given on the command "
    "line override it; a run's run.json or a cache's manifest.json repeats that run or build "
    "(default: none)."
)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The mapping in a ``.json``, ``.yaml`` or ``.yml`` file (the settings of a manifest.json).

    Raises ``ValueError`` with one line saying what is wrong.
    """
    import yaml

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ValueError(f"--config {path}: cannot read it ({error.strerror or error})") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"--config {path} is not valid YAML/JSON: {first}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"--config {path} must hold a mapping of option names to values")
    if isinstance(data.get("settings"), dict) and "format_version" in data:
        return dict(data["settings"])  # a cache's manifest.json: the build's settings
    return data


def _key(name: str) -> str:
    return name.strip().lstrip("-").replace("-", "_")


def _flag(name: str) -> str:
    return name.replace("_", "-")


def _option_names(command: click.Command) -> dict[str, click.Parameter]:
    """Every spelling of every option of ``command`` (its Python name and its flags) -> option."""
    names: dict[str, click.Parameter] = {}
    for param in command.params:
        if param.name is None or param.name == "config_file":
            continue
        names[param.name] = param
        for opt in param.opts:
            if opt.startswith("--"):
                names[_key(opt)] = param
    return names


def _fixed_defaults(settings: tuple[type, ...], name: str) -> list[Any]:
    """The defaults of field ``name`` in the settings dataclasses (the values a command uses)."""
    values = []
    for cls in settings:
        for field in dataclasses.fields(cls):
            if field.name == name and field.default is not dataclasses.MISSING:
                values.append(field.default)
    return values


def _default_map(
    data: dict[str, Any],
    command: click.Command,
    path: str,
    aliases: dict[str, str],
    settings: tuple[type, ...],
) -> dict[str, Any]:
    names = _option_names(command)
    default_map: dict[str, Any] = {}
    for raw_key, value in data.items():
        key = aliases.get(_key(str(raw_key)), _key(str(raw_key)))
        param = names.get(key)
        if param is None:
            fixed = _fixed_defaults(settings, key)
            if fixed and value in fixed:
                continue  # a field of the recorded run/build that no flag sets: the same value
            if fixed:
                raise ValueError(
                    f"--config {path}: {raw_key!r} = {value!r} cannot be set by `kdcache "
                    f"{command.name}` (it is always {fixed[0]!r}); remove it"
                )
            flags = sorted({_flag(name) for name in names})
            nearest = difflib.get_close_matches(_flag(key), flags, n=1)
            hint = f"; did you mean {nearest[0]!r}?" if nearest else ""
            raise ValueError(
                f"--config {path}: unknown option {raw_key!r} for `kdcache {command.name}`{hint}"
            )
        if getattr(param, "multiple", False) and not isinstance(value, list | tuple):
            value = [] if value is None else [value]
        elif not getattr(param, "multiple", False) and isinstance(value, list | tuple):
            value = ",".join(str(item) for item in value)  # report-to: [wandb, tensorboard]
        if isinstance(value, dict):  # e.g. storage options: not stored, not settable here
            raise ValueError(f"--config {path}: {raw_key!r} takes a value, not a mapping")
        default_map[param.name] = value
    return default_map


def config_option(aliases: dict[str, str] | None = None, settings: tuple[type, ...] = ()) -> Any:
    """The ``--config FILE`` option of a command.

    ``aliases`` maps recorded field names to option names (``num_workers`` -> ``workers``);
    ``settings`` are the dataclasses whose fields without a flag may appear at their default.
    """
    aliases = {_key(k): _key(v) for k, v in (aliases or {}).items()}

    def load(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
        if value is None or ctx.resilient_parsing:
            return value
        try:
            data = read_config_file(value)
            mapping = _default_map(data, ctx.command, value, aliases, settings)
        except ValueError as error:
            raise fail(str(error)) from None
        ctx.default_map = {**(ctx.default_map or {}), **mapping}
        return value

    return typer.Option(
        None,
        "--config",
        help=CONFIG_HELP,
        is_eager=True,
        callback=load,
        show_default=False,
    )

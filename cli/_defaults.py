"""Help texts that state each option's effective default, read from where the default is defined.

An option whose default is a plain value passes it to ``typer.Option`` and typer prints
``[default: X]``. An option resolved after parsing (the demo has its own settings, ``None`` means
"the cache's" or "all rows") gets its default written into the help text by ``resolved``, with the
value read from the config dataclass, never restated. Help texts use round brackets only: typer
renders help through rich, which takes ``[...]`` for markup and silently drops it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

__all__ = ["field_default", "resolved"]


def field_default(config_cls: type, name: str) -> Any:
    """The default of dataclass field ``name`` of ``config_cls`` (KeyError if it has none)."""
    for field in dataclasses.fields(config_cls):
        if field.name != name:
            continue
        if field.default is not dataclasses.MISSING:
            return field.default
        if field.default_factory is not dataclasses.MISSING:
            return field.default_factory()
        break
    raise KeyError(f"{config_cls.__name__}.{name} has no default")


def resolved(text: str, default: Any, demo: Any = None, **others: Any) -> str:
    """``text`` plus ``(default: DEFAULT)``, ``(default: DEFAULT; demo: DEMO)`` and so on.

    ``others`` name further cases, e.g. ``quick=3`` -> ``; --quick: 3``.
    """
    cases = [f"default: {default}"]
    if demo is not None:
        cases.append(f"demo: {demo}")
    cases += [f"--{name.replace('_', '-')}: {value}" for name, value in others.items()]
    return f"{text.removesuffix('.')} ({'; '.join(cases)})."

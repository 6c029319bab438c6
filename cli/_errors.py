"""Turn known kdcache errors into one clean line on stderr and a non-zero exit."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import typer

from kdcache.cache.errors import KdcacheError

F = TypeVar("F", bound=Callable[..., Any])

DEBUG_ENV = "KDCACHE_DEBUG"


def debug_enabled() -> bool:
    """True when ``KDCACHE_DEBUG`` is set to a non-empty value other than ``0``."""
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def fail(message: str, exit_code: int = 2) -> typer.Exit:
    """Print ``error: message`` to stderr and return the ``typer.Exit`` to raise."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code=exit_code)


def handle_errors(fn: F) -> F:
    """Decorator for CLI commands: a ``KdcacheError`` becomes one line on stderr plus its exit code.

    Set ``KDCACHE_DEBUG=1`` to see the full traceback instead.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except KdcacheError as error:
            if debug_enabled():
                raise
            raise fail(str(error), error.exit_code) from None
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            sys.exit(130)

    return wrapper  # type: ignore[return-value]

"""``kdcache evaluate``: placeholder until the command is implemented (raises a clear error)."""

from __future__ import annotations

from kdcache.cache.errors import KdcacheError
from kdcache.cli._errors import handle_errors


@handle_errors
def evaluate() -> None:
    """Not implemented yet."""
    raise KdcacheError("'kdcache evaluate' is not implemented yet")

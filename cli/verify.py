"""``kdcache verify``: placeholder until the command is implemented (raises a clear error)."""

from __future__ import annotations

from kdcache.cache.errors import KdcacheError
from kdcache.cli._errors import handle_errors


@handle_errors
def verify() -> None:
    """Not implemented yet."""
    raise KdcacheError("'kdcache verify' is not implemented yet")

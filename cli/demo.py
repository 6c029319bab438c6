"""``kdcache demo``: placeholder until the command is implemented (raises a clear error)."""

from __future__ import annotations

from kdcache.cache.errors import KdcacheError
from kdcache.cli._errors import handle_errors


@handle_errors
def demo() -> None:
    """Not implemented yet."""
    raise KdcacheError("'kdcache demo' is not implemented yet")

"""``kdcache train``: placeholder until the command is implemented (raises a clear error)."""

from __future__ import annotations

from kdcache.cache.errors import KdcacheError
from kdcache.cli._errors import handle_errors


@handle_errors
def train() -> None:
    """Not implemented yet."""
    raise KdcacheError("'kdcache train' is not implemented yet")

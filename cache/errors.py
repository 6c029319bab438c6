"""Error types shared by every kdcache stage.

Every error a user can cause (bad flags, a missing file, a corrupt shard) is a ``KdcacheError``:
the CLI prints its message on one line and exits with ``exit_code`` instead of a traceback.
"""

from __future__ import annotations


class KdcacheError(Exception):
    """Base class of all user-facing kdcache errors (printed without a traceback)."""

    exit_code: int = 2


class ConfigError(KdcacheError, ValueError):
    """An invalid setting or argument; the message says what is wrong and how to fix it."""


class CacheError(KdcacheError):
    """A cache directory that is missing, incomplete, corrupt, locked or incompatible."""

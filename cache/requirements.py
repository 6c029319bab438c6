"""Minimum versions of optional dependencies, refused in one line before they fail deep inside.

An old package that imports fine can still break a run hours later (an s3fs 0.4 ends a finished
s3 build in a ``NotImplementedError`` from ``rm_file``), so the code that imports an optional
package first calls ``check_min_version`` with the version its extra asks for in pyproject.toml.
"""

from __future__ import annotations

from importlib import metadata

from kdcache.cache.errors import ConfigError

__all__ = ["check_min_version", "installed_version"]


def installed_version(package: str) -> str | None:
    """The installed distribution version of ``package`` (None when it is not installed)."""
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _install_hint(package: str, minimum: str, extra: str | None) -> str:
    if extra is not None:
        return f"pip install -U 'kdcache[{extra}]'"
    return f"pip install -U '{package}>={minimum}'"


def check_min_version(package: str, minimum: str, extra: str | None = None) -> None:
    """Raise ``ConfigError`` unless ``package`` is installed at version ``minimum`` or newer.

    The message names the package, the version found, the version needed and the pip command
    (``kdcache[extra]`` when an extra installs it). Versions compare by PEP 440 (``packaging``,
    a dependency of transformers).
    """
    from packaging.version import InvalidVersion, Version

    found = installed_version(package)
    hint = _install_hint(package, minimum, extra)
    if found is None:
        raise ConfigError(f"kdcache needs {package} >= {minimum}, which is not installed: {hint}")
    try:
        too_old = Version(found) < Version(minimum)
    except InvalidVersion:
        return  # a local build with an unparsable version: let it run
    if too_old:
        raise ConfigError(f"kdcache needs {package} >= {minimum}, found {found}: {hint}")

"""Where a cache lives: a local path or an fsspec URL, resolved in one place.

Every command that takes a cache location (``build --out``, ``train/eval --cache``, ``inspect``,
``verify``, ``push``, ``pull``, ``open_cache``) calls ``resolve_location``. A string with a scheme
(``s3://bucket/prefix``, ``gs://...``, ``hf://datasets/...``) is a URL and goes through fsspec; a
``file://`` URL is a local path; anything else is a local path. A URL is never taken for a local
path: an unknown scheme, a scheme whose filesystem is not installed, or a URL that lost a slash
(``s3:/bucket``, which ``pathlib.Path("s3://bucket")`` produces) is refused in one line.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from kdcache.cache.errors import CacheError, ConfigError

# scheme -> (module fsspec imports for it, the kdcache extra that installs it)
_EXTRAS: dict[str, tuple[str, str]] = {
    "s3": ("s3fs", "s3"),
    "s3a": ("s3fs", "s3"),
    "gs": ("gcsfs", "gcs"),
    "gcs": ("gcsfs", "gcs"),
    "az": ("adlfs", "azure"),
    "abfs": ("adlfs", "azure"),
    "abfss": ("adlfs", "azure"),
}
# package -> the oldest version its extra accepts (pyproject.toml's extras; older ones break late)
MIN_VERSIONS: dict[str, str] = {"s3fs": "2024.6", "gcsfs": "2024.6", "adlfs": "2024.4"}
_URL = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*):(?P<slashes>/*)")
_CACHE_HOME_ENV = "KDCACHE_CACHE_HOME"
DEFAULT_CACHE_LIMIT = "32GiB"  # size limit of the read-through cache of a remote cache


def cache_home() -> Path:
    """kdcache's per-user cache: ``$KDCACHE_CACHE_HOME``, else ``$XDG_CACHE_HOME/kdcache``, else
    ``~/.cache/kdcache`` (read when called, never at import)."""
    if os.environ.get(_CACHE_HOME_ENV):
        return Path(os.environ[_CACHE_HOME_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "kdcache"


def parse_storage_options(items: Iterable[str] | None) -> dict[str, Any]:
    """``["key=value", ...]`` (repeatable ``--storage-option``) -> fsspec keyword arguments.

    Values ``true`` / ``false`` / ``null`` and numbers become JSON values, everything else stays a
    string; a dotted key (``client_kwargs.region_name=eu-west-1``) fills a nested dict.
    """
    options: dict[str, Any] = {}
    for item in items or ():
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(
                f"--storage-option {item!r} must look like key=value, e.g. endpoint_url=http://..."
            )
        try:
            value: Any = json.loads(raw) if raw in ("true", "false", "null") else raw
            if re.fullmatch(r"-?\d+(\.\d+)?", raw):
                value = json.loads(raw)
        except ValueError:
            value = raw
        *parents, leaf = key.strip().split(".")
        target = options
        for parent in parents:
            target = target.setdefault(parent, {})
            if not isinstance(target, dict):
                raise ConfigError(f"--storage-option {item!r}: {parent!r} is already a value")
        target[leaf] = value
    return options


@dataclass(frozen=True)
class Location:
    """A resolved cache location: local (``scheme`` None, ``path`` absolute) or a URL.

    ``path`` is the filesystem-internal path (``bucket/prefix`` for s3) without a trailing slash.
    """

    url: str
    scheme: str | None
    path: str
    storage_options: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def is_remote(self) -> bool:
        return self.scheme is not None

    @property
    def local_path(self) -> Path:
        if self.is_remote:
            raise ValueError(f"{self.url} is not a local path")  # invariant, callers check
        return Path(self.path)

    def __str__(self) -> str:
        return self.url

    def child(self, *parts: str) -> str:
        """The filesystem path of ``parts`` below this location (``bucket/prefix/shards/x``)."""
        return "/".join([self.path, *parts])

    def child_url(self, *parts: str) -> str:
        return "/".join([self.url, *parts])

    def filesystem(self) -> Any:
        """The fsspec filesystem of this URL (instances are cached by fsspec)."""
        import fsspec

        _check_filesystem_version(self.scheme)
        try:
            return fsspec.filesystem(self.scheme, **self.storage_options)
        except ImportError:
            raise _missing_filesystem(self.scheme) from None
        except TypeError as error:  # an option the filesystem does not take
            raise ConfigError(
                f"--storage-option for {self.scheme}:// is not accepted by its filesystem "
                f"({error}); see the fsspec docs of {self.scheme}://"
            ) from None


def _check_filesystem_version(scheme: str) -> None:
    """ConfigError naming the package and the version needed when an installed one is too old."""
    from kdcache.cache.requirements import check_min_version, installed_version

    module, extra = _EXTRAS.get(scheme, (scheme + "fs", None))
    if module in MIN_VERSIONS and installed_version(module) is not None:
        check_min_version(module, MIN_VERSIONS[module], extra)


def _missing_filesystem(scheme: str) -> ConfigError:
    module, extra = _EXTRAS.get(scheme, (scheme + "fs", None))
    install = f'pip install "kdcache[{extra}]"' if extra else f"pip install {module}"
    return ConfigError(f"{scheme}:// URLs need the {module} package: {install}")


def resolve_location(
    where: str | os.PathLike, storage_options: dict[str, Any] | None = None
) -> Location:
    """Resolve a cache path or URL; ConfigError for an unknown scheme or a mangled URL."""
    text = os.fspath(where)
    match = _URL.match(text)
    if match is None or (len(match["scheme"]) == 1 and os.name == "nt"):
        if storage_options:
            raise ConfigError(f"--storage-option applies to URLs only; {text} is a local path")
        local = str(Path(text).expanduser())
        return Location(url=local, scheme=None, path=local)
    scheme = match["scheme"].lower()
    if len(match["slashes"]) < (1 if scheme == "file" else 2):
        raise ConfigError(
            f"{text!r} looks like a URL with a missing slash (write {scheme}://...); for a local "
            f"path of that name write ./{text}"
        )
    if scheme == "file":
        return resolve_location(unquote(urlparse(text).path) or "/", storage_options)
    _check_known_scheme(scheme, text)
    path = text[match.end() :].rstrip("/")
    if not path:
        raise ConfigError(f"{text!r} names no bucket or path: write {scheme}://bucket/prefix")
    return Location(
        url=f"{scheme}://{path}", scheme=scheme, path=path, storage_options=storage_options or {}
    )


def _check_known_scheme(scheme: str, text: str) -> None:
    from fsspec.registry import known_implementations, registry

    if scheme not in known_implementations and scheme not in registry:
        raise ConfigError(
            f"{text!r}: unknown URL scheme {scheme}:// (use a local path or an fsspec URL such as "
            "s3://bucket/prefix, gs://, az://, hf://, file://)"
        )


# --------------------------------------------------------------------------- remote errors


@contextlib.contextmanager
def remote_errors(location: Location, action: str) -> Iterator[None]:
    """Turn a filesystem's exceptions into one CacheError line naming ``location`` and the fix."""
    try:
        yield
    except (CacheError, ConfigError):
        raise
    except PermissionError as error:
        raise CacheError(
            f"{location.url}: access denied while {action} ({_short(error)}): check the "
            "credentials (environment, profile or --storage-option key=... secret=...)"
        ) from None
    except FileNotFoundError as error:
        raise CacheError(
            f"{location.url}: not found while {action} ({_short(error)}): check that the bucket "
            "exists and the URL is right"
        ) from None
    except Exception as error:  # botocore / aiohttp / gcsfs raise their own types
        name = type(error).__name__
        if "NoCredentials" in name:
            raise CacheError(
                f"{location.url}: no credentials found while {action}: set them in the "
                "environment or a profile, pass --storage-option key=... secret=..., or "
                "--storage-option anon=true for a public bucket"
            ) from None
        if "Endpoint" in name or "Connect" in name:
            raise CacheError(
                f"{location.url}: cannot reach the storage while {action} ({_short(error)}): "
                "check the network and --storage-option endpoint_url"
            ) from None
        if "Credential" in name or "Signature" in str(error) or "AccessKey" in str(error):
            raise CacheError(
                f"{location.url}: credentials rejected while {action} ({name}: {_short(error)}): "
                "check the environment, profile or --storage-option key=... secret=..."
            ) from None
        raise CacheError(f"{location.url}: {action} failed ({name}: {_short(error)})") from None


def _short(error: BaseException) -> str:
    return " ".join(str(error).split())[:200] or type(error).__name__


_BUCKET_SCHEMES = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss")


def check_bucket(location: Location, action: str) -> None:
    """Reach the location's bucket once, so that a missing bucket or rejected credentials fail
    before any work, in one line (filesystems without buckets are reached on first use)."""
    if location.scheme not in _BUCKET_SCHEMES:
        return
    fs = location.filesystem()
    bucket = location.path.split("/", 1)[0]
    with remote_errors(location, action):
        try:
            fs.info(bucket)
        except FileNotFoundError:
            raise CacheError(
                f"{location.url}: bucket {bucket!r} does not exist: create it or fix the URL"
            ) from None


def upload_tree(location: Location, local_dir: Path, *parts: str) -> None:
    """Upload every file below ``local_dir`` to ``location/parts/...`` (nothing if it is absent)."""
    fs = location.filesystem()
    with remote_errors(location, f"uploading {'/'.join(parts)}"):
        for path in sorted(local_dir.rglob("*")) if local_dir.is_dir() else []:
            if path.is_file():
                fs.put_file(str(path), location.child(*parts, *path.relative_to(local_dir).parts))


def download_tree(location: Location, local_dir: Path, *parts: str) -> None:
    """Download every object below ``location/parts`` into ``local_dir`` (nothing if absent)."""
    fs = location.filesystem()
    prefix = location.child(*parts)
    with remote_errors(location, f"downloading {'/'.join(parts)}"):
        for path in fs.find(prefix) if fs.exists(prefix) else []:
            target = local_dir.joinpath(*path[len(prefix) + 1 :].split("/"))
            target.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(path, str(target))

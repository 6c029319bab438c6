"""``kdcache push LOCAL URL`` / ``kdcache pull URL LOCAL``: publish or fetch a finished cache."""

from __future__ import annotations

from typing import Annotated

import typer

from kdcache.cli import _storage
from kdcache.cli._errors import handle_errors


@handle_errors
def push(
    local: Annotated[str, typer.Argument(help="Finished local cache directory.")],
    url: Annotated[str, typer.Argument(help="Destination URL, e.g. s3://bucket/prefix.")],
    storage_option: list[str] = _storage.storage_option(),
    overwrite: bool = typer.Option(False, help="Replace a different cache already at URL."),
) -> None:
    """Upload a finished cache (shards verified on arrival, manifest.json last)."""
    from kdcache.cache.storage.location import parse_storage_options
    from kdcache.cache.transfer import push_cache

    summary = push_cache(
        local, url, storage_options=parse_storage_options(storage_option), overwrite=overwrite
    )
    typer.echo(summary.line())


@handle_errors
def pull(
    url: Annotated[str, typer.Argument(help="Source URL, e.g. s3://bucket/prefix.")],
    local: Annotated[str, typer.Argument(help="Local directory to write the cache into.")],
    storage_option: list[str] = _storage.storage_option(),
    overwrite: bool = typer.Option(False, help="Replace a different cache already in LOCAL."),
) -> None:
    """Download a finished cache (shards verified on arrival, manifest.json last)."""
    from kdcache.cache.storage.location import parse_storage_options
    from kdcache.cache.transfer import pull_cache

    summary = pull_cache(
        url, local, storage_options=parse_storage_options(storage_option), overwrite=overwrite
    )
    typer.echo(summary.line())

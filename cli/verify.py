"""``kdcache verify CACHE``: recompute every shard checksum; exit 1 when any shard is bad."""

from __future__ import annotations

from typing import Annotated

import typer

from kdcache.cli import _storage
from kdcache.cli._errors import handle_errors


@handle_errors
def verify(
    cache: Annotated[str, typer.Argument(help="Cache directory or URL (holds manifest.json).")],
    storage_option: list[str] = _storage.storage_option(),
) -> None:
    """Check every shard of CACHE against the manifest (size + sha256); exit 1 if any is bad."""
    from kdcache.cache.read.verify import verify_cache
    from kdcache.cache.storage.location import parse_storage_options

    checked: list[str] = []

    def report(name: str, problem: str | None) -> None:
        checked.append(name)
        if problem is not None:
            typer.echo(f"BAD {name}: {problem}")

    bad = verify_cache(cache, report=report, storage_options=parse_storage_options(storage_option))
    if bad:
        typer.echo(f"{len(bad)} of {len(checked)} shards of {cache} are bad: rebuild the cache")
        raise typer.Exit(code=1)
    typer.echo(f"OK {cache}: all {len(checked)} shards match the manifest (size + sha256)")

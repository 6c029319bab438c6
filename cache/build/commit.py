"""The commit of a build: its manifest (from the row groups' completion markers) and summary.

``build_cache`` (cache/build/pipeline.py) calls ``write_build_manifest`` once every row group is
complete; ``finalize_build`` (``kdcache build --out OUT --finalize``) does the same for a build run
in independent slices, from the build state and the markers alone (no teacher, no data).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kdcache.cache.build.config import BuildConfig
from kdcache.cache.build.lock import STATE_NAME, TOKENIZER_DIR
from kdcache.cache.build.output import build_target
from kdcache.cache.build.slices import missing_groups, missing_text, shards_of_markers
from kdcache.cache.errors import CacheError, ConfigError
from kdcache.cache.format.blocks import BlockCodec
from kdcache.cache.format.manifest import (
    ShardInfo,
    manifest_path,
    read_manifest,
    shard_summary,
    write_manifest,
)


@dataclass
class BuildSummary:
    """What a build did (``status``: built, resumed or complete) and the cache's totals."""

    out: Path | str  # the cache directory or URL
    status: str
    num_sequences: int
    num_tokens: int
    num_positions: int
    bytes: int
    seconds: float = 0.0  # teacher + writing time of this run
    tokens_this_run: int = 0
    splits: dict[str, Any] = field(default_factory=dict)
    waiting_for: str | None = None  # a slice done before the others: what is still missing

    @property
    def bytes_per_token(self) -> float:
        return self.bytes / self.num_tokens if self.num_tokens else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens_this_run / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        """One-line summary: sequences, tokens, bytes, bytes/token, tokens/s."""
        if self.waiting_for is not None:
            return (
                f"slice written: {self.tokens_this_run} tokens, {self.tokens_per_second:.0f} "
                f"tokens/s; the manifest comes with the last slice ({self.waiting_for}) -> "
                f"{self.out}"
            )
        return (
            f"{self.status}: {self.num_sequences} sequences, {self.num_tokens} tokens, "
            f"{self.bytes} bytes ({self.bytes_per_token:.1f} B/token), "
            f"{self.tokens_per_second:.0f} tokens/s -> {self.out}"
        )


def storage_settings(config: BuildConfig, vocab_size: int) -> dict[str, Any]:
    """The manifest's storage settings (mode, top_k, vocab_size, tail_samples ...): those of the
    column groups the codec registry gives for ``config`` (a group's key only when it is on)."""
    codec = BlockCodec(
        config.mode, config.top_k, vocab_size, tail_samples=config.tail_samples,
        observed_logprobs=config.observed_logprobs,
    )  # fmt: skip
    return codec.settings()


def finalize_build(
    out: str | Path, storage_options: dict[str, Any] | None = None, staging_dir: str | None = None
) -> BuildSummary:
    """``kdcache build --out OUT --finalize``: write the manifest of a build run in slices from its
    completion markers (no teacher, no data); ConfigError naming the slices still missing."""
    from kdcache.cache.storage.location import resolve_location

    location = resolve_location(out, storage_options or {})
    target = build_target(location, 0, staging_dir and Path(staging_dir))
    if not location.is_remote and manifest_path(target.local_dir).is_file():
        return summary_of(target.display, "complete", read_manifest(target.local_dir))
    state = target.read_state()
    if manifest_path(target.local_dir).is_file():  # a URL's manifest, mirrored by read_state
        return summary_of(location.url, "complete", read_manifest(target.local_dir))
    markers = target.complete_groups()
    missing = missing_groups(int(state["partition"]["num_groups"]), markers)
    if missing:
        raise ConfigError(
            f"cannot finalize {target.display}: {missing_text(missing, state.get('num_shards'))}; "
            "run them (the same command with their --shard-index), then --finalize again"
        )
    if not (target.local_dir / TOKENIZER_DIR).is_dir() and not location.is_remote:
        raise CacheError(f"{target.display} has no tokenizer/; re-run any slice to write it")
    complete = {info.name: info for info in target.complete_shards()}
    shards = shards_of_markers(markers, complete)
    world = int(state.get("num_shards") or 1)
    manifest = write_build_manifest(target.local_dir, shards, state["manifest"], world, 0.0, 0)
    if location.is_remote:
        from kdcache.cache.format.manifest import MANIFEST_NAME

        target._put_file(manifest_path(target.local_dir), MANIFEST_NAME)
        target.clean_staging()
    return summary_of(target.display, "built", manifest)


def stored_manifest_fields(out: Path) -> dict[str, Any] | None:
    """The manifest fields of the build state in ``out`` (the first process's), if it has them:
    every slice then writes the same manifest, whatever its own non-fingerprinted flags."""
    path = out / STATE_NAME
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8")).get("manifest")


# BuildConfig fields that are not build settings (storage options may hold credentials)
_NOT_SETTINGS = ("out", "progress", "storage_options", "staging_dir", "num_shards", "shard_index")


def _kdcache_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("kdcache")
    except PackageNotFoundError:
        return "unknown"


def manifest_fields(
    config: BuildConfig, fingerprints: dict[str, Any], vocab_size: int
) -> dict[str, Any]:
    """What the manifest says besides its shards and run statistics (kept in the build state, so
    that any slice, or ``--finalize``, writes the same manifest)."""
    field_name = config.messages_field or config.text_field
    return {
        "teacher": config.teacher,
        **storage_settings(config, vocab_size),  # mode, top_k, vocab_size, tail_samples ...
        "temperature": float(config.temperature),
        "tokenizer_fingerprint": fingerprints["tokenizer"]["hash"],
        "data": f"{config.data} (split {config.split}, field {field_name})",
        "fingerprints": fingerprints,
        "settings": {
            **{k: v for k, v in asdict(config).items() if k not in _NOT_SETTINGS},
            "dtype": fingerprints["settings"]["dtype"],
        },
    }


def write_build_manifest(
    out: Path,
    shards: list[ShardInfo],
    fields: dict[str, Any],
    world_size: int,
    seconds: float,
    tokens_this_run: int,
) -> dict[str, Any]:
    summary = shard_summary(shards)
    if not summary["shards"]:
        raise CacheError(f"the build of {out} wrote no complete shards; re-run it")
    manifest = {
        **summary,
        **fields,
        "world_size": world_size,
        "build": {
            "seconds": round(seconds, 3),
            "tokens_this_run": tokens_this_run,
            "tokens_per_second": round(tokens_this_run / seconds, 1) if seconds > 0 else None,
            "bytes_per_token": round(summary["bytes"] / max(summary["num_tokens"], 1), 2),
        },
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "kdcache_version": _kdcache_version(),
    }
    write_manifest(out, manifest)
    return manifest


def summary_of(
    out: Path | str, status: str, manifest: dict[str, Any], seconds: float = 0.0, tokens: int = 0
) -> BuildSummary:
    return BuildSummary(
        out=out,
        status=status,
        num_sequences=int(manifest["num_sequences"]),
        num_tokens=int(manifest["num_tokens"]),
        num_positions=int(manifest.get("num_positions", 0)),
        bytes=int(manifest.get("bytes", 0)),
        seconds=seconds,
        tokens_this_run=tokens,
        splits=manifest["splits"],
    )

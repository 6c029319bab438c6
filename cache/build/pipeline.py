"""``build_cache``: run the teacher once over a dataset and write a top-k + tail-mass cache.

Order of work, chosen so that bad input never damages an existing directory: validate the config,
load the tokenizer, the data and the teacher, compute the fingerprints; only then create the
directory, take the lock and compare with what is already there (manifest or build state):

* same fingerprints and a manifest: the cache is complete, nothing to do;
* same fingerprints and a build state: resume (skip the records of complete shards);
* different fingerprints: refuse, naming the differences, unless ``overwrite``.

Each (split, rank) stream is written by one ``ShardWriter`` (background encoding thread); the
manifest is written last by rank 0, after a barrier, from the complete shards of all ranks.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kdcache.cache.build.config import (  # noqa: F401 (BuildConfig, MODES: re-exported here)
    DEFAULT_TAIL_SAMPLES,
    DEFAULT_TOP_K,
    MODES,
    BuildConfig,
)
from kdcache.cache.build.data import SPLITS, RecordStream
from kdcache.cache.errors import CacheError, ConfigError, KdcacheError
from kdcache.cache.build.fingerprint import (
    data_fingerprint,
    stable_hash,
    teacher_fingerprint,
    tokenizer_details,
)
from kdcache.cache.format.blocks import BlockCodec
from kdcache.cache.build.lock import TOKENIZER_DIR
from kdcache.cache.build.output import build_target
from kdcache.cache.format.manifest import ShardInfo, read_manifest, shard_summary, write_manifest


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

    @property
    def bytes_per_token(self) -> float:
        return self.bytes / self.num_tokens if self.num_tokens else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens_this_run / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        """One-line summary: sequences, tokens, bytes, bytes/token, tokens/s."""
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


def fingerprints_for(
    config: BuildConfig, model, tokenizer, rows, dtype, vocab_size: int
) -> dict[str, Any]:
    """The four fingerprints of a build (teacher, tokenizer, data, settings).

    The settings hash leaves out vocab_size (the teacher fingerprint holds it) so that caches
    built before the codec registry, whose hash did not have it, still resume.
    """
    storage = storage_settings(config, vocab_size)
    settings = {
        **{key: value for key, value in storage.items() if key != "vocab_size"},
        "temperature": float(config.temperature),
        "dtype": str(dtype).removeprefix("torch."),
    }
    return {
        "teacher": teacher_fingerprint(config.teacher, model),
        "tokenizer": tokenizer_details(tokenizer),
        "data": data_fingerprint(config.data_spec(), tokenizer, rows),
        "settings": {**settings, "hash": stable_hash(settings)},
    }


def _together(world_size: int, value: Any = None) -> list[Any]:
    """Every rank's ``value`` (a barrier); re-raise the first rank's KdcacheError on all ranks.

    Pass a KdcacheError as ``value`` to refuse on every rank at once: a rank that just exited
    would leave the others waiting at their next collective.
    """
    values = [value]
    if world_size > 1:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            values = [None] * world_size
            dist.all_gather_object(values, value)
    for item in values:
        if isinstance(item, KdcacheError):
            raise value if isinstance(value, KdcacheError) else type(item)(str(item))
    return values


def _attempt(action, *args, **kwargs) -> Any:
    """``action(...)``, or the KdcacheError it raised (to be shared with ``_together``)."""
    try:
        return action(*args, **kwargs)
    except KdcacheError as error:
        return error


def build_cache(config: BuildConfig, *, rank: int = 0, world_size: int = 1) -> BuildSummary:
    """Build (or resume, or confirm) the cache described by ``config``; see the module docstring.

    ``rank`` / ``world_size``: this process's slice of the data under torchrun (sequences with
    ``sequence_id % world_size == rank``); rank 0 writes the manifest after a barrier. A URL
    ``out`` builds in a local staging directory and uploads (cache/build/output.py): each rank
    its own shards, rank 0 the manifest, last.
    """
    from kdcache.cache.build.teacher import (
        TeacherRunner,
        load_model,
        load_tokenizer,
        output_vocab_size,
        resolve_device,
        resolve_dtype,
    )

    if not 0 <= rank < world_size:
        raise ConfigError(f"rank {rank} is outside world size {world_size}")
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    target = build_target(config.location, rank, config.staging_dir and Path(config.staging_dir))
    target.check_writable()
    tokenizer = load_tokenizer(config.teacher)
    stream = RecordStream(config.data_spec(), tokenizer)
    model = load_model(config.teacher, dtype, device)
    vocab_size = output_vocab_size(model)
    if config.top_k > vocab_size:
        raise ConfigError(f"--top-k {config.top_k} exceeds the teacher's vocabulary ({vocab_size})")
    if next(iter(stream.sequences("train")), None) is None:
        raise ConfigError(
            f"dataset '{config.data}' gives no training sequences ({len(stream.rows)} rows, "
            f"holdout {config.holdout}); use more data or a smaller --holdout"
        )
    fingerprints = fingerprints_for(config, model, tokenizer, stream.rows, dtype, vocab_size)

    out = target.local_dir  # the cache directory, or the staging directory of a URL
    out.mkdir(parents=True, exist_ok=True)
    with target.lock():
        status = (
            _attempt(target.prepare, fingerprints, config.overwrite, world_size)
            if rank == 0
            else ""
        )
        _together(world_size, status)  # rank 0 has cleaned up / written the build state
        if rank != 0:
            status = _attempt(target.prepare, fingerprints, False, world_size)
        _together(world_size, status)
        if status == "complete":
            return _summary(config.out, "complete", read_manifest(out))
        runner = TeacherRunner(
            model,
            top_k=config.top_k,
            temperature=config.temperature,
            tail_samples=config.tail_samples,
            observed_logprobs=config.observed_logprobs,
        )
        started = time.perf_counter()
        tokens_this_run = 0
        resumed = False
        with _progress_bar(config.progress and rank == 0) as bar:
            for split in SPLITS:
                done = [s for s in target.complete_shards() if s.split == split and s.rank == rank]
                resumed = resumed or bool(done)
                tokens_this_run += _run_split(
                    config, target, runner, stream, split, rank, world_size, vocab_size, done, bar
                )
        target.flush()
        seconds = time.perf_counter() - started
        mine = [s.name for s in target.complete_shards() if s.rank == rank]
        written = _together(world_size, mine)
        if rank != 0:
            return BuildSummary(config.out, "written", 0, 0, 0, 0, seconds, tokens_this_run)
        complete = target.complete_shards()
        unseen = sorted(set().union(*written) - {s.name for s in complete})
        if unseen:
            raise CacheError(
                f"rank 0 cannot see {len(unseen)} shards the other ranks wrote ({unseen[0]} ...): "
                f"--out {out} must be one directory on a filesystem shared by every rank"
            )
        tokenizer.save_pretrained(out / TOKENIZER_DIR)
        manifest = _write_manifest(
            out, complete, config, fingerprints, vocab_size, world_size, seconds, tokens_this_run
        )
        target.commit()
        status = "resumed" if resumed else "built"
        return _summary(config.out, status, manifest, seconds, tokens_this_run)


def _progress_bar(enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(
        desc="teacher", unit="tok", unit_scale=True, disable=not enabled, dynamic_ncols=True
    )


def _run_split(
    config: BuildConfig,
    target,
    runner,
    stream: RecordStream,
    split: str,
    rank: int,
    world_size: int,
    vocab_size: int,
    done: list,
    bar,
) -> int:
    """Run the teacher over this rank's part of ``split`` after the records of ``done`` shards.

    Returns the number of tokens run. ``done``: this (split, rank)'s complete shards, which hold
    a prefix of the rank's record stream (shard indices 0..n-1).
    """
    from kdcache.cache.format.shards import ShardWriter
    from kdcache.cache.build.teacher import run_sequences

    indices = sorted(info.index for info in done)
    if indices != list(range(len(indices))):
        raise CacheError(
            f"{target.display}: shards of split {split} rank {rank} are not contiguous ({indices}); "
            "pass --overwrite to rebuild"
        )
    skip = sum(info.num_sequences for info in done)
    tokens = positions = 0
    sequences = stream.sequences(split, rank, world_size)
    with ShardWriter(
        target.local_dir,
        split,
        rank=rank,
        top_k=config.top_k,
        vocab_size=vocab_size,
        start_index=len(done),
        max_shard_tokens=config.shard_tokens,
        mode=config.mode,
        tail_samples=config.tail_samples,
        observed_logprobs=config.observed_logprobs,
        on_shard=target.publish,
    ) as writer:
        for record in run_sequences(runner, sequences, config.batch_tokens, skip=skip):
            writer.write(record)
            tokens += record.num_tokens
            positions += record.num_positions
            bar.update(record.num_tokens)
            bar.set_postfix(split=split, positions=positions, refresh=False)
    return tokens


# BuildConfig fields that are not build settings (storage options may hold credentials)
_NOT_SETTINGS = ("out", "progress", "storage_options", "staging_dir")


def _kdcache_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("kdcache")
    except PackageNotFoundError:
        return "unknown"


def _write_manifest(
    out: Path,
    shards: list[ShardInfo],
    config: BuildConfig,
    fingerprints: dict[str, Any],
    vocab_size: int,
    world_size: int,
    seconds: float,
    tokens_this_run: int,
) -> dict[str, Any]:
    summary = shard_summary(shards)
    if not summary["shards"]:
        raise CacheError(f"the build of {out} wrote no complete shards; re-run it")
    field_name = config.messages_field or config.text_field
    manifest = {
        **summary,
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


def _summary(
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

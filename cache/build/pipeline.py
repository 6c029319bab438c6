"""``build_cache``: run the teacher once over a dataset and write a top-k + tail-mass cache.

Order of work, chosen so that bad input never damages an existing directory: validate the config,
load the tokenizer, the data and the teacher, compute the fingerprints; only then create the
directory, take the lock and compare with what is already there (manifest or build state):

* same fingerprints and a manifest: the cache is complete, nothing to do;
* same fingerprints and a build state: resume, with any number of processes (skip the row
  groups with a completion marker, and the records of a group's complete shards);
* different fingerprints: refuse, naming the differences, unless ``overwrite``.

The work is cut into row groups (cache/build/data.py, cache/build/slices.py); a process builds
its groups ``g % world_size == rank``, tokenizing only their rows (the next group on a
background thread while the teacher runs). Each (split, group) stream is written by one
``ShardWriter`` (background encoding thread); a group's completion marker follows its shards.
The manifest is written last, from the markers: by rank 0 after a barrier under torchrun, by
the slice that completes the last group for independent slices, or by ``finalize_build``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from kdcache.cache.build.commit import (  # noqa: F401 (BuildSummary, finalize_build: re-exported)
    BuildSummary,
    finalize_build,
    manifest_fields,
    storage_settings,
    stored_manifest_fields,
    summary_of,
    write_build_manifest,
)
from kdcache.cache.build.config import (  # noqa: F401 (BuildConfig, MODES: re-exported here)
    DEFAULT_TAIL_SAMPLES,
    DEFAULT_TOP_K,
    MODES,
    BuildConfig,
)
from kdcache.cache.build.data import SPLITS, RecordStream, owned_groups
from kdcache.cache.build.fingerprint import (
    data_fingerprint,
    stable_hash,
    teacher_fingerprint,
    tokenizer_details,
)
from kdcache.cache.build.output import build_target
from kdcache.cache.build.slices import missing_groups, missing_text, shards_of_markers
from kdcache.cache.errors import CacheError, ConfigError, KdcacheError
from kdcache.cache.extraction.sizing import PassSizes, size_teacher_pass
from kdcache.cache.format.manifest import (
    ShardInfo,
    read_manifest,
)


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


def teacher_pass_sizes(config: BuildConfig, model, device, vocab_size: int) -> PassSizes:
    """``--head-chunk-rows`` / ``--batch-tokens`` resolved for ``device`` (extraction/sizing.py)."""
    parameter = next(model.parameters())
    return size_teacher_pass(
        device.type,
        vocab_size=vocab_size,
        model_config=model.config,
        dtype_bytes=parameter.element_size(),
        max_length=config.max_length,
        head_chunk_rows=config.head_chunk_rows,
        batch_tokens=config.batch_tokens,
    )


def build_cache(config: BuildConfig, *, rank: int = 0, world_size: int = 1) -> BuildSummary:
    """Build (or resume, or confirm) the cache described by ``config``; see the module docstring.

    ``rank`` / ``world_size``: this process's part of the work under torchrun (the row groups
    ``g % world_size == rank``, cache/build/slices.py); rank 0 writes the manifest after a
    barrier. ``config.num_shards`` / ``config.shard_index``: an independent slice instead (no
    collective); the slice that completes the last row group writes the manifest. A URL ``out``
    builds in a local staging directory and uploads (cache/build/output.py): each process its
    own shards and markers, the manifest last.
    """
    from kdcache.cache.build.teacher import (
        TeacherRunner,
        load_model,
        load_tokenizer,
        output_vocab_size,
        prefetch,
        resolve_device,
        resolve_dtype,
    )

    independent = config.num_shards is not None
    if independent:
        if world_size > 1:
            raise ConfigError(
                "--num-shards/--shard-index run one independent slice: start it without torchrun"
            )
        rank, world_size = int(config.shard_index or 0), int(config.num_shards)
    if not 0 <= rank < world_size:
        raise ConfigError(f"rank {rank} is outside world size {world_size}")
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    target = build_target(config.location, rank, config.staging_dir and Path(config.staging_dir))
    target.check_writable()
    tokenizer = load_tokenizer(config.teacher)
    stream = RecordStream(config.data_spec(), tokenizer)
    owned = owned_groups(stream.num_groups, rank, world_size)
    target.owned = set(owned)
    model = load_model(config.teacher, dtype, device)
    vocab_size = output_vocab_size(model)
    if config.top_k > vocab_size:
        raise ConfigError(f"--top-k {config.top_k} exceeds the teacher's vocabulary ({vocab_size})")
    # the process owning row group 0 checks that the data gives training sequences (the others
    # tokenize none of its rows); under torchrun every rank learns the answer
    problem = _attempt(_check_train_sequences, config, stream) if 0 in owned else None
    if isinstance(problem, KdcacheError) and (independent or world_size == 1):
        raise problem
    if not independent:
        _together(world_size, problem)
    sizes = teacher_pass_sizes(config, model, device, vocab_size)
    fingerprints = fingerprints_for(config, model, tokenizer, stream.rows, dtype, vocab_size)
    state = {
        **fingerprints,
        "partition": {"group_rows": stream.group_size, "num_groups": stream.num_groups},
        "num_shards": config.num_shards,
        "manifest": manifest_fields(config, fingerprints, vocab_size),
    }

    out = target.local_dir  # the cache directory, or the staging directory of a URL
    out.mkdir(parents=True, exist_ok=True)
    with target.lock():
        if independent:
            status = target.prepare(state, config.overwrite, creator=True, exclusive=True)
        else:
            status = _attempt(target.prepare, state, config.overwrite, True) if rank == 0 else ""
            _together(world_size, status)  # rank 0 has cleaned up / written the build state
            if rank != 0:
                status = _attempt(target.prepare, state, False, False)
            _together(world_size, status)
        if status == "complete":
            return summary_of(config.out, "complete", read_manifest(out))
        runner = TeacherRunner(
            model,
            top_k=config.top_k,
            temperature=config.temperature,
            tail_samples=config.tail_samples,
            chunk_elements=sizes.chunk_rows * vocab_size,
            observed_logprobs=config.observed_logprobs,
        )
        started = time.perf_counter()
        done = target.complete_groups()
        todo = [group for group in owned if group not in done]
        resumed = len(todo) < len(owned)
        tokens_this_run = 0
        # listed once: a group in progress resumes after its complete shards (a prefix)
        complete = [s for s in target.complete_shards() if s.rank in set(todo)] if todo else []
        with _progress_bar(config.progress and rank == 0) as bar:
            for group, sequences in prefetch(_group_sequences(stream, todo), size=1):
                names = []
                for split in SPLITS:
                    finished = [s for s in complete if s.split == split and s.rank == group]
                    resumed = resumed or bool(finished)
                    tokens, written = _run_split(
                        config, target, runner, sequences[split], split, group, vocab_size,
                        finished, sizes.batch_tokens, bar,
                    )  # fmt: skip
                    tokens_this_run += tokens
                    names += [s.name for s in finished] + [s.name for s in written]
                target.flush()  # the group's shards are where readers look, then its marker
                target.mark_group(group, names)
        target.flush()
        seconds = time.perf_counter() - started
        if not independent:
            _together(world_size, None)  # every rank's groups are marked
            if rank != 0:
                return BuildSummary(config.out, "written", 0, 0, 0, 0, seconds, tokens_this_run)
        target.save_tokenizer(tokenizer)
        markers = target.complete_groups()
        missing = missing_groups(stream.num_groups, markers)
        if missing and independent:
            summary = BuildSummary(config.out, "written", 0, 0, 0, 0, seconds, tokens_this_run)
            summary.waiting_for = missing_text(missing, config.num_shards)
            return summary
        if missing:
            raise CacheError(
                f"rank 0 cannot see the completion of {missing_text(missing, None)}: --out "
                f"{out} must be one directory on a filesystem shared by every rank"
            )
        complete = {info.name: info for info in target.complete_shards()}
        shards = shards_of_markers(markers, complete)
        fields = stored_manifest_fields(out) or state["manifest"]  # whoever wrote the state
        manifest = write_build_manifest(out, shards, fields, world_size, seconds, tokens_this_run)
        target.commit()
        status = "resumed" if resumed else "built"
        return summary_of(config.out, status, manifest, seconds, tokens_this_run)


def _group_sequences(stream: RecordStream, groups: list[int]):
    """``(group, {split: [SequenceInput, ...]})`` for each group: only its own rows tokenized."""
    for group in groups:
        yield group, {split: list(stream.group_sequences(split, group)) for split in SPLITS}


def _check_train_sequences(config: BuildConfig, stream: RecordStream) -> None:
    if next(iter(stream.sequences("train")), None) is None:
        raise ConfigError(
            f"dataset '{config.data}' gives no training sequences ({len(stream.rows)} rows, "
            f"holdout {config.holdout}); use more data or a smaller --holdout"
        )


def _progress_bar(enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(
        desc="teacher", unit="tok", unit_scale=True, disable=not enabled, dynamic_ncols=True
    )


def _run_split(
    config: BuildConfig,
    target,
    runner,
    sequences: list,
    split: str,
    group: int,
    vocab_size: int,
    done: list,
    batch_tokens: int,
    bar,
) -> tuple[int, list[ShardInfo]]:
    """Run the teacher over one row group's ``sequences`` of ``split`` after the records of
    ``done`` shards; returns the tokens run and the shards written. ``done``: this (split,
    group)'s complete shards, which hold a prefix of the group's records (indices 0..n-1)."""
    from kdcache.cache.build.teacher import run_sequences
    from kdcache.cache.format.shards import ShardWriter

    indices = sorted(info.index for info in done)
    if indices != list(range(len(indices))):
        raise CacheError(
            f"{target.display}: shards of split {split} row group {group} are not contiguous "
            f"({indices}); pass --overwrite to rebuild"
        )
    skip = sum(info.num_sequences for info in done)
    if skip >= len(sequences):
        return 0, []
    tokens = positions = 0
    with ShardWriter(
        target.local_dir,
        split,
        rank=group,
        top_k=config.top_k,
        vocab_size=vocab_size,
        start_index=len(done),
        max_shard_tokens=config.shard_tokens,
        mode=config.mode,
        tail_samples=config.tail_samples,
        observed_logprobs=config.observed_logprobs,
        on_shard=target.publish,
    ) as writer:
        for record in run_sequences(runner, sequences, batch_tokens, skip=skip):
            writer.write(record)
            tokens += record.num_tokens
            positions += record.num_positions
            bar.update(record.num_tokens)
            bar.set_postfix(split=split, positions=positions, refresh=False)
        written = writer.close()
    return tokens, written

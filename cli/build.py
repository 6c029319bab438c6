"""``kdcache build``: run the teacher once over a dataset and write a top-k + tail-mass cache.

With neither ``--teacher`` nor ``--data`` it builds the embedded demo (shipped teacher, held-out
standard-library text). Under torchrun (``RANK`` / ``WORLD_SIZE`` set) every rank builds its row
groups and rank 0 writes the manifest; ``--num-shards N --shard-index I`` builds one independent
slice (no torchrun, no collective) and ``--finalize`` writes the manifest of a sliced build.
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import typer

from kdcache.cache.build.config import (
    DEFAULT_TAIL_SAMPLES,
    DEFAULT_TOP_K,
    ESTIMATE_SAMPLE_SEQUENCES,
    BuildConfig,
)
from kdcache.cache.errors import ConfigError
from kdcache.cli import _storage
from kdcache.cli._config import config_option
from kdcache.cli._defaults import field_default, resolved
from kdcache.cli._errors import handle_errors
from kdcache.demo import DEFAULT_CACHE_DIR as DEMO_CACHE_DIR
from kdcache.demo import DEMO_BUILD_SETTINGS


def _build(name: str):
    return field_default(BuildConfig, name)


def _demo_defaults(out: str | None) -> tuple[str, str, str]:
    """(teacher, data, out) of the embedded demo; writes the demo dataset next to the cache."""
    from kdcache.cache.storage.location import resolve_location
    from kdcache.demo import DEFAULT_CACHE_DIR, demo_teacher_dir, write_demo_dataset

    out = out or str(DEFAULT_CACHE_DIR)
    location = resolve_location(out)  # the demo data goes next to a local cache only
    parent = Path(DEFAULT_CACHE_DIR).parent if location.is_remote else location.local_path.parent
    data = write_demo_dataset(parent / "data" / "demo.jsonl")
    return str(demo_teacher_dir()), str(data), out


# Build ranks meet only at the start and at the end, to exchange a few small Python objects (gloo
# on CPU is enough, also on GPU nodes), but a rank may wait there for hours: after a resume, a rank
# whose slice is complete waits for the others. torchrun still stops every rank when one fails.
BUILD_GROUP_TIMEOUT = timedelta(days=7)


def _distributed() -> tuple[int, int]:
    """(rank, world_size) from torchrun's environment; initializes the process group if needed."""
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) <= 1:
        return 0, 1
    import torch
    import torch.distributed as dist

    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if not dist.is_initialized():
        if torch.cuda.is_available():  # --device auto then means this rank's own GPU
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend="gloo", timeout=BUILD_GROUP_TIMEOUT)
    return rank, world_size


@handle_errors
def build(
    teacher: str | None = typer.Option(
        None,
        help="Teacher: model directory or hub id (default: with --data also left out, the "
        "shipped demo teacher on the demo data).",
    ),
    data: str | None = typer.Option(
        None,
        help="Dataset: hub id, jsonl/json/parquet/csv/txt file or a directory of them (default: "
        "with --teacher also left out, the demo data).",
    ),
    out: str | None = typer.Option(
        None,
        help=resolved(
            "Cache directory or URL (s3://bucket/prefix, gs://, az://, file://) to write",
            "required",
            demo=DEMO_CACHE_DIR,
        ),
    ),
    split: str = typer.Option(_build("split"), help="Dataset split to read."),
    data_config: str | None = typer.Option(
        None, help="Dataset configuration name of a hub dataset (default: none)."
    ),
    text_field: str = typer.Option(_build("text_field"), help="Column holding the text."),
    messages_field: str | None = typer.Option(
        None,
        help="Column of chat messages, rendered with the chat template; only assistant tokens "
        "are distilled (default: none, use --text-field).",
    ),
    top_k: int | None = typer.Option(
        None,
        help=resolved(
            "Top-k entries stored per position. Alone it gives a plain top-k cache; 0 with "
            "--tail-samples: a sampled cache",
            f"{DEFAULT_TOP_K}, with {DEFAULT_TAIL_SAMPLES} tail samples",
            demo=DEMO_BUILD_SETTINGS["top_k"],
        ),
    ),
    temperature: float = typer.Option(
        _build("temperature"), help="Softmax temperature of the stored distributions."
    ),
    max_length: int | None = typer.Option(
        None,
        help=resolved(
            "Tokens per sequence", _build("max_length"), demo=DEMO_BUILD_SETTINGS["max_length"]
        ),
    ),
    pack: bool = typer.Option(
        _build("pack"), "--pack/--no-pack", help="Pack documents into blocks (EOS between)."
    ),
    limit: int | None = typer.Option(None, help="Use only the first N rows (default: all rows)."),
    holdout: float | None = typer.Option(
        None,
        help=resolved(
            "Fraction of rows in the 'holdout' split",
            _build("holdout"),
            demo=DEMO_BUILD_SETTINGS["holdout"],
        ),
    ),
    dtype: str = typer.Option(
        _build("dtype"), help="auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16, float16."
    ),
    device: str = typer.Option(_build("device"), help="auto, cpu, cuda, cuda:N."),
    batch_tokens: str = typer.Option(
        _build("batch_tokens"),
        help="Padded tokens per teacher batch: auto (CPU 16384; CUDA from free memory) or N.",
    ),
    head_chunk_rows: str = typer.Option(
        _build("head_chunk_rows"),
        help="Positions per chunk of the teacher's head (log-softmax, top-k): auto (CPU: 2^24 "
        "logits; CUDA from free memory) or N.",
    ),
    shard_tokens: int = typer.Option(
        _build("shard_tokens"),
        help="Tokens per shard file (object size on object storage; more shards, more readers).",
    ),
    group_rows: str = typer.Option(
        _build("group_rows"),
        help="Rows per row group, the unit of work of ranks and slices (packing restarts at "
        "each group): auto (~64 groups of 256-1024 rows; under 256 rows one group) or N.",
    ),
    num_shards: int | None = typer.Option(
        None,
        help="Build one independent slice of N (with --shard-index): no collective, any order, "
        "any machine; the last slice writes the manifest (default: one build).",
    ),
    shard_index: int | None = typer.Option(
        None, help="Which slice (0..N-1) of --num-shards N this job builds (default: none)."
    ),
    finalize: bool = typer.Option(
        False,
        help="Only write the manifest of a build run in slices, from --out alone (or name the "
        "slices still missing).",
    ),
    mode: str = typer.Option(
        _build("mode"),
        "--encoding",
        "--mode",
        help="Storage encoding (docs/FORMAT.md): exact (fp16 log-probs), unique (exact, each "
        "distinct tail sample once with its count), q8 (8-bit log-domain log-probs, fp16 tail "
        "mass, samples with counts) or compact (8-bit, drops entries; no tail samples).",
    ),
    tail_samples: int | None = typer.Option(
        None,
        help=resolved(
            "topk+tail mode: also store N tail ids per position drawn from the teacher's tail "
            "(unbiased FKL; docs/QUALITY.md); with --top-k 0, N draws from the whole "
            "distribution (RS-KD); 0 = off",
            f"{DEFAULT_TAIL_SAMPLES} when --top-k is not given, else 0",
        ),
    ),
    observed_logprobs: bool = typer.Option(
        _build("observed_logprobs"),
        help="Also store the teacher's log-prob of each observed next token (~2 B/token; "
        "cross-tokenizer --xtok-loss alm needs it; inspect reports the teacher's perplexity).",
    ),
    overwrite: bool = typer.Option(
        _build("overwrite"), help="Replace a different cache already in --out."
    ),
    estimate: bool = typer.Option(
        False, help="Only estimate size, run time and top-k mass; write nothing."
    ),
    sample_sequences: int = typer.Option(
        ESTIMATE_SAMPLE_SEQUENCES, help="Sequences the --estimate runs the teacher on."
    ),
    storage_option: list[str] = _storage.storage_option(),
    staging_dir: str | None = typer.Option(
        None,
        help=resolved(
            "URL --out: local directory where shards are written before upload",
            f"{_storage.CACHE_HOME_TEXT}/staging",
        ),
    ),
    config_file: str | None = config_option(settings=(BuildConfig,)),
) -> None:
    """Run the teacher once over a dataset; store top-k log-probs + tail mass per position."""
    from kdcache.cache.build.pipeline import build_cache
    from kdcache.cache.storage.location import parse_storage_options

    if finalize:
        from kdcache.cache.build.pipeline import finalize_build

        if out is None:
            raise ConfigError("--finalize needs --out: the directory or URL the slices built into")
        summary = finalize_build(out, parse_storage_options(storage_option), staging_dir)
        if summary.status == "complete":
            typer.echo(f"cache is complete, nothing to do: {summary.out}")
        typer.echo(summary.line())
        return
    defaults: dict[str, int | float] = {
        "max_length": _build("max_length"),
        "holdout": _build("holdout"),
    }
    if teacher is None and data is None:
        defaults.update(DEMO_BUILD_SETTINGS)  # the same cache as `kdcache demo` builds
        teacher, data, out = _demo_defaults(out)
        typer.echo(f"Using the demo defaults: teacher {teacher}, data {data}, out {out}")
    elif teacher is None or data is None:
        raise ConfigError("pass both --teacher and --data (or neither, for the demo defaults)")
    elif out is None and not estimate:
        raise ConfigError("pass --out DIR: the cache directory to write")
    config = BuildConfig(
        teacher=teacher,
        data=data,
        out=out if out is not None else "kdcache-estimate-unused",
        split=split,
        data_config=data_config,
        text_field=text_field,
        messages_field=messages_field,
        top_k=int(defaults["top_k"]) if top_k is None and "top_k" in defaults else top_k,
        temperature=temperature,
        max_length=int(defaults["max_length"]) if max_length is None else max_length,
        pack=pack,
        limit=limit,
        holdout=float(defaults["holdout"]) if holdout is None else holdout,
        dtype=dtype,
        device=device,
        batch_tokens=batch_tokens,
        head_chunk_rows=head_chunk_rows,
        shard_tokens=shard_tokens,
        group_rows=group_rows,
        num_shards=num_shards,
        shard_index=shard_index,
        mode=mode,
        tail_samples=tail_samples,
        observed_logprobs=observed_logprobs,
        overwrite=overwrite,
        storage_options=parse_storage_options(storage_option),
        staging_dir=staging_dir,
    )
    if estimate:
        from kdcache.cache.build.estimate import estimate_build

        report = estimate_build(config, sample_sequences=sample_sequences)
        typer.echo(report.text())
        return
    rank, world_size = _distributed() if num_shards is None else (0, 1)
    try:
        summary = build_cache(config, rank=rank, world_size=world_size)
    finally:
        if world_size > 1:
            import torch.distributed as dist

            dist.destroy_process_group()
    if rank == 0 or num_shards is not None:
        if summary.status == "complete":
            typer.echo(f"cache is complete, nothing to do: {summary.out}")
        typer.echo(summary.line())

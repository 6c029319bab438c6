"""``kdcache eval``: held-out CE / perplexity, bits per byte, top-1 and the cache's KL estimates."""

from __future__ import annotations

from pathlib import Path

import typer

from kdcache.cli import _storage
from kdcache.cli._config import config_option
from kdcache.cli._defaults import field_default
from kdcache.cli._errors import handle_errors
from kdcache.trainer.config import EvalConfig


def _eval(name: str):
    return field_default(EvalConfig, name)


@handle_errors
def evaluate(
    cache: str = typer.Option(..., help="Cache directory or URL written by `kdcache build`."),
    student: list[str] = typer.Option(
        ..., help="Student checkpoint dir or hub id; repeat to compare several side by side."
    ),
    split: str = typer.Option(_eval("split"), help="Cache split to evaluate on."),
    json_path: Path | None = typer.Option(
        None, "--json", help="Write the results here (default: <student>/eval-<split>.json)."
    ),
    batch_size: int = typer.Option(_eval("batch_size"), help="Sequences per batch."),
    max_sequences: int | None = typer.Option(
        None, help="Evaluate the first N sequences only (default: all of the split)."
    ),
    chunk_size: int = typer.Option(_eval("chunk_size"), help="Positions per lm_head chunk."),
    device: str = typer.Option(_eval("device"), help="auto, cpu, cuda, cuda:N."),
    dtype: str = typer.Option(
        _eval("dtype"), help="auto (bf16 autocast on CUDA), float32, bfloat16."
    ),
    teacher: str | None = typer.Option(
        None,
        help="Also report KL to this teacher's full distribution, its own forward (default: none).",
    ),
    storage_option: list[str] = _storage.storage_option(),
    cache_dir: str | None = _storage.cache_dir_option(),
    cache_limit: str = _storage.cache_limit_option(),
    cross_tokenizer: bool = typer.Option(
        _eval("cross_tokenizer"),
        help="Allow students whose tokenizer differs from the teacher's: CE / perplexity on "
        "their own tokens and bits per byte (no KL to the teacher). Not needed for a checkpoint "
        "whose run.json (beside or above it) says the run was --cross-tokenizer.",
    ),
    config_file: str | None = config_option(
        aliases={"students": "student"}, settings=(EvalConfig,)
    ),
) -> None:
    """Evaluate students on the cache's held-out split and print them side by side."""
    from kdcache.trainer import evaluate as run_evaluation
    from kdcache.trainer import format_table

    config = EvalConfig(
        cache=cache,
        students=list(student),
        split=split,
        json_path=None if json_path is None else str(json_path),
        batch_size=batch_size,
        max_sequences=max_sequences,
        chunk_size=chunk_size,
        device=device,
        dtype=dtype,
        teacher=teacher,
        **_storage.reader_settings(storage_option, cache_dir, cache_limit),
        cross_tokenizer=cross_tokenizer,
    )
    report = run_evaluation(config)
    typer.echo(format_table(report))
    for path in report["json"]:
        typer.echo(f"wrote {path}")

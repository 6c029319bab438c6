"""``kdcache inspect CACHE``: what a cache holds and which k it needs (text, JSON or a PNG)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from kdcache.cli import _storage
from kdcache.cli._errors import handle_errors


def _inspect_default(name: str) -> Any:
    """A default of ``inspect_cache``, which defines the sampling settings."""
    import inspect as signatures

    from kdcache.cache.read.inspect import inspect_cache

    return signatures.signature(inspect_cache).parameters[name].default


@handle_errors
def inspect(
    cache: Annotated[str, typer.Argument(help="Cache directory or URL written by kdcache build.")],
    full: Annotated[
        bool, typer.Option("--full", help="Read every position instead of a sample (default: off).")
    ] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print machine-readable JSON only (default: off).")
    ] = False,
    plot: Annotated[
        Path | None,
        typer.Option("--plot", help="Also draw the statistics to this .png file (default: none)."),
    ] = None,
    sample: Annotated[
        int, typer.Option("--sample", help="Positions to sample when not --full.")
    ] = _inspect_default("sample_positions"),
    seed: Annotated[int, typer.Option("--seed", help="Seed of the sample.")] = _inspect_default(
        "seed"
    ),
    storage_option: list[str] = _storage.storage_option(),
    cache_dir: str | None = _storage.cache_dir_option(),
    cache_limit: str = _storage.cache_limit_option(),
) -> None:
    """Show the manifest and the top-k mass, entropy and kept mass at smaller k of a cache."""
    from kdcache.cache.errors import ConfigError
    from kdcache.cache.read.inspect import inspect_cache

    if plot is not None and plot.suffix.lower() != ".png":
        raise ConfigError(f"--plot must name a .png file, got '{plot}'")
    from kdcache.cache.read.reader import open_cache

    opened = open_cache(cache, **_storage.reader_settings(storage_option, cache_dir, cache_limit))
    report = inspect_cache(opened, sample_positions=sample, full=full, seed=seed)
    if plot is not None:
        from kdcache.cache.read.plot import plot_report

        plot_report(report, plot)
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
        return
    typer.echo(format_report(report))
    if plot is not None:
        typer.echo(f"\nplot written to {plot}")


def format_report(report: Any) -> str:
    """The human-readable report: manifest, splits, statistics tables."""
    lines = [f"cache {report.path}"]
    width = max(len(key) for key in report.summary)
    lines += [
        f"  {key:<{width}}  {f'{value:,.6g}' if isinstance(value, float) else _cell(value)}"
        for key, value in report.summary.items()
    ]

    lines += ["", "splits"]
    rows = [
        [s.name, s.shards, s.sequences, s.tokens, s.positions, s.bytes,
         f"{s.bytes / s.tokens:.2f}" if s.tokens else None]
        for s in report.splits
    ]  # fmt: skip
    header = ["split", "shards", "sequences", "tokens", "positions", "bytes", "B/token"]
    lines += _table(header, rows)
    teacher = getattr(report, "teacher", None)
    if teacher is not None:
        temperature = teacher["temperature"]
        at = "" if temperature in (None, 1, 1.0) else f" at the cache temperature {temperature}"
        lines += ["", (
            f"teacher on {teacher['split']} (observed next-token log-probs{at}): CE "
            f"{teacher['ce_nats']:.4f} nats/token ({teacher['bits_per_token']:.4f} bits), "
            f"perplexity {teacher['perplexity']:.2f} over {teacher['positions']:,} positions"
        )]  # fmt: skip

    sample, stats = report.sample, report.stats
    lines.append("")
    if stats is None and report.manifest.get("top_k") == 0:
        lines.append("statistics: a sampled cache (top-k 0) stores tail samples only, no top-k")
        return "\n".join(lines)
    if stats is None:
        lines.append("statistics: the cache stores no positions")
        return "\n".join(lines)
    if sample["full"]:
        lines.append(f"statistics over all {sample['sampled_positions']:,} positions")
    else:
        lines.append(
            f"statistics over {sample['sampled_positions']:,} sampled positions from "
            f"{sample['shards_read']} of {sample['shards_total']} shards (seed {sample['seed']}; "
            "--full for all)"
        )
    top_k = report.summary.get("top_k")
    header = ["", "mean", *(f"p{p}" for p in stats.topk_mass.percentiles)]
    named = [
        (f"top-{top_k} mass", stats.topk_mass),
        ("tail mass", stats.tail_mass),
        ("entropy (nats)", stats.entropy),
        ("entropy upper", stats.entropy_upper),
    ]
    lines += _table(header, [[name, d.mean, *d.percentiles.values()] for name, d in named])
    lines.append(
        "  entropy: over the top-k + tail bucket as one outcome (a lower bound); upper: the tail "
        "spread uniformly over the tokens not stored"
    )

    lines += ["", "mass kept by the top k' entries"]
    header = ["k'", "mean", *(f"p{p}" for p in stats.topk_mass.percentiles), "of top-k"]
    full_mean = stats.topk_mass.mean
    rows = [
        [k, d.mean, *d.percentiles.values(), d.mean / full_mean if full_mean else None]
        for k, d in stats.kept_mass.items()
    ]
    lines += _table(header, rows)
    for share in (0.95, 0.99):
        enough = [k for k, d in stats.kept_mass.items() if d.mean >= share * full_mean]
        lines.append(
            f"  k' = {enough[0]} keeps {share:.0%} of the stored top-{top_k} mass on average"
        )

    if len(report.split_stats) > 1:
        lines += ["", "per split"]
        header = ["split", "positions", f"top-{top_k} mass", "p50 mass", "entropy"]
        rows = [
            [name, s.num_positions, s.topk_mass.mean, s.topk_mass.percentiles[50], s.entropy.mean]
            for name, s in report.split_stats.items()
        ]
        lines += _table(header, rows)
    return "\n".join(lines)


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    cells = [header, *([_cell(value) for value in row] for row in rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    out = []
    for row in cells:
        first = row[0].ljust(widths[0])
        rest = [cell.rjust(width) for cell, width in zip(row[1:], widths[1:], strict=True)]
        out.append("  " + "  ".join([first, *rest]).rstrip())
    return out


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 100 else f"{value:,.1f}"
    return str(value)

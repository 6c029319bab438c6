"""``kdcache demo``: build, train AKL and CE students, evaluate and plot, on the embedded defaults."""

from __future__ import annotations

from pathlib import Path

import typer

from kdcache.cli._defaults import field_default, resolved
from kdcache.cli._errors import handle_errors
from kdcache.demo import DEFAULT_DEMO_DIR
from kdcache.demo.run import QUICK, DemoSettings


@handle_errors
def demo(
    out: Path = typer.Option(
        DEFAULT_DEMO_DIR, "--out", help="Directory for the demo's data, cache and runs."
    ),
    steps: int | None = typer.Option(
        None,
        "--steps",
        help=resolved(
            "Optimizer steps of each student",
            field_default(DemoSettings, "steps"),
            quick=QUICK.steps,
        ),
    ),
    quick: bool = typer.Option(
        False,
        "--quick",
        help="Tiny sizes (a few steps on a few KB): checks the path in seconds (default: off).",
    ),
    threads: int = typer.Option(
        2, "--threads", help="CPU threads for torch (the demo is sized for 2 cores)."
    ),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
) -> None:
    """Run the whole pipeline offline with the shipped teacher and print AKL vs CE students."""
    from kdcache.cache.errors import ConfigError

    if threads < 1:
        raise ConfigError(f"--threads must be >= 1, got {threads}")
    import torch

    from kdcache.demo.run import run_demo

    torch.set_num_threads(threads)
    run_demo(out, steps=steps, quick=quick, progress=progress, echo=typer.echo)

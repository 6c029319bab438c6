"""The ``kdcache`` command line: one thin typer command per module, each calling one library function.

Commands live in their own modules (``build.py``, ``verify.py``, ``train.py`` ...) and are registered
here. Heavy imports (torch, transformers) happen inside the commands so ``kdcache --help`` is fast.
"""

from __future__ import annotations

import typer

from kdcache.cli import build, demo, evaluate, inspect, train, transfer, verify

app = typer.Typer(
    name="kdcache",
    help="Run the teacher once (build), distill many students from the cache (train, eval).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

app.command("build")(build.build)
app.command("verify")(verify.verify)
app.command("inspect")(inspect.inspect)
app.command("train")(train.train)
app.command("eval")(evaluate.evaluate)
app.command("demo")(demo.demo)
app.command("push")(transfer.push)
app.command("pull")(transfer.pull)


def main() -> None:
    """Console-script entry point (``kdcache``)."""
    app()

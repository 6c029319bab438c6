"""kdcache command line (typer). ``kdcache.cli.app`` holds the application."""

__all__ = ["main"]


def main() -> None:
    """Run the ``kdcache`` command line."""
    from kdcache.cli.app import main as _main

    _main()

"""The `fededge` command line: thin Typer commands over the library."""

from fededge.cli.app import app

__all__ = ["app"]

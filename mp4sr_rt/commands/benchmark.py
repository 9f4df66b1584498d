"""`mp4sr-rt benchmark`."""

from __future__ import annotations

import typer


def benchmark() -> None:
    """Not available yet."""
    raise typer.Exit(3)

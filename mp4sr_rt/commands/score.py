"""`mp4sr-rt score`."""

from __future__ import annotations

import typer


def score() -> None:
    """Not available yet."""
    raise typer.Exit(3)

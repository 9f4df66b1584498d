"""`mp4sr-rt export`."""

from __future__ import annotations

import typer


def export() -> None:
    """Not available yet."""
    raise typer.Exit(3)

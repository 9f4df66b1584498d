"""`mp4sr-rt features`."""

from __future__ import annotations

import typer


def features() -> None:
    """Not available yet."""
    raise typer.Exit(3)

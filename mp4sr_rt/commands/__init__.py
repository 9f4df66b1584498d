"""The runtime's command (`score`) and the error handling every command of `mp4sr-rt` shares.

The training and export commands live in train/commands.py and export/commands.py; mp4sr_cli
assembles all of them. Heavy imports (onnxruntime) happen inside the command."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import TypeVar

import typer

from mp4sr_rt.errors import UserError

F = TypeVar("F", bound=Callable)


def user_errors(fn: F) -> F:
    """Turn UserError (and Ctrl-C) into one line on stderr and a non-zero exit, no traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]

"""`mp4sr-rt train`: pre-train and fine-tune MP4SR (the built-in demo data by default)."""

from __future__ import annotations

from pathlib import Path

import typer

from mp4sr_rt.commands import user_errors


@user_errors
def train(
    data: Path | None = typer.Option(
        None, help="Interactions file or dataset directory (generic, RecBole atomic or Amazon 2018). "
        "Default: the built-in demo dataset."
    ),
    features: Path | None = typer.Option(None, help="Features file (safetensors) for the items of --data."),
    out: Path = typer.Option(Path("mp4sr-out"), help="Run directory."),
    preset: str = typer.Option("demo", help="Config preset: demo, tiny or paper."),
    stage: str = typer.Option("all", help="all (pre-train then fine-tune), pretrain or finetune."),
    epochs: int | None = typer.Option(None, min=1, help="Override the epochs of every selected stage."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    resume: bool = typer.Option(False, help="Continue a killed run from its last completed epoch."),
    overwrite: bool = typer.Option(False, help="Discard an existing run in --out and start again."),
    seed: int | None = typer.Option(None, help="Random seed (default: the preset's)."),
    quiet: bool = typer.Option(False, help="No progress bars or per-epoch lines."),
) -> None:
    """Train on --data (default: the demo dataset) into --out; prints a summary, writes metrics.json."""
    from train import config as config_lib
    from train.run import train as run_train

    cfg = config_lib.preset(preset)
    overrides = {}
    if epochs is not None:
        overrides.update({"train.pretrain.epochs": epochs, "train.finetune.epochs": epochs})
    if seed is not None:
        overrides["train.seed"] = seed
    cfg = config_lib.replace(cfg, overrides)
    run_train(cfg, data, features, out, stage, device, resume, overwrite, progress=not quiet)

"""`mp4sr-rt benchmark`: baselines, ablations and cold-start evaluation; writes results.md and results.png."""

from __future__ import annotations

from pathlib import Path

import typer

from mp4sr_rt.commands import user_errors


@user_errors
def benchmark(
    ctx: typer.Context,
    data: Path | None = typer.Option(None, help="Dataset as for `train`. Default: the built-in demo dataset."),
    features: Path | None = typer.Option(
        None, help="Features file (safetensors) for the items of --data. Default: extracted as `train` does."
    ),
    models: str = typer.Option(
        "all", help="Comma-separated models, or all: mp4sr, popularity, sasrec, sasrec-features, "
        "mp4sr-no-pretrain, no-mixup, no-cmcl, no-nip, text-only, image-only, reference-quirks."
    ),
    seeds: int = typer.Option(3, min=1, help="Number of seeds (0, 1, ...) each model runs with."),
    preset: str = typer.Option("demo", help="Config preset: demo, tiny or paper."),
    epochs: int | None = typer.Option(None, min=1, help="Override the epochs of both stages (a shortened schedule)."),
    settings: str = typer.Option("all", help="Comma-separated settings, or all: normal, cold-start."),
    cold_fraction: float = typer.Option(0.1, help="Share of the items held out of training in the cold-start setting."),
    out: Path = typer.Option(Path("mp4sr-bench"), help="Results directory; finished runs in it are not repeated."),
    report: Path | None = typer.Option(None, help="Where to write results.md (results.png beside it). "
                                       "Default: <out>/results.md."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    threads: int | None = typer.Option(
        None, min=1, help="CPU threads for torch (1 is often fastest on a CPU shared with other jobs)."
    ),
    quiet: bool = typer.Option(False, help="No progress bars or per-epoch lines (one line per run remains)."),
) -> None:
    """Train every selected model in the normal and the cold-start setting over --seeds seeds; report
    mean and spread per model (results.md: a table per setting; results.png: bar chart with error bars)."""
    import torch

    from train import config as config_lib
    from train.benchmark import BenchmarkOptions, run_benchmark, select_models, select_settings, write_report

    if threads is not None:
        torch.set_num_threads(threads)
    cfg = config_lib.preset(preset)
    if epochs is not None:
        cfg = config_lib.replace(cfg, {"train.pretrain.epochs": epochs, "train.finetune.epochs": epochs})
    options = BenchmarkOptions(
        cfg=cfg, seeds=tuple(range(seeds)), out=out, models=select_models(models), data=data, features=features,
        cold_fraction=cold_fraction, settings=select_settings(settings), device=device, progress=not quiet,
    )
    result = run_benchmark(options)
    report = report or out / "results.md"
    write_report(result, options, report, command_line(ctx))
    print(report)


def command_line(ctx: typer.Context) -> str:
    """The options given that differ from their defaults, as a command to rerun (for the report)."""
    words = ["mp4sr-rt", "benchmark"]
    for param in ctx.command.params:
        value = ctx.params[param.name]
        if value != param.default:
            words += [param.opts[0]] if value is True else [param.opts[0], str(value)]
    return " ".join(words)

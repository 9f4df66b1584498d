"""The training commands of `mp4sr-rt` (assembled by mp4sr_cli): `train`, `features`, `benchmark`.

Each imports torch and the training stack inside the command, so `mp4sr-rt --help` starts fast."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mp4sr_rt.commands import user_errors
from mp4sr_rt.errors import UserError


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
    set_: list[str] | None = typer.Option(
        None, "--set", help="Config override KEY=VALUE, VALUE as JSON (repeatable), e.g. "
                            "--set train.softmax.kind='\"sampled\"' --set train.finetune.lr=3e-4."),
    nproc: int = typer.Option(1, min=1, help="Processes on this machine (torchrun, DistributedDataParallel; "
                                             "gloo on CPU, NCCL on GPU). For several machines run torchrun "
                                             "yourself: README 'Training across processes and machines'."),
) -> None:
    """Train on --data (default: the demo dataset) into --out; prints a summary, writes metrics.json."""
    import json
    import os
    import sys

    from mp4sr_train import config as config_lib
    from mp4sr_train.run import train as run_train

    if nproc > 1 and "WORLD_SIZE" not in os.environ:
        from mp4sr_train.distributed import launch

        argv, skip = [], False
        for arg in sys.argv[1:]:
            if skip or arg.startswith("--nproc"):
                skip = arg == "--nproc" and not skip
                continue
            argv.append(arg)
        raise typer.Exit(launch(nproc, argv))
    cfg = config_lib.preset(preset)
    overrides = {}
    for item in set_ or ():
        key, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"--set {item!r}: expected KEY=VALUE")
        try:
            overrides[key] = json.loads(value)
        except ValueError:
            overrides[key] = value  # a bare word: a string

    if epochs is not None:
        overrides.update({"train.pretrain.epochs": epochs, "train.finetune.epochs": epochs})
    if seed is not None:
        overrides["train.seed"] = seed
    cfg = config_lib.replace(cfg, overrides)
    run_train(cfg, data, features, out, stage, device, resume, overwrite, progress=not quiet)


@user_errors
def features(
    data: Annotated[Path | None, typer.Option(help=(
        "Dataset with item text/images (items.jsonl, RecBole .item or Amazon meta). "
        "Default: the built-in demo dataset."))] = None,
    out: Annotated[Path | None, typer.Option(help=(
        "Features file to write. Default: <cache dir>/extracted/<data dir name>-<hash of its path>-<hash of "
        "the settings>.safetensors: one file per dataset and settings, never inside the data directory."))] = None,
    text_encoder: Annotated[str | None, typer.Option(help=(
        "Hugging Face checkpoint directory, or a name already in the local HF cache. "
        "Default: the bundled all-MiniLM-L6-v2 (384-d)."))] = None,
    text_pooling: Annotated[str, typer.Option(help=(
        "auto (the checkpoint's convention: mean for sentence-transformers, else CLS), "
        "mean or cls."))] = "auto",
    clip_model: Annotated[str, typer.Option(help=(
        "open_clip config name, or a JSON model config file."))] = "ViT-B-32",
    clip_weights: Annotated[Path | None, typer.Option(help=(
        "Local CLIP weights (.safetensors/.bin/.pt). Without them the tower is randomly "
        "initialised, a warning says so and the file records clip_weights: null."))] = None,
    image_tokens: Annotated[int, typer.Option(help=(
        "Words per image pseudo-sentence (top-N by CLIP similarity)."))] = 15,
    batch_size: Annotated[int, typer.Option(help="Sentences or images per batch.")] = 64,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    cache_dir: Annotated[Path | None, typer.Option(help=(
        "Vector cache shared by reruns. "
        "Default: $MP4SR_CACHE_DIR or ~/.cache/mp4sr-rt/features."))] = None,
    dtype: Annotated[str, typer.Option(help=(
        "float32, or float16: half the file, for catalogues whose features do not fit in memory "
        "(training maps the file and reads the rows a step touches)."))] = "float32",
    quiet: Annotated[bool, typer.Option(help="No progress bars.")] = False,
) -> None:
    """Embed item sentences and CLIP image words (offline, cached); prints the path on stdout."""
    from mp4sr_train.data import default_demo_dir, generate_demo, read_dataset
    from mp4sr_train.features.extract import default_features_path, extract_features

    if data is None:
        data = generate_demo(default_demo_dir())
    raw = read_dataset(data)
    settings = {
        "text_encoder": text_encoder, "text_pooling": text_pooling, "clip_model": clip_model,
        "clip_weights": clip_weights, "image_tokens": image_tokens,
    }
    out = out or default_features_path(Path(data).expanduser(), **settings, cache_dir=cache_dir)
    path = extract_features(raw, out, batch_size=batch_size, device=device, cache_dir=cache_dir,
                            progress=not quiet, dtype=dtype, **settings)
    print(path)


@user_errors
def benchmark(
    ctx: typer.Context,
    data: Path | None = typer.Option(None, help="Dataset as for `train`. Default: the built-in demo dataset."),
    features: Path | None = typer.Option(
        None, help="Features file (safetensors) for the items of --data. Default: extracted as `train` does."
    ),
    models: str = typer.Option(
        "all", help="Comma-separated models, or all. The report's: mp4sr, popularity, sasrec, sasrec-features, "
        "mp4sr-no-pretrain; the ablations are named in train/benchmark.py MODELS, and an unknown name lists "
        "every choice."
    ),
    seeds: int = typer.Option(3, min=1, help="Number of seeds (0, 1, ...) each model runs with."),
    first_seed: int = typer.Option(
        0, min=0, help="The first seed: --first-seed 1 --seeds 2 runs seeds 1 and 2 (for example beside another "
        "process running seed 0 into the same --out; a later run over all the seeds reuses both)."
    ),
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
    from mp4sr_train import config as config_lib
    from mp4sr_train.benchmark import BenchmarkOptions, run_benchmark, select_models, select_settings
    from mp4sr_train.report import write_report

    if threads is not None:
        torch.set_num_threads(threads)
    cfg = config_lib.preset(preset)
    if epochs is not None:
        cfg = config_lib.replace(cfg, {"train.pretrain.epochs": epochs, "train.finetune.epochs": epochs})
    options = BenchmarkOptions(
        cfg=cfg, seeds=tuple(range(first_seed, first_seed + seeds)), out=out, models=select_models(models),
        data=data, features=features, cold_fraction=cold_fraction, settings=select_settings(settings), device=device,
        progress=not quiet,
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

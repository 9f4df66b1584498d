"""`mp4sr-rt features`: item text and images -> the features file that `mp4sr-rt train` reads."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mp4sr_rt.commands import user_errors


@user_errors
def features(
    data: Annotated[Path | None, typer.Option(help=(
        "Dataset with item text/images (items.jsonl, RecBole .item or Amazon meta). "
        "Default: the built-in demo dataset."))] = None,
    out: Annotated[Path | None, typer.Option(help=(
        "Features file to write. Default: <data dir>/features-<hash of the settings>.safetensors "
        "(one file per settings)."))] = None,
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
    quiet: Annotated[bool, typer.Option(help="No progress bars.")] = False,
) -> None:
    """Embed item sentences and CLIP image words (offline, cached); prints the path on stdout."""
    from train.data import default_demo_dir, generate_demo, read_dataset
    from train.features.extract import default_features_path, extract_features

    if data is None:
        data = generate_demo(default_demo_dir())
    raw = read_dataset(data)
    settings = {
        "text_encoder": text_encoder, "text_pooling": text_pooling, "clip_model": clip_model,
        "clip_weights": clip_weights, "image_tokens": image_tokens,
    }
    out = out or default_features_path(Path(data).expanduser(), **settings)
    path = extract_features(raw, out, batch_size=batch_size, device=device, cache_dir=cache_dir,
                            progress=not quiet, **settings)
    print(path)

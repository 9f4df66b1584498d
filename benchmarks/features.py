"""Feature extraction throughput: items/s of the text path and of the image path.

    .venv/bin/python benchmarks/features.py                      # 256 demo items, batch 64
    .venv/bin/python benchmarks/features.py --items 512 --device cuda --clip-model ViT-B-16

Runs the real extraction (default: bundled all-MiniLM-L6-v2 and a randomly initialised
ViT-B-32, whose speed equals a trained one) on the first N items of the demo catalogue with an
empty cache, so every vector is computed. The vocabulary's CLIP text vectors are computed once
per dataset and timed apart.

With --artifacts (default: mp4sr-out/artifacts, when it holds the encoders), the same items then
go through the runtime's `Scorer.add_items` (onnxruntime, no torch): text only, then text and
images, so both paths are timed side by side on the same machine and items.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from mp4sr_train.data import default_demo_dir, generate_demo, read_dataset
from mp4sr_train.data.types import RawData
from mp4sr_train.features.cache import FeatureCache
from mp4sr_train.features.extract import extract
from mp4sr_train.features.image import Clip
from mp4sr_train.features.text import TextEncoder
from mp4sr_train.loop import resolve_device


def first_items(raw: RawData, n: int) -> RawData:
    keep = sorted(raw.item_info)[:n]
    ids = np.array(keep)
    return RawData.from_ids(users=ids, items=ids, timestamps=np.zeros(len(ids)),
                   item_info={item: raw.item_info[item] for item in keep})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--text-encoder", default=None)
    parser.add_argument("--clip-model", default="ViT-B-32")
    parser.add_argument("--artifacts", type=Path, default=Path("mp4sr-out/artifacts"),
                        help="exported artifacts with encoders, for the runtime's add_items")
    args = parser.parse_args()

    device = resolve_device(args.device)
    raw = first_items(read_dataset(generate_demo(default_demo_dir())), args.items)
    text = TextEncoder.load(args.text_encoder, device)
    clip = Clip.load(args.clip_model, None, device)
    with tempfile.TemporaryDirectory() as tmp, FeatureCache(tmp) as cache:
        r = extract(raw, Path(tmp) / "features.safetensors", text, clip, cache=cache,
                    batch_size=args.batch_size, progress=False)
    im = r.images
    print(f"device {device} ({torch.get_num_threads()} CPU threads) | {text.name} | CLIP "
          f"{clip.name} | {r.items} demo items, batch {args.batch_size}")
    print(f"text path:  {r.text_items} items, {r.sentences_computed} distinct sentences in "
          f"{r.text_seconds:.1f} s: {r.text_items / r.text_seconds:.1f} items/s "
          f"({r.sentences_computed / r.text_seconds:.0f} sentences/s)")
    print(f"image path: {r.image_items} items, {im.computed} images in {r.image_seconds:.1f} s: "
          f"{r.image_items / r.image_seconds:.1f} items/s")
    print(f"vocabulary: {im.vocabulary} words in {im.vocabulary_seconds:.1f} s: "
          f"{im.vocabulary / im.vocabulary_seconds:.1f} words/s (once per dataset)")
    if (args.artifacts / "text_encoder.onnx").is_file():
        runtime_add_items(args.artifacts, raw, r)
    else:
        print(f"runtime: skipped, {args.artifacts} holds no exported encoders")


def runtime_add_items(artifacts: Path, raw: RawData, r) -> None:
    """The same items through Scorer.add_items: text only, then text and images; rates per item
    with text (with images), as the extraction's."""
    from mp4sr_rt.scorer import Scorer

    scorer = Scorer(artifacts, backend="auto")
    items = sorted(raw.item_info)
    texts = [list(raw.item_info[i].sentences) for i in items]
    images = [list(raw.item_info[i].images) for i in items]
    scorer.add_items(["warm-up"], texts=texts[:1], images=images[:1])  # opens the sessions
    start = time.perf_counter()
    scorer.add_items([f"text-{i}" for i in items], texts=texts)
    text_seconds = time.perf_counter() - start
    start = time.perf_counter()
    scorer.add_items([f"both-{i}" for i in items], texts=texts, images=images)
    both_seconds = time.perf_counter() - start
    text_rate = r.text_items / text_seconds
    image_rate = r.image_items / max(both_seconds - text_seconds, 1e-9)
    print(f"runtime add_items ({scorer.backend.description}): text path {text_rate:.1f} items/s "
          f"({text_rate * r.text_seconds / r.text_items:.2f}x the extraction), image path "
          f"{image_rate:.1f} items/s ({image_rate * r.image_seconds / r.image_items:.2f}x), "
          f"{len(items)} items with both in {both_seconds:.1f} s")


if __name__ == "__main__":
    main()

"""Feature extraction throughput: items/s of the text path and of the image path.

    .venv/bin/python benchmarks/features.py                      # 256 demo items, batch 64
    .venv/bin/python benchmarks/features.py --items 512 --device cuda --clip-model ViT-B-16

Runs the real extraction (default: bundled all-MiniLM-L6-v2 and a randomly initialised
ViT-B-32, whose speed equals a trained one) on the first N items of the demo catalogue with an
empty cache, so every vector is computed. The vocabulary's CLIP text vectors are computed once
per dataset and timed apart.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

from train.data import default_demo_dir, generate_demo, read_dataset
from train.data.types import RawData
from train.features.cache import FeatureCache
from train.features.extract import extract
from train.features.image import Clip
from train.features.text import TextEncoder
from train.loop import resolve_device


def first_items(raw: RawData, n: int) -> RawData:
    keep = sorted(raw.item_info)[:n]
    ids = np.array(keep)
    return RawData(users=ids, items=ids, timestamps=np.zeros(len(ids)),
                   item_info={item: raw.item_info[item] for item in keep})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--text-encoder", default=None)
    parser.add_argument("--clip-model", default="ViT-B-32")
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


if __name__ == "__main__":
    main()

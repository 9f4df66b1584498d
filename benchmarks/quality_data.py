"""The data configurations the quality report checks beside the default demo, so that no model
default is fitted to one synthetic world.

    python benchmarks/quality_data.py OUT      # writes OUT/<name>/data/ and OUT/<name>/features.safetensors

Configurations (each a dataset directory and a features file for `mp4sr-rt benchmark --data --features`):
    small-latent  the demo generator with another seed and size (seed 1, 1,200 items, 2,000 users),
                  features drawn straight from the latent topics (64-d, no neural encoder): another
                  world and another feature space
    text-only     the default demo's interactions and texts with every image removed (real
                  all-MiniLM-L6-v2 text features): a catalogue with one modality, as many real ones are
Prints one line per configuration: its name, data directory and features file.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from mp4sr_train.data import default_demo_dir, demo_features, generate_demo, read_dataset
from mp4sr_train.features.extract import extract_features


def small_latent(out: Path) -> tuple[Path, Path]:
    data = generate_demo(out / "data", n_items=1200, n_users=2000, seed=1)
    features = out / "features.safetensors"
    if not features.is_file():
        demo_features(data, features, dim=64, seed=1)
    return data, features


def text_only(out: Path) -> tuple[Path, Path]:
    demo = generate_demo(default_demo_dir())
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(demo / "interactions.csv", data / "interactions.csv")
    with open(demo / "items.jsonl", encoding="utf-8") as src, open(data / "items.jsonl", "w", encoding="utf-8") as dst:
        for line in src:
            record = json.loads(line)
            record.pop("images", None)
            dst.write(json.dumps(record) + "\n")
    features = out / "features.safetensors"
    if not features.is_file():
        extract_features(read_dataset(data), features, progress=False)
    return data, features


CONFIGS = {"small-latent": small_latent, "text-only": text_only}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated: " + ", ".join(CONFIGS))
    args = parser.parse_args()
    for name in args.configs.split(","):
        data, features = CONFIGS[name](args.out / name)
        print(name, data, features)


if __name__ == "__main__":
    main()

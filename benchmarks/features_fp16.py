"""What float16 features cost in accuracy: the rounding error of every slot vector, and a trained
run's test metrics with its features read from a float32 file and from its float16 copy (memory-mapped,
as the large-catalogue path reads it), the model unchanged.

    python benchmarks/features_fp16.py mp4sr-out [--features FILE] [--out docs/bench/features-fp16.jsonl]

RUN: a finished `mp4sr-rt train` directory (default features: the file it was trained on). Prints
JSON lines.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from mp4sr_train.checkpoint import load_checkpoint
from mp4sr_train.data import load_or_preprocess
from mp4sr_train.features.store import read_features, save_features
from mp4sr_train.loop import evaluate
from mp4sr_train.run import load_item_features


def rounding(full: np.ndarray, half: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    x, y = full[mask].astype(np.float64), half[mask].astype(np.float64)
    norms = np.maximum(np.linalg.norm(x, axis=-1), 1e-30)
    relative = np.linalg.norm(x - y, axis=-1) / norms
    return {"relative_error_max": float(relative.max()), "relative_error_mean": float(relative.mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("--features", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    ckpt = load_checkpoint(args.run / "checkpoint")
    source = args.features or Path(ckpt.meta["features"]["path"])
    cfg = ckpt.cfg
    data, _ = load_or_preprocess(ckpt.meta["data"], args.run / "cache", cfg.data.max_len, cfg.data.min_interactions)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        half_path = Path(tmp) / "features-fp16.safetensors"
        full = read_features(source)
        save_features(half_path, full, dtype="float16")
        half = read_features(half_path)
        for name in ("text", "image"):
            mask = getattr(full, f"{name}_mask").astype(bool)
            if mask.any():
                error = rounding(getattr(full, f"{name}_feats"), getattr(half, f"{name}_feats"), mask)
                rows.append({"modality": name, **error})
        rows.append({"file_bytes_float32": source.stat().st_size, "file_bytes_float16": half_path.stat().st_size})
        for label, path, mapped in (("float32", source, False), ("float16, mapped", half_path, True)):
            feats, _ = load_item_features(path, data, torch.device("cpu"), mapped=mapped)
            test = evaluate(ckpt.model, feats, data.test, cfg.train.eval_batch_size, ckpt.id_emb)
            rows.append({"features": label, **{k: test[k] for k in ("recall@10", "recall@20", "ndcg@10", "ndcg@20")}})
    text = "".join(json.dumps(r) + "\n" for r in rows)
    print(text, end="")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()

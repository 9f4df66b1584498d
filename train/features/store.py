"""The features file: per-item text and image feature slots (SPEC section 1) in safetensors.

Tensors: text_feats float [N, S, F], text_mask uint8 [N, S], image_feats float [N, V, F],
image_mask uint8 [N, V]. Metadata (strings): schema, item_ids (JSON list in row order), encoder,
dim, clip_weights (JSON: null when the CLIP tower was randomly initialised). An item whose mask row
is all zero lacks that modality.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mp4sr_rt.errors import UserError
from mp4sr_rt.io import atomic_write

SCHEMA = "mp4sr-features/1"
TENSORS = ("text_feats", "text_mask", "image_feats", "image_mask")


@dataclass(frozen=True)
class FeatureArrays:
    item_ids: tuple[str, ...]
    text_feats: np.ndarray
    text_mask: np.ndarray
    image_feats: np.ndarray
    image_mask: np.ndarray
    meta: dict[str, str]

    @property
    def dim(self) -> int:
        return int(self.text_feats.shape[-1])


def save_features(path: str | Path, arrays: FeatureArrays) -> None:
    from safetensors.numpy import save_file

    tensors = {
        "text_feats": np.ascontiguousarray(arrays.text_feats, dtype=np.float32),
        "text_mask": np.ascontiguousarray(arrays.text_mask, dtype=np.uint8),
        "image_feats": np.ascontiguousarray(arrays.image_feats, dtype=np.float32),
        "image_mask": np.ascontiguousarray(arrays.image_mask, dtype=np.uint8),
    }
    meta = {**arrays.meta, "schema": SCHEMA, "item_ids": json.dumps(list(arrays.item_ids))}
    meta.setdefault("dim", str(arrays.dim))
    atomic_write(path, lambda p: save_file(tensors, str(p), metadata=meta))


def read_features(path: str | Path) -> FeatureArrays:
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise UserError(f"features file not found: {path}")
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = dict(f.metadata() or {})
            missing = [k for k in TENSORS if k not in f.keys()]
            if missing:
                raise UserError(f"features file {path}: missing tensor(s) {', '.join(missing)}")
            tensors = {k: f.get_tensor(k) for k in TENSORS}
    except UserError:
        raise
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise UserError(f"features file {path}: unreadable ({e})") from None
    if meta.get("schema") != SCHEMA:
        raise UserError(f"features file {path}: schema {meta.get('schema')!r}, expected {SCHEMA!r}")
    try:
        item_ids = tuple(str(i) for i in json.loads(meta["item_ids"]))
    except (KeyError, ValueError):
        raise UserError(f"features file {path}: metadata item_ids missing or not JSON") from None
    n = len(item_ids)
    for k, t in tensors.items():
        if t.shape[0] != n:
            raise UserError(f"features file {path}: {k} has {t.shape[0]} rows for {n} item ids")
    return FeatureArrays(item_ids, meta=meta, **tensors)


def align(arrays: FeatureArrays, item_ids: Sequence[str], source: str) -> dict[str, np.ndarray]:
    """Rows in the dataset's item order, with a zero padding row 0: {name: [N + 1, ...]}."""
    row = {item: i for i, item in enumerate(arrays.item_ids)}
    missing = [item for item in item_ids if item not in row]
    if missing:
        raise UserError(
            f"features file {source} does not match the data: {len(missing)} item(s) have no "
            f"features, e.g. {', '.join(map(repr, missing[:5]))}"
        )
    index = np.array([0] + [row[item] + 1 for item in item_ids])
    out = {}
    for name in TENSORS:
        t = getattr(arrays, name)
        padded = np.concatenate([np.zeros_like(t[:1]), t])
        out[name] = padded[index]
    return out

"""Checkpoints: safetensors tensors plus a JSON sidecar; the model is rebuilt from the sidecar.

    checkpoint/model.safetensors   M2SE weights ("m2se.*") and, after fine-tuning, "id_emb.*"
    checkpoint/items.safetensors   "z" (2, N + 1, d): feature-only item vectors in eval mode
    checkpoint/config.json         schema, full config, item-id vocabulary, training counts
Nothing is pickled.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from mp4sr_train import config as config_lib
from mp4sr_train.model import M2SE, ItemIdEmbedding
from safetensors.torch import load_file, save_file

from mp4sr_rt.errors import UserError
from mp4sr_rt.io import atomic_write, write_json_atomic
from mp4sr_rt.manifest import file_sha256

SCHEMA = "mp4sr-checkpoint/1"


@dataclass
class Checkpoint:
    cfg: config_lib.Config
    model: M2SE
    id_emb: ItemIdEmbedding | None
    z: torch.Tensor  # (2, N + 1, d)
    meta: dict[str, Any]  # the sidecar: item_ids, train_counts, stage, features, ...

    @property
    def item_ids(self) -> list[str]:
        return self.meta["item_ids"]


def state_tensors(model: M2SE, id_emb: ItemIdEmbedding | None) -> dict[str, torch.Tensor]:
    tensors = {f"m2se.{k}": v for k, v in model.state_dict().items()}
    if id_emb is not None:
        tensors.update({f"id_emb.{k}": v for k, v in id_emb.state_dict().items()})
    return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}


def load_state(tensors: dict[str, torch.Tensor], model: M2SE, id_emb: ItemIdEmbedding | None) -> None:
    model.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("m2se.")})
    if id_emb is not None:
        id_emb.load_state_dict({k[7:]: v for k, v in tensors.items() if k.startswith("id_emb.")})


def save_checkpoint(directory: Path, ckpt: Checkpoint) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    tensors = state_tensors(ckpt.model, ckpt.id_emb)
    atomic_write(directory / "model.safetensors", lambda p: save_file(tensors, str(p)))
    z = {"z": ckpt.z.detach().cpu().contiguous()}
    atomic_write(directory / "items.safetensors", lambda p: save_file(z, str(p)))
    sidecar = {  # the computed keys last: a loaded checkpoint's meta holds stale copies of them
        **ckpt.meta,
        "schema": SCHEMA,
        "config": config_lib.to_dict(ckpt.cfg),
        "feat_dim": ckpt.model.feat_dim,
        "num_items": len(ckpt.item_ids),
        "has_id_embedding": ckpt.id_emb is not None,
        "model_sha256": file_sha256(directory / "model.safetensors"),
    }
    write_json_atomic(directory / "config.json", sidecar)


def _check_sidecar(meta: Any, path: Path) -> None:
    """The sidecar's keys, types and sizes, so that a damaged one is named, not a traceback."""
    def fail(message: str) -> None:
        raise UserError(f"checkpoint {path}: {message}")

    if not isinstance(meta, dict):
        fail(f"expected a JSON object, got {type(meta).__name__}")
    if meta.get("schema") != SCHEMA:
        fail(f"schema {meta.get('schema')!r}, expected {SCHEMA!r}")
    types = {"config": dict, "feat_dim": int, "num_items": int, "has_id_embedding": bool, "item_ids": list}
    for key, kind in types.items():
        value = meta.get(key)
        if not isinstance(value, kind) or (kind is int and (isinstance(value, bool) or value < 1)):
            fail(f"{key}: expected {'a positive integer' if kind is int else kind.__name__}, got {value!r:.60}")
    ids, n = meta["item_ids"], meta["num_items"]
    if len(ids) != n or any(not isinstance(i, (str, int)) or isinstance(i, bool) for i in ids) or \
            len({str(i) for i in ids}) != n:
        fail(f"item_ids: expected {n} distinct strings or integers")
    counts = meta.get("train_counts")
    if counts is not None and (not isinstance(counts, list) or len(counts) != n + 1 or any(
            not isinstance(c, (int, float)) or isinstance(c, bool) or not c >= 0 for c in counts)):
        fail(f"train_counts: expected {n + 1} counts >= 0")
    if meta.get("stage", "finetune") not in ("pretrain", "finetune"):
        fail(f"stage: expected pretrain or finetune, got {meta.get('stage')!r}")
    if not isinstance(meta.get("features", {}), dict):
        fail("features: expected an object")


def load_checkpoint(directory: str | Path, device: str = "cpu") -> Checkpoint:
    directory = Path(directory)
    sidecar_path = directory / "config.json"
    if not sidecar_path.is_file():
        raise UserError(f"no checkpoint at {directory} (missing {sidecar_path.name}); run `mp4sr-rt train` first")
    try:
        meta = json.loads(sidecar_path.read_text())
    except ValueError as e:
        raise UserError(f"checkpoint sidecar {sidecar_path} is not valid JSON: {e}") from None
    _check_sidecar(meta, sidecar_path)
    try:
        cfg = config_lib.from_dict(config_lib.upgrade(meta["config"]))  # settings added since: as it trained
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise UserError(f"checkpoint {sidecar_path}: config: {e}") from None
    model = M2SE(cfg.model, meta["feat_dim"])
    try:
        tensors = load_file(str(directory / "model.safetensors"), device=device)
        z = load_file(str(directory / "items.safetensors"), device=device)["z"]
    except Exception as e:
        raise UserError(f"checkpoint {directory}: unreadable tensors ({e})") from None
    id_emb = None
    if meta["has_id_embedding"]:
        id_emb = ItemIdEmbedding.create(cfg.train.ids, meta["num_items"], cfg.model.d, tensors["id_emb.known"],
                                        len(cfg.model.modalities))
    load_state(tensors, model, id_emb)
    model.to(device).eval()
    if id_emb is not None:
        id_emb.to(device).eval()
    return Checkpoint(cfg, model, id_emb, z, meta)


"""`mp4sr-rt train`: data -> features -> pre-training -> fine-tuning -> checkpoint + metrics."""

from __future__ import annotations

import hashlib
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from mp4sr_train import config as config_lib
from mp4sr_train.checkpoint import Checkpoint, load_state, save_checkpoint
from mp4sr_train.config import Config
from mp4sr_train.data import default_demo_dir, generate_demo, load_or_preprocess
from mp4sr_train.data.types import SplitData
from mp4sr_train.distributed import World
from mp4sr_train.features.store import RowReader, align, map_features, read_features, rows_of
from mp4sr_train.loop import (
    EVAL_CHUNK,
    StageResult,
    StageRunner,
    check_or_write_run,
    encode_items_chunked,
    evaluate,
    evaluate_popularity,
    resolve_device,
    run_fingerprint,
)
from mp4sr_train.model import M2SE, ItemFeatures, ItemIdEmbedding
from safetensors.torch import load_file

from mp4sr_rt.errors import UserError
from mp4sr_rt.io import atomic_write, write_json_atomic

STAGES = ("all", "pretrain", "finetune")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _silent(msg: str) -> None:
    """The log of ranks other than 0 under torchrun: rank 0 speaks for all."""


def resolve_data(data: Path | None) -> Path:
    """The dataset path; None: the built-in demo dataset (written on first use)."""
    data = generate_demo(default_demo_dir()) if data is None else Path(data).expanduser()
    if not data.exists():
        raise UserError(f"data not found: {data}")
    return data


def resolve_features(data: Path, features: Path | None, device: str = "auto", progress: bool = True) -> Path:
    """The features file; None: extract them from the items' text and images (the file
    `mp4sr-rt features --data DATA` writes; its vector cache makes a rerun cheap)."""
    if features is None:
        from mp4sr_train.data import read_dataset
        from mp4sr_train.features.extract import default_features_path, extract_features

        raw = read_dataset(data)
        if not any(info.sentences or info.images for info in raw.item_info.values()):
            raise UserError(f"--features is required: {data} has no item text or images to extract features from")
        features = extract_features(raw, default_features_path(data), device=device, progress=progress)
    return Path(features)


def resolve_inputs(data: Path | None, features: Path | None, device: str = "auto",
                   progress: bool = True) -> tuple[Path, Path]:
    """`resolve_data`, then `resolve_features` for it."""
    data = resolve_data(data)
    return data, resolve_features(data, features, device, progress)


def features_digest(feats: ItemFeatures, chunk: int = 8192) -> str:
    """SHA-256 of the feature values (float32, in the dataset's item order), read `chunk` items at a
    time: a features file written again with the same values need not have the same bytes
    (safetensors' metadata order varies), and a run must still be recognised, mapped or not."""
    digest = hashlib.sha256()
    n = len(feats)
    for name in ("text", "text_mask", "image", "image_mask"):
        for start in range(0, n, chunk):
            part = feats.take(torch.arange(start, min(start + chunk, n), device=feats.device))  # float32
            digest.update(getattr(part, name).cpu().numpy().tobytes())
    return digest.hexdigest()


def load_item_features(path: Path, data: SplitData, device: torch.device,
                       mapped: bool = False) -> tuple[ItemFeatures, dict]:
    """The features of `data`'s items: in memory as float32, or `mapped` (memory maps of the file,
    float32 or float16, read by row as steps touch items; for catalogues larger than memory)."""
    if mapped:
        arrays = map_features(path)
        rows = rows_of(arrays, data.item_ids, str(path))
        with warnings.catch_warnings():  # read-only maps: nothing ever writes to them
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            text, image = torch.from_numpy(arrays.text_feats), torch.from_numpy(arrays.image_feats)
        masks = [torch.from_numpy(np.asarray(m, dtype=bool)) for m in (arrays.text_mask, arrays.image_mask)]
        # a modality without slots is an empty array in memory, not a map: it is indexed as is
        tables = (arrays.text_feats, arrays.image_feats)
        readers = tuple(RowReader(t) if isinstance(t, np.memmap) else None for t in tables)
        feats = ItemFeatures.mapped(text, masks[0], image, masks[1], torch.from_numpy(rows), device, readers)
        return feats, arrays.meta
    arrays = read_features(path)
    rows = align(arrays, data.item_ids, str(path))
    feats = ItemFeatures(
        torch.as_tensor(rows["text_feats"], dtype=torch.float32),
        torch.as_tensor(rows["text_mask"]).bool(),
        torch.as_tensor(rows["image_feats"], dtype=torch.float32),
        torch.as_tensor(rows["image_mask"]).bool(),
    )
    return feats.to(device), arrays.meta


def train(
    cfg: Config, data: Path | None = None, features: Path | None = None,
    out: Path = Path("mp4sr-out"), stage: str = "all", device: str = "auto",
    resume: bool = False, overwrite: bool = False, progress: bool = True,
) -> dict[str, Any]:
    if stage not in STAGES:
        raise UserError(f"unknown stage {stage!r}; choose one of {', '.join(STAGES)}")
    if resume and overwrite:
        raise UserError("--resume continues the run in --out, --overwrite discards it: choose one")
    dev = resolve_device(device)
    world = World.from_environment(dev)  # a single process, or one rank under torchrun
    try:
        return _train(cfg, data, features, Path(out), stage, world.device(dev), resume, overwrite,
                      progress and world.main, world)
    finally:
        world.close()


def _train(cfg: Config, data: Path | None, features: Path | None, out: Path, stage: str, dev: torch.device,
           resume: bool, overwrite: bool, progress: bool, world: World) -> dict[str, Any]:
    torch.manual_seed(cfg.train.seed)
    with world.main_first():  # rank 0 writes the demo data, the split cache, the features; then the rest read them
        data_path = resolve_data(data)
        # The split first: data with too few users fails here, before feature extraction or --out is made.
        split, _ = load_or_preprocess(data_path, out / "cache", cfg.data.max_len, cfg.data.min_interactions)
        if world.main or features is not None:
            features_path = resolve_features(data_path, features, dev.type, progress)
    if not world.main and features is None:
        from mp4sr_train.features.extract import default_features_path

        features_path = default_features_path(data_path)
    out.mkdir(parents=True, exist_ok=True)
    # The large-catalogue path reads only the items each step touches: its features stay in the file.
    mapped = cfg.train.softmax.sampled(split.num_items)
    feats, feat_meta = load_item_features(features_path, split, dev, mapped=mapped)
    features_sha = features_digest(feats)
    cfg, absent = config_lib.present_modalities(cfg, feats.present())
    with world.main_first():
        if world.main:
            check_or_write_run(out, run_fingerprint(cfg, str(data_path.resolve()), features_sha), resume, overwrite)
    say = log if world.main else _silent  # rank 0 speaks for every rank
    if world.size > 1:
        say(f"distributed: {world.size} processes ({'nccl' if dev.type == 'cuda' else 'gloo'}); "
            f"each trains on 1/{world.size} of every batch")
    say(f"data: {data_path} | {split.num_items} items, {len(split.user_ids)} users, "
        f"{len(split.train)} training sequences | features {feats.dim}-d "
        f"({feat_meta.get('encoder', '?')}{', memory-mapped' if mapped else ''}) | device {dev}")
    if feat_meta.get("clip_weights", "null") == "null" and feat_meta.get("clip_model", "none") != "none":
        say("note: image features were made with a randomly initialised CLIP tower (no --clip-weights)")
    if absent:
        say(f"note: no item has {' or '.join(absent)} features; the model uses "
            f"{', '.join(cfg.model.modalities)} only (train.skip_absent_modalities)")

    t0 = time.perf_counter()
    popularity = {"valid": evaluate_popularity(split, split.valid), "test": evaluate_popularity(split, split.test)}
    model = M2SE(cfg.model, feats.dim).to(dev)
    results: dict[str, StageResult] = {}
    if stage in ("all", "pretrain"):
        runner = StageRunner("pretrain", cfg.train.pretrain, cfg, model, None, feats, split,
                             out / "stages" / "pretrain", progress, world)
        if resume and runner.resume():
            say("pretrain: finished earlier, loading its best epoch")
        results["pretrain"] = runner.run()
    id_emb = None
    if stage in ("all", "finetune"):
        pretrained = out / "stages" / "pretrain" / "best.safetensors"
        from_pretrained = stage == "all"
        if stage == "finetune":
            from_pretrained = pretrained.is_file()
            if from_pretrained:
                load_state(load_file(str(pretrained), device=str(dev)), model, None)
                say(f"finetune: starting from the pre-trained weights in {pretrained.parent}")
            else:
                say("finetune: no pre-trained weights in this run directory; fine-tuning from scratch")
        known = torch.as_tensor(split.train_counts > 0)
        id_emb = ItemIdEmbedding.create(cfg.train.ids, split.num_items, cfg.model.d, known,
                                        len(cfg.model.modalities)).to(dev)
        runner = StageRunner("finetune", cfg.train.finetune, cfg, model, id_emb, feats, split,
                             out / "stages" / "finetune", progress, world,
                             cfg.train.finetune_encoder_lr if from_pretrained else 1.0)
        if resume and runner.resume():
            say("finetune: finished earlier, loading its best epoch")
        results["finetune"] = runner.run()

    final = "finetune" if "finetune" in results else "pretrain"
    if not world.main:
        return {}
    test = evaluate(model, feats, split.test, cfg.train.eval_batch_size, id_emb)
    model.eval()
    with torch.inference_mode():
        z = encode_items_chunked(model, feats, EVAL_CHUNK) if feats.is_mapped else model.encode_items(feats)
    meta = {
        "stage": final,
        "item_ids": list(split.item_ids),
        "train_counts": split.train_counts.tolist(),
        "features": {"path": str(features_path.resolve()), "values_sha256": features_sha,
                     **{k: v for k, v in feat_meta.items() if k != "item_ids"}},
        "data": str(data_path.resolve()),
    }
    save_checkpoint(out / "checkpoint", Checkpoint(cfg, model, id_emb, z, meta))
    metrics = build_metrics(results, final, test, popularity, time.perf_counter() - t0)
    write_json_atomic(out / "metrics.json", metrics)
    write_curves(out / "curves.png", results)
    say(summary(metrics, out))
    return metrics


def build_metrics(results, final, test, popularity, seconds) -> dict[str, Any]:
    metrics: dict[str, Any] = {}
    for name, r in results.items():
        metrics[name] = {
            "best_epoch": r.best_epoch, "epochs": len(r.history), "valid": r.valid,
            "sequences_per_second": r.sequences_per_second,
            "curve": [{"epoch": h["epoch"], "loss": h["loss"], "valid_recall@20": h["valid"]["recall@20"]}
                      for h in r.history],
        }
    metrics[final]["test"] = test
    metrics["baselines"] = {"popularity": popularity}
    metrics["seconds"] = seconds
    return metrics


def summary(metrics: dict[str, Any], out: Path) -> str:
    final = "finetune" if "finetune" in metrics else "pretrain"
    test, pop = metrics[final]["test"], metrics["baselines"]["popularity"]["test"]
    lines = [f"\n== mp4sr-rt train: {out} ({metrics['seconds']:.0f} s) =="]
    for name in ("pretrain", "finetune"):
        if name in metrics:
            m = metrics[name]
            lines.append(f"{name:9s} best epoch {m['best_epoch']}/{m['epochs']}  valid recall@20 "
                         f"{m['valid']['recall@20']:.4f}  {m['sequences_per_second']:.0f} seq/s")
    lines.append(f"{'test':12s}{'recall@10':>10s}{'ndcg@10':>10s}{'recall@20':>10s}{'ndcg@20':>10s}")
    for name, t in ((f"MP4SR ({final})", test), ("popularity", pop)):
        lines.append(f"{name:12s}" + "".join(f"{t[k]:10.4f}" for k in ("recall@10", "ndcg@10", "recall@20", "ndcg@20")))
    ratio = test["ndcg@10"] / pop["ndcg@10"] if pop["ndcg@10"] > 0 else float("inf")
    lines.append(f"NDCG@10 vs popularity: {ratio:.2f}x | checkpoint: {out / 'checkpoint'}")
    return "\n".join(lines)


def write_curves(path: Path, results: dict[str, StageResult]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for name, r in results.items():
        epochs = [h["epoch"] for h in r.history]
        axes[0].plot(epochs, [h["loss"] for h in r.history], marker="o", label=name)
        axes[1].plot(epochs, [h["valid"]["recall@20"] for h in r.history], marker="o", label=name)
    axes[0].set(title="training loss", xlabel="epoch")
    axes[1].set(title="validation Recall@20", xlabel="epoch")
    for ax in axes:
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=100))
    plt.close(fig)



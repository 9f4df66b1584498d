"""`mp4sr-rt export`: run directory -> artifact directory (docs/artifacts.md), behind the parity gate.

Everything is written into a temporary directory beside --out, checked, then renamed into place:
a failed export (bad run directory, parity failure, TensorRT error, Ctrl-C) leaves nothing behind.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from mp4sr_export import parity, tensorrt, triton
from mp4sr_export.ann import build_ann
from mp4sr_export.config import ExportConfig
from mp4sr_export.int8_scan import with_int8_scan
from mp4sr_export.onnx import (
    OPSET,
    convert_fp16,
    describe,
    encoder_specs,
    export_onnx,
    image_size,
    model_specs,
    serving_vectors,
)
from mp4sr_train.checkpoint import Checkpoint, load_checkpoint
from mp4sr_train.model import concat_modalities, serving_table

from mp4sr_rt.errors import UserError
from mp4sr_rt.manifest import (
    MANIFEST,
    SCHEMA,
    Features,
    Manifest,
    ManifestError,
    SourceCheckpoint,
    file_sha256,
    hash_files,
)

EXTRACTORS = ("text_encoder", "image_encoder")
CERTIFIED_NOTE = 0.95  # an int8 scan certifying fewer histories than this gets a note


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def export(run_dir: Path = Path("mp4sr-out"), out: Path | None = None, config: ExportConfig | None = None,
           **options: Any) -> Manifest:
    """Export the run's checkpoint; returns the manifest. `options` are ExportConfig's fields, for
    callers without a config. Raises UserError (nothing written) on failure."""
    t0 = time.perf_counter()
    config = config if config is not None else ExportConfig(**options)
    run_dir = Path(run_dir)
    out = Path(out) if out is not None else run_dir / "artifacts"
    if config.trt:
        tensorrt.require()  # before any work: a clear message at once
    check_replaceable(out, is_ours=lambda d: (d / MANIFEST).is_file())
    triton_dir = config.triton_dir
    if triton_dir is not None:
        check_replaceable(triton_dir, is_ours=lambda d: all(p.name.startswith("mp4sr_") for p in d.iterdir()))
    ckpt = load_run(run_dir)
    k = min(config.top_k, len(ckpt.item_ids))
    if k < config.top_k:
        log(f"note: --top-k {config.top_k} > {len(ckpt.item_ids)} items; the scorer returns the top {k}")
    if config.int8_scan and not k <= config.int8_scan < len(ckpt.item_ids):
        raise UserError(f"--int8-scan {config.int8_scan}: the candidates must number at least the top k "
                        f"({k}) and fewer than the {len(ckpt.item_ids)} items")

    with staging_dir(out) as staging:
        manifest = write_artifacts(ckpt, run_dir, staging, config, k)
        if triton_dir is not None:
            with staging_dir(triton_dir) as triton_staging:
                names = triton.write_repository(staging, manifest, triton_staging, config.max_batch, out, triton_dir)
                publish(triton_staging, triton_dir)
            log(f"triton: {', '.join(names)} in {triton_dir}")
        publish(staging, out)
    log(summary(manifest, out, time.perf_counter() - t0))
    return manifest


def load_run(run_dir: Path) -> Checkpoint:
    """The run's checkpoint, with every way it can be unusable turned into one UserError."""
    if not run_dir.is_dir():
        raise UserError(f"run directory not found: {run_dir}; train one with `mp4sr-rt train --out {run_dir}`")
    directory = run_dir / "checkpoint"
    try:
        ckpt = load_checkpoint(directory)
    except (KeyError, RuntimeError, TypeError, ValueError) as e:
        # Tensors that do not fit the model rebuilt from the sidecar (another version's run).
        detail = " ".join(str(e).split())[:300]
        raise UserError(f"checkpoint {directory} is incompatible with this version: {detail}") from None
    if file_sha256(directory / "model.safetensors") != ckpt.meta.get("model_sha256"):
        raise UserError(f"checkpoint {directory}: model.safetensors does not match the hash in config.json")
    return ckpt


def check_replaceable(path: Path, is_ours) -> None:
    """Refuse to replace anything but an empty directory or a previous export's output."""
    if path.exists() and not (path.is_dir() and (not any(path.iterdir()) or is_ours(path))):
        raise UserError(f"{path} exists and is not a previous export's output; choose another path")


@contextmanager
def staging_dir(dest: Path) -> Iterator[Path]:
    """A temporary directory beside `dest` (same filesystem, so the final rename is atomic),
    removed on exit unless it was published (renamed) by then."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(dest)
    path = Path(tempfile.mkdtemp(prefix=f".{dest.name}.{os.getpid()}.", suffix=".tmp", dir=dest.parent))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def remove_stale(dest: Path) -> None:
    """Remove what exports killed before they finished left beside `dest`: staging and moved-aside
    directories named after a process that no longer runs (a running export keeps its own)."""
    pattern = re.compile(rf"\.{re.escape(dest.name)}\.(?:(\d+)\..*\.tmp|old-(\d+))")
    for path in dest.parent.glob(f".{dest.name}.*"):
        match = pattern.fullmatch(path.name)
        if match and path.is_dir() and not _running(int(match[1] or match[2])):
            shutil.rmtree(path, ignore_errors=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def publish(staging: Path, dest: Path) -> None:
    """Rename `staging` to `dest`, replacing a previous export (moved aside, then deleted)."""
    old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
    if dest.exists():
        dest.rename(old)
    staging.rename(dest)
    shutil.rmtree(old, ignore_errors=True)


def write_artifacts(ckpt: Checkpoint, run_dir: Path, staging: Path, config: ExportConfig, k: int) -> Manifest:
    text, clip, vocabulary = load_extractors(ckpt) if config.encoders else (None, None, None)
    limits = {"history": ckpt.cfg.model.max_len} | ({"tokens": text.max_length} if text else {})
    specs = model_specs(ckpt, k, config.topk_block) + (encoder_specs(text, clip) if text else [])
    models = {}
    for spec in specs:
        # The feature extractors stay fp32 under --fp16: they run once per new item, off the
        # request path, and fp32 reproduces the features the model was trained on.
        precision = config.precision if spec.role not in EXTRACTORS else "fp32"
        path = staging / spec.file
        log(f"export: {spec.file} ({precision})")
        export_onnx(spec, path, limits)
        if precision == "fp16":
            convert_fp16(path)
        if spec.role == "scorer" and config.int8_scan:
            log(f"export: {spec.file}: int8 catalogue scan, {config.int8_scan} candidates rescored")
            add_int8_scan(path, ckpt, k, config.int8_scan, config.fp16)
        models[spec.role] = {"file": spec.file, "opset": OPSET, "precision": precision, **describe(path)}
    write_catalogue(ckpt, staging)
    preprocessing = write_extractor_files(text, clip, vocabulary, ckpt.meta["features"], staging) if text else None

    runners = {(role, "onnxruntime"): parity.ort_runner(staging / m["file"]) for role, m in models.items()}
    if config.trt:
        runners.update(build_engines(models, staging, config.max_batch, limits))
    log(f"parity: {len(runners)} model(s) against PyTorch")
    figures = parity.check_all(ckpt, runners, k, text, clip)
    failures = parity.gate(figures, {role: m["precision"] for role, m in models.items()})
    if failures:
        raise parity.ParityError("parity gate failed, nothing written:\n  " + "\n  ".join(failures))
    certified = figures["scorer"]["onnxruntime"].get("certified", 1.0)
    if certified < CERTIFIED_NOTE:
        log(f"note: the int8 scan certified the top 10 of {certified:.0%} of the parity histories; the "
            "runtime ranks the others again in full precision, which is slower: raise --int8-scan")

    ann_k = min(config.ann_k or k, k)
    index = build_ann(ckpt, config.ann, config.ann_recall, ann_k, staging, log) if config.ann != "none" else None
    files = hash_files(staging)
    write_manifest(build_manifest(ckpt, run_dir, config, k, models, figures, preprocessing, files, index), staging)
    log("parity: the runtime (mp4sr_rt, CPU) on the artifact directory against PyTorch")
    figures["scorer"]["runtime"] = parity.check_runtime(ckpt, staging, k)
    failures = parity.gate({"scorer": figures["scorer"]}, {"scorer": config.precision})
    if failures:
        raise parity.ParityError("parity gate failed, nothing written:\n  " + "\n  ".join(failures))
    manifest = build_manifest(ckpt, run_dir, config, k, models, figures, preprocessing, files, index)
    write_manifest(manifest, staging)
    return manifest


def write_manifest(manifest: Manifest, directory: Path) -> None:
    tmp = directory / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest.to_dict(), indent=2) + "\n", encoding="utf-8")
    tmp.rename(directory / MANIFEST)


def add_int8_scan(path: Path, ckpt: Checkpoint, k: int, candidates: int, fp16: bool) -> None:
    """Rewrite the scorer at `path` to scan the catalogue in int8 (export/int8_scan.py); its
    candidates are rescored against the table in the scorer's own precision."""
    table = serving_table(serving_vectors(ckpt)[1]).numpy()  # (N + 1, 2d), as the Scorer wrapper folds it
    model = with_int8_scan(onnx.load(str(path)), table.astype(np.float16 if fp16 else np.float32), k, candidates)
    onnx.save(model, str(path))
    onnx.checker.check_model(str(path), full_check=True)


def load_extractors(ckpt: Checkpoint) -> tuple[Any, Any, list[str] | None]:
    """(TextEncoder, Clip, CLIP vocabulary) that made the run's features, each None when absent.

    Present when `mp4sr-rt features` made the features file (the demo's latent features have no
    extractor). Everything comes from what the features step recorded in the run's checkpoint:
    the encoders' identities (content hashes), the CLIP weights' path and the CLIP word list; an
    encoder that no longer loads, or loads changed, is a UserError (`--no-encoders` exports
    without them)."""
    features = ckpt.meta.get("features", {})
    if "encoder_sha256" not in features:
        return None, None, None
    text = load_text_encoder(features, ckpt.model.feat_dim)
    if features.get("clip_model", "none") == "none" or "image" not in ckpt.cfg.model.modalities:
        return text, None, None
    clip, vocabulary = load_clip(features)
    return text, clip, vocabulary


def load_text_encoder(features: dict, feat_dim: int):
    from mp4sr_train.features.text import DEFAULT_ENCODER, TextEncoder

    name = None if features["encoder"] == DEFAULT_ENCODER else features["encoder"]
    hint = "; re-run `mp4sr-rt features` and `train`, or export with --no-encoders"
    try:
        text = TextEncoder.load(name, "cpu", features.get("text_pooling", "auto").split("+")[0])
    except UserError as e:
        raise UserError(f"the text encoder the features were made with no longer loads ({e}){hint}") from None
    if text.identity != features["encoder_sha256"] or text.dim != feat_dim:
        raise UserError(f"the text encoder {features['encoder']} changed since the features were made{hint}")
    return text


def load_clip(features: dict):
    from mp4sr_train.features.image import Clip

    hint = "; re-run `mp4sr-rt features` and `train`, or export with --no-encoders"
    words = features.get("clip_vocabulary")
    if words is None or features.get("clip_vocabulary_sha256") != hashlib.sha256(words.encode()).hexdigest():
        raise UserError("the run's features record no CLIP word list (or it was edited), which new "
                        f"items' images are described with{hint}")
    weights = json.loads(features.get("clip_weights", "null"))
    try:
        clip = Clip.load(features["clip_model"], Path(weights["path"]) if weights else None)
    except UserError as e:
        raise UserError(f"the CLIP model the features were made with no longer loads ({e}){hint}") from None
    if clip.identity != features.get("clip_sha256"):
        raise UserError(f"the CLIP model {features['clip_model']} changed since the features were made{hint}")
    return clip, json.loads(words)


def write_extractor_files(text, clip, vocabulary: list[str] | None, features: dict, staging: Path) -> dict:
    """tokenizer/, and with images vocabulary.json + clip_words.npy; returns the manifest's
    `preprocessing` entry: what a caller does before and after the encoders."""
    from mp4sr_rt.raw import MAX_SENTENCES

    text.tokenizer.save_pretrained(staging / "tokenizer")
    preprocessing: dict[str, Any] = {"text": {
        "tokenizer": "tokenizer", "max_tokens": text.max_length, "pooling": text.pooling_label,
        "max_sentences": MAX_SENTENCES,
        "sentences": "text fields in order (title first) split at . ! ? followed by whitespace, after "
                     "CJK full stops and at line breaks; whitespace collapsed; one vector per sentence",
    }}
    if clip is None:
        return preprocessing
    from mp4sr_train.features.extract import MAX_IMAGES
    from mp4sr_train.features.image import PROMPT

    words = np.concatenate([clip.encode_words(vocabulary[i:i + 256]) for i in range(0, len(vocabulary), 256)])
    np.save(staging / "clip_words.npy", words.astype(np.float32))  # (W, D) unit rows
    (staging / "vocabulary.json").write_text(json.dumps(vocabulary) + "\n", encoding="utf-8")
    normalize = next(t for t in clip.preprocess.transforms if hasattr(t, "mean"))
    preprocessing["image"] = {
        "image_size": image_size(clip), "layout": "NCHW float32, RGB",
        "resize": "shorter side to image_size (bicubic, antialiased), then a centre crop",
        "scale": 1 / 255, "mean": list(normalize.mean), "std": list(normalize.std),
        "max_images": MAX_IMAGES, "words": int(features.get("image_tokens", 15)), "prompt": PROMPT,
        "vocabulary": "vocabulary.json", "word_vectors": "clip_words.npy",
        "describe": "per image: the `words` vocabulary words of highest image . word_vectors (ties to the "
                    "earlier word), best first, joined by spaces -> one sentence for text_encoder",
    }
    return preprocessing


ITEM_TABLE = "item_table.npy"  # the serving table, for a model whose candidates have ID rows of their own


def write_catalogue(ckpt: Checkpoint, staging: Path) -> None:
    """items.json (vocabulary, training popularity), item_inputs.npy (sequence-input vectors) and,
    for a model whose candidates have ID rows of their own, item_table.npy (the serving table)."""
    vocabulary = {"items": list(ckpt.item_ids), "popularity": [int(c) for c in ckpt.meta["train_counts"][1:]]}
    (staging / "items.json").write_text(json.dumps(vocabulary) + "\n", encoding="utf-8")
    inputs, outputs = serving_vectors(ckpt)
    np.save(staging / "item_inputs.npy", concat_modalities(inputs).numpy().astype(np.float32))  # (N + 1, M d)
    if has_own_table(ckpt):
        np.save(staging / ITEM_TABLE, serving_table(outputs).numpy().astype(np.float32))


def has_own_table(ckpt: Checkpoint) -> bool:
    """Whether the serving table is not the normalised sequence inputs (untied candidate ID rows)."""
    return ckpt.id_emb is not None and ckpt.id_emb.untied


def build_engines(models: dict, staging: Path, max_batch: int, limits: dict[str, int]) -> dict:
    """A TensorRT engine next to each ONNX file; returns their parity runners."""
    ranges = tensorrt.profile_ranges(max_batch, limits)
    runners = {}
    for role, model in models.items():
        engine = f"{role}.plan"
        profile = tensorrt.input_profile(model["inputs"], ranges)
        log(f"tensorrt: building {engine}")
        tensorrt.build_engine(staging / model["file"], staging / engine, profile)
        model["tensorrt"] = {"file": engine, "profile": profile}
        runners[(role, "tensorrt")] = tensorrt.engine_runner(staging / engine)
    return runners


def build_manifest(ckpt: Checkpoint, run_dir: Path, config: ExportConfig, k: int, models: dict,
                   figures: dict, preprocessing: dict | None, files: dict, index: dict | None = None) -> Manifest:
    features = ckpt.meta.get("features", {})
    values = {
        "schema": SCHEMA,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "tool_versions": tool_versions(config.trt),
        "source_checkpoint": SourceCheckpoint(str((run_dir / "checkpoint").resolve()), ckpt.meta["model_sha256"],
                                              ckpt.meta.get("stage")),
        "precision": config.precision,
        "padding": "right",
        "pad_id": 0,
        "max_len": ckpt.cfg.model.max_len,
        "top_k": k,
        "topk_block": config.topk_block,
        "int8_scan": config.int8_scan,
        "modalities": tuple(ckpt.cfg.model.modalities),
        "dim": len(ckpt.cfg.model.modalities) * ckpt.cfg.model.d,
        "num_items": len(ckpt.item_ids),
        "max_batch": config.max_batch,
        "vocabulary": "items.json",
        "item_inputs": "item_inputs.npy",
        "item_table": ITEM_TABLE if has_own_table(ckpt) else None,
        "features": Features(features.get("encoder"), ckpt.model.feat_dim, tensorrt.MAX_SLOTS,
                             features.get("values_sha256")),
    }
    # The nested parts go through the strict loader too, so the exporter can only write what the
    # runtime reads.
    loose = {"models": models, "parity": figures, "preprocessing": preprocessing, "ann": index,
             "files": {name: dataclasses.asdict(entry) for name, entry in files.items()}}
    try:
        return Manifest.from_dict({**{key: _plain(v) for key, v in values.items()}, **loose})
    except ManifestError as e:
        raise UserError(f"export wrote an invalid manifest ({e}): a defect, please report it") from None


def _plain(value: Any) -> Any:
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else list(value) if isinstance(
        value, tuple) else value


def tool_versions(trt: bool) -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in ("mp4sr-rt", "torch", "onnx", "onnxscript", "onnxruntime") + (("tensorrt",) if trt else ()):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def summary(manifest: Manifest, out: Path, seconds: float) -> str:
    files = manifest.files
    lines = [f"\n== mp4sr-rt export: {out} ({manifest.precision}, top {manifest.top_k}, "
             f"{'+'.join(manifest.modalities)}, {seconds:.1f} s) ==",
             f"{'file':28s}{'size':>12s}   parity vs PyTorch"]
    figures = {m.file: manifest.parity[role] for role, m in manifest.models.items()}
    for name, entry in files.items():
        checks = "; ".join(f"{backend}: {describe_figures(f)}" for backend, f in figures.get(name, {}).items())
        lines.append(f"{name:28s}{entry.bytes / 1024:>9.1f} KB   {checks}")
    lines.append(f"{'total':28s}{sum(e.bytes for e in files.values()) / 1024:>9.1f} KB")
    return "\n".join(lines)


def describe_figures(f: dict) -> str:
    text = f"max|diff| {f['max_abs_diff']:.1e}"
    if "top10_agreement" in f:
        text += f", top-10 {f['top10_agreement']:.4f}, top-1 {f['top1_agreement']:.4f}"
    if "certified" in f:
        text += f", int8 scan certified {f['certified']:.1%}"
    return text + f" ({int(f['rows'])} rows)"

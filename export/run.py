"""`mp4sr-rt export`: run directory -> artifact directory (docs/artifacts.md), behind the parity gate.

Everything is written into a temporary directory beside --out, checked, then renamed into place:
a failed export (bad run directory, parity failure, TensorRT error, Ctrl-C) leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import platform
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

from export import parity, tensorrt, triton
from export.onnx import OPSET, convert_fp16, describe, export_onnx, model_specs, serving_inputs
from mp4sr_rt.errors import UserError
from mp4sr_rt.manifest import MANIFEST, SCHEMA, file_sha256, hash_files
from train.checkpoint import Checkpoint, load_checkpoint


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def export(
    run_dir: Path = Path("mp4sr-out"), out: Path | None = None, fp16: bool = False, top_k: int = 100,
    max_batch: int = 4096, trt: bool = False, triton_dir: Path | None = None,
) -> dict[str, Any]:
    """Export the run's checkpoint; returns the manifest. Raises UserError (nothing written) on failure."""
    t0 = time.perf_counter()
    run_dir = Path(run_dir)
    out = Path(out) if out is not None else run_dir / "artifacts"
    if top_k < 1 or max_batch < 1:
        raise UserError(f"--top-k and --max-batch must be >= 1 (got {top_k} and {max_batch})")
    if trt:
        tensorrt.require()  # before any work: a clear message at once
    check_replaceable(out, is_ours=lambda d: (d / MANIFEST).is_file())
    if triton_dir is not None:
        triton_dir = Path(triton_dir)
        check_replaceable(triton_dir, is_ours=lambda d: all(p.name.startswith("mp4sr_") for p in d.iterdir()))
    ckpt = load_run(run_dir)
    k = min(top_k, len(ckpt.item_ids))
    if k < top_k:
        log(f"note: --top-k {top_k} > {len(ckpt.item_ids)} items; the scorer returns the top {k}")

    with staging_dir(out) as staging:
        manifest = write_artifacts(ckpt, run_dir, staging, fp16, k, max_batch, trt)
        if triton_dir is not None:
            with staging_dir(triton_dir) as triton_staging:
                names = triton.write_repository(staging, manifest, triton_staging, max_batch)
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
    path = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def publish(staging: Path, dest: Path) -> None:
    """Rename `staging` to `dest`, replacing a previous export (moved aside, then deleted)."""
    old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
    if dest.exists():
        dest.rename(old)
    staging.rename(dest)
    shutil.rmtree(old, ignore_errors=True)


def write_artifacts(ckpt: Checkpoint, run_dir: Path, staging: Path, fp16: bool, k: int,
                    max_batch: int, trt: bool) -> dict[str, Any]:
    precision = "fp16" if fp16 else "fp32"
    models = {}
    for spec in model_specs(ckpt, k):
        path = staging / spec.file
        log(f"export: {spec.file} ({precision})")
        export_onnx(spec, path, ckpt.cfg.model.max_len)
        if fp16:
            convert_fp16(path)
        models[spec.role] = {"file": spec.file, "opset": OPSET, "precision": precision, **describe(path)}
    write_catalogue(ckpt, staging)

    runners = {(role, "onnxruntime"): parity.ort_runner(staging / m["file"]) for role, m in models.items()}
    if trt:
        runners.update(build_engines(models, staging, max_batch, ckpt.cfg.model.max_len))
    log(f"parity: {len(runners)} model(s) against PyTorch")
    figures = parity.check_all(ckpt, runners, k)
    failures = parity.gate(figures, precision)
    if failures:
        raise parity.ParityError("parity gate failed, nothing written:\n  " + "\n  ".join(failures))

    manifest = build_manifest(ckpt, run_dir, models, figures, precision, k, max_batch, trt)
    manifest["files"] = hash_files(staging)
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def write_catalogue(ckpt: Checkpoint, staging: Path) -> None:
    """items.json (vocabulary, training popularity) and item_inputs.npy (sequence-input vectors)."""
    vocabulary = {"items": list(ckpt.item_ids), "popularity": [int(c) for c in ckpt.meta["train_counts"][1:]]}
    (staging / "items.json").write_text(json.dumps(vocabulary) + "\n", encoding="utf-8")
    inputs = serving_inputs(ckpt)
    rows = np.concatenate([inputs[0].numpy(), inputs[1].numpy()], axis=-1).astype(np.float32)  # (N + 1, 2d)
    np.save(staging / "item_inputs.npy", rows)


def build_engines(models: dict, staging: Path, max_batch: int, max_len: int) -> dict:
    """A TensorRT engine next to each ONNX file; returns their parity runners."""
    ranges = tensorrt.profile_ranges(max_batch, max_len)
    runners = {}
    for role, model in models.items():
        engine = f"{role}.plan"
        profile = tensorrt.input_profile(model["inputs"], ranges)
        log(f"tensorrt: building {engine}")
        tensorrt.build_engine(staging / model["file"], staging / engine, profile)
        model["tensorrt"] = {"file": engine, "profile": profile}
        runners[(role, "tensorrt")] = tensorrt.engine_runner(staging / engine)
    return runners


def build_manifest(ckpt: Checkpoint, run_dir: Path, models: dict, figures: dict, precision: str,
                   k: int, max_batch: int, trt: bool) -> dict[str, Any]:
    features = ckpt.meta.get("features", {})
    return {
        "schema": SCHEMA,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "tool_versions": tool_versions(trt),
        "source_checkpoint": {"path": str((run_dir / "checkpoint").resolve()),
                              "sha256": ckpt.meta["model_sha256"], "stage": ckpt.meta.get("stage")},
        "precision": precision,
        "padding": "right",
        "pad_id": 0,
        "max_len": ckpt.cfg.model.max_len,
        "top_k": k,
        "dim": 2 * ckpt.cfg.model.d,
        "num_items": len(ckpt.item_ids),
        "max_batch": max_batch,
        "vocabulary": "items.json",
        "item_inputs": "item_inputs.npy",
        "features": {"encoder": features.get("encoder"), "dim": ckpt.model.feat_dim,
                     "max_slots": tensorrt.MAX_SLOTS, "sha256": features.get("sha256")},
        "models": models,
        "parity": figures,
    }


def tool_versions(trt: bool) -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in ("mp4sr-rt", "torch", "onnx", "onnxscript", "onnxruntime") + (("tensorrt",) if trt else ()):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def summary(manifest: dict, out: Path, seconds: float) -> str:
    files = manifest["files"]
    lines = [f"\n== mp4sr-rt export: {out} ({manifest['precision']}, top {manifest['top_k']}, "
             f"{seconds:.1f} s) ==",
             f"{'file':24s}{'size':>12s}   parity vs PyTorch"]
    figures = {m["file"]: manifest["parity"][role] for role, m in manifest["models"].items()}
    for name, entry in files.items():
        checks = "; ".join(f"{backend}: max|diff| {f['max_abs_diff']:.1e}, top-10 {f['top10_agreement']:.4f}, "
                           f"top-1 {f['top1_agreement']:.4f} ({f['rows']} rows)"
                           for backend, f in figures.get(name, {}).items())
        lines.append(f"{name:24s}{entry['bytes'] / 1024:>9.1f} KB   {checks}")
    lines.append(f"{'total':24s}{sum(e['bytes'] for e in files.values()) / 1024:>9.1f} KB")
    return "\n".join(lines)

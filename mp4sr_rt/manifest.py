"""The artifact directory's manifest.json (docs/artifacts.md): read it, and verify the files it lists.

Standard library only: the serving runtime imports this without torch or onnx.

    manifest = verify_artifacts("mp4sr-out/artifacts")   # raises ArtifactError naming the file
    scorer = manifest["models"]["scorer"]                  # file, inputs, outputs, precision...
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from mp4sr_rt.errors import ArtifactError

SCHEMA = "mp4sr-artifacts/1"
MANIFEST = "manifest.json"


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def hash_files(directory: str | Path) -> dict[str, dict[str, Any]]:
    """{relative posix path: {"sha256", "bytes"}} for every file under `directory` but the manifest."""
    directory = Path(directory)
    return {
        p.relative_to(directory).as_posix(): {"sha256": file_sha256(p), "bytes": p.stat().st_size}
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.relative_to(directory).as_posix() != MANIFEST
    }


def load_manifest(directory: str | Path) -> dict[str, Any]:
    """The parsed manifest of an artifact directory, after checking its schema version."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"no artifacts at {directory} (missing {MANIFEST}); run `mp4sr-rt export` first")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("schema") != SCHEMA:
        found = manifest.get("schema") if isinstance(manifest, dict) else None
        raise ArtifactError(f"{path}: schema {found!r}, expected {SCHEMA!r}; re-export with this version")
    return manifest


def verify_artifacts(directory: str | Path) -> dict[str, Any]:
    """load_manifest, then check that every listed file exists with its size and sha256, and that
    every model file is among them. Returns the manifest."""
    directory = Path(directory)
    manifest = load_manifest(directory)
    files = manifest.get("files", {})
    for role, model in manifest.get("models", {}).items():
        if model.get("file") not in files:
            raise ArtifactError(f"{directory / MANIFEST}: model {role!r} file {model.get('file')!r} is not listed")
    for name, expected in files.items():
        path = directory / name
        if not path.is_file():
            raise ArtifactError(f"artifact file missing: {path}")
        if path.stat().st_size != expected["bytes"] or file_sha256(path) != expected["sha256"]:
            raise ArtifactError(f"artifact file corrupted (sha256 differs from the manifest): {path}")
    return manifest

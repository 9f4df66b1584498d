"""One `Backend` interface over the exported ONNX models, several implementations (STYLE 9).

    backend = open_backend("auto", artifacts_dir, manifest)   # "cpu" | "cuda" | "tensorrt"
    scores, items, user, bound = backend.run(ids)             # ids int64 (B, L), right-padded

`auto` takes the fastest one that works here, in the order tensorrt, cuda, cpu, and logs its
choice (and why the faster ones were passed over) on stderr.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Protocol

import numpy as np

from mp4sr_rt.errors import UserError
from mp4sr_rt.manifest import Manifest

BACKENDS = ("auto", "cpu", "cuda", "tensorrt")
FASTEST_FIRST = ("tensorrt", "cuda", "cpu")
MAX_BATCH = 4096  # rows per model call: bounds the (B, N) score matrix inside the scorer


class BackendUnavailable(UserError):
    """The requested backend cannot run on this machine; the message says why."""


class Backend(Protocol):
    name: str  # "cpu" | "cuda" | "tensorrt"
    description: str  # what actually runs, e.g. "onnxruntime 1.32.0 CPUExecutionProvider"
    max_batch: int  # most rows one call takes
    # True where a row's result does not depend on the other rows' shapes (the CPU provider): the
    # scorer then pads each history to its own width. A GPU picks kernels per shape anyway, so
    # there one width per batch scans the catalogue once per call instead of once per width.
    exact_rows: bool

    def run(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
        """scorer.onnx: ids int64 (B, L) -> scores float32 (B, K), items int64 (B, K),
        user float32 (B, dim), and with an int8 scan (export --int8-scan) bound float32 (B, 1):
        no item outside a row's top K scores above it (None without)."""

    def encode_history(self, inputs: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """history_encoder.onnx: inputs float32 (B, L, dim), lengths int64 (B,) -> user (B, dim)."""

    def encode_items(self, feeds: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """item_tower.onnx: feature slots -> table float32 (n, dim), inputs float32 (n, dim)."""

    def embed(self, role: str, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """text_encoder.onnx or image_encoder.onnx: its inputs -> vectors float32 (B, F)."""


def open_backend(name: str, directory: Path, manifest: Manifest, threads: int = 0) -> Backend:
    """The backend called `name` over the artifacts in `directory`; BackendUnavailable if it
    cannot run here. `threads`: the CPU backend's intra-op threads (0: one per core)."""
    if name not in BACKENDS:
        raise UserError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if name != "auto":
        return _open(name, directory, manifest, threads)
    skipped = []
    for candidate in FASTEST_FIRST:
        try:
            backend = _open(candidate, directory, manifest, threads)
        except BackendUnavailable as e:
            skipped.append(f"{candidate}: {e}")
            continue
        note = f" (skipped {'; '.join(skipped)})" if skipped else ""
        print(f"backend: {backend.name} [{backend.description}]{note}", file=sys.stderr)
        return backend
    raise BackendUnavailable("no backend can run here: " + "; ".join(skipped))


def _open(name: str, directory: Path, manifest: Manifest, threads: int) -> Backend:
    # Imported here: the TensorRT module probes native libraries, which only its users pay for.
    if name == "cpu":
        from mp4sr_rt.backends.onnxruntime import CpuBackend

        return CpuBackend(directory, manifest, threads)
    if name == "cuda":
        from mp4sr_rt.backends.onnxruntime import CudaBackend

        return CudaBackend(directory, manifest)
    from mp4sr_rt.backends.tensorrt import TensorRTBackend

    return TensorRTBackend(directory, manifest)

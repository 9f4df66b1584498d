"""onnxruntime backends: CPU, and CUDA with device-resident I/O and CUDA graphs.

    backend = CpuBackend(artifacts_dir, manifest)
    scores, items, user, bound = backend.run(ids)     # ids int64 (B, L); bound: None without an int8 scan

The CUDA backend keeps, per shape bucket (batch rounded up to a power of two, times the history
width), the ids input and every output on the GPU (IOBinding), so a call copies B x L ids in and
B x K top-k rows (and the user vectors) out and nothing else: the (B, N) score matrix never
leaves the device. Buckets give the graph fixed shapes, which is what lets onnxruntime capture
and replay one CUDA graph per bucket (`enable_cuda_graph`); when the graph cannot be captured
(a node left on the CPU), it runs without and says so.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from mp4sr_rt.backends import MAX_BATCH, BackendUnavailable
from mp4sr_rt.errors import ArtifactError
from mp4sr_rt.manifest import Manifest, Model

SCORER_OUTPUTS = ("scores", "items", "user")
BOUND = "bound"  # the scorer's fourth output with an int8 catalogue scan (export/int8_scan.py)
ERRORS_ONLY = 3  # onnxruntime's log severity: keep its warnings off the user's terminal


class OrtBackend:
    """Lazily opened onnxruntime sessions, one per exported model, on `providers`."""

    name = "onnxruntime"
    disabled_optimizers: tuple[str, ...] = ()  # onnxruntime graph rewrites this backend skips

    def __init__(self, directory: Path, manifest: Manifest, providers: list[Any], threads: int = 0):
        self.directory = Path(directory)
        self.manifest = manifest
        self.providers = providers
        self.threads = threads
        # Rows per call: the scorer splits larger batches (TensorRT's profile ends there too).
        self.max_batch = min(MAX_BATCH, manifest.max_batch)
        self._sessions: dict[str, ort.InferenceSession] = {}
        self._lock = threading.Lock()
        # The scorer's outputs: SCORER_OUTPUTS, then BOUND where the graph has it (int8 scan).
        names = manifest.models["scorer"].output_names()
        self.scorer_outputs = [*SCORER_OUTPUTS, *([BOUND] if BOUND in names else [])]

    @property
    def description(self) -> str:
        return f"onnxruntime {ort.__version__} {self.session('scorer').get_providers()[0]}"

    def session(self, role: str) -> ort.InferenceSession:
        with self._lock:
            if role not in self._sessions:
                self._sessions[role] = self._open_session(role, self.providers)
            return self._sessions[role]

    def _open_session(self, role: str, providers: list[Any]) -> ort.InferenceSession:
        model = self.manifest.models.get(role)
        if model is None:
            raise ArtifactError(f"{self.directory / 'manifest.json'}: no {role!r} model")
        options = ort.SessionOptions()
        options.log_severity_level = ERRORS_ONLY
        options.intra_op_num_threads = self.threads
        path = self.directory / model.file
        try:
            session = ort.InferenceSession(str(path), options, providers=providers,
                                           disabled_optimizers=list(self.disabled_optimizers))
        except Exception as e:  # onnxruntime raises its own exception types, not exported stably
            raise ArtifactError(f"{path}: onnxruntime cannot load it ({e})") from None
        _check_io(path, model, session)
        return session

    def _run(self, role: str, outputs: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        try:
            return self.session(role).run(outputs, feeds)
        except _ORT_ERRORS as e:  # inputs the runtime checked: the model and its manifest disagree
            raise ArtifactError(f"{self.directory / self.manifest.models[role].file}: onnxruntime failed on "
                                f"inputs of shapes {[v.shape for v in feeds.values()]} ({e})") from None

    def run(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
        scores, items, user, *bound = self._run("scorer", self.scorer_outputs, {"ids": ids})
        return scores, items, user, (bound[0] if bound else None)

    def encode_history(self, inputs: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        return self._run("history_encoder", ["user"], {"inputs": inputs, "lengths": lengths})[0]

    def encode_items(self, feeds: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        table, inputs = self._run("item_tower", ["table", "inputs"], feeds)
        return table, inputs

    def embed(self, role: str, feeds: dict[str, np.ndarray]) -> np.ndarray:
        return self._run(role, ["vectors"], feeds)[0]


_state = ort.capi.onnxruntime_pybind11_state
_ORT_ERRORS = (_state.Fail, _state.InvalidArgument, _state.RuntimeException)
_ORT_TYPES = {"float32": "tensor(float)", "float16": "tensor(float16)", "int64": "tensor(int64)",
              "int32": "tensor(int32)", "bool": "tensor(bool)"}


def _check_io(path: Path, model: Model, session: ort.InferenceSession) -> None:
    """The graph's inputs and outputs against those the manifest declares for it: a manifest
    edited by hand (its own file is not hashed) cannot promise a top K or a width the model
    does not have."""
    actual = {t.name: t for t in (*session.get_inputs(), *session.get_outputs())}
    for spec in (*model.inputs, *model.outputs):
        tensor = actual.get(spec.name)
        if tensor is None:
            raise ArtifactError(f"{path}: the manifest declares {spec.name!r}, the model has no such input or output")
        dtype = _ORT_TYPES.get(spec.dtype)
        fixed = [(j, d) for j, d in enumerate(spec.shape) if isinstance(d, int)]
        if (dtype is not None and tensor.type != dtype) or len(tensor.shape) != len(spec.shape) or \
                any(tensor.shape[j] != d for j, d in fixed):
            raise ArtifactError(f"{path}: {spec.name!r} is {tensor.type} {list(tensor.shape)} in the model, "
                                f"{spec.dtype} {list(spec.shape)} in the manifest")


class CpuBackend(OrtBackend):
    name = "cpu"
    exact_rows = True
    # Its CPU kernel is slower than the Add and LayerNormalization it replaces: the scorer at
    # batch 1 and 48 positions took 0.196 ms with it, 0.157 ms without (onnxruntime 1.32, 1 thread).
    disabled_optimizers = ("SkipLayerNormFusion",)

    def __init__(self, directory: Path, manifest: Manifest, threads: int = 0):
        # One thread per request stream can beat a pool on a shared machine: a pool's barrier
        # stalls whenever another process holds one of its cores.
        super().__init__(directory, manifest, ["CPUExecutionProvider"], threads)
        self.session("scorer")  # open now: a broken file fails at load time, not mid-request


@dataclass
class _Bucket:
    """Device buffers of one fixed batch shape, bound once and reused by every call."""

    ids: ort.OrtValue
    outputs: tuple[ort.OrtValue, ...]
    binding: ort.IOBinding
    run_options: ort.RunOptions


class CudaBackend(OrtBackend):
    """onnxruntime CUDA: IOBinding with device-resident ids and outputs, CUDA graphs when the
    scorer's every node runs on the GPU."""

    name = "cuda"
    exact_rows = False
    provider = "CUDAExecutionProvider"

    def __init__(self, directory: Path, manifest: Manifest, device_id: int = 0):
        if self.provider not in ort.get_available_providers():
            raise BackendUnavailable(
                f"onnxruntime {ort.__version__} has no {self.provider} (install mp4sr-rt[gpu])"
            )
        _preload_cuda_libraries()
        self.device_id = device_id
        cuda = ("CUDAExecutionProvider", {"device_id": str(device_id)})
        super().__init__(directory, manifest, [cuda, "CPUExecutionProvider"])
        self.cuda_graph = False
        if manifest.int8_scan:
            print(f"{self.name}: this scorer scans the catalogue in int8 (export --int8-scan), a CPU "
                  "option whose GPU speed is not measured; export without it for a GPU", file=sys.stderr)
        self._scorer = self._open_scorer()
        self._buckets: dict[tuple[int, int], _Bucket] = {}
        self._run_lock = threading.Lock()

    @property
    def description(self) -> str:
        graphs = ", CUDA graphs" if self.cuda_graph else ""
        return f"onnxruntime {ort.__version__} {self._scorer.get_providers()[0]}, IOBinding{graphs}"

    def _open_scorer(self) -> ort.InferenceSession:
        graph_options = {"device_id": str(self.device_id), "enable_cuda_graph": "1"}
        try:
            providers = [(self.provider, graph_options), "CPUExecutionProvider"]
            session = self._open_session("scorer", providers)
            self.cuda_graph = True
        except ArtifactError as e:
            print(f"cuda: running without CUDA graphs ({e})", file=sys.stderr)
            session = self._open_session("scorer", self.providers)
        self._check_provider(session)
        return session

    def _check_provider(self, session: ort.InferenceSession) -> None:
        # onnxruntime falls back to the CPU, with an error in its log, when the provider's
        # libraries fail to load; a backend named cuda must not quietly run on the CPU.
        if session.get_providers()[0] != self.provider:
            raise BackendUnavailable(
                f"{self.provider} failed to start (CUDA/cuDNN libraries missing or of another "
                "version than this onnxruntime build needs; see onnxruntime's message above)"
            )

    def run(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
        try:
            return self._run_bound(ids)
        except Exception as e:  # onnxruntime raises its own exception types
            if not self.cuda_graph:
                raise
            # Capture can also fail at a bucket's first run (an operator that cannot be captured).
            print(f"cuda: CUDA graph capture failed, running without ({e})", file=sys.stderr)
            with self._run_lock:
                self.cuda_graph = False
                self._buckets.clear()
                self._scorer = self._open_session("scorer", self.providers)
            return self._run_bound(ids)

    def _run_bound(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
        rows, width = ids.shape
        with self._run_lock:  # one run at a time: a bucket's buffers are shared
            bucket = self._bucket(min(_bucket_rows(rows), self.max_batch), width)
            padded = np.zeros(bucket.ids.shape(), dtype=np.int64)  # all-padding rows: finite, unused
            padded[:rows] = ids
            bucket.ids.update_inplace(padded)
            self._scorer.run_with_iobinding(bucket.binding, bucket.run_options)
            outputs = bucket.binding.copy_outputs_to_cpu()
        scores, items, user, *bound = (value[:rows] for value in outputs)
        return scores, items, user, (bound[0] if bound else None)

    def _bucket(self, rows: int, length: int) -> _Bucket:
        key = (rows, length)
        if key not in self._buckets:
            self._buckets[key] = self._new_bucket(rows, length, graph_id=len(self._buckets))
        return self._buckets[key]

    def _new_bucket(self, rows: int, length: int, graph_id: int) -> _Bucket:
        k, dim = self.manifest.top_k, self.manifest.dim

        def device(shape: tuple[int, ...], dtype: type) -> ort.OrtValue:
            return ort.OrtValue.ortvalue_from_shape_and_type(shape, dtype, "cuda", self.device_id)

        ids = device((rows, length), np.int64)
        shapes = {"scores": ((rows, k), np.float32), "items": ((rows, k), np.int64),
                  "user": ((rows, dim), np.float32), BOUND: ((rows, 1), np.float32)}
        outputs = tuple(device(*shapes[name]) for name in self.scorer_outputs)
        binding = self._scorer.io_binding()
        binding.bind_ortvalue_input("ids", ids)
        for name, value in zip(self.scorer_outputs, outputs, strict=True):
            binding.bind_ortvalue_output(name, value)
        run_options = ort.RunOptions()
        if self.cuda_graph:
            # One captured graph per shape: the id tells onnxruntime which one to replay.
            run_options.add_run_config_entry("gpu_graph_id", str(graph_id))
        return _Bucket(ids, outputs, binding, run_options)


def _bucket_rows(rows: int) -> int:
    """The next power of two: at most 2x padding, and few distinct shapes (graphs) overall."""
    return 1 << max(rows - 1, 0).bit_length()


def _preload_cuda_libraries() -> None:
    """Load CUDA and cuDNN from the nvidia-* wheels (onnxruntime >= 1.21). Skipped when torch
    is already imported: it loaded its own, and loading a second copy is what breaks."""
    if "torch" in sys.modules or not hasattr(ort, "preload_dlls"):
        return
    # preload_dlls reports on stdout, which carries the JSON results of `mp4sr-rt score`.
    with contextlib.redirect_stdout(sys.stderr):
        try:
            ort.preload_dlls()
        except (OSError, RuntimeError) as e:
            print(f"cuda: could not preload CUDA libraries ({e})", file=sys.stderr)

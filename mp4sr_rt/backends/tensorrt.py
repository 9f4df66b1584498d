"""TensorRT through onnxruntime's TensorRT execution provider (onnxruntime-gpu + tensorrt).

    backend = TensorRTBackend(artifacts_dir, manifest)   # BackendUnavailable (why) if absent

The scorer runs as a TensorRT engine that the execution provider builds for one optimisation
profile (batch 1..max_batch, history 1..L) and caches under ~/.cache/mp4sr-rt/tensorrt, so only the
first process pays the build; its precision is the ONNX file's own (fp16 weights in --fp16
artifacts). I/O binding and batch buckets are the CUDA backend's. The history encoder and the
item tower run on the CUDA provider: they serve the rare requests that involve items added at
serve time. The `.plan` engines of `mp4sr-rt export --trt` are for C++ and Triton callers: running
them directly needs device buffers from a CUDA library, which this torch-free runtime leaves out.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
from pathlib import Path

import onnxruntime as ort

from mp4sr_rt.backends import BackendUnavailable
from mp4sr_rt.backends.onnxruntime import CudaBackend
from mp4sr_rt.manifest import Manifest

NVINFER = "libnvinfer.so.10"  # TensorRT 10, the major version current onnxruntime-gpu builds link


class TensorRTBackend(CudaBackend):
    name = "tensorrt"
    provider = "TensorrtExecutionProvider"

    def __init__(self, directory: Path, manifest: Manifest, device_id: int = 0):
        if self.provider not in ort.get_available_providers():
            raise BackendUnavailable(
                f"onnxruntime {ort.__version__} has no {self.provider} (needs onnxruntime-gpu)")
        _load_tensorrt()
        super().__init__(directory, manifest, device_id)

    def _open_scorer(self) -> ort.InferenceSession:
        length = self.manifest.max_len
        options = {
            "device_id": str(self.device_id),
            "trt_engine_cache_enable": "True",
            "trt_engine_cache_path": str(cache_dir()),
            "trt_timing_cache_enable": "True",
            "trt_timing_cache_path": str(cache_dir()),
            "trt_profile_min_shapes": "ids:1x1",
            "trt_profile_opt_shapes": f"ids:{min(256, self.max_batch)}x{length}",
            "trt_profile_max_shapes": f"ids:{self.max_batch}x{length}",
        }
        providers = [(self.provider, options), self.providers[0], "CPUExecutionProvider"]
        session = self._open_session("scorer", providers)
        self._check_provider(session)
        return session


def cache_dir() -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser()
    path = root / "mp4sr-rt" / "tensorrt"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _load_tensorrt() -> None:
    """Make TensorRT's libraries loadable: the system's, or those of the `tensorrt` wheel
    (package tensorrt_libs), which is not on the loader's path by itself."""
    try:
        ctypes.CDLL(NVINFER, mode=ctypes.RTLD_GLOBAL)
        return
    except OSError:
        pass
    spec = importlib.util.find_spec("tensorrt_libs")
    folders = list(spec.submodule_search_locations or []) if spec else []
    if not folders:
        raise BackendUnavailable(f"TensorRT libraries ({NVINFER}) not found (pip install tensorrt)")
    # libnvinfer first: the plugin and parser libraries link against it.
    for lib in sorted(Path(folders[0]).glob("libnv*.so*"), key=lambda p: p.name != NVINFER):
        ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)

"""TensorRT engines from the exported ONNX files (`mp4sr-rt export --trt`), TensorRT >= 10.

NOT VERIFIED: TensorRT cannot be installed on the machines this project is built on. This is
written against the documented Python API of TensorRT 10 / 11 (Builder, OnnxParser,
IOptimizationProfile, execute_async_v3); only the error raised when TensorRT is absent is tested.

Networks are strongly typed: the precision is the ONNX file's own (the --fp16 files carry fp16
weights and compute with LayerNorm, Softmax and norms in fp32), so no FP16 builder flag is set;
TensorRT 11 removed that flag and makes strong typing the only mode.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from mp4sr_rt.errors import UserError

MAX_SLOTS = 10  # SPEC section 1: at most 10 sentences / images per item
WORKSPACE_BYTES = 1 << 30


def require() -> Any:
    """The tensorrt module, or a UserError saying why --trt cannot run here."""
    try:
        import tensorrt as trt
    except ImportError:
        raise UserError(
            "--trt needs TensorRT's Python package (>= 10) and an NVIDIA GPU, and `import tensorrt` "
            "failed here; install TensorRT on a GPU machine, or export without --trt (the ONNX files "
            "also run under TensorRT through onnxruntime's TensorRT execution provider)"
        ) from None
    if int(trt.__version__.split(".")[0]) < 10:
        raise UserError(f"--trt needs TensorRT >= 10, found {trt.__version__}")
    return trt


def profile_ranges(max_batch: int, limits: dict[str, int]) -> dict[str, tuple[int, int, int]]:
    """(min, opt, max) per symbolic axis. opt: a typical serving batch, and the longest history or
    sentence (`limits`: clients pad histories to max_len so that requests batch together)."""
    batch = (1, min(256, max_batch), max_batch)
    ranges = {"batch": batch, "n": batch, "text_slots": (1, MAX_SLOTS, MAX_SLOTS),
              "image_slots": (1, MAX_SLOTS, MAX_SLOTS)}
    return ranges | {axis: (1, limit, limit) for axis, limit in limits.items()}


def input_profile(inputs: list[dict], ranges: dict[str, tuple[int, int, int]]) -> dict[str, list[list[int]]]:
    """{input name: [min shape, opt shape, max shape]} from manifest input entries."""
    profile = {}
    for entry in inputs:
        shapes = [[ranges[d][i] if isinstance(d, str) else d for d in entry["shape"]] for i in range(3)]
        profile[entry["name"]] = shapes
    return profile


def build_engine(onnx_path: Path, engine_path: Path, profile: dict[str, list[list[int]]]) -> None:
    """Parse `onnx_path`, build a strongly typed engine with one optimization profile, write it."""
    trt = require()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise UserError(f"TensorRT could not parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    opt_profile = builder.create_optimization_profile()
    for name, (low, opt, high) in profile.items():
        opt_profile.set_shape(name, low, opt, high)
    config.add_optimization_profile(opt_profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise UserError(f"TensorRT failed to build an engine from {onnx_path.name} (see its log above)")
    engine_path.write_bytes(bytes(serialized))


def engine_runner(engine_path: Path):
    """A parity runner (feeds -> {output name: array}) executing the engine on the current GPU,
    with torch CUDA tensors as device buffers."""
    import torch

    trt = require()
    engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(engine_path.read_bytes())
    context = engine.create_execution_context()
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]

    def run(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        buffers = {}
        for name, array in feeds.items():
            buffers[name] = torch.from_numpy(np.ascontiguousarray(array)).cuda()
            context.set_input_shape(name, tuple(array.shape))
        for name in outputs:
            dtype = torch.from_numpy(np.empty(0, dtype=trt.nptype(engine.get_tensor_dtype(name)))).dtype
            buffers[name] = torch.empty(tuple(context.get_tensor_shape(name)), dtype=dtype, device="cuda")
        for name, tensor in buffers.items():
            context.set_tensor_address(name, tensor.data_ptr())
        stream = torch.cuda.current_stream()  # the one the input copies were queued on
        if not context.execute_async_v3(stream.cuda_stream):
            raise UserError(f"TensorRT failed to run {engine_path.name}")
        stream.synchronize()
        return {name: buffers[name].cpu().numpy() for name in outputs}

    return run

"""A Triton Inference Server model repository for the exported models (`mp4sr-rt export --triton DIR`).

    DIR/mp4sr/, DIR/mp4sr_catalogue/       Python backend: the runtime itself (original item ids
                                           in and out, filters, catalogue changes), what
                                           `mp4sr-rt serve --repository DIR` loads
    DIR/mp4sr_scorer/config.pbtxt, DIR/mp4sr_scorer/1/model.onnx, likewise mp4sr_item_tower, ...
                                           onnxruntime backend, for NGC Triton containers

The onnxruntime-backend models: dynamic batching, one GPU instance each, and onnxruntime's
TensorRT accelerator (built by Triton at load time from the ONNX file, FP16 a commented choice).
Their configs parse with Triton's own ModelConfig protobuf (tests/test_export.py); the
nvidia-pytriton wheel's server has no onnxruntime backend, so they are not loaded by a test here.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from mp4sr_rt.manifest import Manifest, Model, TensorSpec
from mp4sr_rt.serving.repository import ServeOptions, artifacts_path, write_models

TRITON_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "int64": "TYPE_INT64", "bool": "TYPE_BOOL"}
QUEUE_DELAY_US = 100  # wait up to 0.1 ms for more requests: batching pays off well before that


def model_name(role: str) -> str:
    return f"mp4sr_{role}"


def tensor_block(kind: str, entries: tuple[TensorSpec, ...]) -> str:
    """`input [...]` or `output [...]`; the first (batch) axis is Triton's, not listed in dims."""
    items = []
    for e in entries:
        dims = ", ".join("-1" if isinstance(d, str) else str(d) for d in e.shape[1:])
        items.append(f'  {{ name: "{e.name}" data_type: {TRITON_TYPES[e.dtype]} dims: [ {dims} ] }}')
    return f"{kind} [\n" + ",\n".join(items) + "\n]\n"


def config_text(role: str, model: Model, max_batch: int) -> str:
    """config.pbtxt of one model, from its manifest entry."""
    return (
        f'name: "{model_name(role)}"\n'
        'backend: "onnxruntime"\n'
        f"max_batch_size: {max_batch}\n"
        + tensor_block("input", model.inputs)
        + tensor_block("output", model.outputs)
        + "# Only requests of equal shapes are batched: pad histories (right, item 0) to the\n"
        "# manifest's max_len so that they batch together.\n"
        f"dynamic_batching {{\n  max_queue_delay_microseconds: {QUEUE_DELAY_US}\n}}\n"
        "instance_group [\n  { kind: KIND_GPU count: 1 }\n]\n"
        "optimization {\n"
        "  execution_accelerators {\n"
        "    gpu_execution_accelerator: [\n"
        "      {\n"
        '        name: "tensorrt"\n'
        '        parameters { key: "precision_mode" value: "FP32" }\n'
        '        # parameters { key: "precision_mode" value: "FP16" }  # half-precision kernels\n'
        '        parameters { key: "max_workspace_size_bytes" value: "1073741824" }\n'
        "      }\n"
        "    ]\n"
        "  }\n"
        "}\n"
    )


def write_repository(artifacts: Path, manifest: Manifest, out: Path, max_batch: int,
                     final_artifacts: Path, final_out: Path) -> list[str]:
    """The runtime's Python-backend models and one onnxruntime-backend model per manifest model,
    written under `out` (which must not exist yet) from the artifacts in `artifacts`; the
    Python-backend models name the artifacts by their path relative to `final_out`, where the
    repository is published (and `final_artifacts` where the artifacts are)."""
    names = write_models(out, artifacts_path(final_artifacts, final_out), manifest, ServeOptions())
    for role, model in manifest.models.items():
        name = model_name(role)
        version = out / name / "1"
        version.mkdir(parents=True)
        shutil.copyfile(artifacts / model.file, version / "model.onnx")
        (out / name / "config.pbtxt").write_text(config_text(role, model, max_batch), encoding="utf-8")
        names.append(name)
    return names

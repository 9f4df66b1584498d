"""The Python-backend models of a Triton model repository that serve an artifact directory:

    REPO/mp4sr/config.pbtxt, REPO/mp4sr/1/model.py                       ranks histories
    REPO/mp4sr_catalogue/config.pbtxt, REPO/mp4sr_catalogue/1/model.py   adds and removes items

`mp4sr-rt serve ARTIFACTS` writes them into a temporary repository; `mp4sr-rt export --triton DIR`
writes them beside the onnxruntime-backend models (the artifacts' path then relative to the model
folder, so the pair can move together). Inputs and outputs: protocol.py.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from mp4sr_rt.manifest import Manifest

RECOMMEND = "mp4sr"
CATALOGUE = "mp4sr_catalogue"
MODEL_PY = '''"""Triton Python-backend model: mp4sr-rt's {what} (mp4sr_rt/serving/triton_models.py)."""

from mp4sr_rt.serving.triton_models import {cls} as TritonPythonModel  # noqa: F401
'''


@dataclass(frozen=True)
class ServeOptions:
    max_batch: int = 256  # rows per batch of Triton's dynamic batcher
    max_delay_ms: float = 2.0  # how long a request may wait for others to batch with
    # Requests waiting beyond this are refused at once (UNAVAILABLE); 0: no bound. Off by default:
    # with a queue policy, Triton 2.51's dynamic batcher holds some requests for ~500 ms even at one
    # client (measured: p99 504 ms against 6.7 ms without; README, docs/bench/serve-cpu*.jsonl).
    max_queue: int = 0
    backend: str = "auto"  # the Scorer's: auto | cpu | cuda
    instances: int = 1  # model instances (processes) ranking in parallel
    threads: int = 0  # onnxruntime intra-op threads per instance (0: one per core)

    def __post_init__(self) -> None:
        if self.max_batch < 1 or self.max_delay_ms < 0 or self.max_queue < 0 or self.instances < 1 or self.threads < 0:
            raise ValueError(f"invalid serving options: {self}")


def _parameters(artifacts: str, options: ServeOptions) -> str:
    values = {"artifacts": artifacts, "backend": options.backend, "threads": str(options.threads)}
    body = "\n".join(f'  {{ key: "{k}" value: {{ string_value: "{v}" }} }},' for k, v in values.items())
    return "parameters [\n" + body.rstrip(",") + "\n]\n"


def _kind(options: ServeOptions) -> str:
    return "KIND_GPU" if options.backend == "cuda" else "KIND_CPU"


def recommend_config(artifacts: str, options: ServeOptions) -> str:
    ragged = "allow_ragged_batch: true"
    return (
        f'name: "{RECOMMEND}"\n'
        'backend: "python"\n'
        f"max_batch_size: {options.max_batch}\n"
        "input [\n"
        f'  {{ name: "history" data_type: TYPE_STRING dims: [ -1 ] {ragged} }},\n'
        f'  {{ name: "k" data_type: TYPE_INT32 dims: [ 1 ] optional: true }},\n'
        f'  {{ name: "exclude_seen" data_type: TYPE_BOOL dims: [ 1 ] optional: true }},\n'
        f'  {{ name: "exclude" data_type: TYPE_STRING dims: [ -1 ] optional: true {ragged} }},\n'
        f'  {{ name: "allow" data_type: TYPE_STRING dims: [ -1 ] optional: true {ragged} }}\n'
        "]\n"
        "output [\n"
        '  { name: "items" data_type: TYPE_STRING dims: [ -1 ] },\n'
        '  { name: "scores" data_type: TYPE_FP32 dims: [ -1 ] },\n'
        '  { name: "unknown_items" data_type: TYPE_STRING dims: [ -1 ] },\n'
        '  { name: "fallback" data_type: TYPE_STRING dims: [ 1 ] }\n'
        "]\n"
        "# Requests of any history length batch together (each is ranked on its own, exactly).\n"
        "dynamic_batching {\n"
        f"  max_queue_delay_microseconds: {round(options.max_delay_ms * 1000)}\n"
        + (f"  default_queue_policy {{ max_queue_size: {options.max_queue} }}  # beyond: refused at once\n"
           if options.max_queue else "")
        + "}\n"
        f"instance_group [ {{ kind: {_kind(options)} count: {options.instances} }} ]\n"
        + _parameters(artifacts, options)
    )


def catalogue_config(artifacts: str, manifest: Manifest, options: ServeOptions) -> str:
    entries = [
        '  { name: "action" data_type: TYPE_STRING dims: [ 1 ] }',
        '  { name: "ids" data_type: TYPE_STRING dims: [ -1 ] }',
    ]
    for modality in manifest.modalities:
        entries += [
            f'  {{ name: "{modality}s" data_type: TYPE_STRING dims: [ -1 ] optional: true }}',
            f'  {{ name: "{modality}_feats" data_type: TYPE_FP32 dims: [ -1, -1, -1 ] optional: true }}',
            f'  {{ name: "{modality}_mask" data_type: TYPE_BOOL dims: [ -1, -1 ] optional: true }}',
        ]
    return (
        f'name: "{CATALOGUE}"\n'
        'backend: "python"\n'
        "max_batch_size: 0\n"
        "input [\n" + ",\n".join(entries) + "\n]\n"
        "output [\n"
        '  { name: "version" data_type: TYPE_INT64 dims: [ 1 ] },\n'
        '  { name: "num_items" data_type: TYPE_INT64 dims: [ 1 ] }\n'
        "]\n"
        # One instance: changes are serialised anyway (the catalogue lock), and it keeps the
        # encoders' memory to one process.
        f"instance_group [ {{ kind: {_kind(options)} count: 1 }} ]\n"
        + _parameters(artifacts, options)
    )


def artifacts_path(artifacts: Path, repository: Path | None = None) -> str:
    """How a model config names the artifacts: absolute, or (given where the repository will
    live) relative to a model's folder, so that the two directories can move together."""
    if repository is None:
        return str(artifacts.resolve())
    return os.path.relpath(artifacts.resolve(), (repository / RECOMMEND).resolve())


def write_models(repository: Path, artifacts: str, manifest: Manifest, options: ServeOptions) -> list[str]:
    """Write the two models under `repository`; `artifacts` as artifacts_path gives it."""
    names = []
    for name, cls, what in ((RECOMMEND, "RecommendModel", "recommender"),
                            (CATALOGUE, "CatalogueModel", "catalogue changes")):
        folder = repository / name
        (folder / "1").mkdir(parents=True)
        path = artifacts
        if '"' in path or "\\" in path:
            raise ValueError(f"artifact path {path!r}: a quote or backslash cannot go into config.pbtxt")
        config = recommend_config(path, options) if name == RECOMMEND else catalogue_config(path, manifest, options)
        (folder / "config.pbtxt").write_text(config, encoding="utf-8")
        (folder / "1" / "model.py").write_text(MODEL_PY.format(what=what, cls=cls), encoding="utf-8")
        names.append(name)
    return names

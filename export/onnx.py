"""ONNX export of the wrappers: which models, their traced inputs, names and dynamic axes.

The dynamo exporter (torch.export) is used for every model. The TorchScript one (`dynamo=False`)
exports the scorer and the history encoder, causal scaled_dot_product_attention included, but
not the item tower: MoEAdaptor's `layer_norm(y, y.shape[-1:])` becomes a traced shape, which it
refuses as a LayerNorm shape. One exporter for all keeps one code path; it costs about 3 s a model.
The files are checked against PyTorch afterwards on other shapes than the traced ones (parity.py).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import onnx
import onnx_ir as ir
import torch
from mp4sr_export.wrappers import HistoryEncoder, ImageEncoder, ItemTower, Scorer, SentenceEncoder
from mp4sr_train.checkpoint import Checkpoint
from mp4sr_train.model import item_vectors
from torch import Tensor, nn
from torch.export import Dim

# The dynamo exporter's native opset (older ones go through a version converter); onnxruntime
# >= 1.14 and TensorRT >= 8.6 read it.
OPSET = 18
DTYPES = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16",
          onnx.TensorProto.INT64: "int64", onnx.TensorProto.BOOL: "bool"}


@dataclass(frozen=True)
class ModelSpec:
    """One exported model: the module, the example inputs it is traced with, its I/O names."""

    role: str
    module: nn.Module
    example: tuple[Tensor, ...]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    dynamic_axes: dict[str, dict[int, str]]  # per input: {axis: name}; outputs follow

    @property
    def file(self) -> str:
        return f"{self.role}.onnx"


def serving_vectors(ckpt: Checkpoint) -> tuple[Tensor, Tensor]:
    """Sequence-input vectors and (normalised by `candidates`) candidate vectors of the trained
    catalogue: (M, N + 1, d) each (model.item_vectors)."""
    with torch.no_grad():
        return item_vectors(ckpt.z, ckpt.id_emb)


def model_specs(ckpt: Checkpoint, k: int, topk_block: int = 0) -> list[ModelSpec]:
    """The scorer, the item tower and the history encoder, traced on small fixed shapes
    (batch 2, history 3, 3 text and 2 image slots) that parity then avoids. The item tower takes
    the slots of the model's own modalities only."""
    model, feat_dim = ckpt.model, ckpt.model.feat_dim
    modalities = model.cfg.modalities
    length = min(3, ckpt.cfg.model.max_len)
    ids = torch.tensor([[1, 2, 3], [2, 0, 0]])[:, :length]
    masks = {"text": torch.tensor([[True, True, False], [False, False, False]]),
             "image": torch.tensor([[True, False], [True, True]])}
    g = torch.Generator().manual_seed(0)
    item_feats, names, axes = [], [], {}
    for name in modalities:
        mask = masks[name]
        item_feats += [torch.randn(*mask.shape, feat_dim, generator=g), mask]
        names += [f"{name}_feats", f"{name}_mask"]
        axes |= {f"{name}_feats": {0: "n", 1: f"{name}_slots"}, f"{name}_mask": {0: "n", 1: f"{name}_slots"}}
    history = (torch.randn(2, length, len(modalities) * model.cfg.d, generator=g), torch.tensor([length, 1]))
    return [
        ModelSpec("scorer", Scorer(model, *serving_vectors(ckpt), k, topk_block), (ids,), ("ids",),
                  ("scores", "items", "user"), {"ids": {0: "batch", 1: "history"}}),
        ModelSpec("item_tower", ItemTower(model, ckpt.id_emb), tuple(item_feats), tuple(names), ("table", "inputs"),
                  axes),
        ModelSpec("history_encoder", HistoryEncoder(model), history, ("inputs", "lengths"), ("user",),
                  {"inputs": {0: "batch", 1: "history"}, "lengths": {0: "batch"}}),
    ]


def encoder_specs(text, clip) -> list[ModelSpec]:
    """The feature extractors (train/features) that made the run's features: a TextEncoder and,
    if the items had images, a Clip; traced on a padded batch of two sentences."""
    tokens = text.tokenizer(["A red tent.", "It sleeps four people in the rain."], padding=True, return_tensors="pt")
    specs = [ModelSpec("text_encoder", SentenceEncoder(text.model, text.pooling, text.normalize),
                       (tokens["input_ids"], tokens["attention_mask"]), ("input_ids", "attention_mask"), ("vectors",),
                       {"input_ids": {0: "batch", 1: "tokens"}, "attention_mask": {0: "batch", 1: "tokens"}})]
    if clip is not None:
        size = image_size(clip)
        pixels = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
        specs.append(ModelSpec("image_encoder", ImageEncoder(clip.model), (pixels,), ("pixels",), ("vectors",),
                               {"pixels": {0: "batch"}}))
    return specs


def image_size(clip) -> int:
    size = clip.model.visual.image_size
    return size[0] if isinstance(size, tuple | list) else int(size)


def export_onnx(spec: ModelSpec, path: Path, limits: dict[str, int]) -> None:
    """Trace `spec.module` to an fp32 ONNX file at `path`; `limits` caps named axes (history <=
    max_len positions, tokens <= the text encoder's maximum)."""
    dims = {n: Dim(n, max=limits[n]) if n in limits else Dim(n)
            for axes in spec.dynamic_axes.values() for n in axes.values()}
    shapes = tuple({axis: dims[n] for axis, n in spec.dynamic_axes[i].items()} for i in spec.inputs)
    spec.module.eval()
    with warnings.catch_warnings(), torch.no_grad():
        # The exporter warns when two inputs share an axis name (batch), which is the intent.
        warnings.filterwarnings("ignore", message=".*axis name.*")
        torch.onnx.export(
            spec.module, spec.example, str(path), dynamo=True, opset_version=OPSET,
            input_names=list(spec.inputs), output_names=list(spec.outputs),
            dynamic_shapes=shapes, external_data=False, verbose=False,
        )
    onnx.checker.check_model(str(path), full_check=True)


def convert_fp16(path: Path) -> None:
    """Rewrite an fp32 ONNX file in place with fp16 weights and compute, fp32 inputs and outputs.

    Converting the exported graph (onnxruntime's own converter, shipped with onnxruntime) rather
    than tracing a half-precision copy of the model keeps one traced graph for both precisions.
    Kept in fp32: LayerNormalization and Softmax (variance and exp sums lose too much in fp16),
    ReduceL2, the norm of every normalisation (a squared sum overflows fp16 above 65504), and the
    converter's own list (TopK, Range...). The item table and every matmul are fp16, which is
    where the memory and time go on a large catalogue."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    model = onnx.load(str(path))
    # The exporter's intermediate type annotations would go stale under the converter, which
    # re-infers the types it needs.
    del model.graph.value_info[:]
    blocked = [*DEFAULT_OP_BLOCK_LIST, "LayerNormalization", "Softmax", "ReduceL2"]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*truncated.*")  # constants clipped to fp16 range
        half = ir.from_proto(convert_float_to_float16(model, keep_io_types=True, op_block_list=blocked))
    half.graph.sort()  # the converter appends its Cast nodes out of topological order
    onnx.save(ir.to_proto(half), str(path))
    onnx.checker.check_model(str(path), full_check=True)


def describe(path: Path) -> dict:
    """Inputs and outputs of an ONNX file as manifest entries: [{name, dtype, shape}], with the
    dynamic axes as their symbolic names."""
    graph = onnx.load(str(path), load_external_data=False).graph

    def entry(value: onnx.ValueInfoProto) -> dict:
        tensor = value.type.tensor_type
        shape = [d.dim_param or d.dim_value for d in tensor.shape.dim]
        return {"name": value.name, "dtype": DTYPES[tensor.elem_type], "shape": shape}

    return {"inputs": [entry(v) for v in graph.input], "outputs": [entry(v) for v in graph.output]}

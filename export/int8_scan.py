"""The scorer's catalogue scan in int8, then an exact rescoring of the best candidates.

    model = with_int8_scan(onnx.load("scorer.onnx"), table, k=100, candidates=512)

On a CPU the scan of a large catalogue is one pass over the item table per history, bound by
memory bandwidth: int8 codes are a quarter of the fp32 bytes. The rewritten scorer

1. quantises the user vector u per row (8 bits: q_u in [-127, 127], s_u = max|u| / 127) and
   scans the table's int8 codes (per item: q_n in [-63, 63], s_n = max|x_n| / 63) with
   MatMulInteger, exact in int32; approx_n = s_u s_n (q_u . q_n);
2. keeps the C best items by approx_n (TopK C) and rescores them against the full-precision rows
   (Gather, then one dot product each): the K best of those are its `scores` and `items`;
3. returns `bound` (batch, 1): no item outside `items` scores above it. With u~, x~ the
   dequantised vectors, approx - exact = (u~ - u) . x~ + u . (x~ - x), so by Cauchy-Schwarz
   |approx_n - exact_n| <= |u~ - u| max|x~| + |u| max|x~ - x| = error, and an item that is not
   a candidate has exact <= approx + error <= approx_C + error; a candidate outside the top K
   scores at most the K-th score. bound = max(approx_C + error, K-th score).

A caller's top k (after its own exclusions) is exact, up to ties, when its k-th score is at
least `bound`; otherwise it rescans that history in full precision (the runtime does:
Scorer._from_user). The item codes keep 7 bits so that no pair of uint8 x int8 products
overflows 16 bits: x86 CPUs without VNNI add such pairs with saturation (VPMADDUBSW), which
would break the exactness that the bound assumes.

Each step is a per-row computation, so a row's result never depends on the rest of the batch.
The nodes are appended to the exported scorer's graph, from its `user` output on; its own
catalogue MatMul and TopK are left unused and pruned with their table.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

TABLE_LEVELS = 63  # item codes in [-63, 63]: 7 bits, see the module docstring
USER_LEVELS = 127  # user codes in [-127, 127], stored as uint8 around a zero point of 128
# Added to the bound, times |u| max|x~|: the float rounding of the rescoring dot products and of
# the scale products, each far below 1e-5 of the scores' range.
ROUNDING = 1e-5


def quantize_rows(table: np.ndarray, levels: int = TABLE_LEVELS) -> tuple[np.ndarray, np.ndarray]:
    """Per-row symmetric codes int8 (N, D) in [-levels, levels] and scales float32 (N,):
    table ~ codes * scales[:, None]. All-zero rows get scale 1 and zero codes."""
    table = np.asarray(table, dtype=np.float64)
    peak = np.abs(table).max(axis=1)
    scales = np.where(peak > 0, peak / levels, 1.0).astype(np.float32)
    codes = np.clip(np.rint(table / scales[:, None]), -levels, levels).astype(np.int8)
    return codes, scales


def error_constants(table: np.ndarray, codes: np.ndarray, scales: np.ndarray) -> tuple[float, float]:
    """(max_n |x~_n|, max_n |x~_n - x_n|) in float64, x~ = codes * scales as the graph scales them."""
    table = np.asarray(table, dtype=np.float64)
    dequantized = codes.astype(np.float64) * scales.astype(np.float64)[:, None]
    return (float(np.linalg.norm(dequantized, axis=1).max()),
            float(np.linalg.norm(dequantized - table, axis=1).max()))


def with_int8_scan(model: onnx.ModelProto, table: np.ndarray, k: int, candidates: int) -> onnx.ModelProto:
    """`model` (a scorer: ids -> scores, items, user) with its catalogue scan replaced as the
    module docstring says. `table` (N + 1, 2d) float32 or float16: the rows the scorer ranks,
    row 0 the padding item (never returned); rescored in its own precision widened to float32.
    Requires k <= candidates < N."""
    rows_table = np.asarray(table)[1:]  # item j is row j - 1: the padding item is not scanned
    items = len(rows_table)
    if not k <= candidates < items:
        raise ValueError(f"need top_k {k} <= candidates {candidates} < items {items}")
    full = rows_table.astype(np.float32)
    codes, scales = quantize_rows(full)
    largest, table_error = error_constants(full, codes, scales)
    graph = model.graph
    outputs = {o.name: o for o in graph.output}
    if not {"scores", "items", "user"} <= set(outputs):
        raise ValueError("the scorer graph lacks one of its outputs scores, items, user")

    def const(name: str, value) -> str:
        graph.initializer.append(numpy_helper.from_array(np.asarray(value), f"int8_scan/{name}"))
        return f"int8_scan/{name}"

    nodes: list[onnx.NodeProto] = []

    def node(op: str, inputs: list[str], name: str, count: int = 1, **attrs) -> str:
        """Appends one node; returns its first output's name (the others: NAME:1, ...)."""
        out = [f"int8_scan/{name}"] + [f"int8_scan/{name}:{i}" for i in range(1, count)]
        nodes.append(helper.make_node(op, inputs, out, name=out[0], **attrs))
        return out[0]

    last = const("last_axis", np.array([-1], np.int64))
    # 1. The user vector in 8 bits per row; the scan ranks by s_n (q_u . q_n), which orders
    #    items as approx_n does (s_u > 0 is the row's own constant).
    peak = node("ReduceMax", [node("Abs", ["user"], "abs_user"), last], "peak", keepdims=1)  # (B, 1)
    s_u = node("Div", [node("Max", [peak, const("tiny", np.float32(1e-30))], "peak_pos"),
                       const("user_levels", np.float32(USER_LEVELS))], "s_u")
    rounded = node("Round", [node("Div", ["user", s_u], "scaled_user")], "rounded_user")  # [-127, 127]
    q_u = node("Cast", [node("Add", [rounded, const("zero_f", np.float32(128))], "shifted_user")],
               "q_u", to=TensorProto.UINT8)
    dot = node("MatMulInteger", [q_u, const("codes_t", np.ascontiguousarray(codes.T)),
                                 const("zero_point", np.uint8(128))], "dot")  # (B, N) int32, exact
    ranked = node("Mul", [node("Cast", [dot], "dot_f", to=TensorProto.FLOAT), const("scales", scales)], "ranked")
    # 2. The C best, rescored in full precision.
    top_ranked = node("TopK", [ranked, const("candidates", np.array([candidates], np.int64))],
                      "top_ranked", count=2, axis=-1)
    cand = f"{top_ranked}:1"  # (B, C) row indices
    rows = node("Gather", [const("table", rows_table), cand], "rows", axis=0)  # (B, C, 2d)
    if rows_table.dtype != np.float32:
        rows = node("Cast", [rows], "rows_f", to=TensorProto.FLOAT)
    user_col = node("Unsqueeze", ["user", last], "user_col")  # (B, 2d, 1)
    rescored = node("Squeeze", [node("MatMul", [rows, user_col], "rescored_col"), last], "rescored")  # (B, C)
    kk = const("k", np.array([k], np.int64))
    top = node("TopK", [rescored, kk], "top", count=2, axis=-1)
    picked = node("GatherElements", [cand, f"{top}:1"], "picked", axis=1)
    # 3. The bound: no non-candidate scores above approx_C + error.
    dequant = node("Mul", [node("Sub", [node("Cast", [q_u], "q_u_f", to=TensorProto.FLOAT),
                                        const("zero_f2", np.float32(128))], "q_u_centred"), s_u], "user_q")
    user_error = node("ReduceL2", [node("Sub", [dequant, "user"], "user_diff"), last], "user_error", keepdims=1)
    user_norm = node("ReduceL2", ["user", last], "user_norm", keepdims=1)
    error = node("Add", [node("Mul", [user_error, const("largest", np.float32(largest))], "e_user"),
                         node("Mul", [user_norm, const("table_error", np.float32(table_error + ROUNDING * largest))],
                              "e_table")], "error")  # (B, 1)
    c_th = node("Slice", [top_ranked, const("c_1", np.array([candidates - 1], np.int64)),
                          const("c", np.array([candidates], np.int64)), last], "ranked_c")
    # Candidates that missed the top K score at most its K-th score.
    kth = node("Slice", [top, const("k_1", np.array([k - 1], np.int64)), kk, last], "kth")
    beyond = node("Add", [node("Mul", [c_th, s_u], "approx_c"), error], "beyond")  # (B, 1)
    nodes += [
        helper.make_node("Max", [beyond, kth], ["bound"], name="int8_scan/bound"),
        helper.make_node("Identity", [top], ["scores"], name="int8_scan/scores"),
        helper.make_node("Add", [picked, const("one", np.array(1, np.int64))], ["items"],
                         name="int8_scan/items"),  # row j - 1 -> item j
    ]

    # Rewire: the old scores / items producers lose their outputs, then everything unused goes.
    for n in graph.node:
        for i, name in enumerate(n.output):
            if name in ("scores", "items"):
                n.output[i] = f"unused/{name}"
    graph.node.extend(nodes)
    batch = outputs["scores"].type.tensor_type.shape.dim[0]
    graph.output.append(helper.make_tensor_value_info(
        "bound", TensorProto.FLOAT, [batch.dim_param or batch.dim_value, 1]))
    _prune(graph)
    return model


def _prune(graph: onnx.GraphProto) -> None:
    """Drop the nodes and initializers that no graph output depends on."""
    needed = {o.name for o in graph.output}
    kept = []
    for n in reversed(graph.node):
        if any(o in needed for o in n.output):
            kept.append(n)
            needed.update(i for i in n.input if i)
    del graph.node[:]
    graph.node.extend(reversed(kept))
    initializers = [t for t in graph.initializer if t.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(initializers)
    values = [v for v in graph.value_info if v.name in needed]
    del graph.value_info[:]
    graph.value_info.extend(values)

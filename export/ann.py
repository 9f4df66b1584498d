"""`mp4sr-rt export --ann ivf|hnsw`: a FAISS index over the serving table, tuned behind a recall gate.

The search setting (IVF nprobe, HNSW efSearch) is raised step by step until the index's top k
holds at least `--ann-recall` of the exact top k (k = --ann-k, by default the scorer's K; and 10) for the user
vectors of one set of histories; the setting is then checked on another set, drawn
independently, and the export fails (nothing written) if either set misses the target. Users
come from the PyTorch model's own forward (parity.reference_users), the exact top k from the
serving table the scorer folds in.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from mp4sr_export import parity
from mp4sr_export.onnx import serving_inputs
from mp4sr_train.checkpoint import Checkpoint
from mp4sr_train.model import serving_table

from mp4sr_rt import ann
from mp4sr_rt.errors import UserError

INDEX_FILE = "ann.faiss"
TUNE_SEED, CHECK_SEED = 11, 12  # two independent draws of parity histories


class AnnRecallError(UserError):
    """The index cannot reach the recall asked for: the export is discarded."""


def users(ckpt: Checkpoint, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.concatenate([parity.reference_users(ckpt, ids) for ids in parity.batches(rng, ckpt)])


def measure(index_search: ann.AnnSearch, table: np.ndarray, u: np.ndarray, k: int) -> dict[str, float]:
    exact = ann.exact_top(table, u, k)
    found = index_search.search(u, k)[1]
    return {"recall_at_10": ann.recall(found, exact, min(10, k)), "recall_at_k": ann.recall(found, exact, k)}


def build_ann(ckpt: Checkpoint, kind: str, target: float, k: int, staging: Path, log) -> dict:
    """Write the index into `staging`; returns its manifest entry. AnnRecallError if the target
    cannot be met on both sets of histories."""
    start = time.perf_counter()
    table = serving_table(serving_inputs(ckpt)).numpy()[1:].astype(np.float32)  # (N, M d), position = index - 1
    index = ann.build(kind, table)
    seconds = time.perf_counter() - start
    tune, check = users(ckpt, TUNE_SEED), users(ckpt, CHECK_SEED)
    tried = []
    for setting in ann.search_ladder(kind, index, k):
        search = ann.AnnSearch(index, kind, setting)
        figures = measure(search, table, tune, k)
        tried.append(f"{setting}: recall@10 {figures['recall_at_10']:.4f}, @{k} {figures['recall_at_k']:.4f}")
        if min(figures.values()) >= target:
            break
    else:
        raise AnnRecallError(f"--ann {kind}: no search setting reaches recall {target} of the exact top {k} "
                             f"(tried {'; '.join(tried)}); nothing written. Lower --ann-recall or use --ann none")
    held_out = measure(search, table, check, k)
    if min(held_out.values()) < target:
        raise AnnRecallError(f"--ann {kind} {setting}: recall {target} on the histories it was tuned on, but "
                             f"{held_out} on others; nothing written. Lower --ann-recall")
    ann.import_faiss().write_index(index, str(staging / INDEX_FILE))
    log(f"ann: {kind} {ann.build_params(kind, index)}, search {setting}: recall@10 "
        f"{held_out['recall_at_10']:.4f}, recall@{k} {held_out['recall_at_k']:.4f} on held-out histories")
    return {"file": INDEX_FILE, "kind": kind, "params": ann.build_params(kind, index), "search": setting,
            "target_recall": target, "k": k, **held_out, "tuned_rows": len(tune), "checked_rows": len(check),
            "build_seconds": round(seconds, 3)}

"""`mp4sr-rt export --ann ivf|ivf-pq|hnsw`: a FAISS index over the serving table, tuned behind a recall gate.

The search setting (IVF nprobe, HNSW efSearch) is raised step by step until the index's top k
holds at least `--ann-recall` of the exact top k (k = --ann-k, by default the scorer's K; and 10) for the user
vectors of one set of ROWS histories, judged by the lower bound of the set's mean recall (mean -
2 standard errors over its histories), so that the setting holds on histories it has not seen
rather than on these alone; the setting is then checked on another set, drawn independently,
whose mean recall must reach the target too, and the export fails (nothing written) if either
misses. Users come from the PyTorch model's own forward (parity.reference_users) over random
histories of 1 to L trained items, the exact top k from the serving table the scorer folds in;
recall is that of the runtime's answers, the history's own items left out (`measure`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from mp4sr_export import parity
from mp4sr_export.onnx import serving_vectors
from mp4sr_train.checkpoint import Checkpoint
from mp4sr_train.model import serving_table

from mp4sr_rt import ann
from mp4sr_rt.errors import UserError

INDEX_FILE = "ann.faiss"
TUNE_SEED, CHECK_SEED = 11, 12  # two independent draws of histories
ROWS = 4096  # histories per draw: 2 standard errors of a recall near 0.99 are about 0.001


class AnnRecallError(UserError):
    """The index cannot reach the recall asked for: the export is discarded."""


def histories(ckpt: Checkpoint, seed: int, rows: int = ROWS, batch: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """(user vectors (rows, M d), item ids (rows, L), 0-padded) of random histories of 1 to L items."""
    rng, n, max_len = np.random.default_rng(seed), len(ckpt.item_ids), ckpt.cfg.model.max_len
    starts = range(0, rows, batch)
    ids = np.concatenate([parity.histories(rng, n, min(batch, rows - start), max_len) for start in starts])
    users = np.concatenate([parity.reference_users(ckpt, ids[start:start + batch]) for start in starts])
    return users, ids


def top_unseen(positions: np.ndarray, seen: list[set[int]], k: int) -> np.ndarray:
    """Each row's first k positions outside its history (-1 padded), as the runtime answers."""
    out = np.full((len(positions), k), -1, dtype=np.int64)
    for r, (row, s) in enumerate(zip(positions, seen, strict=True)):
        kept = [p for p in row.tolist() if p >= 0 and p not in s][:k]
        out[r, :len(kept)] = kept
    return out


@dataclass(frozen=True)
class Probe:
    """A set of histories and what the exact scan answers for them, computed once per set."""

    users: np.ndarray  # (rows, M d)
    seen: list[set[int]]  # each history's own items, as index positions
    groups: dict[int, np.ndarray]  # distinct items per history -> its rows: one search per pool size
    exact: np.ndarray  # (rows, k) the exact top k without the history's items


def probe(table: np.ndarray, users: np.ndarray, ids: np.ndarray, k: int) -> Probe:
    seen = [{int(i) - 1 for i in row if i} for row in ids]
    extra = np.array([len(s) for s in seen])
    groups = {int(e): np.flatnonzero(extra == e) for e in np.unique(extra)}
    exact = np.full((len(users), k), -1, dtype=np.int64)
    for e, rows in groups.items():
        exact[rows] = top_unseen(ann.exact_top(table, users[rows], k + e), [seen[r] for r in rows], k)
    return Probe(users, seen, groups, exact)


def measure(index_search: ann.AnnSearch, probe: Probe, k: int) -> dict[str, float]:
    """Recall of what the runtime returns: per history the index's top k + (its distinct items)
    candidates, its own items dropped, against the exact top k without them. Mean recall@10 and
    recall@k, and `lower`: the smaller of their lower bounds (mean - 2 SE over the histories)."""
    found = np.full(probe.exact.shape, -1, dtype=np.int64)
    for e, rows in probe.groups.items():  # like requests of that history length
        found[rows] = top_unseen(index_search.search(probe.users[rows], k + e)[1], [probe.seen[r] for r in rows], k)
    figures, lower = {}, 1.0
    for name, top in (("recall_at_10", min(10, k)), ("recall_at_k", k)):
        per_row = ann.recalls(found, probe.exact, top)
        figures[name] = float(per_row.mean())
        lower = min(lower, figures[name] - 2 * float(per_row.std()) / np.sqrt(len(per_row)))
    return {**figures, "lower": lower}


def build_ann(ckpt: Checkpoint, kind: str, target: float, k: int, staging: Path, log) -> dict:
    """Write the index into `staging`; returns its manifest entry. AnnRecallError if the target
    cannot be met on both sets of histories."""
    start = time.perf_counter()
    table = serving_table(serving_vectors(ckpt)[1]).numpy()[1:].astype(np.float32)  # (N, M d), position = index - 1
    index = ann.build(kind, table)
    seconds = time.perf_counter() - start
    tune, check = (probe(table, *histories(ckpt, seed), k) for seed in (TUNE_SEED, CHECK_SEED))
    tried = []
    for setting in ann.search_ladder(kind, index, k):
        search = ann.AnnSearch(index, kind, setting)
        figures = measure(search, tune, k)
        tried.append(f"{setting}: recall@10 {figures['recall_at_10']:.4f}, @{k} {figures['recall_at_k']:.4f} "
                     f"(lower bound {figures['lower']:.4f})")
        if figures["lower"] >= target:
            break
    else:
        raise AnnRecallError(f"--ann {kind}: no search setting reaches recall {target} of the exact top {k} "
                             f"(tried {'; '.join(tried)}); nothing written. Lower --ann-recall or use --ann none")
    held_out = measure(search, check, k)
    del held_out["lower"]
    if min(held_out.values()) < target:
        raise AnnRecallError(f"--ann {kind} {setting}: recall {target} on the histories it was tuned on, but "
                             f"{held_out} on others; nothing written. Lower --ann-recall")
    ann.import_faiss().write_index(index, str(staging / INDEX_FILE))
    log(f"ann: {kind} {ann.build_params(kind, index)}, search {setting}: recall@10 "
        f"{held_out['recall_at_10']:.4f}, recall@{k} {held_out['recall_at_k']:.4f} on held-out histories")
    return {"file": INDEX_FILE, "kind": kind, "params": ann.build_params(kind, index), "search": setting,
            "target_recall": target, "k": k, **held_out, "tuned_rows": len(tune.users),
            "checked_rows": len(check.users), "build_seconds": round(seconds, 3)}

"""The HNSW index export builds against HNSW over fp32 rows: recall@10 and batch-1 search time,
on one item table and one set of user vectors, timed in turns.

    python benchmarks/ann_variants.py --run mp4sr-out --items 1000000

The table: the trained model in --run over a generated catalogue of --items items (the serving
benchmark's synthetic catalogue, benchmarks/serving.py); the users: the model's own user vectors
of 2,048 random histories (1 to L items), as the export's recall gate draws them. Recall is the
runtime's: per history the index's top 10 + (its length) candidates, its own items dropped,
against the exact top 10 without them. Search time: mp4sr_rt.ann.AnnSearch.search alone (one
thread, batch 1, 300 histories, p50), without the history encoder or the runtime around it; the
systems take turns on every history, so that the machine's load falls on all of them alike.
Systems:
- hnsw-fp32: IndexHNSWFlat, the graph over the fp32 rows (exports before the fp16 graph);
- hnsw: what `export --ann hnsw` builds (mp4sr_rt.ann.build): an HNSW graph over fp16 rows under an
  IndexRefineFlat that ranks 2 x the asked-for candidates again on the fp32 rows;
- hnsw-fp16-graph: that index's graph alone (its fp16 order, no second ranking): what the refine
  step buys.
One JSON line per system and efSearch.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import faiss  # noqa: E402
from mp4sr_export.ann import histories, probe, top_unseen  # noqa: E402
from mp4sr_export.onnx import serving_vectors  # noqa: E402
from mp4sr_train.checkpoint import load_checkpoint  # noqa: E402
from mp4sr_train.model import serving_table  # noqa: E402
from serving import synthetic  # noqa: E402

from mp4sr_rt import ann  # noqa: E402

K, ROWS, TIMED = 10, 2048, 300


def build_all(table: np.ndarray) -> dict[str, tuple[object, float]]:
    """System name -> (FAISS index, build seconds)."""
    out = {}
    t0 = time.perf_counter()
    flat = faiss.IndexHNSWFlat(table.shape[1], ann.HNSW_M, faiss.METRIC_INNER_PRODUCT)
    flat.hnsw.efConstruction = ann.HNSW_EF_CONSTRUCTION
    flat.add(table)
    out["hnsw-fp32"] = flat, time.perf_counter() - t0
    t0 = time.perf_counter()
    refined = ann.build("hnsw", table)
    out["hnsw"] = refined, time.perf_counter() - t0
    out["hnsw-fp16-graph"] = faiss.downcast_index(refined.base_index), out["hnsw"][1]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, default=ROOT / "mp4sr-out")
    p.add_argument("--items", type=int, default=1_000_000)
    p.add_argument("--ef-search", default="128,192,256,320,384")
    args = p.parse_args()
    torch.manual_seed(0)
    ckpt = synthetic(load_checkpoint(args.run / "checkpoint"), args.items)
    table = serving_table(serving_vectors(ckpt)[1]).numpy()[1:].astype(np.float32)
    users, ids = histories(ckpt, seed=11, rows=ROWS)
    truth = probe(table, users, ids, K)
    faiss.omp_set_num_threads(os.cpu_count())
    systems = build_all(table)
    faiss.omp_set_num_threads(1)
    for ef in (int(v) for v in args.ef_search.split(",")):
        searches = {name: ann.AnnSearch(index, "hnsw", {"ef_search": ef}) for name, (index, _) in systems.items()}
        times: dict[str, list[float]] = {name: [] for name in systems}
        for r in range(TIMED):  # in turns
            for name, search in searches.items():
                t = time.perf_counter()
                search.search(truth.users[r:r + 1], K + len(truth.seen[r]))
                times[name].append(time.perf_counter() - t)
        for name, search in searches.items():
            found = np.full(truth.exact.shape, -1, dtype=np.int64)
            for extra, rows in truth.groups.items():
                positions = search.search(truth.users[rows], K + extra)[1]
                found[rows] = top_unseen(positions, [truth.seen[r] for r in rows], K)
            recall = ann.recalls(found, truth.exact, K)
            print(json.dumps({"items": args.items, "system": name, "ef_search": ef,
                              "recall_at_10": round(float(recall.mean()), 4),
                              "lower_bound": round(float(recall.mean() - 2 * recall.std() / np.sqrt(len(recall))), 4),
                              "search_p50_ms": round(1e3 * float(np.median(times[name])), 3),
                              "build_s": round(systems[name][1], 1)}), flush=True)


if __name__ == "__main__":
    main()

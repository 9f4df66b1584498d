"""The HNSW index export builds against other FAISS indexes: recall@10 and batch-1 search time,
on one item table and one set of user vectors, timed in turns.

    python benchmarks/ann_variants.py --run mp4sr-out --items 1000000
    python benchmarks/ann_variants.py --items 1000000 --systems hnsw,ivf-pq,ivf-pq64

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
  step buys;
- hnsw-m48: the export's index with 48 links per node instead of 32 (a denser graph, fewer hops);
- ivf-pq: what `export --ann ivf-pq` builds (mp4sr_rt.ann.build): IVF over about 4 sqrt(N) lists
  (4,000 at 1M items) of 4-bit codes, one per dimension, scanned with FAISS's SIMD "fast scan",
  then 4 x the asked-for candidates ranked again on the fp32 rows: it reads D / 2 bytes per item
  scanned instead of a graph's random rows;
- ivf-pq64: IVF over 4,096 lists of 4-bit product codes of 64 two-dimensional sub-vectors (half
  the bytes of ivf-pq's), IVF_PQ64_REFINE x the asked-for candidates ranked again on the fp32 rows.
The IVF systems' setting is nprobe, the i-th of IVF_NPROBE taking its turn beside the i-th
efSearch of the graphs.
The default systems are the first three. One JSON line per system and setting.
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
SYSTEMS = ("hnsw-fp32", "hnsw", "hnsw-fp16-graph", "hnsw-m48", "ivf-pq", "ivf-pq64")
IVF_PQ64 = "IVF4096,PQ64x4fs,RFlat"
IVF_PQ64_REFINE = 64  # fewer candidates ranked again lose recall to the 4-bit codes (16: 0.96 at nprobe 256)
IVF_NPROBE = (64, 128, 256, 384, 512)


def build_all(table: np.ndarray, names: list[str]) -> dict[str, tuple[object, float]]:
    """System name -> (FAISS index, build seconds)."""
    out = {}
    if "hnsw-fp32" in names:
        t0 = time.perf_counter()
        flat = faiss.IndexHNSWFlat(table.shape[1], ann.HNSW_M, faiss.METRIC_INNER_PRODUCT)
        flat.hnsw.efConstruction = ann.HNSW_EF_CONSTRUCTION
        flat.add(table)
        out["hnsw-fp32"] = flat, time.perf_counter() - t0
    if {"hnsw", "hnsw-fp16-graph"} & set(names):
        t0 = time.perf_counter()
        refined = ann.build("hnsw", table)
        out["hnsw"] = refined, time.perf_counter() - t0
        out["hnsw-fp16-graph"] = faiss.downcast_index(refined.base_index), out["hnsw"][1]
    if "hnsw-m48" in names:
        t0 = time.perf_counter()
        out["hnsw-m48"] = ann.build("hnsw", table, m=48), time.perf_counter() - t0
    if "ivf-pq" in names:
        t0 = time.perf_counter()
        out["ivf-pq"] = ann.build("ivf-pq", table), time.perf_counter() - t0
    if "ivf-pq64" in names:
        t0 = time.perf_counter()
        index = faiss.index_factory(table.shape[1], IVF_PQ64, faiss.METRIC_INNER_PRODUCT)
        faiss.extract_index_ivf(index).cp.seed = 0
        index.train(table)
        index.add(table)
        index.k_factor = IVF_PQ64_REFINE
        out["ivf-pq64"] = index, time.perf_counter() - t0
    return {name: out[name] for name in names}


def searcher(name: str, index, step: int, ef: int):
    if name.startswith("ivf"):
        return ann.AnnSearch(index, "ivf-pq", {"nprobe": IVF_NPROBE[step]}), {"nprobe": IVF_NPROBE[step]}
    return ann.AnnSearch(index, "hnsw", {"ef_search": ef}), {"ef_search": ef}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, default=ROOT / "mp4sr-out")
    p.add_argument("--items", type=int, default=1_000_000)
    p.add_argument("--ef-search", default="128,192,256,320,384")
    p.add_argument("--systems", default="hnsw-fp32,hnsw,hnsw-fp16-graph", help=f"of {', '.join(SYSTEMS)}")
    args = p.parse_args()
    names = args.systems.split(",")
    efs = [int(v) for v in args.ef_search.split(",")]
    if not set(names) <= set(SYSTEMS) or (any(n.startswith("ivf") for n in names) and len(efs) > len(IVF_NPROBE)):
        p.error(f"--systems: of {', '.join(SYSTEMS)}; with ivf-pq at most {len(IVF_NPROBE)} efSearch steps")
    torch.manual_seed(0)
    ckpt = synthetic(load_checkpoint(args.run / "checkpoint"), args.items)
    table = serving_table(serving_vectors(ckpt)[1]).numpy()[1:].astype(np.float32)
    users, ids = histories(ckpt, seed=11, rows=ROWS)
    truth = probe(table, users, ids, K)
    faiss.omp_set_num_threads(os.cpu_count())
    systems = build_all(table, names)
    faiss.omp_set_num_threads(1)
    for step, ef in enumerate(efs):
        searches = {name: searcher(name, index, step, ef) for name, (index, _) in systems.items()}
        times: dict[str, list[float]] = {name: [] for name in systems}
        for r in range(TIMED):  # in turns
            for name, (search, _) in searches.items():
                t = time.perf_counter()
                search.search(truth.users[r:r + 1], K + len(truth.seen[r]))
                times[name].append(time.perf_counter() - t)
        for name, (search, setting) in searches.items():
            found = np.full(truth.exact.shape, -1, dtype=np.int64)
            for extra, rows in truth.groups.items():
                positions = search.search(truth.users[rows], K + extra)[1]
                found[rows] = top_unseen(positions, [truth.seen[r] for r in rows], K)
            recall = ann.recalls(found, truth.exact, K)
            print(json.dumps({"items": args.items, "system": name, **setting,
                              "recall_at_10": round(float(recall.mean()), 4),
                              "lower_bound": round(float(recall.mean() - 2 * recall.std() / np.sqrt(len(recall))), 4),
                              "search_p50_ms": round(1e3 * float(np.median(times[name])), 3),
                              "build_s": round(systems[name][1], 1)}), flush=True)


if __name__ == "__main__":
    main()

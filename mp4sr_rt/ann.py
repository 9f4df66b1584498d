"""Approximate top-k over the serving table with FAISS (inner product), behind a recall contract.

    index = build("ivf-pq", table)                     # table float32 (N, M d): serving rows of items 1..N
    ann = AnnSearch(index, "ivf-pq", {"nprobe": 64})
    scores, positions = ann.search(users, pool, blocked=..., allowed=...)   # (B, pool) each; -1 when fewer

A row position p is catalogue index p + 1 (index 0 is padding and never in the index); items
added at serve time take the next positions. `mp4sr-rt export --ann ivf|ivf-pq|hnsw` builds the index
and tunes its search parameter until the recall of the exact top k reaches the target on held-out
histories (docs/artifacts.md); the runtime then takes a pool of candidates with their exact scores
(mp4sr_rt.scorer): IVF-Flat keeps the rows in full precision; IVF-PQ scans 4-bit codes of them
(one per dimension, FAISS's SIMD "fast scan") and HNSW walks a graph over fp16 copies of them,
then FAISS ranks their candidates again on the full-precision rows (IndexRefineFlat).
Filters (items excluded, an allow-list, removed items) go through FAISS's ID selectors, so a
filtered request gets the top k of the items it may see.

faiss is imported on first use: install `mp4sr-rt[ann]` (faiss-cpu).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable

import numpy as np

from mp4sr_rt.errors import ArtifactError, UserError

SEARCH_SETTING = {"ivf": "nprobe", "ivf-pq": "nprobe", "hnsw": "ef_search"}  # kind -> its tuned search setting
KINDS = tuple(SEARCH_SETTING)
HNSW_M = 32  # links per node: FAISS's usual choice for recall >= 0.99 on vectors of this size
HNSW_EF_CONSTRUCTION = 200
# The graph walks fp16 copies of the rows (half the memory traffic of fp32; 15-20% less search
# time at 1M items at the same efSearch and recall: benchmarks/ann_variants.py), then FAISS ranks
# HNSW_REFINE_K_FACTOR x the asked-for candidates again on the full-precision rows (IndexRefineFlat):
# the scores it returns are exact.
HNSW_REFINE_K_FACTOR = 2
# efSearch steps of the tuning, about x1.25 to x1.5 apart: search time grows about linearly with efSearch.
HNSW_EF_SEARCH = (16, 24, 32, 48, 64, 96, 128, 160, 192, 256, 320, 384, 512, 640, 768, 1024, 1536, 2048, 3072,
                  4096)
MIN_POINTS_PER_LIST = 39  # FAISS warns below this many training vectors per IVF list
# IVF-PQ: one 4-bit code per dimension (a 16-level quantiser learnt per dimension: D / 2 bytes a row,
# scanned with SIMD table lookups), then IVF_PQ_REFINE_K_FACTOR x the asked-for candidates ranked
# again on the full-precision rows. At 1M items of 128 dimensions its recall is bounded by the lists
# probed, not by the codes: k_factor 4, 8 and 16 reach the same recall@10 (benchmarks/ann_variants.py).
IVF_PQ_BITS = 4
IVF_PQ_REFINE_K_FACTOR = 4


def import_faiss():
    try:
        import faiss
    except ImportError:
        raise UserError("these artifacts carry an approximate (FAISS) index: install it with "
                        "`pip install 'mp4sr-rt[ann]'` (faiss-cpu), or open the Scorer with ann=False "
                        "(`score --exact`) for the exact scan") from None
    return faiss


def ivf_lists(n: int) -> int:
    """IVF lists for n items: about 4 sqrt(n), with at least MIN_POINTS_PER_LIST items per list."""
    return max(1, min(int(4 * math.sqrt(n)), n // MIN_POINTS_PER_LIST))


def build(kind: str, table: np.ndarray, seed: int = 0, m: int = HNSW_M):
    """A FAISS inner-product index over `table` (N, D) float32, rows at positions 0..N-1; `m`: the
    HNSW graph's links per node (benchmarks/ann_variants.py tries others)."""
    faiss = import_faiss()
    n, dim = table.shape
    table = np.ascontiguousarray(table, dtype=np.float32)
    if kind == "ivf":
        nlist = ivf_lists(n)
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = seed
        index.train(table)
        index.add_with_ids(table, np.arange(n, dtype=np.int64))
    elif kind == "ivf-pq":
        quantizer = faiss.IndexFlatIP(dim)
        lists = faiss.IndexIVFPQFastScan(quantizer, dim, ivf_lists(n), dim, IVF_PQ_BITS, faiss.METRIC_INNER_PRODUCT)
        lists.own_fields = True  # the lists own their quantizer
        quantizer.this.disown()
        lists.by_residual = False  # one code book for every list: one lookup table per query
        lists.cp.seed = seed
        index = _refined(faiss, lists, IVF_PQ_REFINE_K_FACTOR, table)
    elif kind == "hnsw":
        graph = faiss.IndexHNSWSQ(dim, faiss.ScalarQuantizer.QT_fp16, m, faiss.METRIC_INNER_PRODUCT)
        graph.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        index = _refined(faiss, graph, HNSW_REFINE_K_FACTOR, table)
    else:
        raise UserError(f"unknown index kind {kind!r}; choose {', '.join(KINDS)}")
    return index


def _refined(faiss, base, k_factor: int, table: np.ndarray):
    """An IndexRefineFlat over `base`, trained and filled with `table`: it keeps the full-precision
    rows and ranks k_factor x the asked-for candidates of `base` again on them."""
    index = faiss.IndexRefineFlat(base)
    index.k_factor = k_factor
    index.train(table)
    index.add(table)
    index.own_fields = True  # the refine index owns its base: one object to keep and write
    base.this.disown()
    return index


def build_params(kind: str, index) -> dict[str, int]:
    if kind == "ivf":
        return {"nlist": int(index.nlist)}
    if kind == "ivf-pq":
        faiss = import_faiss()
        lists = faiss.downcast_index(faiss.extract_index_ivf(index))
        return {"nlist": int(lists.nlist), "pq_m": int(lists.pq.M), "pq_bits": int(lists.pq.nbits),
                "refine_k_factor": int(index.k_factor)}
    return {"m": HNSW_M, "ef_construction": HNSW_EF_CONSTRUCTION, "graph_bits": 16,
            "refine_k_factor": HNSW_REFINE_K_FACTOR}


def search_ladder(kind: str, index, k: int) -> list[dict[str, int]]:
    """Search settings from fastest to most exact, for tuning."""
    if kind in ("ivf", "ivf-pq"):
        nlist = int(import_faiss().extract_index_ivf(index).nlist)
        steps = [1 << i for i in range(nlist.bit_length()) if 1 << i < nlist] + [nlist]
        return [{"nprobe": p} for p in steps]
    return [{"ef_search": ef} for ef in HNSW_EF_SEARCH if ef >= k]


def exact_top(table: np.ndarray, users: np.ndarray, k: int, chunk: int = 1 << 16) -> np.ndarray:
    """Row positions of the exact top k (best first) of users (B, D) over table (N, D), in chunks
    of the table: memory B x chunk, whatever N."""
    scores, positions = [], []
    for start in range(0, len(table), chunk):
        s = users @ table[start:start + chunk].T
        top = min(k, s.shape[1])
        part = np.argpartition(-s, top - 1, axis=1)[:, :top]
        scores.append(np.take_along_axis(s, part, axis=1))
        positions.append(part + start)
    s, p = np.concatenate(scores, axis=1), np.concatenate(positions, axis=1)
    return np.take_along_axis(p, np.argsort(-s, axis=1, kind="stable")[:, :k], axis=1)


def recalls(found: np.ndarray, exact: np.ndarray, k: int) -> np.ndarray:
    """Per row, the share of its exact top k that `found` (rows of positions, -1 padded) holds."""
    return np.array([len(set(f[:k].tolist()) & set(e[:k].tolist())) / min(k, len(e))
                     for f, e in zip(found, exact, strict=True)])


class AnnSearch:
    """Thread-safe searches and additions on one FAISS index."""

    def __init__(self, index, kind: str, search: dict[str, int], threads: int = 0):
        self.faiss = import_faiss()
        self.index, self.kind, self.search_params = index, kind, dict(search)
        self._lock = threading.Lock()  # FAISS indexes are not safe to add to while searched
        if threads:
            self.faiss.omp_set_num_threads(threads)
        # Most requests carry no filter: their parameters are built once (two SWIG objects per
        # search were tens of microseconds of a sub-millisecond request).
        self._unfiltered = self._params(None)

    @property
    def size(self) -> int:
        return int(self.index.ntotal)

    def _params(self, selector):
        """Search parameters; the selector goes to the index that walks the candidates (under an
        IndexRefineFlat, its graph), which must then outlive the search with the parameters."""
        faiss = self.faiss
        if self.kind == "hnsw":
            inner = faiss.SearchParametersHNSW(sel=selector, efSearch=self.search_params["ef_search"])
        else:
            inner = faiss.SearchParametersIVF(sel=selector, nprobe=self.search_params["nprobe"])
        if not isinstance(self.index, faiss.IndexRefine):  # IVF-Flat, HNSW-Flat (earlier exports)
            return inner, None
        return faiss.IndexRefineSearchParameters(base_index_params=inner, k_factor=self.index.k_factor), inner

    def _selector(self, blocked: Iterable[int], allowed: np.ndarray | None):
        """Positions a search may return: not `blocked`, and among `allowed` when given (None: any)."""
        faiss, parts = self.faiss, []
        blocked = np.fromiter(blocked, dtype=np.int64)
        if len(blocked):
            parts.append(faiss.IDSelectorNot(faiss.IDSelectorBatch(blocked)))
        if allowed is not None:
            parts.append(faiss.IDSelectorBatch(np.ascontiguousarray(allowed, dtype=np.int64)))
        if not parts:
            return None, []
        selector = parts[0] if len(parts) == 1 else faiss.IDSelectorAnd(*parts)
        return selector, parts  # the parts must outlive the search (FAISS keeps raw pointers)

    def search(self, users: np.ndarray, pool: int, blocked: Iterable[int] = (),
               allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(scores, positions), each (B, pool), best first: the candidates' inner products with
        the user vectors and their row positions (-1 where fewer exist). The scores are the exact
        ones of the full-precision rows: IVF-Flat stores them, and IVF-PQ and HNSW rank their
        candidates on them (IndexRefineFlat; HNSW-Flat in artifacts of earlier exports)."""
        selector, keep = self._selector(blocked, allowed)
        params, inner = self._unfiltered if selector is None else self._params(selector)
        with self._lock:
            scores, positions = self.index.search(np.ascontiguousarray(users, dtype=np.float32), pool, params=params)
        del keep, inner
        return scores, positions

    def add(self, rows: np.ndarray, start: int) -> None:
        """Rows (M, D) at positions start .. start + M - 1 (the next ones: items added at serve time)."""
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        with self._lock:
            if self.size != start:
                raise RuntimeError(f"index holds {self.size} rows, cannot add at position {start}")
            if self.kind == "ivf":
                self.index.add_with_ids(rows, np.arange(start, start + len(rows), dtype=np.int64))
            else:
                self.index.add(rows)


def read(path, kind: str, search: dict[str, int], threads: int = 0) -> AnnSearch:
    faiss = import_faiss()
    try:
        index = faiss.read_index(str(path))
    except RuntimeError as e:
        raise ArtifactError(f"{path}: FAISS cannot read it ({' '.join(str(e).split())[:200]})") from None
    return AnnSearch(index, kind, search, threads)

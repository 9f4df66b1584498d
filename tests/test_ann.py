"""The approximate index (export --ann): its recall gate, the runtime's search with filters,
added and removed items, against the exact scorer on the same artifacts."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from mp4sr_rt.errors import UserError
from mp4sr_rt.manifest import verify_artifacts
from mp4sr_rt.scorer import Scorer

ITEMS = 3000


@pytest.fixture(scope="module")
def catalogue_run(tiny_run, tmp_path_factory) -> Path:
    """The tiny model over a 3,000-item catalogue of generated features: an item table with the
    clustered structure of a trained one."""
    import torch
    from mp4sr_train.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
    from mp4sr_train.data.demo import catalogue_features
    from mp4sr_train.model import ItemFeatures

    base = load_checkpoint(tiny_run / "checkpoint")
    f = catalogue_features(ITEMS, base.model.feat_dim, seed=3)
    feats = ItemFeatures(*(torch.as_tensor(f[k]) for k in ("text", "text_mask", "image", "image_mask")))
    with torch.no_grad():
        z = base.model.encode_items(feats)
    counts = np.random.default_rng(0).integers(0, 50, ITEMS + 1)
    counts[0] = 0
    meta = {"stage": "finetune", "item_ids": [f"c{i}" for i in range(ITEMS)], "train_counts": counts.tolist(),
            "features": {}}
    run = tmp_path_factory.mktemp("catalogue") / "run"
    save_checkpoint(run / "checkpoint", Checkpoint(base.cfg, base.model, None, z, meta))
    return run


@pytest.fixture(scope="module", params=["ivf", "ivf-pq", "hnsw"])
def indexed(catalogue_run, tmp_path_factory, request) -> Path:
    """Artifacts with each kind of index; the tests below run on each."""
    from mp4sr_export.run import export

    out = tmp_path_factory.mktemp(f"ann-{request.param}") / "artifacts"
    export(catalogue_run, out, top_k=50, ann=request.param, ann_recall=0.99)
    return out


def histories(n: int, seed: int) -> list[list[str]]:
    rng = np.random.default_rng(seed)
    return [[f"c{i}" for i in rng.integers(0, ITEMS, rng.integers(1, 9))] for _ in range(n)]


def overlap(a, b, k: int) -> float:
    return float(np.mean([len(set(x.items[:k]) & set(y.items[:k])) / k for x, y in zip(a, b, strict=True)]))


def test_the_index_is_tuned_behind_the_gate_and_recorded(indexed):
    manifest = verify_artifacts(indexed)
    spec = manifest.ann
    if spec.kind == "ivf":
        assert spec.params["nlist"] > 1 and 1 <= spec.search["nprobe"] <= spec.params["nlist"]
    elif spec.kind == "ivf-pq":  # 4-bit codes, one per dimension, ranked again on the full-precision rows
        assert spec.params["nlist"] > 1 and 1 <= spec.search["nprobe"] <= spec.params["nlist"]
        assert (spec.params["pq_m"], spec.params["pq_bits"], spec.params["refine_k_factor"]) == (manifest.dim, 4, 4)
    else:  # an fp16 graph whose candidates FAISS ranks again on the full-precision rows
        assert spec.params == {"m": 32, "ef_construction": 200, "graph_bits": 16, "refine_k_factor": 2}
        assert spec.search["ef_search"] >= spec.k
    assert spec.recall_at_10 >= 0.99 and spec.recall_at_k >= 0.99 and spec.k == 50
    assert spec.tuned_rows >= 256 and spec.checked_rows >= 256
    assert manifest.files[spec.file].bytes > ITEMS * manifest.dim * 4


def test_runtime_recall_on_fresh_histories_and_filters(indexed):
    approx, exact = Scorer(indexed, backend="cpu"), Scorer(indexed, backend="cpu", ann=False)
    assert approx.approximate and not exact.approximate
    batch = histories(300, seed=21)
    got, want = approx.score(batch, k=10), exact.score(batch, k=10)
    assert overlap(got, want, 10) >= 0.98
    for g, w in zip(got, want, strict=True):  # scores are the exact ones, in order
        assert g.scores == sorted(g.scores, reverse=True)
        common = set(g.items) & set(w.items)
        assert all(abs(g.scores[g.items.index(i)] - w.scores[w.items.index(i)]) < 1e-5 for i in common)
    # Seen items, an exclusion list and an allow-list, through FAISS's selectors.
    excluded = [item for rec in want[:50] for item in rec.items[:3]]
    got = approx.score(batch[:50], k=10, exclude=excluded)
    assert not {i for rec in got for i in rec.items} & set(excluded)
    assert all(not set(rec.items) & set(h) for rec, h in zip(got, batch[:50], strict=True))
    allowed = [f"c{i}" for i in range(0, ITEMS, 3)]
    got, want = approx.score(batch[:50], k=10, allow=allowed), exact.score(batch[:50], k=10, allow=allowed)
    assert {i for rec in got for i in rec.items} <= set(allowed) and overlap(got, want, 10) >= 0.95
    small = allowed[:7]  # fewer allowed items than k: all of them, in the exact order
    got, want = approx.score(batch[:20], k=10, allow=small), exact.score(batch[:20], k=10, allow=small)
    assert [r.items for r in got] == [r.items for r in want]


def test_added_and_removed_items_on_the_index(indexed):
    approx, exact = Scorer(indexed, backend="cpu"), Scorer(indexed, backend="cpu", ann=False)
    rng = np.random.default_rng(4)
    feats = {"text_feats": rng.normal(size=(20, 2, 12)).astype(np.float32),
             "image_feats": rng.normal(size=(20, 1, 12)).astype(np.float32)}
    for scorer in (approx, exact):
        scorer.add_items([f"new{j}" for j in range(20)], **feats)
    batch = [["new3", "c5"], ["new7"], *histories(100, seed=5)]
    got, want = approx.score(batch, k=10), exact.score(batch, k=10)
    assert overlap(got, want, 10) >= 0.97
    assert any(i.startswith("new") for rec in want for i in rec.items)  # new items do compete
    assert {i for rec in got for i in rec.items if i.startswith("new")} == \
        {i for rec in want for i in rec.items if i.startswith("new")}
    removed = sorted({i for rec in want[:10] for i in rec.items[:2]})
    for scorer in (approx, exact):
        scorer.remove_items(removed)
    assert set(approx.removed) == set(removed)
    got = approx.score(batch, k=10) + approx.score([["unknown"]], k=10) + exact.score(batch[:10], k=10)
    assert not {i for rec in got for i in rec.items} & set(removed)
    with pytest.raises(UserError, match="not in the catalogue"):
        approx.remove_items(["nope"])


def test_a_search_while_items_are_added_keeps_to_its_own_catalogue(indexed):
    """add_items puts the new rows in the index, then publishes them: a search in between may
    find a row its snapshot of the catalogue cannot name, which it must leave out."""
    scorer = Scorer(indexed, backend="cpu")
    batch = histories(20, seed=9)
    before = scorer.score(batch, k=10)
    added = scorer._added
    # Rows the users' own vectors: each one's best possible item, in the index, not yet published.
    users = scorer._users([scorer._prepare(h, added) for h in batch], scorer.max_len, added)
    scorer._ann.add(users.astype(np.float32), scorer.num_items)
    during = scorer.score(batch, k=10)
    assert all(len(rec.items) == 10 for rec in during) and overlap(during, before, 10) >= 0.9
    assert scorer.num_items == ITEMS


def test_an_unreachable_target_fails_the_export_and_writes_nothing(catalogue_run, tmp_path, monkeypatch):
    from mp4sr_export.run import export

    from mp4sr_rt import ann

    monkeypatch.setattr(ann, "search_ladder", lambda kind, index, k: [{"nprobe": 1}])
    out = tmp_path / "artifacts"
    with pytest.raises(UserError, match="no search setting reaches recall 0.999"):
        export(catalogue_run, out, top_k=50, ann="ivf", ann_recall=0.999)
    assert not out.exists() and not list(tmp_path.glob(".artifacts.*"))


def test_hnsw_and_the_cli(catalogue_run, tmp_path):
    from typer.testing import CliRunner

    from mp4sr_cli import app

    out = tmp_path / "artifacts"
    result = CliRunner().invoke(app, ["export", str(catalogue_run), "--out", str(out), "--top-k", "20",
                                      "--ann", "hnsw", "--ann-recall", "0.99", "--ann-k", "10"])
    assert result.exit_code == 0, result.stderr
    spec = verify_artifacts(out).ann
    assert spec.kind == "hnsw" and spec.k == 10 and min(spec.recall_at_10, spec.recall_at_k) >= 0.99
    (tmp_path / "h.json").write_text(json.dumps(histories(5, seed=1)))
    scored = CliRunner().invoke(app, ["score", str(tmp_path / "h.json"), "--artifacts", str(out), "--backend", "cpu",
                                      "--exclude", "c1", "--allow", "c1", "--allow", "c2", "--allow", "c3"])
    assert scored.exit_code == 0, scored.stderr
    assert "hnsw index" in scored.stderr
    assert {i for r in json.loads(scored.stdout) for i in r["items"]} <= {"c2", "c3"}
    bad = CliRunner().invoke(app, ["export", str(catalogue_run), "--out", str(tmp_path / "x"), "--ann", "lsh"])
    assert bad.exit_code == 2 and "--ann: expected ivf, ivf-pq, hnsw or none" in bad.stderr


def test_without_faiss_an_index_says_what_to_install(indexed, monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)
    with pytest.raises(UserError, match=r"pip install 'mp4sr-rt\[ann\]'"):
        Scorer(indexed, backend="cpu")
    assert not Scorer(indexed, backend="cpu", ann=False).approximate


REQUIRE_CPP = __import__("os").environ.get("MP4SR_REQUIRE_CPP") == "1"


def faiss_root() -> Path | None:
    import os

    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mp4sr-rt" / "faiss"
    return root if (root / "usr/lib/x86_64-linux-gnu/libfaiss.a").is_file() else None


@pytest.mark.skipif(not REQUIRE_CPP and (faiss_root() is None or __import__("shutil").which("g++") is None),
                    reason="no FAISS C++ library: run examples/cpp/fetch_faiss.sh (and g++)")
def test_cpp_example_searches_the_index_like_python(indexed, tmp_path):
    """examples/cpp/ann_search.cc, built against Debian's FAISS (1.7.3), reads the index this
    FAISS wrote and returns what the runtime's search returns."""
    import os
    import subprocess

    assert faiss_root() is not None, "examples/cpp/fetch_faiss.sh failed"
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "FAISS_ROOT": str(faiss_root()), "PYTHON": sys.executable}
    from test_export import ort_headers

    env["ORT_INCLUDE_DIR"] = str(ort_headers())
    subprocess.run(["bash", root / "examples/cpp/build.sh", tmp_path], check=True, env=env, capture_output=True)
    scorer = Scorer(indexed, backend="cpu")
    for j, history in enumerate(histories(5, seed=8)):
        ids = np.array([[scorer._index[i] for i in history]])
        user = scorer.backend.run(ids)[2][0].astype(np.float32)
        (tmp_path / f"user{j}.f32").write_bytes(user.tobytes())
        run = subprocess.run([tmp_path / "ann_search", indexed, tmp_path / f"user{j}.f32", "10"], capture_output=True,
                             text=True, check=True)
        got = [line.split("\t") for line in run.stdout.splitlines()]
        scores, positions = scorer._ann.search(user[None], 10)
        assert [item for item, _ in got] == [f"c{p}" for p in positions[0]]
        np.testing.assert_allclose([float(s) for _, s in got], scores[0], rtol=1e-5)


def test_catalogue_versions_reach_the_index_of_every_scorer(indexed, tmp_path):
    import shutil

    from mp4sr_rt import catalogue

    directory = tmp_path / "artifacts"
    shutil.copytree(indexed, directory)
    writer, reader = Scorer(directory, backend="cpu"), Scorer(directory, backend="cpu")
    rng = np.random.default_rng(6)
    feats = {"text_feats": rng.normal(size=(20, 2, 12)).astype(np.float32),
             "image_feats": rng.normal(size=(20, 1, 12)).astype(np.float32)}
    catalogue.update(writer, lambda s: s.add_items([f"new{j}" for j in range(20)], **feats))
    assert reader.refresh() and reader.approximate
    batch = [["new3", "c5"], ["new7"], *histories(50, seed=7)]
    exact = Scorer(directory, backend="cpu", ann=False)
    assert exact.num_items == ITEMS + 20
    for scorer in (reader, Scorer(directory, backend="cpu")):  # taken up, and read at start
        got, want = scorer.score(batch, k=10), exact.score(batch, k=10)
        assert overlap(got, want, 10) >= 0.97
        assert {i for r in got for i in r.items if i.startswith("new")} == \
            {i for r in want for i in r.items if i.startswith("new")} != set()


def test_the_gate_holds_the_lower_bound_of_the_recall_not_its_mean(monkeypatch):
    """A mean at the target from few histories is not enough: the gate uses mean - 2 SE."""
    from mp4sr_export import ann as export_ann

    from mp4sr_rt import ann

    exact = np.tile(np.arange(10), (100, 1))
    found = exact.copy()
    found[0] = np.arange(10, 20)  # one history in 100 misses its whole top 10

    class Search:
        def search(self, users, pool):
            return None, found

    monkeypatch.setattr(ann, "exact_top", lambda table, users, k: exact)
    table, users, no_history = np.zeros((20, 4), np.float32), np.zeros((100, 4), np.float32), np.zeros((100, 5), int)
    figures = export_ann.measure(Search(), export_ann.probe(table, users, no_history, 10), 10)
    assert figures["recall_at_10"] == pytest.approx(0.99) and figures["recall_at_k"] == pytest.approx(0.99)
    assert figures["lower"] == pytest.approx(0.99 - 2 * np.sqrt(0.99 * 0.01) / 10)
    assert figures["lower"] < 0.99


def test_the_gate_measures_what_the_runtime_returns_history_items_left_out(monkeypatch):
    """A history's own items are dropped from the index's answer and from the exact one: an index
    that finds only the exact top k, and not the k + (history length) the runtime asks for, misses."""
    from mp4sr_export import ann as export_ann

    from mp4sr_rt import ann

    k, ids = 3, np.array([[1, 2, 0], [0, 0, 0]])  # history items at positions 0 and 1; an empty one
    ranking = np.tile(np.arange(10), (2, 1))  # the exact order of positions, both rows

    class Search:
        def search(self, users, pool):  # an index that returns only the first 3 of its pool, then -1
            out = np.full((len(users), pool), -1)
            out[:, :3] = ranking[: len(users), :3]
            return None, out

    monkeypatch.setattr(ann, "exact_top", lambda table, users, top: ranking[: len(users), :top])
    table, users = np.zeros((10, 4), np.float32), np.zeros((2, 4), np.float32)
    figures = export_ann.measure(Search(), export_ann.probe(table, users, ids, k), k)
    # Row 0: exact without its items is 2, 3, 4; the index gives 2 of them. Row 1: all 3.
    assert figures["recall_at_k"] == pytest.approx((1 / 3 + 1) / 2)


def test_an_hnsw_flat_index_of_earlier_exports_still_searches_with_filters():
    """Exports before the fp16 graph wrote IndexHNSWFlat: the runtime searches it as before."""
    import faiss

    from mp4sr_rt import ann

    rng = np.random.default_rng(2)
    table = rng.normal(size=(2000, 16)).astype(np.float32)
    users = rng.normal(size=(20, 16)).astype(np.float32)
    flat = faiss.IndexHNSWFlat(16, 32, faiss.METRIC_INNER_PRODUCT)
    flat.add(table)
    search = ann.AnnSearch(flat, "hnsw", {"ef_search": 256})
    blocked = sorted({int(p) for p in ann.exact_top(table, users, 1)[:, 0]})  # every user's best item
    scores, positions = search.search(users, 10, blocked=blocked)
    exact = users @ table.T
    exact[:, blocked] = -np.inf
    assert not set(positions.ravel().tolist()) & set(blocked)
    assert ann.recalls(positions, np.argsort(-exact, axis=1)[:, :10], 10).mean() >= 0.98
    np.testing.assert_allclose(scores, np.take_along_axis(users @ table.T, positions, 1), rtol=1e-5)

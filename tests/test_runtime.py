"""The serving runtime (mp4sr_rt): torch-free imports, parity of every backend with PyTorch,
batch independence, unknown items and fallback, items added at serve time, the micro-batcher."""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from mp4sr_export.onnx import serving_vectors
from mp4sr_export.wrappers import HistoryEncoder, ItemTower
from mp4sr_train.checkpoint import load_checkpoint
from mp4sr_train.model import serving_table, user_vector

from mp4sr_rt.backends import BACKENDS, BackendUnavailable
from mp4sr_rt.batching import BatcherClosed, MicroBatcher, Overloaded
from mp4sr_rt.errors import ArtifactError, UserError
from mp4sr_rt.manifest import MANIFEST, hash_files
from mp4sr_rt.scorer import Scorer

ROOT = Path(__file__).resolve().parents[1]
RUNTIME_MODULES = (
    "mp4sr_rt", "mp4sr_rt.scorer", "mp4sr_rt.batching", "mp4sr_rt.histories", "mp4sr_rt.manifest",
    "mp4sr_rt.backends", "mp4sr_rt.backends.onnxruntime", "mp4sr_rt.backends.tensorrt",
    "mp4sr_rt.commands.score",
)


@pytest.fixture(scope="module")
def scorer(tiny_artifacts) -> Scorer:
    return Scorer(tiny_artifacts, backend="cpu")


@pytest.fixture(scope="module")
def ckpt(tiny_run):
    return load_checkpoint(tiny_run / "checkpoint")


@pytest.fixture(scope="module")
def item_ids(tiny_artifacts) -> list[str]:
    return json.loads((tiny_artifacts / "items.json").read_text())["items"]


def random_histories(item_ids: list[str], count: int, seed: int) -> list[list[str]]:
    """Lengths 0 to 12 (L is 8: some are truncated), some with ids outside the catalogue."""
    rng = random.Random(seed)
    histories = []
    for _ in range(count):
        h = [rng.choice(item_ids) for _ in range(rng.randint(0, 12))]
        if rng.random() < 0.2:
            h.insert(rng.randint(0, len(h)), f"unknown-{rng.randint(0, 9)}")
        histories.append(h)
    return histories


def reference_top_k(ckpt, item_ids, histories, k, exclude_seen):
    """PyTorch: train.model's serving path on the last L known items, full catalogue ranked."""
    index = {item: i + 1 for i, item in enumerate(item_ids)}
    max_len = ckpt.cfg.model.max_len
    known = [[index[i] for i in h if i in index] for h in histories]
    ids = torch.zeros(len(known), max_len, dtype=torch.long)
    for row, h in zip(ids, known, strict=True):
        row[: len(h[-max_len:])] = torch.tensor(h[-max_len:], dtype=torch.long)
    inputs, outputs = serving_vectors(ckpt)
    with torch.no_grad():
        user = user_vector(ckpt.model.encode_history(ids, inputs))
        scores = user @ serving_table(outputs).T  # (B, N + 1)
    scores[:, 0] = float("-inf")
    for row, h in zip(scores, known, strict=True):
        if exclude_seen:
            row[h] = float("-inf")
    top = torch.topk(scores, k)
    return [([item_ids[int(i) - 1] for i in items], s.tolist())
            for items, s in zip(top.indices, top.values, strict=True)]


# -- torch-free runtime ----------------------------------------------------------------------

def test_runtime_never_imports_torch(tiny_artifacts):
    code = f"""
import importlib, sys
for name in {RUNTIME_MODULES!r}:
    importlib.import_module(name)
from mp4sr_rt import MicroBatcher, Scorer
scorer = Scorer({str(tiny_artifacts)!r}, backend="cpu")
with MicroBatcher(scorer.score) as batcher:
    batcher.submit([]).result()
assert "torch" not in sys.modules, "torch was imported"
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr


# -- backends --------------------------------------------------------------------------------

def assert_same_ranking(items, scores, want_items, want_scores, atol: float) -> None:
    """The same items in the same order with the same scores; only items whose expected scores tie
    (within atol) may come in either order among themselves."""
    np.testing.assert_allclose(scores, want_scores, atol=atol)
    assert len(items) == len(want_items)
    start = 0
    for end in range(1, len(want_items) + 1):
        if end == len(want_items) or abs(want_scores[end] - want_scores[end - 1]) > atol:
            assert set(items[start:end]) == set(want_items[start:end]), (start, items, want_items)
            start = end


def test_same_ranking_checks_order_and_pairing():
    assert_same_ranking(["a", "b", "c"], [0.9, 0.5, 0.5], ["a", "c", "b"], [0.9, 0.5, 0.5], atol=1e-6)
    with pytest.raises(AssertionError):
        assert_same_ranking(["b", "a"], [0.9, 0.5], ["a", "b"], [0.9, 0.5], atol=1e-6)
    with pytest.raises(AssertionError):
        assert_same_ranking(["a", "b"], [0.5, 0.9], ["a", "b"], [0.9, 0.5], atol=1e-6)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "auto"])
def test_backend_parity_with_pytorch(backend, tiny_artifacts, ckpt, item_ids):
    try:
        runtime = Scorer(tiny_artifacts, backend=backend)
    except BackendUnavailable as e:
        pytest.skip(f"{backend} backend absent here: {e}")
    histories = [h for h in random_histories(item_ids, 64, seed=1) if set(h) & set(item_ids)]
    for exclude_seen in (False, True):
        got = runtime.score(histories, k=10, exclude_seen=exclude_seen)
        want = reference_top_k(ckpt, item_ids, histories, 10, exclude_seen)
        for rec, (items, scores) in zip(got, want, strict=True):
            assert rec.fallback is None
            assert_same_ranking(rec.items, rec.scores, items, scores, atol=1e-4)
    # Alone or in a batch: bit for bit on the CPU (test_results_do_not_depend_on_the_batch); a
    # GPU may pick other kernels for another batch size, so compare within float tolerance.
    for h, rec in zip(histories[:8], runtime.score(histories, k=10), strict=False):
        alone = runtime.score([h], k=10)[0]
        assert_same_ranking(alone.items, alone.scores, rec.items, rec.scores, atol=1e-5)


def test_auto_picks_a_backend_and_says_which(tiny_artifacts, capsys):
    runtime = Scorer(tiny_artifacts, backend="auto")
    assert f"backend: {runtime.backend.name}" in capsys.readouterr().err


def test_unknown_backend_is_a_user_error(tiny_artifacts):
    with pytest.raises(UserError, match="unknown backend 'tpu'"):
        Scorer(tiny_artifacts, backend="tpu")


# -- artifacts -------------------------------------------------------------------------------

@pytest.fixture
def artifacts_copy(tiny_artifacts, tmp_path) -> Path:
    out = tmp_path / "artifacts"
    shutil.copytree(tiny_artifacts, out)
    return out


def rewrite_manifest(directory: Path, change) -> None:
    manifest = json.loads((directory / MANIFEST).read_text())
    change(manifest)
    (directory / MANIFEST).write_text(json.dumps(manifest))


def rehash(directory: Path) -> None:
    """List and hash the directory's files as they are now, as someone editing artifacts would."""
    files = {name: dataclasses.asdict(entry) for name, entry in hash_files(directory).items()}
    rewrite_manifest(directory, lambda m: m.update(files=files))


def _drop(key):
    return lambda m: m.pop(key)


def _set(path, value):
    def change(m):
        *parents, leaf = path.split(".")
        for key in parents:
            m = m[key]
        m[leaf] = value
    return change


@pytest.mark.parametrize(("change", "message"), [
    (_set("files", ["scorer.onnx"]), "files: expected an object"),
    (lambda m: m["files"].update({"items.json": {"bytes": 3}}), "files.items.json: missing key.*sha256"),
    (_drop("files"), "missing key.*files"),
    (_drop("models"), "missing key.*models"),
    (_drop("max_len"), "missing key.*max_len"),
    (_set("top_k", "20"), "top_k: expected int"),
    (_set("top_k", 10_000), "top_k: 10000 > num_items"),
    (_set("max_len", True), "max_len: expected int"),
    (_set("surprise", 1), "unknown key.*surprise"),
    (_set("modalities", ["image", "text"]), "modalities"),
    (_set("dim", 33), "dim: 33 is not a multiple"),
    (_set("vocabulary", "../items.json"), "vocabulary: '../items.json' is not a relative path"),
    (_set("item_inputs", "/etc/passwd"), "item_inputs: '/etc/passwd' is not a relative path"),
    (_set("models.scorer.inputs", [{"name": "ids"}]), "models.scorer.inputs\\[0\\]: missing key"),
    (lambda m: m["files"].pop("items.json"), "vocabulary: 'items.json' is not listed"),
    (lambda m: m["models"].pop("history_encoder"), "no 'history_encoder' model"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_a_malformed_manifest_is_refused_naming_the_key(artifacts_copy, change, message):
    rewrite_manifest(artifacts_copy, change)
    with pytest.raises(ArtifactError, match=message):
        Scorer(artifacts_copy, backend="cpu")


def test_a_manifest_promising_what_the_model_lacks_is_refused(artifacts_copy):
    """The manifest cannot hash itself: one edited to declare a larger top K (its output shapes
    edited to match) must still agree with the graph it describes."""
    def larger_top_k(m):
        k = m["top_k"] * 2
        m["top_k"] = k
        for output in m["models"]["scorer"]["outputs"]:
            if output["name"] in ("scores", "items"):
                output["shape"] = ["batch", k]
    rewrite_manifest(artifacts_copy, larger_top_k)
    with pytest.raises(ArtifactError, match=r"scorer.onnx: 'scores' is tensor\(float\) \['batch', \d+\] in the model"):
        Scorer(artifacts_copy, backend="cpu")


def test_a_max_len_the_model_cannot_take_is_an_artifact_error(artifacts_copy, item_ids):
    """A manifest promising longer histories than the model's positions: onnxruntime's failure
    names the model instead of ending in a traceback."""
    max_len = json.loads((artifacts_copy / MANIFEST).read_text())["max_len"]
    rewrite_manifest(artifacts_copy, _set("max_len", max_len + 9))
    with pytest.raises(ArtifactError, match="scorer.onnx: onnxruntime failed on inputs of shapes"):
        Scorer(artifacts_copy, backend="cpu").score([item_ids[: max_len + 9]], k=5)


def test_files_edited_and_rehashed_are_checked_for_what_they_hold(artifacts_copy):
    """A listed file whose hash was updated is still read with care: no pickles, the manifest's
    shape and dtype, a well-formed vocabulary."""
    inputs = np.load(artifacts_copy / "item_inputs.npy")
    for replacement, message in (
        (lambda path: np.save(path, np.array([{"x": 1}], dtype=object)), "not a plain .npy array"),
        (lambda path: np.save(path, inputs[:-1]), r"expected float32 \(61, 32\)"),
        (lambda path: np.save(path, inputs.astype(np.float64)), "float64"),
        (lambda path: path.write_bytes(b"garbage"), "not a plain .npy array"),
    ):
        replacement(artifacts_copy / "item_inputs.npy")
        rehash(artifacts_copy)
        with pytest.raises(ArtifactError, match=message):
            Scorer(artifacts_copy, backend="cpu")
    np.save(artifacts_copy / "item_inputs.npy", inputs)
    vocabulary = json.loads((artifacts_copy / "items.json").read_text())
    for edited, message in (
        ("{not json", "not valid JSON"),
        (json.dumps({**vocabulary, "popularity": [1e9] * 59 + [-1]}), "popularity must hold finite counts >= 0"),
        (json.dumps({**vocabulary, "items": vocabulary["items"][:-1]}), "lists of the manifest's 60 items"),
        (json.dumps({**vocabulary, "items": [vocabulary["items"][0]] * 60}), "distinct"),
        (json.dumps([vocabulary]), "expected an object"),
    ):
        (artifacts_copy / "items.json").write_text(edited)
        rehash(artifacts_copy)
        with pytest.raises(ArtifactError, match=message):
            Scorer(artifacts_copy, backend="cpu")


def test_an_edited_unlisted_vocabulary_is_refused(artifacts_copy):
    """items.json edited and taken out of `files`: refused, not served."""
    vocabulary = json.loads((artifacts_copy / "items.json").read_text())
    vocabulary["popularity"] = [10**9] * len(vocabulary["popularity"])
    (artifacts_copy / "items.json").write_text(json.dumps(vocabulary))
    rewrite_manifest(artifacts_copy, lambda m: m["files"].pop("items.json"))
    with pytest.raises(ArtifactError, match="items.json' is not listed"):
        Scorer(artifacts_copy, backend="cpu")


def test_corrupted_file_is_named(artifacts_copy):
    with open(artifacts_copy / "scorer.onnx", "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02")
    with pytest.raises(ArtifactError, match="scorer.onnx"):
        Scorer(artifacts_copy, backend="cpu")


def test_schema_mismatch_is_named(artifacts_copy):
    rewrite_manifest(artifacts_copy, lambda m: m.update(schema="mp4sr-artifacts/0"))
    with pytest.raises(ArtifactError, match="manifest.json.*schema"):
        Scorer(artifacts_copy, backend="cpu")


def test_integer_ids_match_numeric_item_ids(artifacts_copy):
    """Training data with numeric ids: a history may give them as JSON integers or strings."""
    vocabulary = json.loads((artifacts_copy / "items.json").read_text())
    vocabulary["items"] = [str(100 + i) for i in range(len(vocabulary["items"]))]
    (artifacts_copy / "items.json").write_text(json.dumps(vocabulary))
    rehash(artifacts_copy)
    runtime = Scorer(artifacts_copy, backend="cpu")
    as_ints, as_strings = runtime.score([[101, 105, 130], ["101", "105", "130"]])
    assert as_ints == as_strings and as_ints.unknown_items == [] and as_ints.fallback is None


# -- scoring semantics -----------------------------------------------------------------------

@pytest.mark.parametrize("step", [8, 3, 1])
def test_results_do_not_depend_on_the_batch(scorer, item_ids, step, monkeypatch):
    """Also with several padded widths (tiny L is 8: a step of 3 gives widths 3, 6 and 8)."""
    monkeypatch.setattr("mp4sr_rt.scorer.WIDTH_STEP", step)
    histories = random_histories(item_ids, 80, seed=2)
    batched = scorer.score(histories, k=7)
    assert [scorer.score([h], k=7)[0] for h in histories] == batched
    assert scorer.score(histories[::-1], k=7) == batched[::-1]


@pytest.fixture(scope="module")
def int8_scorer(tiny_run, tmp_path_factory) -> Scorer:
    """The tiny run exported with --int8-scan at its smallest (candidates = top K = 20), so
    that the bound often cannot certify a top k and the host path runs too."""
    from mp4sr_export.run import export

    out = tmp_path_factory.mktemp("int8") / "artifacts"
    export(tiny_run, out, top_k=20, int8_scan=20)
    return Scorer(out, backend="cpu")


@pytest.mark.parametrize("exclude_seen", [True, False])
def test_int8_scan_gives_the_exact_results(scorer, int8_scorer, item_ids, exclude_seen):
    """Certified histories and rescanned ones alike: the fp32 artifacts' items, and scores within
    float rounding; results independent of the batch."""
    histories = random_histories(item_ids, 150, seed=5)
    int8_scorer.rescans = 0
    for k in (1, 5, 10, 20):
        got, want = (s.score(histories, k=k, exclude_seen=exclude_seen) for s in (int8_scorer, scorer))
        for g, w in zip(got, want, strict=True):
            assert (g.items, g.unknown_items, g.fallback) == (w.items, w.unknown_items, w.fallback)
            np.testing.assert_allclose(g.scores, w.scores, atol=1e-5)
    scored = 4 * sum(1 for h in histories if set(h) & set(item_ids))
    assert 0 < int8_scorer.rescans < scored, "both paths must run"
    assert [int8_scorer.score([h], k=7, exclude_seen=exclude_seen)[0] for h in histories[:40]] == \
        int8_scorer.score(histories[:40], k=7, exclude_seen=exclude_seen)


def test_long_history_keeps_its_last_l_items(scorer, item_ids):
    max_len = scorer.max_len
    long = item_ids[: max_len + 5]
    assert scorer.score([long], exclude_seen=False) == scorer.score([long[-max_len:]], exclude_seen=False)


def test_unknown_items_are_dropped_and_reported(scorer, item_ids):
    mixed = ["ghost", item_ids[3], 42, item_ids[7], "ghost"]
    rec, clean = scorer.score([mixed, [item_ids[3], item_ids[7]]])
    assert rec.unknown_items == ["ghost", 42, "ghost"]
    assert (rec.items, rec.scores, rec.fallback) == (clean.items, clean.scores, None)


def test_no_known_item_falls_back_to_popular(scorer, tiny_artifacts):
    popularity = json.loads((tiny_artifacts / "items.json").read_text())
    counts = dict(zip(popularity["items"], popularity["popularity"], strict=True))
    for history in ([], ["nobody-knows-me"]):
        rec = scorer.score([history], k=5)[0]
        assert rec.fallback == "popular"
        assert rec.unknown_items == history
        assert rec.scores == sorted(counts.values(), reverse=True)[:5]
        assert [counts[i] for i in rec.items] == rec.scores


def test_popular_fallback_reaches_added_items(tiny_artifacts, ckpt, item_ids):
    """A history with no known item ranks the trained items by count, then the added ones: an
    allow-list of new items and a k of the whole catalogue are answered in full."""
    runtime = Scorer(tiny_artifacts, backend="cpu")
    runtime.add_items(["new-a", "new-b"], **new_features(ckpt.model.feat_dim, 2, seed=8))
    runtime.remove_items([item_ids[0]])
    rec = runtime.score([["nobody"]], k=5, allow=["new-b", "new-a", item_ids[0]])[0]
    assert (rec.items, rec.scores, rec.fallback) == (["new-a", "new-b"], [0.0, 0.0], "popular")
    everything = runtime.score([[]], k=runtime.num_items)[0]
    assert len(everything.items) == runtime.num_items - 1 and everything.items[-2:] == ["new-a", "new-b"]


@pytest.mark.parametrize("call", ["score", "add_items", "remove_items"])
def test_one_string_where_a_list_of_ids_belongs_is_refused(scorer, item_ids, call):
    """"item12" must not become the items "i", "t", "e", ... (nor "12" the items "1" and "2")."""
    before = (scorer.num_items, scorer.removed)
    with pytest.raises(UserError, match="not one string"):
        if call == "score":
            scorer.score([item_ids[3]], k=5)
        else:
            getattr(scorer, call)(item_ids[3])
    assert (scorer.num_items, scorer.removed) == before


def test_exclude_seen_beyond_the_scorers_top_k(scorer, ckpt, item_ids):
    """More seen items than the scorer's top K leaves: the host ranks the whole catalogue."""
    history = item_ids[: scorer.top_k + 5]
    rec = scorer.score([history], k=10)[0]
    items, scores = reference_top_k(ckpt, item_ids, [history], 10, exclude_seen=True)[0]
    assert not set(rec.items) & set(history)
    assert_same_ranking(rec.items, rec.scores, items, scores, atol=1e-4)


def test_every_item_seen_leaves_nothing(scorer, item_ids):
    rec = scorer.score([item_ids], k=10)[0]
    assert (rec.items, rec.fallback) == ([], None)


def test_k_must_be_positive(scorer):
    with pytest.raises(UserError, match="k must be an integer >= 1"):
        scorer.score([[]], k=0)


# -- items added at serve time ---------------------------------------------------------------

def new_features(feat_dim: int, n: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    text_mask = np.ones((n, 3), bool)
    text_mask[0, 2] = False
    image_mask = np.ones((n, 2), bool)
    image_mask[-1] = False  # the last new item has no image
    return {"text_feats": rng.normal(size=(n, 3, feat_dim)).astype(np.float32), "text_mask": text_mask,
            "image_feats": rng.normal(size=(n, 2, feat_dim)).astype(np.float32), "image_mask": image_mask}


def test_added_items_are_scorable_and_usable_in_histories(tiny_artifacts, ckpt, item_ids):
    runtime = Scorer(tiny_artifacts, backend="cpu")
    feats = new_features(ckpt.model.feat_dim, 3, seed=3)
    runtime.add_items(["new-a", "new-b", 7], **feats)
    assert runtime.num_items == len(item_ids) + 3

    # PyTorch reference: the rows of items without a trained ID row (features, and the ID row
    # the model predicts from them), as training scores its untrained items.
    with torch.no_grad():
        table, inputs = ItemTower(ckpt.model, ckpt.id_emb)(*(torch.from_numpy(feats[n]) for n in
                                                ("text_feats", "text_mask", "image_feats", "image_mask")))
    history = [item_ids[1], item_ids[2]]
    everything = runtime.score([history], k=runtime.num_items, exclude_seen=False)[0]
    assert {"new-a", "new-b", 7} <= set(everything.items)
    assert everything.scores == sorted(everything.scores, reverse=True)
    user = reference_user(ckpt, [history])
    for j, item in enumerate(["new-a", "new-b", 7]):
        got = everything.scores[everything.items.index(item)]
        assert got == pytest.approx(float(user[0] @ table[j]), abs=1e-4)

    # A history holding new items goes through the history encoder (no fallback).
    rec = runtime.score([["new-a", item_ids[4], 7]], k=5)[0]
    assert rec.fallback is None and rec.unknown_items == []
    assert not {"new-a", 7, item_ids[4]} & set(rec.items)
    with torch.no_grad():
        rows, outputs = serving_vectors(ckpt)  # (2, N + 1, d) each; item_ids[4] is row 5
        seq = torch.stack([inputs[0], torch.cat([rows[0, 5], rows[1, 5]]), inputs[2]])
        user = HistoryEncoder(ckpt.model)(seq[None], torch.tensor([3]))[0]
        scores = torch.cat([serving_table(outputs)[1:] @ user, table @ user])  # trained, then new
    scores[[4, len(item_ids), len(item_ids) + 2]] = float("-inf")  # the history's own items
    np.testing.assert_allclose(rec.scores, torch.topk(scores, 5).values.numpy(), atol=1e-4)


def reference_user(ckpt, histories: list[list[str]]) -> torch.Tensor:
    index = {item: i + 1 for i, item in enumerate(ckpt.item_ids)}
    ids = torch.tensor([[index[i] for i in h] for h in histories])
    with torch.no_grad():
        return user_vector(ckpt.model.encode_history(ids, serving_vectors(ckpt)[0]))


def test_new_item_is_retrieved(tiny_artifacts, ckpt, item_ids):
    """A new twin of a history's best item (same features, but no ID embedding, as every new
    item) is retrieved right beside it, without retraining."""
    runtime = Scorer(tiny_artifacts, backend="cpu")
    history = [item_ids[10], item_ids[11], item_ids[12]]
    best = runtime.score([history], k=1)[0].items[0]
    runtime.add_items(["twin"], **load_features(ckpt, [item_ids.index(best) + 1]))
    after = runtime.score([history], k=3)[0]
    assert "twin" in after.items[:2] and best in after.items[:2]


def load_features(ckpt, indices: list[int]) -> dict[str, np.ndarray]:
    from mp4sr_train.features.store import align, read_features

    arrays = read_features(Path(ckpt.meta["features"]["path"]))
    rows = align(arrays, ckpt.item_ids, "features")
    return {name: np.asarray(rows[name])[indices].astype(bool if "mask" in name else np.float32)
            for name in ("text_feats", "text_mask", "image_feats", "image_mask")}


@pytest.mark.parametrize(("ids", "features", "message"), [
    ([], {}, "no item ids"),
    (["x", "x"], {"text_feats": (2, 3)}, "duplicate"),
    (["item00000"], {"text_feats": (1, 3)}, "already in the catalogue"),
    ([True], {"text_feats": (1, 3)}, "not a string or an integer"),
    (["x"], {"text_feats": (1, 2, 5)}, "must have shape"),
    (["x"], {"text_feats": (1, 3), "text_mask": (1, 2)}, "text_mask must be bool of shape"),
    (["x"], {"text_feats": (1, 3), "image_mask": (1, 2)}, "image_mask given without image_feats"),
    (["x"], {"colour": (1,)}, "unknown feature 'colour'"),
    (["x"], {}, "give features of the model's modalities"),
    (["x"], {"texts": [["a red tent"]]}, "carries no text_encoder"),
])
def test_add_items_rejects_bad_input(scorer, ids, features, message):
    """Shapes stand for arrays: (n, slots) a bool mask, (n, slots[, F]) features of that shape."""
    def array(name, shape):
        if not isinstance(shape, tuple):
            return shape
        if name.endswith("mask"):
            return np.ones(shape, bool)
        return np.ones(shape if len(shape) == 3 else (*shape, scorer._feature_dim()), np.float32)

    before = scorer.num_items
    with pytest.raises(UserError, match=message):
        scorer.add_items(ids, **{name: array(name, shape) for name, shape in features.items()})
    assert scorer.num_items == before


def test_add_items_rejects_non_finite_features(scorer):
    feats = new_features(scorer._feature_dim(), 1, seed=0)
    feats["image_feats"][0, 0, 0] = np.nan
    with pytest.raises(UserError, match="image_feats holds NaN"):
        scorer.add_items(["x"], **feats)
    feats = new_features(scorer._feature_dim(), 1, seed=0)
    with pytest.raises(UserError, match="must hold real numbers, got <U"):
        scorer.add_items(["x"], **{**feats, "text_feats": feats["text_feats"].astype(str)})


def test_add_items_refuses_items_the_tower_cannot_represent(tiny_artifacts, monkeypatch):
    """Finite features can still overflow the item tower (an fp16 export turns text_feats of
    1e38 into NaN rows): such an item is refused, never served with NaN scores."""
    runtime = Scorer(tiny_artifacts, backend="cpu")
    encode = runtime.backend.encode_items

    def overflowing(feeds):
        table, inputs = encode(feeds)
        table[1] = np.nan
        return table, inputs

    monkeypatch.setattr(runtime.backend, "encode_items", overflowing)
    with pytest.raises(UserError, match="not finite for 'y'"):
        runtime.add_items(["x", "y"], **new_features(runtime._feature_dim(), 2, seed=0))
    assert runtime.num_items == runtime.num_base


# -- micro-batcher ---------------------------------------------------------------------------

def test_batcher_serves_concurrent_threads_their_own_results(scorer, item_ids):
    histories = random_histories(item_ids, 400, seed=4)
    expected = [scorer.score([h], k=5)[0] for h in histories]
    sizes = []

    def run(batch):
        sizes.append(len(batch))
        return scorer.score(batch, k=5)

    results: dict[int, object] = {}
    with MicroBatcher(run, max_batch=32, max_delay_ms=5) as batcher:
        def client(rows):
            for i in rows:
                results[i] = batcher.submit(histories[i]).result(timeout=30)

        threads = [threading.Thread(target=client, args=(range(t, 400, 16),)) for t in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert [results[i] for i in range(400)] == expected
    assert sum(sizes) == 400 and max(sizes) <= 32 and max(sizes) > 1


def test_batcher_waits_at_most_max_delay():
    with MicroBatcher(lambda xs: [x + 1 for x in xs], max_batch=64, max_delay_ms=20) as batcher:
        # A lone request is answered without waiting for a full batch (else the result times out).
        assert batcher.submit(1).result(timeout=5) == 2


def blocked_batcher(max_queue: int):
    """A batcher whose first batch blocks until `release` is set."""
    release, started = threading.Event(), threading.Event()

    def run(batch):
        started.set()
        release.wait(10)
        return [x * 10 for x in batch]

    return MicroBatcher(run, max_batch=1, max_delay_ms=0, max_queue=max_queue), release, started


def test_full_queue_raises_overloaded_and_recovers():
    batcher, release, started = blocked_batcher(max_queue=3)
    first = batcher.submit(0)
    started.wait(5)
    queued = [batcher.submit(i) for i in range(1, 4)]
    with pytest.raises(Overloaded, match="overloaded"):
        batcher.submit(99)
    release.set()
    assert [f.result(timeout=5) for f in [first, *queued]] == [0, 10, 20, 30]
    assert batcher.submit(5).result(timeout=5) == 50
    batcher.close()


def closed_with_pending(drain: bool) -> tuple[MicroBatcher, list]:
    """A batcher closed while its first request runs and 19 more wait: (batcher, futures)."""
    batcher, release, started = blocked_batcher(max_queue=100)
    futures = [batcher.submit(i) for i in range(20)]
    started.wait(5)
    threading.Timer(0.05, release.set).start()
    batcher.close(drain=drain)
    return batcher, futures


def test_close_with_drain_finishes_every_pending_request():
    batcher, futures = closed_with_pending(drain=True)
    assert [f.result(timeout=0) for f in futures] == [i * 10 for i in range(20)]
    with pytest.raises(BatcherClosed):
        batcher.submit(1)


def test_close_without_drain_fails_pending_requests_never_drops_them():
    _, futures = closed_with_pending(drain=False)
    assert futures[0].result(timeout=0) == 0  # already running: it finishes
    for f in futures[1:]:
        with pytest.raises(BatcherClosed):
            f.result(timeout=0)


def test_failing_batch_fails_its_callers_and_the_batcher_goes_on():
    def run(batch):
        if "bad" in batch:
            raise ValueError("bad request in batch")
        return batch

    with MicroBatcher(run, max_batch=8, max_delay_ms=50) as batcher:
        futures = [batcher.submit(x) for x in ("a", "bad", "c")]
        for f in futures:
            with pytest.raises(ValueError, match="bad request"):
                f.result(timeout=5)
        assert batcher.submit("d").result(timeout=5) == "d"


def test_cancelled_request_is_left_out_of_its_batch():
    batcher, release, started = blocked_batcher(max_queue=10)
    batcher.submit(0)
    started.wait(5)
    cancelled, kept = batcher.submit(1), batcher.submit(2)
    assert cancelled.cancel()
    release.set()
    assert kept.result(timeout=5) == 20
    batcher.close()


def test_runtime_never_imports_torch_train_or_export_at_any_depth():
    """Static: every import statement of every module of the runtime, inside functions too."""
    import ast

    forbidden = {"torch", "mp4sr_train", "mp4sr_export", "mp4sr_cli", "train", "export"}
    found = []
    for path in sorted((ROOT / "mp4sr_rt").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in
                  ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant)):
                names = [str(node.args[0].value)]
            else:
                continue
            found += [f"{path.relative_to(ROOT)}:{node.lineno} {n}" for n in names if n.split(".")[0] in forbidden]
    assert len(list((ROOT / "mp4sr_rt").rglob("*.py"))) > 10
    assert found == []

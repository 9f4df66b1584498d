"""Readers, the leave-one-out split, its cache, the cold-start hold-out and the demo generator."""

from __future__ import annotations

import gzip
import importlib
import json
from pathlib import Path

import numpy as np
import pytest
from mp4sr_train.data import (
    RawData,
    demo_features,
    generate_demo,
    hold_out_items,
    load_or_preprocess,
    preprocess,
    read_dataset,
)

from mp4sr_rt.errors import UserError

# The package re-exports the function `preprocess`, which shadows the module of the same name.
preprocess_module = importlib.import_module("mp4sr_train.data.preprocess")

ROWS = [("u1", "i1", 3), ("u2", "i2", 1), ("u1", "i3", 2)]
ROW = '{"user_id": "u", "item_id": "i", "timestamp": 1}'
CSV = "user_id,item_id,timestamp\n" + "".join(f"{u},{i},{t}\n" for u, i, t in ROWS)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def jsonl(records: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def gz(path: Path, text: str) -> Path:
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write(text)
    return path


def assert_rows(raw: RawData, rows: list[tuple[str, str, float]] = ROWS) -> None:
    assert list(zip(raw.users, raw.items, raw.timestamps, strict=True)) == rows
    assert raw.timestamps.dtype == np.float64


# ---------------------------------------------------------------------------------------------
# Readers


def test_generic_csv_with_items(tmp_path):
    write(tmp_path / "interactions.csv", CSV)
    items = [
        {
            "item_id": "i1",
            "categories": ["Sports", "Running"],
            "title": "Trail shoe",
            "color": "red",
            "description": ["Light.", "Grippy."],
            "images": ["img/i1.jpg", "/abs/i1b.png"],
            "price": 12.5,
        },
        {"item_id": "i2", "brand": "Acme"},
    ]
    write(tmp_path / "items.jsonl", jsonl(items))
    raw = read_dataset(tmp_path)
    assert_rows(raw)
    info = raw.item_info["i1"]
    assert info.sentences == ("Trail shoe", "Light. Grippy.", "Sports, Running", "red")
    assert info.images == (str((tmp_path / "img/i1.jpg").resolve()), "/abs/i1b.png")
    assert raw.item_info["i2"].sentences == ("Acme",)
    assert raw.source == str(tmp_path / "interactions.csv")


def test_generic_jsonl_and_parquet_match_csv(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = [{"user_id": u, "item_id": i, "timestamp": t} for u, i, t in ROWS]
    assert_rows(read_dataset(write(tmp_path / "a" / "interactions.jsonl", jsonl(records))))
    columns = {k: [r[k] for r in records] for k in records[0]}
    pq.write_table(pa.table(columns), tmp_path / "b.parquet")
    assert_rows(read_dataset(tmp_path / "b.parquet"))


def test_parquet_numeric_ids_and_timestamp_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table(
        {
            "user_id": pa.array([7, 8]),
            "item_id": pa.array([1, 2]),
            "timestamp": pa.array([1000, 2000], type=pa.timestamp("ms")),
        }
    )
    pq.write_table(table, tmp_path / "interactions.parquet")
    raw = read_dataset(tmp_path)
    assert_rows(raw, [("7", "1", 1.0), ("8", "2", 2.0)])


def test_recbole(tmp_path):
    d = tmp_path / "ml"
    write(
        d / "ml.inter",
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
        "u1\ti1\t5\t3\nu2\ti2\t4\t1\nu1\ti3\t3\t2\n",
    )
    write(
        d / "ml.item",
        "item_id:token\tmovie_title:token_seq\trelease_year:token\tgenre:token_seq\n"
        "i1\tToy Story\t1995\tAnimation Comedy\ni2\tHeat\t1995\n",
    )
    raw = read_dataset(d)
    assert_rows(raw)
    assert raw.item_info["i1"].sentences == ("Toy Story", "Animation Comedy")
    assert raw.item_info["i2"].sentences == ("Heat",)


def amazon_dir(d: Path) -> Path:
    reviews = [
        {"reviewerID": u, "asin": i, "unixReviewTime": t, "overall": 5.0} for u, i, t in ROWS
    ]
    d.mkdir(parents=True)
    gz(d / "reviews.json.gz", jsonl(reviews))
    meta = [
        {
            "asin": "i1",
            "title": "Shoe",
            "description": ["Light.", "Grippy."],
            "brand": "Acme",
            "category": ["Sports", "Running"],
            "imageURL": ["http://a/1.jpg"],
            "imageURLHighRes": ["http://a/1-hd.jpg", "http://a/1.jpg"],
        }
    ]
    gz(d / "meta.json.gz", jsonl(meta))
    write(d / "images" / "i1.jpg", "")
    write(d / "images" / "i2" / "b.png", "")
    write(d / "images" / "i2" / "a.webp", "")
    return d


def test_amazon_gz(tmp_path):
    d = amazon_dir(tmp_path / "amz")
    before = {p: p.read_bytes() for p in d.rglob("*") if p.is_file()}
    raw = read_dataset(d)
    assert_rows(raw)
    i1, i2 = raw.item_info["i1"], raw.item_info["i2"]
    assert i1.sentences == ("Shoe", "Light. Grippy.", "Acme", "Sports, Running")
    assert i1.image_urls == ("http://a/1-hd.jpg", "http://a/1.jpg")
    assert i1.images == (str((d / "images" / "i1.jpg").resolve()),)
    assert i2.sentences == () and [Path(p).name for p in i2.images] == ["a.webp", "b.png"]
    assert_rows(read_dataset(d / "reviews.json.gz"))  # the file itself, meta found beside it
    assert before == {p: p.read_bytes() for p in d.rglob("*") if p.is_file()}  # inputs untouched


BAD_INPUTS = {
    "missing file": ("nothing.csv", None, "not found"),
    "unknown format": ("data.txt", "a,b\n", "unknown dataset format"),
    "missing column": ("interactions.csv", "user_id,item_id\nu,i\n", "missing column timestamp"),
    "bad timestamp": ("interactions.csv", "user_id,item_id,timestamp\nu,i,1\nu,j,soon\n", "line 3"),
    "empty csv": ("interactions.csv", "", "empty"),
    "header only": ("interactions.csv", "user_id,item_id,timestamp\n", "no interactions"),
    "empty jsonl": ("interactions.jsonl", "", "no interactions"),
    "malformed json": ("interactions.jsonl", ROW + "\n{oops\n", "line 2"),
    "missing field": ("interactions.jsonl", '{"user_id": "u", "item_id": "i"}\n', "'timestamp'"),
    "recbole field": ("d.inter", "user_id:token\titem_id:token\nu\ti\n", "missing column"),
    "amazon field": ("reviews.json", '{"asin": "i", "unixReviewTime": 1}\n', "'reviewerID'"),
}


@pytest.mark.parametrize("case", BAD_INPUTS, ids=list(BAD_INPUTS))
def test_bad_input_names_the_file(tmp_path, case):
    name, text, expected = BAD_INPUTS[case]
    path = tmp_path / name if text is None else write(tmp_path / name, text)
    with pytest.raises(UserError) as err:
        read_dataset(path)
    assert name in str(err.value) and expected in str(err.value)


def test_bad_inputs_in_side_files(tmp_path):
    write(tmp_path / "interactions.csv", CSV)
    write(tmp_path / "items.jsonl", '{"item_id": "i1"}\n[1, 2]\n')
    with pytest.raises(UserError, match=r"items\.jsonl, line 2"):
        read_dataset(tmp_path)
    d = amazon_dir(tmp_path / "amz")
    (d / "meta.json.gz").write_bytes(b"not gzip")
    with pytest.raises(UserError, match=r"meta\.json\.gz"):
        read_dataset(d)


def test_ambiguous_directory(tmp_path):
    write(tmp_path / "interactions.csv", CSV)
    write(tmp_path / "reviews.json", "")
    with pytest.raises(UserError, match="ambiguous"):
        read_dataset(tmp_path)


# ---------------------------------------------------------------------------------------------
# Preprocessing

# File order is deliberately not time order. u1: "c" and "b" tie at t=2 (file order decides),
# "a" occurs twice (the later one, t=3, stays). u2 has 5 rows but 4 distinct items: dropped.
# u3 has 4: dropped, and its items with it.
EXAMPLE = [
    ("u1", "a", 1), ("u2", "b", 10), ("u1", "c", 2), ("u1", "b", 2), ("u0", "e", 7),
    ("u1", "a", 3), ("u0", "d", 8), ("u2", "c", 11), ("u1", "d", 4), ("u1", "f", 6),
    ("u1", "e", 5), ("u0", "c", 9), ("u2", "d", 12), ("u3", "g", 1), ("u3", "h", 2),
    ("u0", "b", 10), ("u2", "e", 13), ("u3", "i", 3), ("u0", "a", 11), ("u2", "b", 14),
    ("u3", "j", 4),
]  # fmt: skip


def example_raw() -> RawData:
    users, items, ts = zip(*EXAMPLE, strict=True)
    return RawData.from_ids(np.array(users), np.array(items), np.array(ts, dtype=np.float64), source="ex")


def test_preprocess_hand_computed():
    data = preprocess(example_raw(), max_len=2, min_interactions=5)
    assert data.item_ids == ("a", "b", "c", "d", "e", "f")  # a=1 ... f=6
    assert data.user_ids == ("u0", "u1")
    # u0 = e d c b a = [5, 4, 3, 2, 1]; u1 = c b a d e f = [3, 2, 1, 4, 5, 6]
    np.testing.assert_array_equal(data.train.histories, [[5, 0], [5, 4], [3, 0], [3, 2], [2, 1]])
    np.testing.assert_array_equal(data.train.targets, [4, 3, 2, 1, 4])
    np.testing.assert_array_equal(data.valid.histories, [[4, 3], [1, 4]])
    np.testing.assert_array_equal(data.valid.targets, [2, 5])
    np.testing.assert_array_equal(data.test.histories, [[3, 2], [4, 5]])
    np.testing.assert_array_equal(data.test.targets, [1, 6])
    # training parts: u0 [5, 4, 3], u1 [3, 2, 1, 4]
    np.testing.assert_array_equal(data.train_counts, [0, 1, 1, 2, 2, 1, 0])
    for split in (data.train, data.valid, data.test):
        assert split.histories.dtype == np.int64 and split.targets.dtype == np.int64


def test_preprocess_pads_to_max_len():
    data = preprocess(example_raw(), max_len=50)
    assert data.test.histories.shape == (2, 50)
    np.testing.assert_array_equal(data.test.histories[1, :6], [3, 2, 1, 4, 5, 0])
    assert not data.test.histories[:, 6:].any()


def test_preprocess_nothing_left():
    with pytest.raises(UserError, match="no user has at least 7 interactions in ex"):
        preprocess(example_raw(), min_interactions=7)


def test_hold_out_items():
    data = preprocess(example_raw(), max_len=2)
    cold, held = hold_out_items(data, fraction=1 / 3, seed=0)
    assert held.shape == (7,) and held.sum() == 2 and not held[0]
    again, held_again = hold_out_items(data, fraction=1 / 3, seed=0)
    np.testing.assert_array_equal(held, held_again)
    assert not held[cold.train.targets].any() and not held[cold.train.histories].any()
    assert (cold.train.histories[:, 0] != 0).all()  # compacted left, never empty
    assert not cold.train_counts[held].any()
    np.testing.assert_array_equal(cold.train_counts[~held], data.train_counts[~held])
    assert cold.test is data.test and cold.valid is data.valid


def test_hold_out_strips_and_compacts():
    data = preprocess(example_raw(), max_len=2)
    # Hold out item 3 ("c") by hand: the same code path as a seeded choice.
    held = np.zeros(7, dtype=bool)
    held[3] = True
    train = preprocess_module._strip_items(data.train, held)
    # rows: [5,0]->4, [5,4]->3 (dropped), [3,0]->2 (empty, dropped), [3,2]->1, [2,1]->4
    np.testing.assert_array_equal(train.histories, [[5, 0], [2, 0], [2, 1]])
    np.testing.assert_array_equal(train.targets, [4, 1, 4])


# ---------------------------------------------------------------------------------------------
# Cache


def example_csv(path: Path) -> Path:
    return write(
        path, "user_id,item_id,timestamp\n" + "".join(f"{u},{i},{t}\n" for u, i, t in EXAMPLE)
    )


def assert_same(a, b) -> None:
    assert a.item_ids == b.item_ids and a.user_ids == b.user_ids
    np.testing.assert_array_equal(a.train_counts, b.train_counts)
    for name in ("train", "valid", "test"):
        np.testing.assert_array_equal(getattr(a, name).histories, getattr(b, name).histories)
        np.testing.assert_array_equal(getattr(a, name).targets, getattr(b, name).targets)


def test_cache_hit_and_invalidation(tmp_path, monkeypatch):
    csv_path = example_csv(tmp_path / "data" / "interactions.csv")
    write(tmp_path / "data" / "items.jsonl", jsonl([{"item_id": "a", "title": "Apple"}]))
    cache = tmp_path / "cache"
    data, summary = load_or_preprocess(tmp_path / "data", cache, max_len=2, min_interactions=5)
    assert_same(data, preprocess(read_dataset(csv_path), max_len=2))
    assert summary.item_info["a"].sentences == ("Apple",)

    def fail(path):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(preprocess_module, "read_dataset", fail)
    cached, cached_summary = load_or_preprocess(tmp_path / "data", cache, 2, 5)
    assert_same(cached, data)
    assert cached_summary.item_info == summary.item_info
    assert cached_summary.source == summary.source and not len(cached_summary.users)
    with pytest.raises(AssertionError):  # another setting: recomputed
        load_or_preprocess(tmp_path / "data", cache, 3, 5)
    with csv_path.open("a") as f:
        f.write("u0,f,20\n")
    with pytest.raises(AssertionError):  # changed input: recomputed
        load_or_preprocess(tmp_path / "data", cache, 2, 5)
    monkeypatch.undo()
    changed, _ = load_or_preprocess(tmp_path / "data", cache, 2, 5)
    np.testing.assert_array_equal(changed.test.targets, [6, 6])


def test_corrupt_cache_is_rebuilt(tmp_path):
    example_csv(tmp_path / "interactions.csv")
    cache = tmp_path / "cache"
    data, _ = load_or_preprocess(tmp_path, cache, 2, 5)
    for npz in cache.glob("*.npz"):
        npz.write_bytes(b"garbage")
    again, _ = load_or_preprocess(tmp_path, cache, 2, 5)
    assert_same(again, data)


# ---------------------------------------------------------------------------------------------
# Demo

SMALL = {"n_items": 120, "n_users": 150, "seed": 3, "image_size": 16}


def test_demo_is_deterministic_and_idempotent(tmp_path):
    a = generate_demo(tmp_path / "a", **SMALL)
    b = generate_demo(tmp_path / "b", **SMALL)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    stamp = (a / "demo.json").stat().st_mtime_ns
    assert generate_demo(a, **SMALL) == a and (a / "demo.json").stat().st_mtime_ns == stamp
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]  # no temporary dirs left
    other = generate_demo(a, **{**SMALL, "seed": 4})  # other parameters replace the old demo
    assert json.loads((other / "demo.json").read_text())["seed"] == 4


def test_demo_refuses_foreign_directory(tmp_path):
    write(tmp_path / "mine" / "notes.txt", "keep me")
    with pytest.raises(UserError, match="not a demo dataset"):
        generate_demo(tmp_path / "mine", **SMALL)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_demo_reads_and_splits(tmp_path):
    d = generate_demo(tmp_path / "demo", **SMALL)
    raw = read_dataset(d)
    per_user = np.unique(raw.users, return_counts=True)[1]
    assert len(per_user) == SMALL["n_users"] and per_user.min() >= 5 and per_user.max() <= 40
    data = preprocess(raw)
    assert len(data.user_ids) == SMALL["n_users"]  # no repeats, so no user falls below 5
    with_images = [i for i in raw.item_info.values() if i.images]
    assert with_images and all(Path(p).is_file() for i in with_images for p in i.images)
    assert sum(bool(i.sentences) for i in raw.item_info.values()) > 0.9 * SMALL["n_items"]


def test_demo_features(tmp_path):
    from safetensors import safe_open

    d = generate_demo(tmp_path / "demo", **SMALL)
    out = demo_features(d, tmp_path / "f.safetensors", dim=8)
    with safe_open(str(out), framework="numpy") as f:
        meta = f.metadata()
        t = {k: f.get_tensor(k) for k in f.keys()}
    n = SMALL["n_items"]
    assert t["text_feats"].shape == (n, 4, 8) and t["text_feats"].dtype == np.float32
    assert t["image_feats"].shape == (n, 1, 8) and t["image_mask"].shape == (n, 1)
    assert t["text_mask"].dtype == np.uint8 and t["text_mask"].shape == (n, 4)
    assert meta["schema"] == "mp4sr-features/1" and meta["encoder"] == "demo-latent"
    assert meta["dim"] == "8" and meta["clip_weights"] == "null"
    items = json.loads(meta["item_ids"])
    raw = read_dataset(d)
    assert items == sorted(raw.item_info) and len(items) == n
    # Masks follow the dataset: an item has image features iff items.jsonl lists an image.
    has_image = np.array([bool(raw.item_info[i].images) for i in items])
    np.testing.assert_array_equal(t["image_mask"][:, 0].astype(bool), has_image)
    assert not t["image_feats"][~has_image].any()
    again = demo_features(d, tmp_path / "g.safetensors", dim=8)
    with safe_open(str(again), framework="numpy") as f:
        assert f.metadata() == meta
        assert all(np.array_equal(f.get_tensor(k), t[k]) for k in t)


def test_demo_structure_is_learnable(tmp_path):
    """Topic of the recent history + popularity beats global popularity by a wide margin."""
    from mp4sr_train.data.demo import read_catalogue

    d = generate_demo(tmp_path / "demo", n_items=400, n_users=800, seed=0, image_size=8)
    data = preprocess(read_dataset(d))
    cat = read_catalogue(d)
    row = {str(item): k for k, item in enumerate(cat.item_ids)}
    topic = np.array([-1] + [cat.behaviour[row[i]] for i in data.item_ids])
    popularity = data.train_counts + 1.0
    popularity[0] = 0
    hist, targets = data.test.histories, data.test.targets
    last = hist[np.arange(len(hist)), (hist != 0).sum(1) - 1]
    by_topic = (topic[None, :] == topic[last][:, None]) * popularity  # (B, N + 1)

    def recall20(scores):
        top = np.argsort(-scores, axis=1)[:, :20]
        return (top == targets[:, None]).any(1).mean()

    assert recall20(by_topic) > 2 * recall20(np.broadcast_to(popularity, by_topic.shape))

"""New items from raw text and images at serve time (mp4sr_rt.raw): the runtime's torch-free
preprocessing against train/features, which made the training features with the same encoders,
and Scorer.add_items end to end."""

from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from mp4sr_cli import app
from mp4sr_rt.errors import ArtifactError, UserError
from mp4sr_rt.raw import clip_pixels, decode_image
from mp4sr_rt.scorer import Scorer

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("size", [(40, 25), (25, 40), (32, 32), (7, 300), (333, 17), (20, 20), (33, 32)])
def test_pixels_are_open_clips(size):
    """Landscape, portrait, square, up- and down-scaled, odd crop offsets: the same floats."""
    import open_clip

    rng = np.random.default_rng(sum(size))
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    preprocess = open_clip.image_transform(32, is_train=False)
    normalize = next(t for t in preprocess.transforms if hasattr(t, "mean"))
    got = clip_pixels(image, 32, normalize.mean, normalize.std)
    np.testing.assert_allclose(got, preprocess(image).numpy(), rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def scorer(extractor_artifacts) -> Scorer:
    return Scorer(extractor_artifacts, backend="cpu")


def test_text_vectors_match_the_training_encoder(scorer, extractor_run):
    """Tokenizer (lower-casing, accents, CJK, truncation at max_tokens) and pooling."""
    from mp4sr_train.features.text import TextEncoder

    sentences = ["A red tent.", "Café naïve résumé", "日本語の説明", "x", " ".join(["word"] * 400)]
    reference = TextEncoder.load(extractor_run.parent / "bert").encode(sentences)
    got = scorer._raw._sentence_vectors([sentences])
    np.testing.assert_allclose(np.stack([got[s] for s in sentences]), reference, atol=1e-5)


def readable_items(tiny_data_dir) -> tuple[list[str], list, list]:
    """Items of the tiny dataset with text and only decodable images: (ids, texts, images)."""
    from mp4sr_train.data import read_dataset

    raw = read_dataset(tiny_data_dir)
    chosen = []
    for item, info in sorted(raw.item_info.items()):
        blobs = [Path(p).read_bytes() for p in info.images if Path(p).is_file()]
        if info.sentences and len(blobs) == len(info.images) and all(decode_image(b) for b in blobs):
            chosen.append((item, list(info.sentences), list(info.images)))
    assert len(chosen) >= 5 and any(images for *_, images in chosen)
    return tuple(map(list, zip(*chosen[:8], strict=True)))  # type: ignore[return-value]


def test_raw_items_get_the_features_training_extracted(scorer, extractor_run, tiny_data_dir):
    from mp4sr_train.features.store import read_features

    items, texts, images = readable_items(tiny_data_dir)
    feeds = scorer._raw.features(len(items), scorer._feature_dim(), texts, images)
    arrays = read_features(extractor_run.parent / "features.safetensors")
    rows = [arrays.item_ids.index(item) for item in items]
    assert feeds["image_mask"].sum() >= 3 and feeds["text_mask"].sum() >= len(items)
    for modality in ("text", "image"):
        mask, feats = feeds[f"{modality}_mask"], feeds[f"{modality}_feats"]
        want_mask = np.asarray(getattr(arrays, f"{modality}_mask"))[rows].astype(bool)
        want = np.asarray(getattr(arrays, f"{modality}_feats"))[rows]
        slots = mask.shape[1]
        assert not want_mask[:, slots:].any()
        np.testing.assert_array_equal(mask, want_mask[:, :slots])
        np.testing.assert_allclose(feats, want[:, :slots] * mask[..., None], atol=1e-5)


def torch_rows(ckpt, arrays, rows: list[int], drop: str | None = None) -> np.ndarray:
    """Serving rows of catalogue items as new items, computed by the PyTorch model from the
    features training extracted (features.safetensors), with modality `drop` left out."""
    import torch
    from mp4sr_train.model import serving_table, untrained_vectors

    z = []
    for m, name in enumerate(ckpt.cfg.model.modalities):
        x = torch.as_tensor(np.asarray(getattr(arrays, f"{name}_feats"))[rows])
        mask = torch.as_tensor(np.asarray(getattr(arrays, f"{name}_mask"))[rows].astype(bool))
        if name == drop:
            mask = torch.zeros_like(mask)
        z.append(ckpt.model.adaptor[m](ckpt.model.pool_slots(m, x, mask)))
    with torch.no_grad():
        return serving_table(untrained_vectors(torch.stack(z).detach(), ckpt.id_emb)[1]).numpy()


def test_add_items_from_raw_data(extractor_artifacts, extractor_run, tiny_data_dir):
    """New items from raw text and images score as the PyTorch model scores the same items from
    the features `mp4sr-rt features` extracted: not the runtime checked against itself."""
    import torch
    from mp4sr_export.onnx import serving_vectors
    from mp4sr_train.checkpoint import load_checkpoint
    from mp4sr_train.features.store import read_features
    from mp4sr_train.model import user_vector

    ckpt = load_checkpoint(extractor_run / "checkpoint")
    arrays = read_features(extractor_run.parent / "features.safetensors")
    runtime = Scorer(extractor_artifacts, backend="cpu")
    items, texts, images = readable_items(tiny_data_dir)
    rows = [arrays.item_ids.index(item) for item in items]
    with_image = next(j for j in range(len(items)) if images[j])
    runtime.add_items([f"new-{item}" for item in items[:3]], texts=texts[:3], images=images[:3])
    runtime.add_items(["text-only"], texts=[texts[3]])  # the other modality counts as missing
    runtime.add_items(["image-only"], images=[[Path(path).read_bytes() for path in images[with_image]]])  # bytes
    assert runtime.num_items == len(runtime._item_ids) + 5
    reference = np.concatenate([torch_rows(ckpt, arrays, rows[:3]), torch_rows(ckpt, arrays, rows[3:4], "image"),
                                torch_rows(ckpt, arrays, [rows[with_image]], "text")])
    np.testing.assert_allclose(runtime._added.table[:len(reference)], reference, atol=1e-5)

    # Scorable at once, each at the score PyTorch gives it, and usable in a history.
    history = [items[4], items[3]]
    everything = runtime.score([history], k=runtime.num_items, exclude_seen=False)[0]
    with torch.no_grad():
        ids = torch.tensor([[runtime._index[i] for i in history]])
        user = user_vector(ckpt.model.encode_history(ids, serving_vectors(ckpt)[0]))[0].numpy()
    for j, item in enumerate(runtime._added.ids[:len(reference)]):
        assert everything.scores[everything.items.index(item)] == pytest.approx(float(user @ reference[j]), abs=1e-5)
    rec = runtime.score([["new-" + items[0], items[4]]], k=5)[0]
    assert rec.fallback is None and rec.unknown_items == [] and "new-" + items[0] not in rec.items


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def test_add_items_refuses_bad_raw_input_and_adds_nothing(scorer, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    huge = tmp_path / "huge.png"  # a 30000 x 30000 header, no pixels: refused before decoding
    huge.write_bytes(b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0))
                     + png_chunk(b"IDAT", zlib.compress(b"")) + png_chunk(b"IEND", b""))
    before = scorer.num_items
    cases = [
        ({"texts": ["a"], "images": [[str(broken)]]}, f"image {broken} is not usable: truncated"),
        ({"texts": ["a"], "images": [[str(huge)]]}, "is not usable: too large"),
        ({"images": [[str(tmp_path / "missing.png")]]}, "missing.png cannot be read"),
        ({"texts": ["a", "b"]}, "one entry per item id"),
        ({"texts": [[1, 2]]}, r"texts\[0\] must be a string or a list of strings"),
        ({"images": [[3]]}, r"images\[0\] must be a path"),
        ({"texts": ["a"], "text_feats": np.zeros((1, 1, scorer._feature_dim()), np.float32)}, "not both"),
    ]
    for kwargs, message in cases:
        with pytest.raises(UserError, match=message):
            scorer.add_items(["x"], **kwargs)
    assert scorer.num_items == before


def test_artifacts_without_encoders_say_so(tiny_artifacts):
    with pytest.raises(ArtifactError, match="carries no text_encoder or image_encoder"):
        Scorer(tiny_artifacts, backend="cpu").add_items(["x"], images=[["a.png"]])


@pytest.mark.parametrize(("part", "key", "value", "message"), [
    ("text", "max_tokens", -1, "text.max_tokens: expected 1 ... 65536"),
    ("text", "max_sentences", 0, "text.max_sentences: expected >= 1"),
    ("image", "image_size", 0, "image.image_size: expected 1 ... 4096"),
    ("image", "image_size", 10**30, "image.image_size: expected 1 ... 4096"),
    ("image", "mean", [], "mean and std must hold 3 values"),
    ("image", "std", [0.5, 0.5, 0.0], "mean and std must hold 3 values each, std > 0"),
    ("image", "words", 0, "image.words: expected >= 1"),
    ("image", "max_images", -1, "image.max_images: expected >= 1"),
])
def test_preprocessing_out_of_range_is_refused(extractor_artifacts, tmp_path, part, key, value, message):
    """Values that would crash the preprocessing, or silently drop every new item's text or images."""
    import shutil

    directory = shutil.copytree(extractor_artifacts, tmp_path / "artifacts")
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest["preprocessing"][part][key] = value
    (directory / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=message):
        Scorer(directory, backend="cpu")


# -- mp4sr-rt score --new-items --------------------------------------------------------------

def score_cli(*args: str):
    return CliRunner().invoke(app, ["score", *map(str, args)])


def test_score_with_new_items_from_an_items_file(extractor_artifacts, tiny_data_dir, tmp_path):
    items, texts, images = readable_items(tiny_data_dir)
    lines = [{"item_id": "new-1", "title": texts[0][0], "description": " ".join(texts[0][1:]),
              "images": [os.path.relpath(p, tmp_path) for p in images[0]]},
             {"item_id": "new-2", "title": texts[1][0]}]
    (tmp_path / "new.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    (tmp_path / "history.json").write_text(json.dumps({"user": "u", "history": ["new-1", items[2], "new-2"]}))
    result = score_cli(tmp_path / "history.json", "--artifacts", extractor_artifacts, "-k", "1000",
                       "--include-seen", "--new-items", tmp_path / "new.jsonl")
    assert result.exit_code == 0, result.output
    [rec] = json.loads(result.stdout)
    assert rec["unknown_items"] == [] and rec["fallback"] is None
    num_items = len(json.loads((extractor_artifacts / "items.json").read_text())["items"])
    assert len(rec["items"]) == num_items + 2 and {"new-1", "new-2"} <= set(rec["items"])
    assert "added 2 new items" in result.stderr


@pytest.mark.parametrize(("lines", "message"), [
    ([{"item_id": "a", "title": "x"}, {"item_id": "a", "title": "y"}], "item 'a' repeats line 1"),
    ([{"item_id": "a"}], "item 'a' has neither text nor images"),
    ([{"title": "x"}], "line 1: missing field 'item_id'"),
    ([{"item_id": "a", "images": ["missing.png"]}], "missing.png cannot be read"),
    ([], "no items"),
    ([{"item_id": 1.5, "title": "x"}], "item_id must be a string or an integer, got 1.5"),
    ([{"item_id": float("nan"), "title": "x"}], "item_id must be a string or an integer, got nan"),
])
def test_score_refuses_bad_new_items(extractor_artifacts, tmp_path, lines, message):
    (tmp_path / "new.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    (tmp_path / "history.json").write_text('["a"]')
    result = score_cli(tmp_path / "history.json", "--artifacts", extractor_artifacts,
                       "--new-items", tmp_path / "new.jsonl")
    assert result.exit_code == 2 and message in result.stderr and result.stdout == ""


def test_score_new_items_needs_the_encoders(tiny_artifacts, tmp_path):
    (tmp_path / "new.jsonl").write_text('{"item_id": "a", "title": "A red tent"}\n')
    result = score_cli(ROOT / "examples" / "history.json", "--artifacts", tiny_artifacts,
                       "--new-items", tmp_path / "new.jsonl")
    assert result.exit_code == 2 and "carries no text_encoder" in result.stderr

"""Feature extraction: sentences, vocabulary, image words, the cache, bad inputs, offline use.

Tiny randomly initialised encoders (a 2-layer BERT with MiniLM's tokenizer, a 1-layer CLIP)
keep every extraction well under a second.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from mp4sr_train.data import read_dataset
from mp4sr_train.data.demo import read_catalogue
from mp4sr_train.data.types import ItemInfo, RawData
from mp4sr_train.features.cache import FeatureCache
from mp4sr_train.features.extract import default_features_path, extract, extract_features
from mp4sr_train.features.image import PROMPT, Clip, build_vocabulary, encode_text_trimmed
from mp4sr_train.features.store import read_features
from mp4sr_train.features.text import TextEncoder, checkpoint_pooling, resolve_checkpoint
from PIL import Image

from mp4sr_rt.errors import UserError
from mp4sr_rt.raw import split_sentences, top_words

TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    """A plain (no sentence-transformers files) 2-layer BERT with MiniLM's real tokenizer."""
    from transformers import BertConfig, BertModel

    out = tmp_path_factory.mktemp("bert")
    minilm = resolve_checkpoint(None)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(minilm / name, out / name)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=128)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def clip_config(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("clip") / "tiny-clip.json"
    path.write_text(json.dumps(TINY_CLIP), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def text(bert_dir) -> TextEncoder:
    return TextEncoder.load(bert_dir)


@pytest.fixture(scope="module")
def clip(clip_config) -> Clip:
    return Clip.load(str(clip_config))


def run(raw: RawData, out: Path, text: TextEncoder, clip: Clip | None, cache_dir: Path):
    with FeatureCache(cache_dir) as cache:
        report = extract(raw, out, text, clip, cache=cache, image_tokens=3, progress=False)
    return report, read_features(out)


def catalogue(items: dict[str, ItemInfo], interacted: tuple[str, ...] = ()) -> RawData:
    """Items with one interaction each: those described and those in ``interacted``."""
    ids = np.array(sorted(items) + list(interacted))
    return RawData.from_ids(users=np.array(["u"] * len(ids)), items=ids,
                   timestamps=np.arange(len(ids), dtype=float), item_info=items)


def image_file(path: Path, color: tuple[int, int, int], fmt: str = "PNG") -> str:
    Image.new("RGB", (20, 24), color).save(path, format=fmt)
    return str(path)


def test_split_sentences_keeps_field_order_and_caps_at_ten():
    fields = ["Red tent", "Sleeps four. Waterproof!  Light? Yes", "Weighs 3.5 kg.\nGreen", "  "]
    assert split_sentences(fields) == [
        "Red tent", "Sleeps four.", "Waterproof!", "Light?", "Yes", "Weighs 3.5 kg.", "Green",
    ]
    assert split_sentences(["日本語の説明。二文目です。"]) == ["日本語の説明。", "二文目です。"]
    assert split_sentences([f"Field {i}." for i in range(15)]) == [f"Field {i}." for i in range(10)]
    assert split_sentences(["", " \n "]) == []


def test_vocabulary_is_lowercase_alphabetic_without_stop_words():
    texts = ["The Red tent, 2 tents!", "Café crème; x a an 4k", "naïve-art for YOU"]
    assert build_vocabulary(texts) == ["art", "café", "crème", "naïve", "red", "tent", "tents"]


def test_top_words_matches_a_hand_computed_case():
    vocabulary = ["apple", "boat", "car", "dog"]
    words = np.array([[1, 0], [0, 1], [0.6, 0.8], [-1, 0]], dtype=np.float32)
    images = np.array([[0.8, 0.6], [0, 1]], dtype=np.float32)
    # Image 1: car .96, apple .8, boat .6. Image 2: boat 1, car .8, then apple and dog tie at 0
    # and the earlier vocabulary word wins.
    assert top_words(images, words, vocabulary, 3) == ["car apple boat", "boat car apple"]
    assert top_words(images[:1], words, vocabulary, 10) == ["car apple boat dog"]


def test_trimmed_word_encoding_equals_open_clip_encode_text(clip):
    tokens = clip.tokenizer([PROMPT.format(w) for w in ("tent", "watercolour", "naïve", "x")])
    with torch.inference_mode():
        full = clip.model.encode_text(tokens)
        trimmed = encode_text_trimmed(clip.model, tokens)
    assert int(tokens.argmax(-1).max()) + 1 < 77  # the test really trims
    torch.testing.assert_close(trimmed, full, rtol=1e-5, atol=1e-6)


def test_pooling_follows_the_checkpoint_convention(tmp_path, bert_dir):
    assert checkpoint_pooling(resolve_checkpoint(None)) == ("mean", True)  # all-MiniLM-L6-v2
    assert checkpoint_pooling(bert_dir) == ("cls", False)  # plain BERT
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text('{"pooling_mode_cls_token": true}')
    modules = [{"path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    assert checkpoint_pooling(tmp_path) == ("cls", False)


def test_demo_extraction_has_a_row_per_item_and_masks_missing_modalities(
    tmp_path, tiny_data_dir, text, clip
):
    raw = read_dataset(tiny_data_dir)
    report, feats = run(raw, tmp_path / "f.safetensors", text, clip, tmp_path / "cache")
    cat = read_catalogue(tiny_data_dir)
    assert feats.item_ids == tuple(sorted(cat.item_ids))
    order = np.argsort(cat.item_ids)
    np.testing.assert_array_equal(feats.text_mask.any(1), cat.has_text[order])
    np.testing.assert_array_equal(feats.image_mask.any(1), cat.has_image[order])
    # Title, two description sentences, brand, categories.
    assert feats.text_feats.shape[1:] == (5, 32)
    assert feats.image_feats.shape[1:] == (1, 32)
    norms = np.linalg.norm(feats.text_feats, axis=-1)
    assert ((norms > 0) == feats.text_mask.astype(bool)).all()
    assert feats.meta["clip_weights"] == "null" and feats.meta["text_pooling"] == "cls"
    assert report.images.used == cat.has_image.sum() and report.images.skipped == 0


def test_output_is_deterministic(tmp_path, tiny_data_dir, bert_dir, clip_config):
    raw = read_dataset(tiny_data_dir)
    runs = [
        run(raw, tmp_path / f"{i}.safetensors", TextEncoder.load(bert_dir),
            Clip.load(str(clip_config)), tmp_path / f"cache{i}")[1]
        for i in range(2)
    ]
    for name in ("text_feats", "text_mask", "image_feats", "image_mask"):
        np.testing.assert_array_equal(getattr(runs[0], name), getattr(runs[1], name))
    assert runs[0].meta == runs[1].meta


def test_the_file_written_in_small_blocks_is_the_one_written_in_one(monkeypatch, tmp_path, tiny_data_dir, text,
                                                                     clip):
    """The file is assembled from the cache block by block (flat memory): 7-item blocks give the
    same tensors as one block, and float16 the same rounded to half."""
    import mp4sr_train.features.extract as extract_module

    raw = read_dataset(tiny_data_dir)
    whole = run(raw, tmp_path / "whole.safetensors", text, clip, tmp_path / "cache")[1]
    monkeypatch.setattr(extract_module, "BLOCK_ITEMS", 7)
    blocks = run(raw, tmp_path / "blocks.safetensors", text, clip, tmp_path / "cache")[1]
    with FeatureCache(tmp_path / "cache") as cache:
        extract(raw, tmp_path / "half.safetensors", text, clip, cache=cache, image_tokens=3, progress=False,
                dtype="float16")
    half = read_features(tmp_path / "half.safetensors")
    assert blocks.item_ids == whole.item_ids and blocks.meta == whole.meta == half.meta
    for name in ("text_feats", "text_mask", "image_feats", "image_mask"):
        np.testing.assert_array_equal(getattr(blocks, name), getattr(whole, name))
        expected = getattr(whole, name)
        np.testing.assert_array_equal(getattr(half, name), expected.astype(np.float16) if "feats" in name else expected)
    assert half.text_feats.dtype == np.float16


def test_a_block_wise_writer_refuses_blocks_that_do_not_add_up(tmp_path):
    from mp4sr_train.features.store import write_features_in_blocks

    def blocks(n: int):
        yield np.zeros((n, 2, 4)), np.ones((n, 2)), np.zeros((n, 1, 4)), np.ones((n, 1))

    for n in (2, 4):
        with pytest.raises(ValueError, match="expected|more than"):
            write_features_in_blocks(tmp_path / "f.safetensors", ["a", "b", "c"], (2, 1), 4, {}, blocks(n))
        assert list(tmp_path.iterdir()) == []  # nothing half-written is left
    write_features_in_blocks(tmp_path / "f.safetensors", ["a", "b", "c"], (2, 1), 4, {}, blocks(3))
    assert read_features(tmp_path / "f.safetensors").text_feats.shape == (3, 2, 4)


def test_cache_reuses_finished_work_and_recomputes_changed_items(
    tmp_path, tiny_data_dir, text, clip
):
    raw = read_dataset(tiny_data_dir)
    cache = tmp_path / "cache"
    first, feats = run(raw, tmp_path / "a.safetensors", text, clip, cache)
    assert first.sentences_computed > 0 and first.images.computed > 0

    again, same = run(raw, tmp_path / "b.safetensors", text, clip, cache)
    assert (again.sentences_computed, again.images.computed, again.images.words_computed,
            again.pseudo_sentences_computed) == (0, 0, 0, 0)
    np.testing.assert_array_equal(feats.text_feats, same.text_feats)
    np.testing.assert_array_equal(feats.image_feats, same.image_feats)

    item = next(i for i, info in sorted(raw.item_info.items()) if info.sentences and info.images)
    info = raw.item_info[item]
    retitled = dataclasses.replace(info, sentences=("Brand new title",) + info.sentences[1:])
    added = ItemInfo(info.sentences, (image_file(tmp_path / "new.png", (9, 99, 199)),))
    changed = {**raw.item_info, item: retitled, "added": added}
    report, _ = run(dataclasses.replace(raw, item_info=changed), tmp_path / "c.safetensors",
                    text, clip, cache)
    assert report.sentences_computed == 1  # the new title; the added item's text is known
    assert report.images.computed == 1


def test_an_interrupted_run_keeps_its_finished_batches(monkeypatch, tmp_path, tiny_data_dir,
                                                       text, clip):
    raw = read_dataset(tiny_data_dir)
    encode = clip.encode_images
    calls = []

    def interrupt_second_batch(images):
        calls.append(len(images))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return encode(images)

    monkeypatch.setattr(clip, "encode_images", interrupt_second_batch)
    with pytest.raises(KeyboardInterrupt), FeatureCache(tmp_path / "cache") as cache:
        extract(raw, tmp_path / "f.safetensors", text, clip, cache=cache, batch_size=16,
                progress=False)
    monkeypatch.setattr(clip, "encode_images", encode)
    report, _ = run(raw, tmp_path / "f.safetensors", text, clip, tmp_path / "cache")
    assert report.sentences_computed == 0  # the text pass had finished
    assert report.images.computed == report.images.used - calls[0]


def test_bad_images_are_skipped_and_counted(tmp_path, text, clip):
    good = image_file(tmp_path / "good.png", (200, 30, 30))
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(Path(good).read_bytes()[:60])
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"not an image at all")
    jpeg = image_file(tmp_path / "j.jpg", (1, 2, 3), "JPEG")
    webp = image_file(tmp_path / "w.webp", (250, 250, 250), "WEBP")
    items = {
        "good": ItemInfo(("Red lamp",), (good,)),
        "truncated": ItemInfo(("Blue lamp",), (str(truncated),)),
        "garbage": ItemInfo(("Green lamp",), (str(garbage),)),
        "missing": ItemInfo(("Grey lamp",), (str(tmp_path / "nowhere.png"),)),
        "mixed": ItemInfo(("Pink lamp",), (str(garbage), jpeg)),
        "webp": ItemInfo(("White lamp",), (webp,)),
    }
    report, feats = run(catalogue(items), tmp_path / "f.safetensors", text, clip, tmp_path / "c")
    used = dict(zip(feats.item_ids, feats.image_mask.sum(1).tolist(), strict=True))
    assert used == {"good": 1, "truncated": 0, "garbage": 0, "missing": 0, "mixed": 1, "webp": 1}
    assert (report.images.used, report.images.skipped) == (3, 4)
    assert feats.text_mask.sum(1).tolist() == [1] * 6


def test_empty_and_non_ascii_text(tmp_path, text):
    items = {
        "empty": ItemInfo(("",)),
        "blank": ItemInfo(("   ", "\n")),
        "unicode": ItemInfo(("Café crème brûlée.", "日本語の説明です。Ünïcödé!")),
        "none": ItemInfo(),
    }
    raw = catalogue(items, interacted=("no-info",))
    _, feats = run(raw, tmp_path / "f.safetensors", text, None, tmp_path / "c")
    assert feats.item_ids == ("blank", "empty", "no-info", "none", "unicode")
    assert feats.text_mask.sum(1).tolist() == [0, 0, 0, 0, 3]
    assert np.linalg.norm(feats.text_feats[4], axis=-1).min() > 0
    assert not feats.image_mask.any()


def test_clip_weights_are_loaded_and_recorded(tmp_path, clip_config, clip):
    weights = tmp_path / "tiny.pt"
    torch.save({k: v + 0.01 for k, v in clip.model.state_dict().items()}, weights)
    loaded = Clip.load(str(clip_config), weights)
    assert loaded.weights["sha256"] and loaded.identity != clip.identity
    assert not np.allclose(loaded.encode_words(["tent"]), clip.encode_words(["tent"]))
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage")
    with pytest.raises(UserError, match="clip-weights"):
        Clip.load(str(clip_config), bad)


def test_nothing_reaches_the_network(monkeypatch, tmp_path, bert_dir, clip_config):
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    minilm = TextEncoder.load(None)  # the bundled real weights
    v = minilm.encode(["hiking boots for the trail", "trail shoes for hiking", "espresso grinder"])
    assert v.shape == (3, 384) and np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-5)
    assert v[0] @ v[1] > v[0] @ v[2] + 0.2
    with pytest.raises(UserError, match="not in the local Hugging Face cache|neither"):
        TextEncoder.load("some-org/model-that-is-not-here")
    with pytest.raises(UserError, match="unknown CLIP model"):
        Clip.load("hf-hub:some-org/clip")
    items = {"a": ItemInfo(("Red tent.",), (image_file(tmp_path / "a.png", (200, 0, 0)),))}
    out = extract_features(catalogue(items), tmp_path / "f.safetensors", text_encoder=str(bert_dir),
                           clip_model=str(clip_config), cache_dir=tmp_path / "c", progress=False)
    assert read_features(out).image_mask.sum() == 1


def test_cli_writes_features_beside_the_data(tmp_path, tiny_data_dir, bert_dir, clip_config):
    from typer.testing import CliRunner

    from mp4sr_cli import app

    data = shutil.copytree(tiny_data_dir, tmp_path / "data")
    args = ["features", "--data", str(data), "--text-encoder", str(bert_dir), "--clip-model",
            str(clip_config), "--cache-dir", str(tmp_path / "cache"), "--quiet"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    out = Path(result.stdout.strip())
    assert out.is_file()
    assert out == default_features_path(data, text_encoder=str(bert_dir), clip_model=str(clip_config),
                                        cache_dir=tmp_path / "cache")
    assert out.is_relative_to(tmp_path / "cache") and not out.is_relative_to(data)  # never in the data
    assert "randomly initialised" in result.stderr and "images used" in result.stderr

    bad = CliRunner().invoke(app, [*args[:3], "--text-encoder", str(tmp_path / "nope")])
    assert bad.exit_code == 2 and "error: text encoder" in bad.stderr

    # --out never overwrites what is not a features file (the data's own items.jsonl, a folder);
    # an earlier extraction's output is replaced.
    items = (data / "items.jsonl").read_bytes()
    for target, message in ((data / "items.jsonl", "is not a features file"), (data, "is not a file")):
        refused = CliRunner().invoke(app, [*args, "--out", str(target)])
        assert refused.exit_code == 2 and message in refused.stderr, refused.output
    assert (data / "items.jsonl").read_bytes() == items
    again = CliRunner().invoke(app, [*args, "--out", str(out)])
    assert again.exit_code == 0 and read_features(out).text_feats.shape[0] > 0

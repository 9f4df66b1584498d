"""Raw item text and images -> the features file (SPEC section 1), computing only what changed.

    raw = read_dataset("data/my_shop")
    extract_features(raw, Path("data/my_shop/features.safetensors"))   # MiniLM + ViT-B-32

Text: each item's sentences (title first, at most 10) -> one vector each. Images: each image (at
most 10 per item) -> its top-N vocabulary words by CLIP similarity -> one pseudo-sentence -> one
vector from the same text encoder, so both modalities share one space. Rows are all items of
the data (interaction items and described items), sorted by id; an item without usable text
(or images) gets an all-zero mask row for that modality.

The cache holds every sentence, image and word vector by content hash, so a rerun after adding
10 items encodes only what those items bring, and an interrupted run loses no finished batch.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from mp4sr_train.data.types import ItemInfo, RawData
from mp4sr_train.features.cache import FeatureCache, content_key, default_cache_dir
from mp4sr_train.features.image import PROMPT, Clip, build_vocabulary
from mp4sr_train.features.store import FLOAT_DTYPES, check_replaceable, write_features_in_blocks
from mp4sr_train.features.text import TextEncoder
from tqdm import tqdm

from mp4sr_rt.errors import UserError
from mp4sr_rt.raw import MAX_SENTENCES, decode_image, pack_slots, split_sentences, top_words

MAX_IMAGES = 10  # the first 10 listed images of an item are used
BLOCK_ITEMS = 16_384  # items per block of the features file: its memory while written


@dataclass
class ImageStats:
    vocabulary: int = 0
    words: list[str] = field(default_factory=list, repr=False)  # the vocabulary itself
    words_computed: int = 0
    vocabulary_seconds: float = 0.0
    used: int = 0
    skipped: int = 0  # missing, truncated or undecodable files
    computed: int = 0
    first_skipped: str = ""


@dataclass(frozen=True)
class Report:
    """What one extraction did; ``*_computed`` count the vectors the cache did not have."""

    path: Path
    items: int
    dim: int
    text_items: int
    sentences: int
    sentences_computed: int
    image_items: int
    images: ImageStats
    pseudo_sentences_computed: int
    text_seconds: float
    image_seconds: float  # images and their pseudo-sentences; the vocabulary is counted apart

    def summary(self) -> str:
        im = self.images
        skipped = f", e.g. {im.first_skipped}" if im.skipped else ""
        return "\n".join([
            f"features: {self.items} items, {self.dim}-d -> {self.path}",
            f"  text:  {self.text_items} items, {self.sentences} sentences "
            f"({self.sentences_computed} new), {_rate(self.text_items, self.text_seconds)}",
            f"  image: {self.image_items} items, {im.used} images used ({im.computed} new), "
            f"{im.skipped} skipped as missing or unreadable{skipped}, "
            f"{_rate(self.image_items, self.image_seconds)}",
            f"  vocabulary: {im.vocabulary} words ({im.words_computed} new), "
            f"{im.vocabulary_seconds:.1f} s",
        ])


def extract_features(
    raw: RawData,
    out_file: Path,
    *,
    text_encoder: str | None = None,
    text_pooling: str = "auto",
    clip_model: str = "ViT-B-32",
    clip_weights: Path | None = None,
    image_tokens: int = 15,
    batch_size: int = 64,
    device: str = "auto",
    cache_dir: Path | None = None,
    progress: bool = True,
    dtype: str = "float32",
) -> Path:
    """Load the encoders, extract, write ``out_file`` (features as ``dtype``: float32, or float16
    for half the size) and log a summary on stderr.

    ``text_encoder``: a checkpoint directory or a name in the local Hugging Face cache (default:
    the bundled all-MiniLM-L6-v2). ``clip_model``: an open_clip config name or a JSON config file.
    """
    from mp4sr_train.loop import resolve_device

    if dtype not in FLOAT_DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(FLOAT_DTYPES)}, got {dtype!r}")
    if image_tokens < 1 or batch_size < 1:
        raise UserError(
            f"--image-tokens and --batch-size must be >= 1, got {image_tokens} and {batch_size}"
        )
    check_replaceable(Path(out_file))
    infos = raw.item_info.values()
    if not any(info.sentences for info in infos):
        raise UserError(
            f"{raw.source or 'the data'} has no item text (e.g. an items.jsonl with titles): "
            "there is nothing to extract features from"
        )
    dev = resolve_device(device)
    text = TextEncoder.load(text_encoder, dev, text_pooling)
    clip = None
    if any(info.images for info in infos):
        clip = Clip.load(clip_model, clip_weights, dev)
        if clip.weights is None:
            _log("warning: no --clip-weights given: the CLIP tower is randomly initialised, so "
                 "image words follow colours and shapes, not meaning; the features file records "
                 '"clip_weights": null')
    with FeatureCache(cache_dir or default_cache_dir()) as cache:
        report = extract(raw, Path(out_file), text, clip, cache=cache, image_tokens=image_tokens,
                         batch_size=batch_size, progress=progress, dtype=dtype)
    _log(report.summary())
    return report.path


def extract(
    raw: RawData, out_file: Path, text: TextEncoder, clip: Clip | None, *, cache: FeatureCache,
    image_tokens: int = 15, batch_size: int = 64, progress: bool = True, dtype: str = "float32",
) -> Report:
    """The extraction with loaded encoders (``clip`` None: ignore images); tests pass tiny ones."""
    item_ids = sorted(set(raw.item_names.tolist()) | set(raw.item_info))
    infos = [raw.item_info.get(item, ItemInfo()) for item in item_ids]

    start = time.perf_counter()
    sentences = [split_sentences(info.sentences) for info in infos]
    text_new = _embed(text, sentences, cache, batch_size, progress, "text")
    text_seconds = time.perf_counter() - start

    start = time.perf_counter()
    described, stats = _describe_images(infos, clip, cache, image_tokens, batch_size, progress)
    image_new = _embed(text, described, cache, batch_size, progress, "image words")
    image_seconds = time.perf_counter() - start - stats.vocabulary_seconds

    meta = {
        "encoder": text.name,
        "encoder_sha256": text.identity,
        "text_pooling": text.pooling_label,
        "max_sentences": str(MAX_SENTENCES),
        "clip_model": clip.name if clip else "none",
        "clip_weights": json.dumps(clip.weights if clip else None),
        "clip_sha256": clip.identity if clip else "",
        "clip_prompt": PROMPT,
        "image_tokens": str(image_tokens),
        "vocabulary_size": str(stats.vocabulary),
        # What export needs to describe new items' images as these were: the CLIP word list.
        "clip_vocabulary": json.dumps(stats.words if clip else []),
    }
    meta["clip_vocabulary_sha256"] = hashlib.sha256(meta["clip_vocabulary"].encode()).hexdigest()
    # Every vector is in the cache now: the file is assembled from it BLOCK_ITEMS items at a time.
    slots = tuple(max([len(row) for row in rows] + [1]) for rows in (sentences, described))

    def blocks():
        for begin in range(0, len(item_ids), BLOCK_ITEMS):
            parts = [_packed(text, rows[begin:begin + BLOCK_ITEMS], cache, width)
                     for rows, width in zip((sentences, described), slots, strict=True)]
            yield (*parts[0], *parts[1])

    write_features_in_blocks(out_file, item_ids, slots, text.dim, meta, blocks(), dtype)
    return Report(
        path=out_file, items=len(item_ids), dim=text.dim,
        text_items=sum(map(bool, sentences)), sentences=sum(map(len, sentences)),
        sentences_computed=text_new, image_items=sum(map(bool, described)), images=stats,
        pseudo_sentences_computed=image_new, text_seconds=text_seconds, image_seconds=image_seconds,
    )


def default_features_path(
    data: Path, *, text_encoder: str | None = None, text_pooling: str = "auto",
    clip_model: str = "ViT-B-32", clip_weights: Path | None = None, image_tokens: int = 15,
    cache_dir: Path | None = None,
) -> Path:
    """``<cache>/extracted/<data dir name>-<8 hex of its path>-<8 hex of the settings>.safetensors``
    (cache: `cache_dir`, by default `default_cache_dir()`), never inside the user's data, which
    may be read-only or shared.

    One file per dataset and settings, so switching encoders never overwrites another run's
    features; the same settings rewrite the same file when the data changes (the vector cache
    keeps that cheap). The defaults are `extract_features`'s, so `mp4sr-rt train` finds what
    `features` wrote.
    """
    settings = [text_encoder, text_pooling, clip_model,
                str(Path(clip_weights).resolve()) if clip_weights else None, image_tokens]
    directory = (data if data.is_dir() else data.parent).resolve()
    name = f"{directory.name}-{content_key(str(directory))[:8]}-{content_key(json.dumps(settings))[:8]}"
    return Path(cache_dir or default_cache_dir()) / "extracted" / f"{name}.safetensors"


def _embed(text: TextEncoder, rows: list[list[str]], cache: FeatureCache, batch_size: int,
           progress: bool, desc: str) -> int:
    """Put the vector of every sentence in ``rows`` in the cache; returns how many were not there.
    Each batch is committed as it is computed: a killed run resumes after its last batch."""
    # Sorted: the batches, hence the exact floats, must not depend on hash-randomised set order.
    unique = sorted({s for row in rows for s in row})
    keys = {s: content_key("sentence", text.identity, s) for s in unique}
    cached = cache.present(keys.values())
    todo = [s for s in unique if keys[s] not in cached]
    with tqdm(total=len(todo), desc=desc, unit="sent", disable=not progress or not todo) as bar:
        for index, batch in text.batches(todo, batch_size):
            cache.put_many({keys[todo[i]]: v for i, v in zip(index, batch, strict=True)})
            bar.update(len(index))
    return len(todo)


def _packed(text: TextEncoder, rows: list[list[str]], cache: FeatureCache, slots: int) -> tuple[np.ndarray, np.ndarray]:
    """pack_slots of `rows` from the cached vectors, `slots` wide: (n, slots, dim), (n, slots)."""
    keys = {s: content_key("sentence", text.identity, s) for row in rows for s in row}
    found = cache.get_many(keys.values())
    missing = [s for s, k in keys.items() if k not in found]
    if missing:
        raise UserError(f"the feature cache {cache.path} lost {len(missing)} vector(s) during the extraction "
                        f"(e.g. {missing[0]!r}); run it again")
    feats, mask = pack_slots(rows, {s: found[k] for s, k in keys.items()}, text.dim)
    pad = slots - feats.shape[1]
    return np.pad(feats, ((0, 0), (0, pad), (0, 0))), np.pad(mask, ((0, 0), (0, pad)))


def _describe_images(infos: list[ItemInfo], clip: Clip | None, cache: FeatureCache, n: int,
                     batch_size: int, progress: bool) -> tuple[list[list[str]], ImageStats]:
    """Per item, one pseudo-sentence of top-``n`` words per usable image."""
    described: list[list[str]] = [[] for _ in infos]
    vocabulary = build_vocabulary(s for info in infos for s in info.sentences)
    stats = ImageStats(vocabulary=len(vocabulary), words=vocabulary)
    pairs = [(row, path) for row, info in enumerate(infos) for path in info.images[:MAX_IMAGES]]
    if clip is None or not pairs:
        return described, stats
    if not vocabulary:
        raise UserError("the item texts hold no words to describe the images with")
    start = time.perf_counter()
    word_vecs = _word_vectors(clip, vocabulary, cache, batch_size, progress, stats)
    stats.vocabulary_seconds = time.perf_counter() - start
    with tqdm(total=len(pairs), desc="images", unit="img", disable=not progress) as bar:
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start:start + batch_size]
            vectors = _image_vectors(clip, [path for _, path in chunk], cache, stats)
            kept = [(row, v) for (row, _), v in zip(chunk, vectors, strict=True) if v is not None]
            if kept:
                words = top_words(np.stack([v for _, v in kept]), word_vecs, vocabulary, n)
                for (row, _), sentence in zip(kept, words, strict=True):
                    described[row].append(sentence)
            bar.update(len(chunk))
    return described, stats


def _word_vectors(clip: Clip, vocabulary: list[str], cache: FeatureCache, batch_size: int,
                  progress: bool, stats: ImageStats) -> np.ndarray:
    """float32 [W, D]: the CLIP text vector of every vocabulary word, computed once."""
    keys = [content_key("clip-word", clip.identity, PROMPT.format(w)) for w in vocabulary]
    found = cache.get_many(keys)
    todo = [i for i, key in enumerate(keys) if key not in found]
    bar = tqdm(total=len(todo), desc="vocabulary", unit="word", disable=not progress or not todo)
    with bar:
        for start in range(0, len(todo), batch_size):
            index = todo[start:start + batch_size]
            vectors = clip.encode_words([vocabulary[i] for i in index])
            new = {keys[i]: v for i, v in zip(index, vectors, strict=True)}
            cache.put_many(new)
            found.update(new)
            bar.update(len(index))
    stats.words_computed = len(todo)
    return np.stack([found[key] for key in keys])


def _image_vectors(clip: Clip, paths: list[str], cache: FeatureCache,
                   stats: ImageStats) -> list[np.ndarray | None]:
    """The CLIP vector of each image file, None where the file is missing or unreadable."""
    blobs = [_read_bytes(path) for path in paths]
    keys = [None if b is None else content_key("clip-image", clip.identity, b) for b in blobs]
    found = cache.get_many(k for k in keys if k is not None)
    out: list[np.ndarray | None] = [found.get(k) if k else None for k in keys]
    new_index, new_images = [], []
    for i, (path, blob) in enumerate(zip(paths, blobs, strict=True)):
        if out[i] is not None:
            continue
        image = decode_image(blob) if blob is not None else None
        if image is None:
            stats.skipped += 1
            stats.first_skipped = stats.first_skipped or path
            continue
        new_index.append(i)
        new_images.append(image)
    if new_images:
        vectors = clip.encode_images(new_images)
        cache.put_many({keys[i]: v for i, v in zip(new_index, vectors, strict=True)})
        for i, v in zip(new_index, vectors, strict=True):
            out[i] = v
        stats.computed += len(new_images)
    stats.used += sum(v is not None for v in out)
    return out


def _read_bytes(path: str) -> bytes | None:
    try:
        return Path(path).read_bytes()
    except OSError:
        return None


def _rate(items: int, seconds: float) -> str:
    return f"{seconds:.1f} s, {items / seconds:.1f} items/s" if seconds > 0 else "0 s"


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)

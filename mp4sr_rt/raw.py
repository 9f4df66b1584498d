"""Raw item text and images -> the item tower's feature slots, without torch (docs/artifacts.md).

    encoders = RawEncoders(artifacts_dir, manifest, backend)          # Scorer.add_items does this
    feeds = encoders.features(1, F, texts=[["Red tent", "Sleeps four."]], images=[["tent.jpg"]])
    # {"text_feats": (1, S, F), "text_mask": (1, S), "image_feats": (1, V, F), "image_mask": (1, V)}

The steps are those of `mp4sr-rt features` (train/features), as the manifest's `preprocessing`
describes them: text fields -> sentences -> tokenizer -> text_encoder, one slot per sentence;
each image -> shorter side resized, centre crop, normalised -> image_encoder -> its top
vocabulary words -> one pseudo-sentence -> text_encoder, one slot per image. The sentence
splitting, image decoding and word choice below are the very functions train/features uses;
the image resize is Pillow's, which torchvision (and so open_clip) calls on Pillow images.
Tokenizer: Hugging Face `tokenizers` on the exported tokenizer.json.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from mp4sr_rt.errors import ArtifactError, UserError
from mp4sr_rt.manifest import Manifest, load_array, load_json

MAX_SENTENCES = 10
# A sentence ends at . ! ? before whitespace (so "3.5 kg" stays whole), after CJK full stops,
# or at a line break.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|(?<=[。！？])|\n+")
TEXT_BATCH = 64  # sentences per text-encoder call
IMAGE_BATCH = 16  # images per image-encoder call


def split_sentences(fields: Iterable[str], max_sentences: int = MAX_SENTENCES) -> list[str]:
    """Sentences of the text fields in order (title first), whitespace collapsed, at most N."""
    out = []
    for field in fields:
        for sentence in _SENTENCE_END.split(field):
            sentence = " ".join(sentence.split())
            if sentence:
                out.append(sentence)
    return out[:max_sentences]


def top_words(image_vecs: np.ndarray, word_vecs: np.ndarray, vocabulary: list[str],
              n: int) -> list[str]:
    """Per image, its ``n`` most similar words (best first) joined into one pseudo-sentence.

    Rows of both matrices are unit vectors, so the dot product is the cosine similarity; ties
    go to the word earlier in the vocabulary, so the result is deterministic.
    """
    similarity = image_vecs @ word_vecs.T  # (images, words)
    best = np.argsort(-similarity, axis=1, kind="stable")[:, :n]
    return [" ".join(vocabulary[j] for j in row) for row in best]


MAX_IMAGE_PIXELS = 89_478_485  # Pillow's own decompression-bomb limit (about 9459 x 9459)


def decode_image(data: bytes):
    """The RGB Pillow image in ``data`` (PNG, JPEG, WebP...), or None if it cannot be used
    (`read_image` says why)."""
    return read_image(data)[0]


def read_image(data: bytes):
    """(RGB Pillow image, None), or (None, why it is not usable: too large, truncated, unknown format)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size  # from the header, before any pixel is decoded
            if width * height > MAX_IMAGE_PIXELS:
                return None, f"too large ({width} x {height} pixels; the limit is {MAX_IMAGE_PIXELS:,} pixels)"
            image.load()  # decode now: a truncated file fails here, not inside a batch
            return image.convert("RGB"), None
    except Image.DecompressionBombError:
        return None, f"too large (more than {2 * MAX_IMAGE_PIXELS:,} pixels; the limit is {MAX_IMAGE_PIXELS:,})"
    except (OSError, ValueError, SyntaxError):
        return None, "truncated or of an unknown format"


def clip_pixels(image, size: int, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """float32 (3, size, size): open_clip's inference transform on an RGB Pillow image.

    Resize (torchvision, shortest side): the shorter side becomes `size`, the longer one
    int(size * long / short), bicubic (Pillow's, antialiased); centre crop with torchvision's
    int(round(...)) offsets; x / 255, then (x - mean) / std per channel."""
    from PIL import Image

    width, height = image.size
    short, long = sorted((width, height))
    scaled = (size, int(size * long / short))
    new_size = scaled if width <= height else scaled[::-1]  # (width, height)
    if new_size != image.size:
        image = image.resize(new_size, Image.Resampling.BICUBIC)
    left = int(round((new_size[0] - size) / 2.0))
    top = int(round((new_size[1] - size) / 2.0))
    image = image.crop((left, top, left + size, top + size))
    x = np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / np.float32(255)
    return (x - np.asarray(mean, np.float32)[:, None, None]) / np.asarray(std, np.float32)[:, None, None]


class Encoders(Protocol):
    def embed(self, role: str, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """text_encoder.onnx or image_encoder.onnx: its inputs -> `vectors` float32 (B, F)."""


class RawEncoders:
    """The artifacts' text and image encoders with their pre- and post-processing."""

    def __init__(self, directory: Path, manifest: Manifest, backend: Encoders):
        self.directory = Path(directory)
        self.backend = backend
        preprocessing = manifest.preprocessing
        self.text = preprocessing.text if preprocessing and "text_encoder" in manifest.models else None
        self.image = preprocessing.image if preprocessing and "image_encoder" in manifest.models else None
        self._tokenizer = None
        self._pad_id = 0  # the tokenizer's [PAD] id, read with the tokenizer
        self._words: tuple[list[str], np.ndarray] | None = None

    def _check(self, texts: bool, images: bool) -> None:
        missing = [role for role, wanted, present in (("text_encoder", texts or images, self.text),
                                                      ("image_encoder", images, self.image))
                   if wanted and present is None]
        if missing:
            raise ArtifactError(
                f"{self.directory} carries no {' or '.join(missing)} (its features did not come "
                "from `mp4sr-rt features`): pass precomputed features (text_feats, text_mask, "
                "image_feats, image_mask) instead")

    def features(self, n: int, dim: int, texts: Sequence[Sequence[str]] | None,
                 images: Sequence[Sequence[str | Path | bytes]] | None) -> dict[str, np.ndarray]:
        """Item-tower inputs (feature size `dim`) for the modalities given, n items each; see the
        module docstring."""
        self._check(texts is not None, images is not None)
        feeds = {}
        if texts is not None:
            rows = [split_sentences(_strings(fields, "texts", i), self.text.max_sentences)
                    for i, fields in enumerate(_per_item(texts, n, "texts"))]
            feeds["text_feats"], feeds["text_mask"] = pack_slots(rows, self._sentence_vectors(rows), dim)
        if images is not None:
            rows = self._describe(_per_item(images, n, "images"))
            feeds["image_feats"], feeds["image_mask"] = pack_slots(rows, self._sentence_vectors(rows), dim)
        return feeds

    # -- text ------------------------------------------------------------------------------

    def _sentence_vectors(self, rows: list[list[str]]) -> dict[str, np.ndarray]:
        """{sentence: vector} for every sentence of `rows`, longest first in batches."""
        unique = sorted({s for row in rows for s in row})
        if not unique:
            return {}
        tokenizer = self._load_tokenizer()
        encoded = tokenizer.encode_batch(unique)
        order = sorted(range(len(unique)), key=lambda i: -len(encoded[i].ids))
        vectors = {}
        for start in range(0, len(order), TEXT_BATCH):
            index = order[start:start + TEXT_BATCH]
            width = max(len(encoded[i].ids) for i in index)
            ids = np.full((len(index), width), self._pad_id, dtype=np.int64)
            mask = np.zeros((len(index), width), dtype=np.int64)
            for row, i in enumerate(index):
                ids[row, :len(encoded[i].ids)] = encoded[i].ids
                mask[row, :len(encoded[i].ids)] = 1
            out = self.backend.embed("text_encoder", {"input_ids": ids, "attention_mask": mask})
            vectors.update({unique[i]: v for i, v in zip(index, out, strict=True)})
        return vectors

    def _load_tokenizer(self):
        if self._tokenizer is None:
            try:
                from tokenizers import Tokenizer
            except ImportError:
                raise UserError("raw item texts need the `tokenizers` package (pip install tokenizers)") from None
            folder = self.directory / self.text.tokenizer
            try:
                tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
                config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
                if not isinstance(config, dict):
                    raise ValueError("tokenizer_config.json is not a JSON object")
            except Exception as e:  # tokenizers raises its own exception type
                raise ArtifactError(f"{folder}: the tokenizer cannot be loaded ({e})") from None
            tokenizer.no_padding()  # padded per batch below, to the batch's longest sentence
            tokenizer.enable_truncation(max_length=self.text.max_tokens)
            pad = tokenizer.token_to_id(config.get("pad_token") or "[PAD]")
            self._pad_id = 0 if pad is None else pad
            self._tokenizer = tokenizer
        return self._tokenizer

    # -- images ----------------------------------------------------------------------------

    def _describe(self, images: list[Sequence[str | Path | bytes]]) -> list[list[str]]:
        """Per item, one pseudo-sentence per image (its first max_images images)."""
        spec = self.image
        pairs = [(row, source) for row, sources in enumerate(images)
                 for source in _sources(sources, row)[:spec.max_images]]
        vocabulary, words = self._word_vectors()
        described: list[list[str]] = [[] for _ in images]
        for start in range(0, len(pairs), IMAGE_BATCH):  # decoded per batch: bounded memory
            batch = pairs[start:start + IMAGE_BATCH]
            pixels = np.stack([self._pixels(source) for _, source in batch])
            vectors = self.backend.embed("image_encoder", {"pixels": pixels})
            for (row, _), sentence in zip(batch, top_words(vectors, words, vocabulary, spec.words), strict=True):
                described[row].append(sentence)
        return described

    def _pixels(self, source: str | Path | bytes) -> np.ndarray:
        spec = self.image
        if isinstance(source, bytes):
            data, name = source, f"<{len(source)} bytes>"
        else:
            name = str(source)
            try:
                data = Path(source).read_bytes()
            except OSError as e:
                raise UserError(f"add_items: image {name} cannot be read ({e.strerror})") from None
        image, problem = read_image(data)
        if problem:
            raise UserError(f"add_items: image {name} is not usable: {problem}")
        return clip_pixels(image, spec.image_size, spec.mean, spec.std)

    def _word_vectors(self) -> tuple[list[str], np.ndarray]:
        if self._words is None:
            path = self.directory / self.image.vocabulary
            vocabulary = load_json(path)
            if not isinstance(vocabulary, list) or not vocabulary or not all(isinstance(w, str) for w in vocabulary):
                raise ArtifactError(f"{path}: expected a non-empty JSON list of words")
            words = load_array(self.directory / self.image.word_vectors, "float32", (len(vocabulary), None))
            self._words = vocabulary, words
        return self._words


def _per_item(values, n: int, name: str) -> list:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or len(values) != n:
        raise UserError(f"add_items: {name} must be a list with one entry per item id ({n})")
    return list(values)


def _strings(fields, name: str, row: int) -> list[str]:
    if isinstance(fields, str):
        return [fields]
    if not isinstance(fields, Sequence) or not all(isinstance(f, str) for f in fields):
        raise UserError(f"add_items: {name}[{row}] must be a string or a list of strings")
    return list(fields)


def _sources(sources, row: int) -> list[str | Path | bytes]:
    if isinstance(sources, (str, Path, bytes)):
        return [sources]
    if not isinstance(sources, Sequence) or not all(isinstance(s, (str, Path, bytes)) for s in sources):
        raise UserError(f"add_items: images[{row}] must be a path, bytes, or a list of them")
    return list(sources)


def pack_slots(rows: list[list[str]], vectors: dict[str, np.ndarray], dim: int) -> tuple[np.ndarray, np.ndarray]:
    """One slot per sentence: features float32 (n, S, dim) and mask bool (n, S), S the longest
    row (at least 1); an item without any sentence gets an all-false mask row. `mp4sr-rt
    features` packs the features file the same way."""
    slots = max([len(row) for row in rows] + [1])
    feats = np.zeros((len(rows), slots, dim), dtype=np.float32)
    mask = np.zeros((len(rows), slots), dtype=bool)
    for i, row in enumerate(rows):
        for j, sentence in enumerate(row):
            feats[i, j] = vectors[sentence]
            mask[i, j] = True
    return feats, mask

"""The artifact directory's manifest.json (docs/artifacts.md), typed: written by the exporter,
read by the runtime, loaded strictly field by field. Standard library only (no torch, no onnx).

    manifest = verify_artifacts("mp4sr-out/artifacts")   # Manifest; ArtifactError naming the key or file
    manifest.models["scorer"].file, manifest.modalities, manifest.item_dim
    manifest.to_dict()                                     # what json.dumps writes

A manifest is refused, with the key named, when a key is unknown or missing, a value has the
wrong type or range, a path leaves the directory, or a file the runtime reads is not listed in
`files` (every one is, with its size and sha256, so nothing it reads can change unseen).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import sys
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Union

import numpy as np

from mp4sr_rt.ann import KINDS as ANN_KINDS
from mp4sr_rt.ann import SEARCH_SETTING as ANN_SEARCH_SETTING
from mp4sr_rt.errors import ArtifactError

SCHEMA = "mp4sr-artifacts/2"
MANIFEST = "manifest.json"
MODALITIES = ("text", "image")  # in this order wherever a model has both
REQUIRED_MODELS = ("scorer", "item_tower", "history_encoder")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")  # what the runtime reads of the tokenizer folder
_SHA256 = re.compile(r"[0-9a-f]{64}")


class ManifestError(ArtifactError):
    """A manifest that does not follow docs/artifacts.md; the message names the key."""


def _check(condition: bool, where: str, message: str) -> None:
    if not condition:
        raise ManifestError(f"{where}: {message}")


def _relative(path: str, where: str) -> str:
    """A path inside the artifact directory: relative, posix, without '..'."""
    p = PurePosixPath(path)
    _check(bool(path) and not p.is_absolute() and ".." not in p.parts and "\\" not in path,
           where, f"{path!r} is not a relative path inside the artifact directory")
    return path


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple[int | str, ...]  # ints, or the names of dynamic axes


@dataclass(frozen=True)
class TensorRTEngine:
    file: str
    profile: dict[str, tuple[tuple[int, ...], ...]]  # per input: [min, opt, max] shapes


@dataclass(frozen=True)
class Model:
    file: str
    opset: int
    precision: str  # of the weights and compute; inputs and outputs are fp32 at every precision
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    tensorrt: TensorRTEngine | None = None

    def input(self, name: str) -> TensorSpec | None:
        return next((t for t in self.inputs if t.name == name), None)

    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    bytes: int


@dataclass(frozen=True)
class SourceCheckpoint:
    path: str
    sha256: str
    stage: str | None


@dataclass(frozen=True)
class Features:
    encoder: str | None  # the text encoder that made the features, None for precomputed ones
    dim: int  # F
    max_slots: int
    values_sha256: str | None  # of the feature values the model was trained on


@dataclass(frozen=True)
class TextPreprocessing:
    tokenizer: str  # folder of the Hugging Face tokenizer files
    max_tokens: int
    pooling: str
    max_sentences: int
    sentences: str


@dataclass(frozen=True)
class ImagePreprocessing:
    image_size: int
    layout: str
    resize: str
    scale: float
    mean: tuple[float, ...]
    std: tuple[float, ...]
    max_images: int
    words: int
    prompt: str
    vocabulary: str  # JSON list of the CLIP words
    word_vectors: str  # .npy float32 (W, D) unit rows
    describe: str


@dataclass(frozen=True)
class Preprocessing:
    text: TextPreprocessing
    image: ImagePreprocessing | None = None


@dataclass(frozen=True)
class AnnIndex:
    """An approximate (FAISS) index over the serving table: `export --ann`."""

    file: str
    kind: str  # ivf | ivf-pq | hnsw
    params: dict[str, int]  # how it was built: nlist, or m and ef_construction
    search: dict[str, int]  # the tuned search setting: nprobe, or ef_search
    target_recall: float  # what the export was asked for, on recall@k and recall@10
    k: int  # the k of recall_at_k (the manifest's top_k)
    recall_at_10: float  # measured on held-out histories (not those it was tuned on)
    recall_at_k: float
    tuned_rows: int
    checked_rows: int
    build_seconds: float


@dataclass(frozen=True)
class Catalogue:
    """Catalogue changes since the export (`mp4sr-rt catalogue`, a running server): version n
    lives in catalogue/v<n>/ (mp4sr_rt/catalogue.py)."""

    version: int  # 1, 2, ...: one per committed change
    changes: str  # JSON {"added": [ids], "removed": [ids]}, added in catalogue order
    added: int  # len(added): rows of the two arrays
    removed: int
    added_table: str | None  # .npy float32 (added, dim): the added items' serving rows
    added_inputs: str | None  # .npy float32 (added, dim): their sequence-input vectors


@dataclass(frozen=True)
class Manifest:
    schema: str
    created: str
    tool_versions: dict[str, str]
    source_checkpoint: SourceCheckpoint
    precision: str  # fp32 | fp16
    padding: str  # right
    pad_id: int  # 0
    max_len: int  # L
    top_k: int  # K, the most the scorer returns
    topk_block: int  # 0, or the block size of the scorer's two-stage top k
    int8_scan: int  # 0, or the candidates of the scorer's int8 scan
    modalities: tuple[str, ...]  # the model's, in order: ("text", "image"), ("text",) or ("image",)
    dim: int  # len(modalities) * d: width of the user vector and of a serving row
    num_items: int  # N
    max_batch: int
    vocabulary: str  # items.json
    item_inputs: str  # item_inputs.npy
    features: Features
    models: dict[str, Model]
    parity: dict[str, dict[str, dict[str, int | float | bool]]]  # role -> backend -> figure
    files: dict[str, FileEntry]
    preprocessing: Preprocessing | None = None
    ann: AnnIndex | None = None
    catalogue: Catalogue | None = None
    # item_table.npy: the serving table of the trained catalogue, float32 [N + 1, M d], written when
    # it is not the normalised item_inputs (a model whose candidates have ID rows of their own);
    # None: the table is item_inputs normalised per modality.
    item_table: str | None = None

    def __post_init__(self) -> None:
        where = MANIFEST
        _check(self.schema == SCHEMA, f"{where} schema", f"{self.schema!r}, expected {SCHEMA!r}; "
               "re-export with this version")
        _check(self.precision in ("fp32", "fp16"), f"{where} precision", f"{self.precision!r} is not fp32 or fp16")
        _check(self.padding == "right" and self.pad_id == 0, f"{where} padding", "only right padding with id 0")
        for name in ("max_len", "num_items", "max_batch", "top_k", "dim"):
            _check(getattr(self, name) >= 1, f"{where} {name}", f"expected >= 1, got {getattr(self, name)}")
        for name in ("topk_block", "int8_scan"):
            _check(getattr(self, name) >= 0, f"{where} {name}", f"expected >= 0, got {getattr(self, name)}")
        _check(self.top_k <= self.num_items, f"{where} top_k", f"{self.top_k} > num_items {self.num_items}")
        m = self.modalities
        _check(len(m) >= 1 and len(set(m)) == len(m) and list(m) == [n for n in MODALITIES if n in m],
               f"{where} modalities", f"{list(m)}: distinct names among {', '.join(MODALITIES)}, in that order")
        _check(self.dim % len(m) == 0, f"{where} dim", f"{self.dim} is not a multiple of {len(m)} modalities")
        for role in REQUIRED_MODELS:
            _check(role in self.models, f"{where} models", f"no {role!r} model")
        for role, (inputs, outputs) in self.expected_io().items():
            model = self.models[role]
            for kind, got, want in (("inputs", model.inputs, inputs), ("outputs", model.outputs, outputs)):
                _check(got == want, f"{where} models.{role}.{kind}",
                       f"{_describe(got)} is not what this manifest's model takes or gives: {_describe(want)}")
        if self.ann is not None:
            _check(self.ann.kind in ANN_KINDS, f"{where} ann.kind",
                   f"{self.ann.kind!r} is not one of {', '.join(ANN_KINDS)}")
            wanted = {ANN_SEARCH_SETTING[self.ann.kind]}
            _check(set(self.ann.search) == wanted and all(v >= 1 for v in self.ann.search.values()),
                   f"{where} ann.search", f"expected {sorted(wanted)} >= 1, got {self.ann.search}")
        if self.catalogue is not None:
            c = self.catalogue
            _check(c.version >= 1 and c.added >= 0 and c.removed >= 0, f"{where} catalogue",
                   "version must be >= 1, added and removed >= 0")
            _check((c.added_table is None) == (c.added_inputs is None) == (c.added == 0), f"{where} catalogue",
                   "added_table and added_inputs go with added > 0")
        for role, part in (("text_encoder", "text"), ("image_encoder", "image")):
            has = self.preprocessing is not None and getattr(self.preprocessing, part) is not None
            _check((role in self.models) == has, f"{where} preprocessing",
                   f"a {role} model and preprocessing.{part} go together")
        for name, entry in self.files.items():
            _relative(name, f"{where} files")
            _check(bool(_SHA256.fullmatch(entry.sha256)), f"{where} files.{name}.sha256", "not a sha256 hex digest")
            _check(entry.bytes >= 0, f"{where} files.{name}.bytes", "negative")
        for path, key in self.read_files():
            _check(_relative(path, f"{where} {key}") in self.files, f"{where} {key}",
                   f"{path!r} is not listed in files (every file the runtime reads is hashed)")
        if self.preprocessing is not None:
            text, image = self.preprocessing.text, self.preprocessing.image
            _check(1 <= text.max_tokens <= 1 << 16, f"{where} preprocessing.text.max_tokens",
                   f"expected 1 ... 65536, got {text.max_tokens}")
            _check(text.max_sentences >= 1, f"{where} preprocessing.text.max_sentences",
                   f"expected >= 1, got {text.max_sentences}")
            if image is not None:
                _check(1 <= image.image_size <= 4096, f"{where} preprocessing.image.image_size",
                       f"expected 1 ... 4096, got {image.image_size}")
                _check(len(image.mean) == len(image.std) == 3 and all(v > 0 for v in image.std),
                       f"{where} preprocessing.image", "mean and std must hold 3 values each, std > 0")
                for name in ("max_images", "words"):
                    _check(getattr(image, name) >= 1, f"{where} preprocessing.image.{name}",
                           f"expected >= 1, got {getattr(image, name)}")
            folder = _relative(self.preprocessing.text.tokenizer, f"{where} preprocessing.text.tokenizer")
            for name in TOKENIZER_FILES:
                _check(f"{folder}/{name}" in self.files, f"{where} preprocessing.text.tokenizer",
                       f"{folder}/{name} is not listed in files")

    def expected_io(self) -> dict[str, tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]]:
        """(inputs, outputs) each recommender model must declare, in graph order (docs/artifacts.md)."""
        k, dim, feat = self.top_k, self.dim, self.features.dim
        scorer_out = [TensorSpec("scores", "float32", ("batch", k)), TensorSpec("items", "int64", ("batch", k)),
                      TensorSpec("user", "float32", ("batch", dim))]
        if self.int8_scan:
            scorer_out.append(TensorSpec("bound", "float32", ("batch", 1)))
        tower_in = []
        for name in self.modalities:
            tower_in += [TensorSpec(f"{name}_feats", "float32", ("n", f"{name}_slots", feat)),
                         TensorSpec(f"{name}_mask", "bool", ("n", f"{name}_slots"))]
        return {
            "scorer": ((TensorSpec("ids", "int64", ("batch", "history")),), tuple(scorer_out)),
            "item_tower": (tuple(tower_in), (TensorSpec("table", "float32", ("n", dim)),
                                             TensorSpec("inputs", "float32", ("n", dim)))),
            "history_encoder": ((TensorSpec("inputs", "float32", ("batch", "history", dim)),
                                 TensorSpec("lengths", "int64", ("batch",))),
                                (TensorSpec("user", "float32", ("batch", dim)),)),
        }

    @property
    def item_dim(self) -> int:
        """d: the width of one modality's part of a user vector or serving row."""
        return self.dim // len(self.modalities)

    def read_files(self) -> list[tuple[str, str]]:
        """(path, manifest key) of every single file the runtime may read."""
        paths = [(self.vocabulary, "vocabulary"), (self.item_inputs, "item_inputs")]
        if self.item_table is not None:
            paths.append((self.item_table, "item_table"))
        for role, model in self.models.items():
            paths.append((model.file, f"models.{role}.file"))
            if model.tensorrt is not None:
                paths.append((model.tensorrt.file, f"models.{role}.tensorrt.file"))
        if self.ann is not None:
            paths.append((self.ann.file, "ann.file"))
        paths += self.catalogue_files()
        image = self.preprocessing.image if self.preprocessing else None
        if image is not None:
            paths += [(image.vocabulary, "preprocessing.image.vocabulary"),
                      (image.word_vectors, "preprocessing.image.word_vectors")]
        return paths

    def catalogue_files(self) -> list[tuple[str, str]]:
        """(path, manifest key) of the catalogue version's files: none without one."""
        c = self.catalogue
        if c is None:
            return []
        paths = [(c.changes, "catalogue.changes")]
        if c.added_table is not None and c.added_inputs is not None:
            paths += [(c.added_table, "catalogue.added_table"), (c.added_inputs, "catalogue.added_inputs")]
        return paths

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Any) -> Manifest:
        """Strict: unknown or missing keys and wrong types are ManifestErrors naming the key."""
        return _build(cls, values, MANIFEST)


def _describe(tensors: tuple[TensorSpec, ...]) -> str:
    return "[" + ", ".join(f"{t.name} {t.dtype} [{', '.join(map(str, t.shape))}]" for t in tensors) + "]"


def _build(tp: Any, value: Any, where: str) -> Any:
    """`value` (parsed JSON) as type `tp`: dataclasses field by field, containers element by element."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None:
            _check(type(None) in args, where, "expected a value, got null")
            return None
        options = [a for a in args if a is not type(None)]
        for option in options:  # int | str: the first that fits
            try:
                return _build(option, value, where)
            except ManifestError as e:
                error = e
        if len(options) == 1:
            raise error
        raise ManifestError(f"{where}: expected {' or '.join(a.__name__ for a in options)}, got {value!r:.60}")
    if dataclasses.is_dataclass(tp):
        _check(isinstance(value, dict), where, f"expected an object, got {type(value).__name__}")
        hints = typing.get_type_hints(tp, vars(sys.modules[__name__]))
        fields = {f.name: f for f in dataclasses.fields(tp)}
        unknown = sorted(set(value) - set(fields))
        _check(not unknown, where, f"unknown key(s) {', '.join(unknown)}")
        missing = [n for n, f in fields.items() if n not in value and f.default is dataclasses.MISSING]
        _check(not missing, where, f"missing key(s) {', '.join(missing)}")
        return tp(**{n: _build(hints[n], v, f"{where} {n}" if where == MANIFEST else f"{where}.{n}")
                     for n, v in value.items()})
    if origin is tuple:
        _check(isinstance(value, list), where, f"expected a list, got {type(value).__name__}")
        return tuple(_build(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        _check(isinstance(value, dict), where, f"expected an object, got {type(value).__name__}")
        return {k: _build(args[1], v, f"{where}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    if tp is float:
        _check(isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value),
               where, f"expected a finite number, got {value!r:.60}")
        return float(value)
    _check(isinstance(value, tp) and not (tp is int and isinstance(value, bool)),
           where, f"expected {tp.__name__}, got {value!r:.60}")
    return value


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def hash_files(directory: str | Path) -> dict[str, FileEntry]:
    """{relative posix path: FileEntry} for every file under `directory` but the manifest."""
    directory = Path(directory)
    return {
        p.relative_to(directory).as_posix(): FileEntry(file_sha256(p), p.stat().st_size)
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.relative_to(directory).as_posix() != MANIFEST
    }


def load_manifest(directory: str | Path) -> Manifest:
    """The manifest of an artifact directory, validated (not yet its files: verify_artifacts)."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"no artifacts at {directory} (missing {MANIFEST}); run `mp4sr-rt export` first")
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(values, dict) or values.get("schema") != SCHEMA:
        found = values.get("schema") if isinstance(values, dict) else None
        raise ArtifactError(f"{path}: schema {found!r}, expected {SCHEMA!r}; re-export with this version")
    try:
        return Manifest.from_dict(values)
    except ManifestError as e:
        raise ManifestError(f"{Path(directory)}/{e}") from None


def verify_artifacts(directory: str | Path) -> Manifest:
    """load_manifest, then check that every listed file exists with its size and sha256."""
    directory = Path(directory)
    manifest = load_manifest(directory)
    verify_files(directory, manifest, manifest.files)
    return manifest


def verify_files(directory: Path, manifest: Manifest, names: Iterable[str]) -> None:
    """Check that the listed files `names` exist with their size and sha256."""
    for name in names:
        expected, path = manifest.files[name], directory / name
        if not path.is_file():
            raise ArtifactError(f"artifact file missing: {path}")
        if path.stat().st_size != expected.bytes or file_sha256(path) != expected.sha256:
            raise ArtifactError(f"artifact file corrupted (sha256 differs from the manifest): {path}")


def load_array(path: Path, dtype: str, shape: tuple[int | None, ...], mmap: bool = False) -> np.ndarray:
    """A listed .npy file, without pickles, of the dtype and shape the manifest implies (None:
    any size on that axis)."""
    try:
        array = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise ArtifactError(f"{path}: not a plain .npy array ({' '.join(str(e).split())[:200]})") from None
    if array.dtype != np.dtype(dtype) or array.ndim != len(shape) or any(
            want is not None and got != want for got, want in zip(array.shape, shape, strict=True)):
        expected = ", ".join("any" if s is None else str(s) for s in shape)
        raise ArtifactError(f"{path}: {array.dtype} {array.shape}, expected {dtype} ({expected})")
    return array


def load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ArtifactError(f"cannot read {path}: {e.strerror or e}") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path} is not valid JSON: {e}") from None

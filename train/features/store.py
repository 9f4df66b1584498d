"""The features file: per-item text and image feature slots (SPEC section 1) in safetensors.

Tensors: text_feats float32 or float16 [N, S, F], text_mask uint8 [N, S], image_feats (the same
float type) [N, V, F], image_mask uint8 [N, V]. Metadata (strings): schema, item_ids (JSON list in
row order), encoder, dim, clip_weights (JSON: null when the CLIP tower was randomly initialised).
An item whose mask row is all zero lacks that modality.

float16 halves the file (1M items x 10 slots x 384 x 2 modalities: 15 GB instead of 30 GB);
`map_features` memory-maps a file instead of reading it, so a catalogue larger than memory is read
row by row as training touches its items (the operating system's page cache keeps what is hot),
through `RowReader`, which copies rows out of the page cache rather than mapping them in, so the
process's resident memory does not grow with the file.
"""

from __future__ import annotations

import json
import os
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mp4sr_rt.errors import UserError
from mp4sr_rt.io import atomic_write

SCHEMA = "mp4sr-features/1"
TENSORS = ("text_feats", "text_mask", "image_feats", "image_mask")
FLOAT_DTYPES = {"float32": np.float32, "float16": np.float16}
_SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "U8": np.uint8}


@dataclass(frozen=True)
class FeatureArrays:
    item_ids: tuple[str, ...]
    text_feats: np.ndarray
    text_mask: np.ndarray
    image_feats: np.ndarray
    image_mask: np.ndarray
    meta: dict[str, str]

    @property
    def dim(self) -> int:
        return int(self.text_feats.shape[-1])


def save_features(path: str | Path, arrays: FeatureArrays, dtype: str = "float32") -> None:
    """Write `arrays` (features as `dtype`: float32 or float16) atomically: one block."""
    block = (arrays.text_feats, arrays.text_mask, arrays.image_feats, arrays.image_mask)
    slots = (arrays.text_feats.shape[1], arrays.image_feats.shape[1])
    write_features_in_blocks(path, arrays.item_ids, slots, arrays.dim, arrays.meta, [block], dtype)


def write_features_in_blocks(
    path: str | Path, item_ids: Sequence[str], slots: tuple[int, int], dim: int, meta: dict[str, str],
    blocks: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]], dtype: str = "float32",
) -> None:
    """Write a features file (safetensors, read back by `read_features`) block by block:
    `blocks` yields (text_feats, text_mask, image_feats, image_mask) for consecutive items, `slots`
    the (text, image) slot counts. Memory holds one block, whatever the catalogue's size; the file
    appears complete, by one rename, or not at all."""
    if dtype not in FLOAT_DTYPES:
        raise UserError(f"features dtype must be one of {', '.join(FLOAT_DTYPES)}, got {dtype!r}")
    n, float_type = len(item_ids), np.dtype(FLOAT_DTYPES[dtype])
    specs = {"text_feats": (float_type, (n, slots[0], dim)), "text_mask": (np.dtype(np.uint8), (n, slots[0])),
             "image_feats": (float_type, (n, slots[1], dim)), "image_mask": (np.dtype(np.uint8), (n, slots[1]))}
    codes = {np.dtype(kind): code for code, kind in _SAFETENSORS_DTYPES.items()}
    header: dict[str, object] = {"__metadata__": {"dim": str(dim), **meta, "schema": SCHEMA,
                                                  "item_ids": json.dumps(list(item_ids))}}
    offset = 0
    for name, (kind, shape) in specs.items():
        size = kind.itemsize * int(np.prod(shape))
        header[name] = {"dtype": codes[kind], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    start = 8 + len(text)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(len(text).to_bytes(8, "little") + text)
            f.truncate(start + offset)
            row = 0
            for block in blocks:
                count = len(block[0])
                if row + count > n:
                    raise ValueError(f"the blocks hold more than the {n} items")
                for (name, (kind, shape)), values in zip(specs.items(), block, strict=True):
                    values = np.ascontiguousarray(values, dtype=kind)
                    if values.shape != (count, *shape[1:]):
                        raise ValueError(f"{name} block of shape {values.shape}, expected {(count, *shape[1:])}")
                    f.seek(start + header[name]["data_offsets"][0] + row * values[:1].nbytes)
                    f.write(values.tobytes())
                row += count
            if row != n:
                raise ValueError(f"the blocks hold {row} items, expected {n}")

    atomic_write(path, write)


def _header(path: Path) -> tuple[dict, int]:
    """A safetensors file's JSON header and its length in bytes (ValueError if implausible)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        if not 0 < length <= min(size - 8, 100 << 20):
            raise ValueError(f"header length {length} in a file of {size} bytes")
        return json.loads(f.read(length)), length


def check_replaceable(path: Path) -> None:
    """`path` may receive a features file: it does not exist, or it is one (an earlier
    extraction's output). Anything else there, the user's data included, is never overwritten."""
    if not path.exists():
        return
    if not path.is_file():
        raise UserError(f"--out {path}: exists and is not a file")
    try:
        ok = (_header(path)[0].get("__metadata__") or {}).get("schema") == SCHEMA
    except (OSError, ValueError, AttributeError):
        ok = False
    if not ok:
        raise UserError(f"--out {path}: exists and is not a features file; remove it or choose another path")


def read_features(path: str | Path) -> FeatureArrays:
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise UserError(f"features file not found: {path}")
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = dict(f.metadata() or {})
            missing = [k for k in TENSORS if k not in f.keys()]
            if missing:
                raise UserError(f"features file {path}: missing tensor(s) {', '.join(missing)}")
            tensors = {k: f.get_tensor(k) for k in TENSORS}
    except UserError:
        raise
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise UserError(f"features file {path}: unreadable ({e})") from None
    return _checked(path, meta, tensors)


def map_features(path: str | Path) -> FeatureArrays:
    """`read_features` without reading: the tensors are read-only memory maps of the file's data
    (safetensors: an 8-byte little-endian header length, a JSON header, then the raw tensors)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"features file not found: {path}")
    size = path.stat().st_size
    try:
        header, length = _header(path)
        meta = dict(header.pop("__metadata__", None) or {})
        missing = [k for k in TENSORS if k not in header]
        if missing:
            raise UserError(f"features file {path}: missing tensor(s) {', '.join(missing)}")
        tensors = {k: _map_tensor(path, header[k], 8 + length, size) for k in TENSORS}
    except UserError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"features file {path}: unreadable ({e})") from None
    return _checked(path, meta, tensors)


class RowReader:
    """Rows of one tensor of a features file, read with pread rather than through its map.

    A page read through a map stays mapped into the process, counted in its RSS, until the map
    closes, and the page cache's large folios map up to 2 MB around each scattered row: a training
    step that touches 25k items of a 7.7 GB file maps most of the file into the process. pread
    copies the rows out of the kernel's page cache instead, which keeps the hot rows as before
    while the process holds only its copies. On a warm 7.7 GB file 25k rows of 3.84 KB took about
    100 ms, as long as the map's own gather."""

    def __init__(self, array: np.memmap):
        self.dtype, self.row_shape = array.dtype, array.shape[1:]
        self.row_bytes = self.dtype.itemsize * int(np.prod(self.row_shape))
        self.offset, self.path = int(array.offset), str(array.filename)
        self.fd = os.open(self.path, os.O_RDONLY)
        weakref.finalize(self, os.close, self.fd)

    def read(self, rows: np.ndarray) -> np.ndarray:
        """The rows `rows` (n,), in that order: (n, *row_shape)."""
        out = np.empty((len(rows), *self.row_shape), self.dtype)
        view, size = memoryview(out.reshape(-1).view(np.uint8)), self.row_bytes
        for j, row in enumerate(np.asarray(rows).tolist()):
            if os.preadv(self.fd, [view[j * size:(j + 1) * size]], self.offset + row * size) != size:
                raise UserError(f"features file {self.path}: truncated (row {row} is past its end)")
        return out


def _map_tensor(path: Path, entry: dict, data_start: int, size: int) -> np.ndarray:
    dtype = np.dtype(_SAFETENSORS_DTYPES[entry["dtype"]])
    shape = tuple(int(n) for n in entry["shape"])
    begin, end = (data_start + int(o) for o in entry["data_offsets"])
    if end > size or end - begin != dtype.itemsize * int(np.prod(shape)):
        raise ValueError(f"tensor of shape {shape} does not fit its offsets {entry['data_offsets']}")
    if begin == end:
        return np.zeros(shape, dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=begin, shape=shape)


def _checked(path: Path, meta: dict[str, str], tensors: dict[str, np.ndarray]) -> FeatureArrays:
    if meta.get("schema") != SCHEMA:
        raise UserError(f"features file {path}: schema {meta.get('schema')!r}, expected {SCHEMA!r}")
    try:
        item_ids = tuple(str(i) for i in json.loads(meta["item_ids"]))
    except (KeyError, ValueError):
        raise UserError(f"features file {path}: metadata item_ids missing or not JSON") from None
    n = len(item_ids)
    for k, t in tensors.items():
        if t.shape[0] != n:
            raise UserError(f"features file {path}: {k} has {t.shape[0]} rows for {n} item ids")
    for k in ("text_feats", "image_feats"):
        if tensors[k].dtype not in (np.float32, np.float16):
            raise UserError(f"features file {path}: {k} is {tensors[k].dtype}, expected float32 or float16")
    return FeatureArrays(item_ids, meta=meta, **tensors)


def rows_of(arrays: FeatureArrays, item_ids: Sequence[str], source: str) -> np.ndarray:
    """The file row of each dataset item, in the dataset's order (int64 [N])."""
    row = {item: i for i, item in enumerate(arrays.item_ids)}
    missing = [item for item in item_ids if item not in row]
    if missing:
        raise UserError(
            f"features file {source} does not match the data: {len(missing)} item(s) have no "
            f"features, e.g. {', '.join(map(repr, missing[:5]))}"
        )
    return np.array([row[item] for item in item_ids], dtype=np.int64)


def align(arrays: FeatureArrays, item_ids: Sequence[str], source: str) -> dict[str, np.ndarray]:
    """Rows in the dataset's item order, with a zero padding row 0: {name: [N + 1, ...]}."""
    index = np.concatenate([[0], rows_of(arrays, item_ids, source) + 1])
    out = {}
    for name in TENSORS:
        t = getattr(arrays, name)
        padded = np.concatenate([np.zeros_like(t[:1]), t])
        out[name] = padded[index]
    return out

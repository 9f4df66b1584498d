"""Read interactions (and optional item side information) from the formats the toolkit accepts.

    raw = read_dataset("data/my_shop")   # -> RawData

Three formats, detected from the path (`detect`):

- generic: ``interactions.{csv,jsonl,parquet}`` (columns user_id, item_id, timestamp), given as the
  file itself or as its directory, with an optional ``items.jsonl`` beside it;
- RecBole atomic files: ``NAME.inter`` and an optional ``NAME.item``;
- Amazon 2018 dumps: ``reviews.json[.gz]`` with an optional ``meta.json[.gz]`` and ``images/``.

Interactions are streamed in chunks of CHUNK_ROWS rows (Parquet batch by batch, only its three
interaction columns); each chunk's ids are interned into integer codes at once, so memory holds
the code arrays, the two vocabularies and one chunk, never a Python object per row of the file.

Every bad input raises UserError naming the file (and the line or row and field where there is
one). Input files are only ever opened for reading.
"""

from __future__ import annotations

import csv
import itertools
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from mp4sr_train.data.types import ItemInfo, RawData

from mp4sr_rt.errors import UserError
from mp4sr_rt.items import TEXT_FIELDS, json_lines, open_text, parse_id, read_items, string_list, text_fields, where

GENERIC_SUFFIXES = (".csv", ".jsonl", ".parquet")
INTERACTION_FIELDS = ("user_id", "item_id", "timestamp")
AMAZON_FIELDS = ("reviewerID", "asin", "unixReviewTime")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
CHUNK_ROWS = 65_536  # interactions read and interned at a time


@dataclass(frozen=True)
class DatasetFiles:
    """What `read_dataset` will read for one path: the format and its files."""

    kind: str  # "generic" | "recbole" | "amazon"
    interactions: Path
    items: Path | None = None
    images_dir: Path | None = None  # Amazon only: listed, images themselves never opened

    def files(self) -> list[Path]:
        """The files whose bytes the reader reads."""
        return [p for p in (self.interactions, self.items) if p is not None]


def read_dataset(path: str | Path) -> RawData:
    files = detect(path)
    reader = {"generic": _read_generic, "recbole": _read_recbole, "amazon": _read_amazon}
    return reader[files.kind](files)


def detect(path: str | Path) -> DatasetFiles:
    """Find the format and files of the dataset at ``path`` without reading them."""
    path = Path(path).expanduser()
    if not path.exists():
        raise UserError(f"dataset not found: {path}")
    if path.is_dir():
        return _detect_dir(path)
    name = path.name
    if path.suffix in GENERIC_SUFFIXES:
        return DatasetFiles("generic", path, _optional(path.parent / "items.jsonl"))
    if path.suffix == ".inter":
        return DatasetFiles("recbole", path, _optional(path.with_suffix(".item")))
    if name.endswith((".json", ".json.gz")):
        return _amazon_files(path)
    raise UserError(
        f"unknown dataset format: {path} (expected interactions .csv/.jsonl/.parquet, a RecBole "
        ".inter file, an Amazon reviews .json[.gz], or a directory holding one)"
    )


def _detect_dir(path: Path) -> DatasetFiles:
    generic = [path / f"interactions{s}" for s in GENERIC_SUFFIXES]
    inter = sorted(path.glob("*.inter"))
    reviews = [path / "reviews.json", path / "reviews.json.gz"]
    found = [p for p in generic + reviews if p.is_file()] + inter
    if not found:
        raise UserError(
            f"unknown dataset format: {path} holds none of interactions.csv/.jsonl/.parquet, "
            "NAME.inter (RecBole) or reviews.json[.gz] (Amazon)"
        )
    if len(found) > 1:
        # RecBole keeps NAME.inter in a directory called NAME: that one is meant.
        own = path / f"{path.name}.inter"
        if own in found and not any(p.suffix != ".inter" for p in found):
            return detect(own)
        names = ", ".join(p.name for p in found)
        raise UserError(f"ambiguous dataset directory {path}: it holds {names}; pass one file")
    return detect(found[0])


def _amazon_files(reviews: Path) -> DatasetFiles:
    stem = reviews.name.removesuffix(".gz").removesuffix(".json")
    # Amazon's own names are NAME.json.gz and meta_NAME.json.gz.
    metas = [
        reviews.parent / f"{m}{s}" for m in ("meta", f"meta_{stem}") for s in (".json", ".json.gz")
    ]
    meta = next((m for m in metas if m.is_file() and m != reviews), None)
    return DatasetFiles("amazon", reviews, meta, _optional(reviews.parent / "images"))


def _optional(path: Path) -> Path | None:
    return path if path.exists() else None


# ---------------------------------------------------------------------------------------------
# Generic format


def _read_generic(files: DatasetFiles) -> RawData:
    path = files.interactions
    if path.suffix == ".csv":
        rows = _csv_interactions(path)
    elif path.suffix == ".jsonl":
        rows = _json_interactions(path, INTERACTION_FIELDS)
    else:
        rows = _parquet_interactions(path)
    item_info = _generic_items(files.items) if files.items else {}
    return _raw_data(rows, item_info, path)


def _csv_interactions(path: Path) -> Iterator[tuple[str, str, float]]:
    with open_text(path) as f:
        try:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None:
                raise UserError(f"{path}: empty file")
            columns = _column_indices(path, [h.strip() for h in header], INTERACTION_FIELDS)
            for row in reader:
                if not row:
                    continue
                line = reader.line_num
                if len(row) <= max(columns):
                    raise UserError(
                        f"{path}, line {line}: expected {len(header)} columns, got {len(row)}"
                    )
                user, item, ts = (row[i] for i in columns)
                yield (
                    parse_id(user, "user_id", path, line),
                    parse_id(item, "item_id", path, line),
                    _timestamp(ts, "timestamp", path, line),
                )
        except (OSError, UnicodeDecodeError, csv.Error) as e:
            raise UserError(f"cannot read {path}: {e}") from None


def _json_interactions(
    path: Path, fields: tuple[str, str, str]
) -> Iterator[tuple[str, str, float]]:
    user_f, item_f, time_f = fields
    for line, record in json_lines(path):
        missing = [f for f in fields if f not in record]
        if missing:
            raise UserError(f"{path}, line {line}: missing field {missing[0]!r}")
        yield (
            parse_id(record[user_f], user_f, path, line),
            parse_id(record[item_f], item_f, path, line),
            _timestamp(record[time_f], time_f, path, line),
        )


def _parquet_interactions(path: Path) -> Iterator[tuple[str, str, float]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    row = 0
    try:
        parquet = pq.ParquetFile(path)
        _column_indices(path, parquet.schema_arrow.names, INTERACTION_FIELDS)
        batches = parquet.iter_batches(batch_size=CHUNK_ROWS, columns=list(INTERACTION_FIELDS))
        for batch in batches:
            users, items = (batch.column(c).to_pylist() for c in INTERACTION_FIELDS[:2])
            timestamps = _parquet_timestamps(batch.column("timestamp"))
            for user, item, ts in zip(users, items, timestamps, strict=True):
                row += 1
                at = f"row {row}"
                yield (
                    parse_id(user, "user_id", path, at),
                    parse_id(item, "item_id", path, at),
                    _timestamp(ts, "timestamp", path, at),
                )
    except (OSError, pa.ArrowException) as e:
        raise UserError(f"cannot read {path}: {e}") from None


def _parquet_timestamps(column: Any) -> list[Any]:
    """Numbers as they are; timestamp columns as seconds since the epoch."""
    import pyarrow as pa

    if pa.types.is_timestamp(column.type):
        per_second = {"s": 1, "ms": 10**3, "us": 10**6, "ns": 10**9}[column.type.unit]
        ints = column.cast(pa.int64()).to_pylist()
        return [None if t is None else t / per_second for t in ints]
    return column.to_pylist()


def _generic_items(path: Path) -> dict[str, ItemInfo]:
    return {r.item_id: ItemInfo(sentences=r.fields, images=r.images, image_urls=r.image_urls)
            for r in read_items(path)}


# ---------------------------------------------------------------------------------------------
# RecBole atomic files


def _read_recbole(files: DatasetFiles) -> RawData:
    path = files.interactions
    rows = _recbole_interactions(path)
    item_info = _recbole_items(files.items) if files.items else {}
    return _raw_data(rows, item_info, path)


def _recbole_rows(path: Path) -> Iterator[tuple[int, list[tuple[str, str]], list[str]]]:
    """Yield (line, header, fields); the header is [(name, type)] from ``name:type`` columns."""
    with open_text(path) as f:
        try:
            first = f.readline()
            if not first.strip():
                raise UserError(f"{path}: empty file")
            header = []
            for column in first.rstrip("\r\n").split("\t"):
                name, sep, kind = column.partition(":")
                if not sep:
                    raise UserError(f"{path}, line 1: header field {column!r} is not NAME:TYPE")
                header.append((name.strip(), kind.strip()))
            for line, text in enumerate(f, start=2):
                if text.strip():
                    yield line, header, text.rstrip("\r\n").split("\t")
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read {path}: {e}") from None


def _recbole_interactions(path: Path) -> Iterator[tuple[str, str, float]]:
    columns = None
    for line, header, fields in _recbole_rows(path):
        if columns is None:
            columns = _column_indices(path, [name for name, _ in header], INTERACTION_FIELDS)
        if len(fields) <= max(columns):
            raise UserError(f"{path}, line {line}: expected {len(header)} tab-separated fields")
        user, item, ts = (fields[i] for i in columns)
        yield (
            parse_id(user, "user_id", path, line),
            parse_id(item, "item_id", path, line),
            _timestamp(ts, "timestamp", path, line),
        )


def _recbole_items(path: Path) -> dict[str, ItemInfo]:
    info = {}
    item_col = text_cols = None
    for line, header, fields in _recbole_rows(path):
        if item_col is None:
            (item_col,) = _column_indices(path, [name for name, _ in header], ("item_id",))
            # token_seq fields are text; token fields also hold text in RecBole's own dumps
            # (Amazon's title:token); float fields never do.
            kinds = [kind for _, kind in header]
            text_cols = [
                i for i, k in enumerate(kinds) if i != item_col and k in ("token", "token_seq")
            ]
        fields += [""] * (len(header) - len(fields))  # RecBole writes empty trailing fields short
        text = (fields[i].strip() for i in text_cols)
        # A bare number (a year, a rank) says nothing as a sentence.
        info[parse_id(fields[item_col], "item_id", path, line)] = ItemInfo(
            sentences=tuple(t for t in text if t and not _is_number(t))
        )
    return info


# ---------------------------------------------------------------------------------------------
# Amazon 2018 dumps


def _read_amazon(files: DatasetFiles) -> RawData:
    path = files.interactions
    rows = _json_interactions(path, AMAZON_FIELDS)
    meta = _amazon_meta(files.items) if files.items else {}
    images = _amazon_images(files.images_dir) if files.images_dir else {}
    item_info = {}
    for item in sorted(meta.keys() | images.keys()):
        sentences, urls = meta.get(item, ((), ()))
        item_info[item] = ItemInfo(
            sentences=sentences, images=images.get(item, ()), image_urls=urls
        )
    return _raw_data(rows, item_info, path)


def _amazon_meta(path: Path) -> dict[str, tuple[tuple[str, ...], tuple[str, ...]]]:
    meta = {}
    for line, record in json_lines(path):
        if "asin" not in record:
            raise UserError(f"{path}, line {line}: missing field 'asin'")
        record = {**record, "categories": record.get("category")}
        urls = []
        for field in ("imageURLHighRes", "imageURL"):
            urls += string_list(record.get(field) or [], field, path, line)
        meta[parse_id(record["asin"], "asin", path, line)] = (
            text_fields(record, TEXT_FIELDS),
            tuple(dict.fromkeys(urls)),  # the same URL often appears in both lists
        )
    return meta


def _amazon_images(images_dir: Path) -> dict[str, tuple[str, ...]]:
    """``images/{asin}.jpg`` or ``images/{asin}/*``, as absolute paths in name order."""
    found: dict[str, list[str]] = {}
    for entry in sorted(images_dir.iterdir()):
        if entry.is_dir():
            files = [p for p in sorted(entry.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]
            found.setdefault(entry.name, []).extend(str(p.resolve()) for p in files)
        elif entry.suffix.lower() in IMAGE_SUFFIXES:
            found.setdefault(entry.stem, []).append(str(entry.resolve()))
    return {asin: tuple(paths) for asin, paths in found.items() if paths}


# ---------------------------------------------------------------------------------------------
# Shared helpers


def _raw_data(
    rows: Iterable[tuple[str, str, float]], item_info: dict[str, ItemInfo], path: Path
) -> RawData:
    """Gather ``rows`` CHUNK_ROWS at a time as codes (ids numbered as first seen) and timestamps."""
    users: dict[str, int] = {}
    items: dict[str, int] = {}
    chunks = []
    rows = iter(rows)
    while chunk := list(itertools.islice(rows, CHUNK_ROWS)):
        user_codes = _codes([row[0] for row in chunk], users)
        item_codes = _codes([row[1] for row in chunk], items)
        chunks.append((user_codes, item_codes, np.array([row[2] for row in chunk], dtype=np.float64)))
    if not chunks:
        raise UserError(f"{path}: no interactions (empty file)")
    user_codes, item_codes, timestamps = (np.concatenate(column) for column in zip(*chunks, strict=True))
    return RawData(
        user_codes=user_codes,
        item_codes=item_codes,
        user_names=np.array(list(users), dtype=str),
        item_names=np.array(list(items), dtype=str),
        timestamps=timestamps,
        item_info=item_info,
        source=str(path),
    )


def _codes(ids: list[str], vocabulary: dict[str, int]) -> np.ndarray:
    """int32 codes of ``ids``, adding the ids not yet in ``vocabulary`` (id -> code) to it."""
    return np.fromiter((vocabulary.setdefault(i, len(vocabulary)) for i in ids), np.int32, len(ids))


def _column_indices(path: Path, names: list[str], required: tuple[str, ...]) -> list[int]:
    missing = [c for c in required if c not in names]
    if missing:
        raise UserError(
            f"{path}: missing column {', '.join(missing)} "
            f"(required: {', '.join(required)}; found: {', '.join(names) or 'none'})"
        )
    return [names.index(c) for c in required]


def _timestamp(value: Any, field: str, path: Path, at: int | str) -> float:
    try:
        if isinstance(value, bool):
            raise TypeError
        t = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{where(path, at)}: {field} {value!r} is not a number") from None
    if not math.isfinite(t):
        raise UserError(f"{where(path, at)}: {field} {value!r} is not a finite number")
    return t


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True

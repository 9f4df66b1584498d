"""Item records in the items.jsonl format, torch-free: training's item side information
(train/data/readers.py) and `mp4sr-rt score --new-items` read them with the same rules.

    {"item_id": "sku-1", "title": "Red tent", "description": "Sleeps four.", "images": ["img/1.jpg"]}

Text fields are kept in a fixed order: title, description, brand, categories, then any other
field in name order (so the order never depends on how a file orders its keys); a list value is
joined (paragraphs by spaces, labels by commas). Image paths are relative to the file.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from mp4sr_rt.errors import UserError

TEXT_FIELDS = ("title", "description", "brand", "categories")  # sentence order, title first
NON_TEXT_FIELDS = frozenset({"item_id", "images", "image_urls"})  # never turned into sentences


@dataclass(frozen=True)
class ItemRecord:
    item_id: str
    fields: tuple[str, ...]  # text fields in order (title first), not yet sentence-split
    images: tuple[str, ...]  # absolute local paths; may not exist
    image_urls: tuple[str, ...]  # recorded only, never downloaded


def item_record(record: dict[str, Any], path: Path, line: int) -> ItemRecord:
    """One line of an items.jsonl file (`path`, for messages and relative image paths)."""
    if "item_id" not in record:
        raise UserError(f"{path}, line {line}: missing field 'item_id'")
    others = sorted(k for k in record if k not in NON_TEXT_FIELDS and k not in TEXT_FIELDS)
    images = string_list(record.get("images", []), "images", path, line)
    return ItemRecord(
        item_id=parse_id(record["item_id"], "item_id", path, line),
        fields=text_fields(record, TEXT_FIELDS + tuple(others)),
        images=tuple(str((path.parent / p).resolve()) for p in images),
        image_urls=tuple(string_list(record.get("image_urls", []), "image_urls", path, line)),
    )


def read_items(path: Path) -> list[ItemRecord]:
    """Every record of an items.jsonl file, in file order; a repeated id is a UserError."""
    records, lines = [], {}
    for line, record in json_lines(path):
        item = item_record(record, path, line)
        if item.item_id in lines:
            raise UserError(f"{path}, line {line}: item {item.item_id!r} repeats line {lines[item.item_id]}")
        lines[item.item_id] = line
        records.append(item)
    return records


def open_text(path: Path) -> IO[str]:
    try:
        if path.suffix == ".gz":
            return gzip.open(path, "rt", encoding="utf-8-sig", newline="")
        return open(path, encoding="utf-8-sig", newline="")  # utf-8-sig: tolerate a BOM
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None


def json_lines(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, object) for each non-blank line of a JSON-lines file."""
    with open_text(path) as f:
        try:
            for line, text in enumerate(f, start=1):
                if not text.strip():
                    continue
                try:
                    record = json.loads(text)
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}, line {line}: malformed JSON ({e.msg})") from None
                if not isinstance(record, dict):
                    raise UserError(f"{path}, line {line}: expected a JSON object")
                yield line, record
        except (OSError, EOFError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read {path}: {e}") from None


def where(path: Path, at: int | str) -> str:
    return f"{path}, {at if isinstance(at, str) else f'line {at}'}"


def parse_id(value: Any, field: str, path: Path, at: int | str) -> str:
    """An id field as text: a string or an integral number (3.0 reads as "3"), not empty."""
    if value is None:
        raise UserError(f"{where(path, at)}: {field} is missing")
    if isinstance(value, (bool, dict, list)):
        raise UserError(f"{where(path, at)}: {field} must be a string or number, got {value!r}")
    if isinstance(value, float):
        if not value.is_integer():  # NaN, infinities and fractions name no item
            raise UserError(f"{where(path, at)}: {field} must be a string or an integer, got {value!r}")
        value = int(value)
    text = str(value).strip()
    if not text:
        raise UserError(f"{where(path, at)}: {field} is empty")
    return text


def string_list(value: Any, field: str, path: Path, line: int) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise UserError(f"{path}, line {line}: {field} must be a list of strings")
    return [v for v in value if v.strip()]


def text_fields(record: dict[str, Any], fields: Iterable[str]) -> tuple[str, ...]:
    """One entry per text field; a list is joined (paragraphs by spaces, labels by commas)."""
    out = []
    for field in fields:
        value = record.get(field)
        if isinstance(value, list):
            parts = [v.strip() for v in value if isinstance(v, str) and v.strip()]
            value = (" " if field == "description" else ", ").join(parts)
        if isinstance(value, str) and value.strip():
            out.append(value.strip())
    return tuple(out)

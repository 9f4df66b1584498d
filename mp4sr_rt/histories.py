"""History files for `mp4sr-rt score`: parsing and validation, entry by entry.

    entries = parse_histories('[["item00001", "item00002"], {"user": 7, "history": []}, 5]')
    entries[0].items    # ("item00001", "item00002"): a HistoryRequest
    entries[1].user     # 7
    entries[2].error    # "expected a list of item ids or an object, got integer 5": an InvalidEntry

Accepted forms (docs: examples/history.json):
- one history: a list of item ids, or {"user": ..., "history": [...]};
- a list of histories (any element a list or an object makes it one);
- JSON Lines: one history per line.
Item ids are strings or integers, users strings, integers or null. A malformed entry does not
spoil the others: it comes back as an `InvalidEntry` naming its position, in input order.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from mp4sr_rt.errors import UserError

ItemId = str | int
HISTORY_KEYS = ("user", "history")


@dataclass(frozen=True)
class HistoryRequest:
    """One valid history: `items` oldest to newest, as given."""

    position: str
    items: tuple[ItemId, ...]
    user: str | int | None = None


@dataclass(frozen=True)
class InvalidEntry:
    """One entry that cannot be scored, and why."""

    position: str
    error: str
    user: str | int | None = None


Entry = HistoryRequest | InvalidEntry


class _Object(dict):
    """A JSON object that remembers the first key it was given twice (json keeps the last)."""

    duplicate: str | None = None


def _object(pairs: list[tuple[str, Any]]) -> _Object:
    obj = _Object(pairs)
    if len(obj) < len(pairs):
        seen: set[str] = set()
        obj.duplicate = next(k for k, _ in pairs if k in seen or seen.add(k))
    return obj


def _loads(text: str) -> Any:
    return json.loads(text, object_pairs_hook=_object)


def parse_histories(text: str) -> list[Entry]:
    """Every entry of a history file, in input order; raises UserError only when the text as a
    whole cannot be split into entries (not JSON, nor JSON Lines)."""
    try:
        document = _loads(text)
    except (ValueError, RecursionError) as whole_error:
        return _parse_json_lines(text, whole_error)
    if _is_history_list(document):
        return [_parse_entry(value, f"[{i}]") for i, value in enumerate(document)]
    return [_parse_entry(document, "document")]


def _parse_json_lines(text: str, whole_error: Exception) -> list[Entry]:
    """JSON Lines if the first non-blank line is a JSON value by itself; otherwise the text is a
    broken JSON document and the document's own error (with line and column) is the message."""
    lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not lines:
        raise UserError("history file is empty (expected JSON or JSON Lines)")
    entries = []
    for n, line in lines:
        try:
            value = _loads(line)
        except (ValueError, RecursionError) as e:
            if not entries:
                raise UserError(f"history file is not valid JSON: {whole_error}") from None
            entries.append(InvalidEntry(f"line {n}", f"invalid JSON: {e}"))
            continue
        entries.append(_parse_entry(value, f"line {n}"))
    return entries


def _is_history_list(document: Any) -> bool:
    """A list holding any list or object is a list of histories; a flat list is one history."""
    return isinstance(document, list) and any(isinstance(v, (list, dict)) for v in document)


def _parse_entry(value: Any, position: str) -> Entry:
    user = None
    if isinstance(value, dict):
        user = value.get("user") if _is_user(value.get("user")) else None
        problem = _check_object(value)
        if problem:
            return InvalidEntry(position, problem, user)
        value = value["history"]
    elif not isinstance(value, list):
        problem = f"expected a list of item ids or an object, got {_kind(value)}"
        return InvalidEntry(position, problem)
    for i, item in enumerate(value):
        if not _is_item_id(item):
            problem = f"history[{i}]: expected a string or integer item id, got {_kind(item)}"
            return InvalidEntry(position, problem, user)
    return HistoryRequest(position, tuple(value), user)


def _check_object(value: dict) -> str | None:
    if getattr(value, "duplicate", None) is not None:
        return f"duplicate key {value.duplicate!r}"
    unknown = sorted(set(value) - set(HISTORY_KEYS))
    if unknown:
        return f"unknown key {unknown[0]!r} (expected {' and '.join(map(repr, HISTORY_KEYS))})"
    if "history" not in value:
        return "missing key 'history'"
    if not isinstance(value["history"], list):
        return f"'history' must be a list of item ids, got {_kind(value['history'])}"
    if not _is_user(value.get("user")):
        return f"'user' must be a string, an integer or null, got {_kind(value['user'])}"
    return None


def _is_item_id(value: Any) -> bool:
    # bool is an int subclass, but true/false are never meant as item ids.
    return isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))


def _is_user(value: Any) -> bool:
    return value is None or _is_item_id(value)


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    name = {bool: "boolean", int: "integer", float: "number", str: "string", list: "list",
            dict: "object"}.get(type(value), type(value).__name__)
    scalar = isinstance(value, (bool, int, float, str))
    return f"{name} {json.dumps(value)[:40]}" if scalar else name

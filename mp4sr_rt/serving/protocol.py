"""The serving request and response, over the Open Inference Protocol (KServe v2), as numpy arrays:
what the Triton models (triton_models.py) read and write, without Triton, so it is tested alone.

Model `mp4sr` (dynamic batching; every input has the batch axis first, one row per history):
    history        BYTES [B, n]   item ids, oldest first; "" pads a row shorter than the others
    k              INT32 [B, 1]   optional, default 10; 1 <= k <= the catalogue size
    exclude_seen   BOOL  [B, 1]   optional, default true
    exclude        BYTES [B, m]   optional: ids never to return ("" pads)
    allow          BYTES [B, m]   optional: the only ids that may be returned ("" pads)
  ->
    items          BYTES [B, w]   best first; "" pads a row shorter than the longest
    scores         FP32  [B, w]   0 where items is ""
    unknown_items  BYTES [B, u]   history ids not in the catalogue ("" pads)
    fallback       BYTES [B, 1]   "" or "popular" (no known history item: the most popular items)

Model `mp4sr_catalogue` (no batching): `action` "add" or "remove", `ids` BYTES [n]; for "add",
either raw `texts` BYTES [n] (each item's text, UTF-8) and `images` BYTES [n] (each item's
encoded image file, b"" for none), or precomputed `text_feats` FP32 [n, S, F], `text_mask`
BOOL [n, S], `image_feats`, `image_mask`. -> `version` INT64 [1], `num_items` INT64 [1].
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from mp4sr_rt.errors import UserError

DEFAULT_K = 10
RECOMMEND_INPUTS = ("history", "k", "exclude_seen", "exclude", "allow")
FEATURE_INPUTS = ("text_feats", "text_mask", "image_feats", "image_mask")


@dataclass(frozen=True)
class Query:
    """One history of a request and the settings it is ranked with."""

    history: list[str]
    k: int
    exclude_seen: bool
    exclude: tuple[str, ...]
    allow: tuple[str, ...] | None

    def settings(self) -> tuple:
        """What the histories ranked in one Scorer.score call must share."""
        return self.k, self.exclude_seen, self.exclude, self.allow


def _text(value: object, where: str) -> str:
    """One BYTES element as text; not UTF-8 is a UserError naming `where`."""
    if isinstance(value, str):
        return value
    try:
        return bytes(value).decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{where} is not UTF-8 text") from None


def strings(array: np.ndarray, name: str) -> list[str]:
    """A BYTES row as text, without the "" padding; an element not UTF-8 is a UserError."""
    texts = (_text(value, f"{name}: element {j}") for j, value in enumerate(array.tolist()))
    return [text for text in texts if text]


def _rows(inputs: Mapping[str, np.ndarray], name: str, batch: int, kind: str) -> np.ndarray | None:
    array = inputs.get(name)
    if array is None:
        return None
    if array.ndim != 2 or array.shape[0] != batch or (kind == "scalar" and array.shape[1] != 1):
        shape = "[batch, 1]" if kind == "scalar" else "[batch, n]"
        raise UserError(f"{name}: expected shape {shape} with the batch of history ({batch}), "
                        f"got {list(array.shape)}")
    return array


def parse_queries(inputs: Mapping[str, np.ndarray], num_items: int) -> list[Query]:
    """The rows of one `mp4sr` request; a bad input is a UserError naming it."""
    unknown = sorted(set(inputs) - set(RECOMMEND_INPUTS))
    if unknown:
        raise UserError(f"unknown input {unknown[0]!r}; inputs are {', '.join(RECOMMEND_INPUTS)}")
    history = inputs.get("history")
    if history is None:
        raise UserError("missing input 'history'")
    if history.ndim != 2:
        raise UserError(f"history: expected shape [batch, n], got {list(history.shape)}")
    batch = history.shape[0]
    ks = _rows(inputs, "k", batch, "scalar")
    seen = _rows(inputs, "exclude_seen", batch, "scalar")
    exclude = _rows(inputs, "exclude", batch, "list")
    allow = _rows(inputs, "allow", batch, "list")
    queries = []
    for b in range(batch):
        k = DEFAULT_K if ks is None else int(ks[b, 0])
        if not 1 <= k <= num_items:
            raise UserError(f"k: {k} is not between 1 and the catalogue size ({num_items})")
        queries.append(Query(
            strings(history[b], "history"), k,
            True if seen is None else bool(seen[b, 0]),
            () if exclude is None else tuple(strings(exclude[b], "exclude")),
            None if allow is None else tuple(strings(allow[b], "allow")),
        ))
    return queries


def bytes_matrix(rows: list[list[str]]) -> np.ndarray:
    """Rows of strings as a BYTES array [B, w], "" padding the shorter rows."""
    width = max((len(r) for r in rows), default=0)
    out = np.full((len(rows), width), b"", dtype=object)
    for b, row in enumerate(rows):
        out[b, :len(row)] = [s.encode("utf-8") for s in row]
    return out


def outputs(recommendations: list) -> dict[str, np.ndarray]:
    """The four output arrays of the Recommendations of one request, in row order."""
    width = max((len(r.items) for r in recommendations), default=0)
    scores = np.zeros((len(recommendations), width), np.float32)
    for b, rec in enumerate(recommendations):
        scores[b, :len(rec.scores)] = rec.scores
    return {
        "items": bytes_matrix([[str(i) for i in r.items] for r in recommendations]),
        "scores": scores,
        "unknown_items": bytes_matrix([[str(i) for i in r.unknown_items] for r in recommendations]),
        "fallback": bytes_matrix([[r.fallback or ""] for r in recommendations]),
    }


@dataclass(frozen=True)
class CatalogueChange:
    action: str  # add | remove
    ids: list[str]
    texts: list[str] | None = None
    images: list[list[bytes]] | None = None
    features: dict[str, np.ndarray] | None = None


def parse_change(inputs: Mapping[str, np.ndarray]) -> CatalogueChange:
    """One `mp4sr_catalogue` request; a bad input is a UserError naming it."""
    known = ("action", "ids", "texts", "images", *FEATURE_INPUTS)
    unknown = sorted(set(inputs) - set(known))
    if unknown:
        raise UserError(f"unknown input {unknown[0]!r}; inputs are {', '.join(known)}")
    for name in ("action", "ids"):
        if name not in inputs:
            raise UserError(f"missing input {name!r}")
    action = strings(inputs["action"].reshape(-1), "action")
    if action not in (["add"], ["remove"]):
        raise UserError(f"action: expected 'add' or 'remove', got {action!r}")
    ids = strings(inputs["ids"].reshape(-1), "ids")
    if not ids:
        raise UserError("ids: no item ids given")
    n = len(ids)
    if action == ["remove"]:
        extra = sorted(set(inputs) - {"action", "ids"})
        if extra:
            raise UserError(f"{extra[0]}: only ids go with action 'remove'")
        return CatalogueChange("remove", ids)
    texts = images = None
    if "texts" in inputs:
        values = inputs["texts"].reshape(-1)
        if len(values) != n:
            raise UserError(f"texts: {len(values)} elements for {n} ids")
        texts = [_text(value, f"texts: element {j}") for j, value in enumerate(values.tolist())]
    if "images" in inputs:
        values = inputs["images"].reshape(-1)
        if len(values) != n:
            raise UserError(f"images: {len(values)} elements for {n} ids")
        images = [[bytes(v)] if len(v) else [] for v in values.tolist()]
    features = {name: inputs[name] for name in FEATURE_INPUTS if name in inputs}
    return CatalogueChange("add", ids, texts, images, features or None)

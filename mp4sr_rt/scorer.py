"""The serving scorer: original item ids in, top-k original item ids out. No torch.

    scorer = Scorer("mp4sr-out/artifacts")                       # backend="auto": fastest here
    [rec] = scorer.score([["item00012", "item00007"]], k=10)
    rec.items, rec.scores, rec.unknown_items, rec.fallback       # fallback: None | "popular"
    scorer.add_items(["new-1"], texts=[["Red tent", "Sleeps four."]], images=[["tent.jpg"]])
    scorer.add_items(["new-2"], text_feats=t, text_mask=tm, image_feats=i, image_mask=im)
    scorer.score([["new-1"]])                                     # new items: scorable at once
    scorer.score(histories, exclude=["item00003"], allow=in_stock)   # filters, for every history
    scorer.remove_items(["item00042"])                            # never recommended again

Paths through the artifacts (docs/artifacts.md):
- histories of trained items: scorer.onnx, the catalogue folded in, returns the top K and the
  user vector u; with an int8 scan (export --int8-scan) also a bound on the scores of the items
  it left out, and a history whose k-th score falls below it is ranked again on the host;
- histories holding items added at serve time: history_encoder.onnx on the items' sequence-input
  vectors (item_inputs.npy rows, or the added rows) -> u, then u . table on the host;
- items added at serve time are scored as u . added_table and merged into the top k;
- a history with no known item: the most popular items, flagged "popular";
- with an approximate index (export --ann) every history goes history_encoder.onnx -> u -> the
  FAISS index (mp4sr_rt/ann.py; filters and removed items through its ID selectors) -> the top k,
  ranked on the host instead when the filters leave the search short of k items; allow-lists of up
  to EXACT_ALLOW items are always ranked exactly on the host.
On the CPU every history is padded to a width that depends on its own length alone (the next
multiple of 4, at most L), so its result never depends on the other histories of the batch, bit
for bit. A GPU picks kernels per batch size anyway (results agree to ~1e-6, not bit for bit), so
there a batch is padded to L once and the catalogue is scanned once per call, not once per width.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import chain, islice
from pathlib import Path

import numpy as np

from mp4sr_rt import ann as ann_lib
from mp4sr_rt.backends import Backend, open_backend
from mp4sr_rt.errors import ArtifactError, UserError
from mp4sr_rt.histories import ItemId
from mp4sr_rt.manifest import MANIFEST, Manifest, load_array, load_json, load_manifest, verify_artifacts, verify_files
from mp4sr_rt.raw import RawEncoders

DEFAULT_ARTIFACTS = Path("mp4sr-out/artifacts")
SCORE_BUDGET = 1 << 28  # score-matrix elements per model call (1 GiB in fp32), whatever N is
EXACT_ALLOW = 20_000  # allow-lists up to this long are ranked exactly on the host, index or not
WIDTH_STEP = 4  # histories are padded to a multiple of this: little padding, few distinct widths
FEATURES = ("text_feats", "text_mask", "image_feats", "image_mask")


@dataclass(frozen=True)
class Recommendation:
    """The top-k of one history. With fallback "popular", scores are training interaction counts."""

    items: list[ItemId]
    scores: list[float]
    unknown_items: list[ItemId] = field(default_factory=list)
    fallback: str | None = None


REFRESH_ATTEMPTS = 5  # catalogue versions read in a row while newer ones keep replacing them


@dataclass(frozen=True)
class _Added:
    """Items added at serve time, rows N + 1 ... N + M. Replaced whole by add_items, never
    changed in place, so a concurrent score() always sees one consistent snapshot."""

    ids: tuple[ItemId, ...] = ()
    index: dict[str, int] = field(default_factory=dict)
    table: np.ndarray | None = None  # (M, 2d) normalised serving rows
    inputs: np.ndarray | None = None  # (M, 2d) sequence-input vectors


@dataclass(frozen=True)
class _Filters:
    """What one score() call may not return: `blocked` (excluded and removed items), the
    history's own items with `exclude_seen`, and anything outside `allowed` (None: no allow-list)."""

    blocked: frozenset[int]
    allowed: np.ndarray | None  # sorted catalogue indices
    exclude_seen: bool

    def excluded(self, h: _History) -> frozenset[int]:
        return self.blocked | h.seen if self.exclude_seen else self.blocked


@dataclass(frozen=True)
class _History:
    ids: list[int]  # catalogue indices, the last L known items
    seen: frozenset[int]  # every known item of the history, for exclude_seen
    unknown: list[ItemId]


class Scorer:
    """Top-k recommendations from an artifact directory (see the module docstring)."""

    def __init__(self, artifacts: str | Path = DEFAULT_ARTIFACTS, backend: str = "auto",
                 max_batch: int | None = None, threads: int = 0, ann: bool = True):
        """`max_batch`: rows per model call (default: a 1 GiB score-matrix budget); `threads`:
        intra-op threads of the CPU backend (0: one per core); `ann`: rank through the artifacts'
        approximate index when they have one (`export --ann`), else the exact scan."""
        self.directory = Path(artifacts)
        self._manifest_key = _stat_key(self.directory / MANIFEST)
        self.manifest = verify_artifacts(self.directory)  # hashes and schema: ArtifactError naming the file
        self.max_len, self.top_k = self.manifest.max_len, self.manifest.top_k
        self.num_base = self.manifest.num_items
        self.modalities = self.manifest.modalities
        self._item_ids, popularity = self._read_vocabulary()
        self._index = {str(item): i + 1 for i, item in enumerate(self._item_ids)}
        self._popularity = np.asarray(popularity, dtype=np.float64)
        # Most popular first; ties by catalogue order (as the training popularity baseline).
        self._popular = np.argsort(-self._popularity, kind="stable") + 1
        # Read on demand: only the added-item and overflow paths touch these.
        self._item_inputs = load_array(self.directory / self.manifest.item_inputs, "float32",
                                       (self.num_base + 1, self.manifest.dim), mmap=True)
        self._item_table = None  # the table's own file, when the manifest has one (else from _item_inputs)
        if self.manifest.item_table is not None:
            self._item_table = load_array(self.directory / self.manifest.item_table, "float32",
                                          (self.num_base + 1, self.manifest.dim), mmap=True)
        self._table: np.ndarray | None = None
        self._added = _Added()
        self._removed: frozenset[int] = frozenset()
        self._write_lock = threading.Lock()
        self._threads = threads
        self._ann = self._read_ann() if ann and self.manifest.ann is not None else None
        self._apply_catalogue(self.manifest)  # items added and removed since the export, if any
        self.backend: Backend = open_backend(backend, self.directory, self.manifest, threads)
        self._raw = RawEncoders(self.directory, self.manifest, self.backend)
        budget = max(1, SCORE_BUDGET // (self.num_base + 1))
        budget = 1 << (budget.bit_length() - 1)  # a power of two: the GPU buckets' own sizes
        self.max_batch = min(max_batch or budget, self.backend.max_batch)
        # Histories ranked on the host because the scorer's top K could not tell (a statistic:
        # concurrent calls may miss a count).
        self.rescans = 0

    def _read_ann(self) -> ann_lib.AnnSearch:
        spec = self.manifest.ann
        index = ann_lib.read(self.directory / spec.file, spec.kind, spec.search, self._threads)
        if index.size != self.num_base or index.index.d != self.manifest.dim:
            raise ArtifactError(f"{self.directory / spec.file}: {index.size} rows of {index.index.d}, "
                                f"manifest says {self.num_base} of {self.manifest.dim}")
        return index

    def _read_vocabulary(self) -> tuple[list[ItemId], list[float]]:
        path = self.directory / self.manifest.vocabulary
        vocabulary = load_json(path)
        if not isinstance(vocabulary, dict) or set(vocabulary) != {"items", "popularity"}:
            raise ArtifactError(f"{path}: expected an object with the keys items and popularity")
        items, popularity = vocabulary["items"], vocabulary["popularity"]
        if not isinstance(items, list) or not isinstance(popularity, list) or \
                len(items) != self.num_base or len(popularity) != self.num_base:
            raise ArtifactError(f"{path}: items and popularity must be lists of the manifest's "
                                f"{self.num_base} items")
        if not all(isinstance(i, (str, int)) and not isinstance(i, bool) for i in items) or \
                len({str(i) for i in items}) != len(items):
            raise ArtifactError(f"{path}: item ids must be distinct strings or integers")
        if not all(isinstance(c, (int, float)) and not isinstance(c, bool) and math.isfinite(c) and c >= 0
                   for c in popularity):
            raise ArtifactError(f"{path}: popularity must hold finite counts >= 0")
        return items, popularity

    @property
    def approximate(self) -> bool:
        """Whether scoring goes through the approximate index (export --ann)."""
        return self._ann is not None

    @property
    def num_items(self) -> int:
        """Items that can be recommended: the trained catalogue plus those added at serve time."""
        return self.num_base + len(self._added.ids)

    # -- scoring ---------------------------------------------------------------------------

    def score(self, histories: Iterable[Sequence[ItemId]], k: int = 10, exclude_seen: bool = True,
              exclude: Iterable[ItemId] = (), allow: Iterable[ItemId] | None = None) -> list[Recommendation]:
        """One Recommendation per history, in order. Histories hold original item ids, oldest
        first; unknown ids are dropped (and reported), the last L known ones are used. A k above
        the catalogue size returns the whole catalogue. Filters, for every history of the call:
        `exclude`, items never to return; `allow`, the only items that may be returned (ids
        unknown to the catalogue are ignored in both); removed items are never returned."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise UserError(f"k must be an integer >= 1, got {k!r}")
        # One snapshot of the catalogue for the whole call: add_items and remove_items replace
        # these objects, never change them, so a concurrent change is seen entirely or not at all.
        added, removed = self._added, self._removed
        k = min(k, self.num_base + len(added.ids))
        blocked = removed | frozenset(self._indices(exclude, added, "exclude"))
        allowed = None
        if allow is not None:
            allowed = np.array(sorted(self._indices(allow, added, "allow") - blocked), dtype=np.int64)
        filters = _Filters(blocked, allowed, exclude_seen)
        prepared = [self._prepare(history, added) for history in histories]
        results: list[Recommendation | None] = [None] * len(prepared)
        groups: dict[tuple[str, int], list[int]] = {}  # (path, width) -> rows
        for i, h in enumerate(prepared):
            if not h.ids:
                results[i] = self._popular_items(h, k, filters, added)
                continue
            width = self._width(len(h.ids)) if self.backend.exact_rows else self.max_len
            if self._ann is not None and (allowed is None or len(allowed) > EXACT_ALLOW):
                path = "ann"
            elif max(h.ids) > self.num_base or allowed is not None:
                path = "host"  # the user vector, then the trained and added items ranked on the host
            else:
                path = "scorer"
            groups.setdefault((path, width), []).append(i)
        for (path, width), rows in groups.items():
            for chunk in _chunks(rows, self.max_batch):
                histories_chunk = [prepared[i] for i in chunk]
                if path == "scorer":
                    recs = self._score_base(histories_chunk, width, k, filters, added)
                else:
                    users = self._users(histories_chunk, width, added)
                    if path == "ann":
                        recs = self._from_ann(histories_chunk, users, k, filters, added)
                    else:
                        recs = [self._from_user(h, u, k, filters, added)
                                for h, u in zip(histories_chunk, users, strict=True)]
                for i, rec in zip(chunk, recs, strict=True):
                    results[i] = rec
        return results  # type: ignore[return-value]

    def _indices(self, ids: Iterable[ItemId], added: _Added, name: str) -> set[int]:
        if isinstance(ids, (str, bytes)):
            raise UserError(f"{name} must be a list of item ids, not one string")
        out = set()
        for item in ids:
            index = self._index.get(str(item)) or added.index.get(str(item))
            if index is not None:
                out.add(index)
        return out

    def _width(self, length: int) -> int:
        """Padded width of a history: its length rounded up to a multiple of WIDTH_STEP, at most
        L. It depends on the history alone, so its result never depends on the batch, while
        each history pays for at most WIDTH_STEP - 1 padding positions."""
        return min(self.max_len, -(-length // WIDTH_STEP) * WIDTH_STEP)

    def _prepare(self, history: Sequence[ItemId], added: _Added) -> _History:
        if isinstance(history, (str, bytes)):
            raise UserError(f"each history must be a list of item ids, not one string ({history!r:.40})")
        known, unknown = [], []
        for item in history:
            key = str(item)
            index = self._index.get(key) or added.index.get(key)
            if index is None:
                unknown.append(item)
            else:
                known.append(index)
        return _History(known[-self.max_len:], frozenset(known), unknown)

    @staticmethod
    def _padded(histories: list[_History], width: int) -> np.ndarray:
        """Right-padded ids (B, width)."""
        ids = np.zeros((len(histories), width), dtype=np.int64)
        for row, h in zip(ids, histories, strict=True):
            row[: len(h.ids)] = h.ids
        return ids

    def _score_base(self, histories: list[_History], width: int, k: int, filters: _Filters,
                    added: _Added) -> list[Recommendation]:
        scores, items, users, bounds = self.backend.run(self._padded(histories, width))
        if bounds is None:  # the exact scan: nothing outside the top K scores above its last
            bounds = np.full((len(histories), 1), -np.inf, np.float32)
        return [self._from_top_k(h, s, it, u, float(b[0]), k, filters, added)
                for h, s, it, u, b in zip(histories, scores, items, users, bounds, strict=True)]

    def _from_top_k(self, h: _History, scores: np.ndarray, items: np.ndarray, user: np.ndarray,
                    bound: float, k: int, filters: _Filters, added: _Added) -> Recommendation:
        excluded = filters.excluded(h)
        pairs = zip(items.tolist(), scores.tolist(), strict=True)
        top = list(islice(((i, s) for i, s in pairs if i not in excluded), k))
        # The graph's top K holds every trained item that can still make the top k unless
        # exclusions left fewer than k of them, or (int8 scan) an item it left out may score
        # above the k-th: then rank the whole catalogue on the host.
        if (len(top) < k and self.top_k < self.num_base) or (top and top[-1][1] < bound):
            self.rescans += 1
            return self._from_user(h, user, k, filters, added)
        return self._recommend(h, self._merge_added(top, user, excluded, None, k, added), added)

    def _users(self, histories: list[_History], width: int, added: _Added) -> np.ndarray:
        """User vectors (B, M d) through the history encoder, for histories of any items."""
        ids = self._padded(histories, width)
        base = ids <= self.num_base
        inputs = np.empty((*ids.shape, self._item_inputs.shape[1]), dtype=np.float32)  # (B, L, M d)
        inputs[base] = self._item_inputs[ids[base]]  # padding reads row 0: zeros
        if not base.all():
            inputs[~base] = added.inputs[ids[~base] - self.num_base - 1]
        return self.backend.encode_history(inputs, (ids != 0).sum(axis=1))

    def _from_user(self, h: _History, user: np.ndarray, k: int, filters: _Filters,
                   added: _Added) -> Recommendation:
        """Rank the trained catalogue (or the allowed part of it) for one user vector on the host
        (one row at a time: a matrix-vector product gives the same bits whatever the batch)."""
        excluded = filters.excluded(h)
        if filters.allowed is None:
            scores = self._host_table() @ user  # (N + 1,)
            scores[0] = -np.inf
            scores[[i for i in excluded if i <= self.num_base]] = -np.inf
            top = [(i, float(scores[i])) for i in _top_indices(scores, k)]
        else:
            rows = filters.allowed[filters.allowed <= self.num_base]
            rows = rows[~np.isin(rows, list(excluded))] if excluded else rows
            scores = self._rows(rows, added) @ user if len(rows) else np.zeros(0, np.float32)
            top = [(int(rows[j]), float(scores[j])) for j in _top_indices(scores, k)]
        return self._recommend(h, self._merge_added(top, user, excluded, filters.allowed, k, added), added)

    def _from_ann(self, histories: list[_History], users: np.ndarray, k: int, filters: _Filters,
                  added: _Added) -> list[Recommendation]:
        """The index's best candidates (trained and added items alike, filters applied by FAISS's
        ID selectors) with their exact scores (mp4sr_rt.ann: full-precision rows)."""
        extra = max(len(h.seen) for h in histories) if filters.exclude_seen else 0
        allowed = None if filters.allowed is None else filters.allowed - 1  # index positions
        scores, positions = self._ann.search(users, k + extra, [i - 1 for i in filters.blocked], allowed)
        # Items added after this call's snapshot may already be in the index: they are left out.
        last = self.num_base + len(added.ids)
        recs = []
        for h, user, row_scores, row in zip(histories, users, scores, positions, strict=True):
            seen = h.seen if filters.exclude_seen else frozenset()
            top = [(p + 1, s) for p, s in zip(row.tolist(), row_scores.tolist(), strict=True)
                   if 0 <= p < last and p + 1 not in seen][:k]
            if len(top) < min(k, last - len(filters.blocked | seen)):
                # The filters left the index's probed part short of k items: rank on the host.
                self.rescans += 1
                recs.append(self._from_user(h, user, k, filters, added))
            else:
                recs.append(self._recommend(h, top, added))
        return recs

    def _rows(self, indices: np.ndarray, added: _Added) -> np.ndarray:
        """Serving rows (n, M d) of catalogue indices, trained or added."""
        base = indices <= self.num_base
        rows = np.empty((len(indices), self.manifest.dim), np.float32)
        if self._item_table is not None:
            rows[base] = self._item_table[indices[base]]
        else:
            rows[base] = serving_rows(np.asarray(self._item_inputs[indices[base]], np.float32), len(self.modalities))
        if not base.all():
            rows[~base] = added.table[indices[~base] - self.num_base - 1]
        return rows

    def _merge_added(self, top: list[tuple[int, float]], user: np.ndarray, excluded: frozenset[int],
                     allowed: np.ndarray | None, k: int, added: _Added) -> list[tuple[int, float]]:
        if added.table is None:
            return top
        scores = added.table @ user  # (M,)
        allowed_set = None if allowed is None else set(allowed.tolist())
        candidates = [(self.num_base + 1 + j, float(s)) for j, s in enumerate(scores.tolist())
                      if self.num_base + 1 + j not in excluded
                      and (allowed_set is None or self.num_base + 1 + j in allowed_set)]
        # Stable sort on score alone: ties keep trained items first, then added order.
        return sorted(top + candidates, key=lambda pair: -pair[1])[:k]

    def _recommend(self, h: _History, top: list[tuple[int, float]], added: _Added) -> Recommendation:
        items = [self._original_id(i, added) for i, _ in top]
        return Recommendation(items, [s for _, s in top], h.unknown)

    def _popular_items(self, h: _History, k: int, filters: _Filters, added: _Added) -> Recommendation:
        """A history with no known item: the trained items by training count, then the added
        items (count 0) in the order they were added."""
        excluded = filters.blocked
        allowed = None if filters.allowed is None else set(filters.allowed.tolist())
        ranked = chain((int(i) for i in self._popular), range(self.num_base + 1, self.num_base + len(added.ids) + 1))
        top = list(islice((i for i in ranked if i not in excluded and (allowed is None or i in allowed)), k))
        counts = [float(self._popularity[i - 1]) if i <= self.num_base else 0.0 for i in top]
        return Recommendation([self._original_id(i, added) for i in top], counts, h.unknown, "popular")

    def _original_id(self, index: int, added: _Added | None = None) -> ItemId:
        if index <= self.num_base:
            return self._item_ids[index - 1]
        return (self._added if added is None else added).ids[index - self.num_base - 1]

    def _host_table(self) -> np.ndarray:
        """The serving table [c_text, c_image] (N + 1, 2d), read the first time a history needs
        it: item_table.npy where the manifest has one, else rebuilt from item_inputs.npy (SPEC
        section 4: c_m = normalize(input_m))."""
        if self._table is None:
            with self._write_lock:
                if self._table is None and self._item_table is not None:
                    self._table = np.asarray(self._item_table, dtype=np.float32)
                elif self._table is None:
                    self._table = serving_rows(np.asarray(self._item_inputs, dtype=np.float32),
                                               len(self.modalities))
        return self._table

    # -- new items -------------------------------------------------------------------------

    def add_items(self, ids: Sequence[ItemId], texts: Sequence[str | Sequence[str]] | None = None,
                  images: Sequence[str | Path | bytes | Sequence[str | Path | bytes]] | None = None,
                  **features: np.ndarray) -> None:
        """Make new items recommendable and usable in histories at once, without retraining.

        Raw data (needs the artifacts' text and image encoders, i.e. features that came from
        `mp4sr-rt features`): `texts`, per item its text fields, title first (or one string);
        `images`, per item its image files (paths or bytes). Or precomputed features (as in a
        features file, one row per id): text_feats float32 (n, S, F), text_mask bool (n, S),
        image_feats float32 (n, V, F), image_mask bool (n, V); a mask left out marks every slot
        as real. A modality given neither way counts as missing for every new item. A bad image
        or id raises UserError and adds nothing."""
        if isinstance(ids, (str, bytes)):
            raise UserError("add_items: give a list of item ids, not one string")
        ids = list(ids)
        self._check_new_ids(ids)
        for modality, raw in (("text", texts), ("image", images)):
            if raw is not None and f"{modality}_feats" in features:
                raise UserError(f"add_items: give {modality}s or {modality}_feats, not both")
            if raw is not None and modality not in self.modalities:
                raise UserError(f"add_items: {modality}s given, but this model's modalities are "
                                f"{', '.join(self.modalities)} only")
        if texts is not None or images is not None:
            features = {**features, **self._raw.features(len(ids), self._feature_dim(), texts, images)}
        table, inputs = self.backend.encode_items(self._item_tower_feeds(len(ids), features))
        broken = ~(np.isfinite(table).all(axis=1) & np.isfinite(inputs).all(axis=1))
        if broken.any():
            raise UserError(f"add_items: the item tower's vectors are not finite for "
                            f"{', '.join(repr(ids[i]) for i in np.flatnonzero(broken)[:5])}: their features "
                            "are out of the range the model was trained on")
        with self._write_lock:
            old = self._added
            self._check_new_ids(ids)  # again, under the lock: a concurrent add may have won
            start = self.num_base + len(old.ids) + 1
            if self._ann is not None:
                self._ann.add(table, start - 1)  # index position = catalogue index - 1
            self._added = _Added(
                old.ids + tuple(ids),
                {**old.index, **{str(item): start + j for j, item in enumerate(ids)}},
                table if old.table is None else np.concatenate([old.table, table]),
                inputs if old.inputs is None else np.concatenate([old.inputs, inputs]),
            )

    def remove_items(self, ids: Sequence[ItemId]) -> None:
        """Never recommend these items again (trained or added ones); they still count in the
        histories that hold them. An id not in the catalogue raises UserError and removes nothing."""
        if isinstance(ids, (str, bytes)):
            raise UserError("remove_items: give a list of item ids, not one string")
        ids = list(ids)
        if not ids:
            raise UserError("remove_items: give a list of item ids")
        with self._write_lock:
            indices = []
            for item in ids:
                index = self._index.get(str(item)) or self._added.index.get(str(item))
                if index is None:
                    raise UserError(f"remove_items: item {item!r} is not in the catalogue")
                indices.append(index)
            self._removed = self._removed | frozenset(indices)

    # -- catalogue versions (mp4sr_rt/catalogue.py) ------------------------------------------

    def refresh(self, force: bool = False) -> bool:
        """Take up the newest catalogue version on disk if it is not the one in use (a stat of
        manifest.json when nothing changed); `force`: reload it in any case, dropping changes
        made in memory only. True when a version was loaded."""
        path = self.directory / MANIFEST
        for attempt in range(REFRESH_ATTEMPTS):
            key = _stat_key(path)
            if key == self._manifest_key and not force:
                return False
            try:
                with self._write_lock:
                    manifest = load_manifest(self.directory)
                    catalogue_files = {path for path, _ in manifest.catalogue_files()}
                    previous = {path for path, _ in self.manifest.catalogue_files()}
                    base = {k: v for k, v in manifest.files.items() if k not in catalogue_files}
                    if base != {k: v for k, v in self.manifest.files.items() if k not in previous}:
                        raise ArtifactError(f"{self.directory}: the exported models changed under a running "
                                            "scorer; start it again to serve them")
                    verify_files(self.directory, manifest, catalogue_files)
                    self._apply_catalogue(manifest, force)
                    self.manifest, self._manifest_key = manifest, key
                return True
            except (ArtifactError, OSError):
                # Versions are kept two deep: two commits while this one was read may have removed
                # its files. Read the newest one instead; a version damaged on its own still fails.
                if _stat_key(path) == key or attempt == REFRESH_ATTEMPTS - 1:
                    raise
        raise AssertionError("unreachable")

    def catalogue_state(self) -> tuple[list[ItemId], np.ndarray | None, np.ndarray | None, list[ItemId]]:
        """(added ids, their serving rows, their sequence-input vectors, removed ids): what
        mp4sr_rt.catalogue writes as a version."""
        added = self._added
        return list(added.ids), added.table, added.inputs, self.removed

    def _apply_catalogue(self, manifest: Manifest, rebuild_index: bool = False) -> None:
        """Serve the catalogue version `manifest` names: its added items and removed items."""
        c = manifest.catalogue
        ids: tuple[ItemId, ...] = ()
        removed_ids: list[ItemId] = []
        table = inputs = None
        if c is not None:
            path = self.directory / c.changes
            changes = load_json(path)
            if not isinstance(changes, dict) or set(changes) != {"added", "removed"} or \
                    not isinstance(changes["added"], list) or not isinstance(changes["removed"], list) or \
                    len(changes["added"]) != c.added or len(changes["removed"]) != c.removed:
                raise ArtifactError(f"{path}: expected {{\"added\": [{c.added} ids], \"removed\": [{c.removed} ids]}}")
            ids, removed_ids = tuple(changes["added"]), changes["removed"]
            keys = [str(i) for i in ids]
            if any(not isinstance(i, (str, int)) or isinstance(i, bool) for i in ids + tuple(removed_ids)) or \
                    len(set(keys)) != len(keys) or any(key in self._index for key in keys):
                raise ArtifactError(f"{path}: added ids must be new, distinct strings or integers")
            if c.added:
                shape = (c.added, self.manifest.dim)
                table = load_array(self.directory / c.added_table, "float32", shape)
                inputs = load_array(self.directory / c.added_inputs, "float32", shape)
        index = {str(item): self.num_base + 1 + j for j, item in enumerate(ids)}
        removed = []
        for item in removed_ids:
            i = self._index.get(str(item)) or index.get(str(item))
            if i is None:
                raise ArtifactError(f"{self.directory / c.changes}: removed item {item!r} is not in the catalogue")
            removed.append(i)
        if self._ann is not None:
            old = self._added.ids
            if rebuild_index or ids[:len(old)] != old:
                self._ann, old = self._read_ann(), ()
            if len(ids) > len(old):
                self._ann.add(table[len(old):], self.num_base + len(old))
        self._added = _Added(ids, index, table, inputs)
        self._removed = frozenset(removed)

    @property
    def removed(self) -> list[ItemId]:
        return [self._original_id(i) for i in sorted(self._removed)]

    def _check_new_ids(self, ids: list[ItemId]) -> None:
        if not ids:
            raise UserError("add_items: no item ids given")
        keys = [str(item) for item in ids]
        for item, key in zip(ids, keys, strict=True):
            if not isinstance(item, (str, int)) or isinstance(item, bool):
                raise UserError(f"add_items: item id {item!r} is not a string or an integer")
            if key in self._index or key in self._added.index:
                raise UserError(f"add_items: item {item!r} is already in the catalogue")
        if len(set(keys)) != len(keys):
            raise UserError("add_items: duplicate item ids")

    def _item_tower_feeds(self, n: int, features: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        unknown = sorted(set(features) - set(FEATURES))
        if unknown:
            raise UserError(
                f"add_items: unknown feature {unknown[0]!r}; expected {', '.join(FEATURES)}")
        model = ", ".join(self.modalities)
        extra = sorted(n for n in features if n.split("_")[0] not in self.modalities)
        if extra:
            raise UserError(f"add_items: {extra[0]!r}: this model's modalities are {model} only")
        if not any(f"{name}_feats" in features for name in self.modalities):
            raise UserError(f"add_items: give features of the model's modalities ({model}): raw "
                            f"{' or '.join(m + 's' for m in self.modalities)}, or precomputed "
                            f"{' or '.join(m + '_feats' for m in self.modalities)}")
        feat_dim = self._feature_dim()
        feeds = {}
        for modality in self.modalities:
            feats, mask = features.get(f"{modality}_feats"), features.get(f"{modality}_mask")
            feeds.update(_modality_feeds(modality, feats, mask, n, feat_dim))
        return feeds

    def _feature_dim(self) -> int:
        dim = self.manifest.models["item_tower"].inputs[0].shape[-1]
        if not isinstance(dim, int):
            raise ArtifactError(f"{self.directory}: item_tower feature size is not fixed ({dim!r})")
        return dim


def _modality_feeds(modality: str, feats: np.ndarray | None, mask: np.ndarray | None, n: int,
                    feat_dim: int) -> dict[str, np.ndarray]:
    """Validated item-tower inputs of one modality; an absent modality is one masked-out slot."""
    if feats is None:
        if mask is not None:
            raise UserError(f"add_items: {modality}_mask given without {modality}_feats")
        return {f"{modality}_feats": np.zeros((n, 1, feat_dim), np.float32),
                f"{modality}_mask": np.zeros((n, 1), bool)}
    feats = np.asarray(feats)
    if feats.dtype.kind not in "fiu":
        raise UserError(f"add_items: {modality}_feats must hold real numbers, got {feats.dtype}")
    feats = feats.astype(np.float32, copy=False)
    if feats.ndim != 3 or feats.shape[0] != n or feats.shape[2] != feat_dim or feats.shape[1] < 1:
        raise UserError(f"add_items: {modality}_feats must have shape "
                        f"({n}, slots >= 1, {feat_dim}), got {feats.shape}")
    if not np.isfinite(feats).all():
        raise UserError(f"add_items: {modality}_feats holds NaN or infinite values")
    mask = np.ones(feats.shape[:2], bool) if mask is None else np.asarray(mask)
    if mask.shape != feats.shape[:2] or mask.dtype != bool:
        raise UserError(f"add_items: {modality}_mask must be bool of shape {feats.shape[:2]}, "
                        f"got {mask.dtype} {mask.shape}")
    return {f"{modality}_feats": feats, f"{modality}_mask": mask}


def serving_rows(inputs: np.ndarray, modalities: int) -> np.ndarray:
    """[x_text/|x_text|, x_image/|x_image|] per row of sequence-input vectors (n, M d), as
    F.normalize (eps 1e-12) computes it: the serving table (SPEC section 4)."""
    parts = np.split(inputs, modalities, axis=1)
    return np.concatenate([x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
                           for x in parts], axis=1)


def _top_indices(scores: np.ndarray, k: int) -> list[int]:
    """Indices of the k highest finite scores, best first, ties by index."""
    k = min(k, len(scores))
    candidates = np.argpartition(-scores, k - 1)[:k]
    order = candidates[np.lexsort((candidates, -scores[candidates]))]
    return [int(i) for i in order if math.isfinite(scores[i])]


def _stat_key(path: Path) -> tuple[int, int, int] | None:
    """What tells one manifest.json from the next: a commit replaces the file (a new inode)."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def _chunks(rows: list[int], size: int) -> Iterable[list[int]]:
    for start in range(0, len(rows), size):
        yield rows[start:start + size]

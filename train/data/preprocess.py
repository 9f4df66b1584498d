"""Raw interactions -> leave-one-out splits (SPEC section 5), with an on-disk cache.

data, raw = load_or_preprocess("data/my_shop", Path(".cache"), max_len=50, min_interactions=5)
data.train.histories  # int64 [P, 50], right-padded; data.train.targets int64 [P]
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import zipfile
from pathlib import Path

import numpy as np
from mp4sr_train.data.readers import DatasetFiles, detect, read_dataset
from mp4sr_train.data.types import ItemInfo, RawData, Split, SplitData

from mp4sr_rt.errors import UserError
from mp4sr_rt.io import atomic_write, write_json_atomic

CACHE_SCHEMA = "mp4sr-split/1"  # bump when the split or the cache layout changes
_SPLITS = ("train", "valid", "test")


def preprocess(raw: RawData, max_len: int = 50, min_interactions: int = 5) -> SplitData:
    """Sort, deduplicate, filter and split ``raw`` exactly as the reference does."""
    if max_len < 1:
        raise UserError(f"max_len must be at least 1, got {max_len}")
    if min_interactions < 3:
        # Leave-one-out needs a test item, a validation item and one item of history.
        raise UserError(f"min_interactions must be at least 3, got {min_interactions}")
    order = np.argsort(raw.timestamps, kind="stable")  # ties keep file order
    user_names, user_idx = _ranks(raw.user_names, raw.user_codes[order])
    item_names, item_idx = _ranks(raw.item_names, raw.item_codes[order])
    keep = _last_occurrences(user_idx.astype(np.int64) * len(item_names) + item_idx)
    user_idx, item_idx = user_idx[keep], item_idx[keep]
    # One filtering pass, like the reference: dropping users may leave items with few
    # interactions, which stay.
    long_enough = np.bincount(user_idx)[user_idx] >= min_interactions
    user_idx, item_idx = user_idx[long_enough], item_idx[long_enough]
    if not len(user_idx):
        raise UserError(f"no user has at least {min_interactions} interactions in {raw.source}")
    # Re-number what remains; np.unique keeps the sorted order of the original id strings.
    kept_users, user_idx = np.unique(user_idx, return_inverse=True)
    kept_items, item_idx = np.unique(item_idx, return_inverse=True)
    by_user = np.argsort(user_idx, kind="stable")  # each user's items, oldest first
    seq = (item_idx[by_user] + 1).astype(np.int64)  # item index; 0 is padding
    lengths = np.bincount(user_idx)
    return SplitData(
        item_ids=tuple(str(i) for i in item_names[kept_items]),
        user_ids=tuple(str(u) for u in user_names[kept_users]),
        **_leave_one_out(seq, lengths, max_len),
        train_counts=_train_counts(seq, lengths, len(kept_items)),
    )


def _ranks(names: np.ndarray, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The vocabulary ``names`` sorted and deduplicated, and the index of each code's name in it.

    The same as ``np.unique(names[codes], return_inverse=True)`` without spelling out every row.
    """
    sorted_names, rank = np.unique(names, return_inverse=True)
    return sorted_names, rank[codes]


def _last_occurrences(keys: np.ndarray) -> np.ndarray:
    """Boolean mask keeping the last occurrence of each key."""
    _, first_from_end = np.unique(keys[::-1], return_index=True)
    keep = np.zeros(len(keys), dtype=bool)
    keep[len(keys) - 1 - first_from_end] = True
    return keep


def _leave_one_out(seq: np.ndarray, lengths: np.ndarray, max_len: int) -> dict[str, Split]:
    """Splits of the concatenated user sequences ``seq`` (user u owns ``lengths[u]`` items)."""
    starts = np.cumsum(lengths) - lengths
    ends = starts + lengths
    # Training targets are s[1 .. n-3] of each user: n - 3 rows per user.
    n_train = lengths - 3
    row_start = np.repeat(starts, n_train)
    offset = np.arange(n_train.sum()) - np.repeat(np.cumsum(n_train) - n_train, n_train)
    return {
        "train": _windows(seq, row_start, row_start + offset + 1, max_len),
        "valid": _windows(seq, starts, ends - 2, max_len),
        "test": _windows(seq, starts, ends - 1, max_len),
    }


def _windows(seq: np.ndarray, first: np.ndarray, target: np.ndarray, max_len: int) -> Split:
    """Row r predicts ``seq[target[r]]`` from ``seq[max(first[r], target[r] - L):target[r]]``."""
    length = np.minimum(target - first, max_len)
    cols = np.arange(max_len)
    idx = (target - length)[:, None] + cols  # (P, L)
    real = cols < length[:, None]
    histories = np.where(real, seq[np.minimum(idx, len(seq) - 1)], 0)
    return Split(histories=histories.astype(np.int64), targets=seq[target])


def _train_counts(seq: np.ndarray, lengths: np.ndarray, num_items: int) -> np.ndarray:
    """Occurrences of each item in the users' training parts s[:n-2]."""
    starts = np.cumsum(lengths) - lengths
    position = np.arange(len(seq)) - np.repeat(starts, lengths)
    in_train = position < np.repeat(lengths - 2, lengths)
    return np.bincount(seq[in_train], minlength=num_items + 1).astype(np.int64)


def hold_out_items(data: SplitData, fraction: float, seed: int) -> tuple[SplitData, np.ndarray]:
    """Cold-start setting: hide a seeded ``fraction`` of the items from training.

    Training rows that predict a held-out item are dropped, held-out items are removed from the
    remaining histories (which close up to the left; rows left empty are dropped). Validation
    and test stay as they are. Returns the new data and the bool mask [N + 1] of held-out items.
    """
    if not 0 <= fraction < 1:
        raise UserError(f"cold-start fraction must be in [0, 1), got {fraction}")
    n = data.num_items
    held = np.zeros(n + 1, dtype=bool)
    held[np.random.default_rng(seed).choice(n, size=round(fraction * n), replace=False) + 1] = True
    counts = data.train_counts.copy()
    counts[held] = 0  # held-out items no longer occur in any training part
    train = _strip_items(data.train, held)
    return dataclasses.replace(data, train=train, train_counts=counts), held


def _strip_items(split: Split, held: np.ndarray) -> Split:
    rows = ~held[split.targets]
    histories, targets = split.histories[rows], split.targets[rows]
    keep = (histories != 0) & ~held[histories]
    # A stable sort of "not kept" moves the kept items to the front in their original order.
    order = np.argsort(~keep, axis=1, kind="stable")
    histories = np.take_along_axis(np.where(keep, histories, 0), order, axis=1)
    nonempty = histories[:, 0] != 0
    return Split(histories=histories[nonempty], targets=targets[nonempty])


# ---------------------------------------------------------------------------------------------
# Cache


def load_or_preprocess(
    data_path: str | Path, cache_dir: Path, max_len: int = 50, min_interactions: int = 5
) -> tuple[SplitData, RawData]:
    """`preprocess(read_dataset(data_path))`, cached in ``cache_dir``.

    The cache key covers the bytes of every input file, the settings and CACHE_SCHEMA, so a
    changed input or setting recomputes. The returned RawData carries ``source`` and the
    ``item_info`` of the vocabulary's items; its interaction arrays are empty (the split replaces
    them), whether or not the cache was hit.
    """
    files = detect(data_path)
    key = _cache_key(files, max_len, min_interactions)
    stem = Path(cache_dir) / f"split-{key[:24]}"
    cached = _load_cache(stem, key)
    if cached is not None:
        return cached
    raw = read_dataset(data_path)
    data = preprocess(raw, max_len, min_interactions)
    info = {item: raw.item_info[item] for item in data.item_ids if item in raw.item_info}
    summary = _summary(info, raw.source)
    _save_cache(stem, key, data, summary)
    return data, summary


def _summary(item_info: dict[str, ItemInfo], source: str) -> RawData:
    empty = np.array([], dtype=str)
    return RawData.from_ids(empty, empty, np.array([], dtype=np.float64), item_info, source)


def _cache_key(files: DatasetFiles, max_len: int, min_interactions: int) -> str:
    settings = {"schema": CACHE_SCHEMA, "max_len": max_len, "min_interactions": min_interactions}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    # Paths count too: item_info holds absolute image paths resolved from the input location.
    for path in files.files():
        key.update(str(path.resolve()).encode() + b"\0" + _file_sha256(path))
    if files.images_dir is not None:
        for image in sorted(files.images_dir.rglob("*")):
            key.update(str(image.relative_to(files.images_dir)).encode() + b"\0")
    return key.hexdigest()


def _file_sha256(path: Path) -> bytes:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None
    return digest.digest()


def _save_cache(stem: Path, key: str, data: SplitData, summary: RawData) -> None:
    arrays = {"train_counts": data.train_counts}
    for name in _SPLITS:
        split = getattr(data, name)
        arrays[f"{name}_histories"] = split.histories
        arrays[f"{name}_targets"] = split.targets
    meta = {
        "schema": CACHE_SCHEMA,
        "key": key,
        "source": summary.source,
        "item_ids": list(data.item_ids),
        "user_ids": list(data.user_ids),
        "item_info": {item: dataclasses.asdict(i) for item, i in summary.item_info.items()},
    }

    def write_npz(path: Path) -> None:
        with open(path, "wb") as f:  # a file object: np.savez would append .npz to a name
            np.savez(f, **arrays)

    try:
        atomic_write(stem.with_suffix(".npz"), write_npz)
        write_json_atomic(stem.with_suffix(".json"), meta)  # written last: marks the entry whole
    except OSError as e:
        raise UserError(f"cannot write the preprocessing cache in {stem.parent}: {e}") from None


def _load_cache(stem: Path, key: str) -> tuple[SplitData, RawData] | None:
    """The cached entry, or None when it is absent, stale or unreadable (then it is rebuilt)."""
    try:
        meta = json.loads(stem.with_suffix(".json").read_text(encoding="utf-8"))
        if meta.get("schema") != CACHE_SCHEMA or meta.get("key") != key:
            return None
        with np.load(stem.with_suffix(".npz"), allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
        splits = {
            name: Split(arrays[f"{name}_histories"], arrays[f"{name}_targets"]) for name in _SPLITS
        }
        info = {
            item: ItemInfo(**{k: tuple(v) for k, v in fields.items()})
            for item, fields in meta["item_info"].items()
        }
        data = SplitData(
            item_ids=tuple(meta["item_ids"]),
            user_ids=tuple(meta["user_ids"]),
            train_counts=arrays["train_counts"],
            **splits,
        )
    except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile):
        return None
    return data, _summary(info, meta["source"])

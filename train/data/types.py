"""In-memory dataset types shared by every reader, the preprocessing step and training.

Item index 0 is the padding item everywhere; item ``item_ids[i]`` has index ``i + 1``.
Histories are right-padded: real items first (oldest to newest), zeros after.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class ItemInfo:
    """What a reader knows about one item besides its interactions."""

    sentences: tuple[str, ...] = ()  # text fields in order (title first), not yet sentence-split
    images: tuple[str, ...] = ()  # local image paths (absolute); may not exist
    image_urls: tuple[str, ...] = ()  # recorded only, never downloaded


@dataclass(frozen=True)
class RawData:
    """Interactions as read, one row per event, plus optional item side information.

    Ids are held as integer codes into vocabularies of the distinct ids: row r's user is
    ``user_names[user_codes[r]]``. `users` and `items` spell each row's id out (4 bytes per
    character per row): for small data; preprocessing works on the codes.
    """

    user_codes: np.ndarray  # int [M]
    item_codes: np.ndarray  # int [M]
    user_names: np.ndarray  # str [U]: distinct ids, each used by some row, in no set order
    item_names: np.ndarray  # str [I]
    timestamps: np.ndarray  # float64 [M]
    item_info: dict[str, ItemInfo] = field(default_factory=dict)
    source: str = ""  # human-readable description of where the data came from

    @classmethod
    def from_ids(cls, users: np.ndarray, items: np.ndarray, timestamps: np.ndarray,
                 item_info: dict[str, ItemInfo] | None = None, source: str = "") -> RawData:
        """From per-row ids (str [M] each); the readers build their codes as they stream."""
        user_names, user_codes = np.unique(np.asarray(users, dtype=str), return_inverse=True)
        item_names, item_codes = np.unique(np.asarray(items, dtype=str), return_inverse=True)
        return cls(user_codes, item_codes, user_names, item_names, np.asarray(timestamps, dtype=np.float64),
                   item_info or {}, source)

    @property
    def users(self) -> np.ndarray:
        """Each row's user id, str [M]."""
        return self.user_names[self.user_codes]

    @property
    def items(self) -> np.ndarray:
        """Each row's item id, str [M]."""
        return self.item_names[self.item_codes]


@dataclass(frozen=True)
class Split:
    """Histories (right-padded, int64 [P, L]) and the item each one should predict (int64 [P])."""

    histories: np.ndarray
    targets: np.ndarray

    def __len__(self) -> int:
        return len(self.targets)


@dataclass(frozen=True)
class SplitData:
    """Preprocessed data, leave-one-out split (SPEC section 5)."""

    item_ids: tuple[str, ...]  # original ids; index i + 1 <-> item_ids[i]
    user_ids: tuple[str, ...]
    train: Split  # every prefix of each user's training part
    valid: Split  # one per user: second-last item
    test: Split  # one per user: last item
    train_counts: np.ndarray  # int64 [N + 1]: occurrences as a training target or history item

    @property
    def num_items(self) -> int:
        return len(self.item_ids)

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
    """Interactions as read, one row per event, plus optional item side information."""

    users: np.ndarray  # str [M]
    items: np.ndarray  # str [M]
    timestamps: np.ndarray  # float64 [M]
    item_info: dict[str, ItemInfo] = field(default_factory=dict)
    source: str = ""  # human-readable description of where the data came from


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

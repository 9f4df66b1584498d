"""A content-addressed cache of feature vectors, so reruns only compute what changed.

    with FeatureCache(default_cache_dir()) as cache:
        key = content_key("sentence", encoder.identity, "A red tent.")
        found = cache.get_many([key])            # {key: float32 vector} for the keys present
        cache.put_many({key: vector})            # committed at once

Keys hash the input itself (a sentence, an image's bytes, a vocabulary word) with the identity
of the model that encodes it, so a changed item, model or setting simply misses. Every
`put_many` is one SQLite transaction: an interrupted run keeps every batch it finished.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from mp4sr_rt.errors import UserError

DB_NAME = "vectors.sqlite"
_QUERY_CHUNK = 500  # below SQLite's limit on host parameters per statement


def default_cache_dir() -> Path:
    return Path(os.environ.get("MP4SR_CACHE_DIR", "~/.cache/mp4sr-rt/features")).expanduser()


def content_key(*parts: str | bytes) -> str:
    """sha256 over the parts, each length-prefixed so ("ab", "c") and ("a", "bc") differ."""
    digest = hashlib.sha256()
    for part in parts:
        data = part.encode("utf-8") if isinstance(part, str) else part
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


class FeatureCache:
    """float32 vectors by key in ``<directory>/vectors.sqlite``."""

    def __init__(self, directory: str | Path):
        self.path = Path(directory).expanduser() / DB_NAME
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # A generous timeout lets two extractions share one cache: writers take turns.
            self._db = sqlite3.connect(self.path, timeout=120)
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS vectors (key TEXT PRIMARY KEY, value BLOB NOT NULL)"
            )
            self._db.commit()
        except (OSError, sqlite3.Error) as e:
            raise UserError(f"features cache {self.path}: cannot be opened ({e})") from None

    def get_many(self, keys: Iterable[str]) -> dict[str, np.ndarray]:
        keys = list(keys)
        found = {}
        for start in range(0, len(keys), _QUERY_CHUNK):
            chunk = keys[start:start + _QUERY_CHUNK]
            marks = ",".join("?" * len(chunk))
            rows = self._db.execute(f"SELECT key, value FROM vectors WHERE key IN ({marks})", chunk)
            found.update((k, np.frombuffer(v, dtype=np.float32)) for k, v in rows)
        return found

    def present(self, keys: Iterable[str]) -> set[str]:
        """The keys that have a vector, without reading the vectors."""
        keys = list(keys)
        found: set[str] = set()
        for start in range(0, len(keys), _QUERY_CHUNK):
            chunk = keys[start:start + _QUERY_CHUNK]
            marks = ",".join("?" * len(chunk))
            found.update(k for (k,) in self._db.execute(f"SELECT key FROM vectors WHERE key IN ({marks})", chunk))
        return found

    def put_many(self, vectors: dict[str, np.ndarray]) -> None:
        rows = [(k, np.asarray(v, dtype=np.float32).tobytes()) for k, v in vectors.items()]
        with self._db:  # one transaction: all rows or none
            self._db.executemany("INSERT OR REPLACE INTO vectors VALUES (?, ?)", rows)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> FeatureCache:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

"""Catalogue changes that persist: items added and removed after the export, written into the
artifact directory as a new version, atomically.

    from mp4sr_rt import catalogue
    scorer = Scorer("mp4sr-out/artifacts")
    version = catalogue.update(scorer, lambda s: s.add_items(["new-1"], texts=[["Red tent"]]))
    version = catalogue.update(scorer, lambda s: s.remove_items(["item00042"]))

A version n is the folder catalogue/v<n>/ (changes.json: the ids added, in catalogue order, and
removed; added_table.npy and added_inputs.npy: the added items' serving rows and sequence-input
vectors) plus a manifest that lists it (`catalogue`, with the files' hashes). A change is made
under an exclusive lock on the directory (`.catalogue.lock`, so the command line and a running
server never interleave), on top of the newest version on disk, and committed in this order:
the new folder is written under a temporary name and renamed into place, then manifest.json is
replaced by one rename. Until that rename every reader sees the old version, complete; after it,
the new one. A process killed at any point leaves one of the two, valid by its hashes; the
folder of the version before the current one is kept for readers that are still opening it,
older ones are deleted. Every Scorer picks a newer version up with `refresh()`.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from mp4sr_rt.manifest import MANIFEST, Catalogue, FileEntry, Manifest, file_sha256

if TYPE_CHECKING:
    from mp4sr_rt.scorer import Scorer

FOLDER = "catalogue"
LOCK = ".catalogue.lock"


@contextmanager
def locked(directory: Path) -> Iterator[None]:
    """Hold the artifact directory's catalogue lock (blocking) for the block's duration."""
    with open(directory / LOCK, "a+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def update(scorer: Scorer, change: Callable[[Scorer], None]) -> int:
    """Apply `change` (add_items / remove_items calls) to the newest catalogue on disk and commit
    it as the next version; returns that version. A change that raises commits nothing, and the
    scorer is put back to the version on disk."""
    with locked(scorer.directory):
        scorer.refresh()
        try:
            change(scorer)
            version = write_version(scorer.directory, scorer.manifest, *scorer.catalogue_state())
        except BaseException:
            scorer.refresh(force=True)
            raise
        scorer.refresh()
        return version


def write_version(directory: Path, manifest: Manifest, added: list[str], table: np.ndarray | None,
                  inputs: np.ndarray | None, removed: list[str]) -> int:
    """Write the catalogue (every item added since the export, every removed one) as the version
    after `manifest`'s and make it current; see the module docstring. Call it under `locked`."""
    version = (manifest.catalogue.version if manifest.catalogue else 0) + 1
    name = f"{FOLDER}/v{version}"
    final, temporary = directory / name, directory / FOLDER / f".v{version}.tmp-{os.getpid()}"
    for stale in (final, temporary):  # left by a process killed before its manifest rename
        shutil.rmtree(stale, ignore_errors=True)
    temporary.mkdir(parents=True)
    _write(temporary / "changes.json", json.dumps({"added": added, "removed": removed}).encode("utf-8"))
    arrays = {}
    if added:
        for key, array in (("added_table", table), ("added_inputs", inputs)):
            with open(temporary / f"{key}.npy", "wb") as f:
                np.save(f, np.ascontiguousarray(array, dtype=np.float32), allow_pickle=False)
                f.flush()
                os.fsync(f.fileno())
            arrays[key] = f"{name}/{key}.npy"
    os.replace(temporary, final)
    _fsync_dir(final.parent)
    entry = Catalogue(version, f"{name}/changes.json", len(added), len(removed),
                      arrays.get("added_table"), arrays.get("added_inputs"))
    old = {path for path, _ in manifest.catalogue_files()}
    files = {k: v for k, v in manifest.files.items() if k not in old}
    for path in [entry.changes, *arrays.values()]:
        files[path] = FileEntry(file_sha256(directory / path), (directory / path).stat().st_size)
    text = json.dumps(dataclasses.replace(manifest, catalogue=entry, files=files).to_dict(), indent=2) + "\n"
    Manifest.from_dict(json.loads(text))  # what the runtime will read: checked before it is written
    _write(directory / MANIFEST, text.encode("utf-8"))
    for folder in (directory / FOLDER).iterdir():  # keep this version and the one before
        if folder.name.startswith(".v") or (folder.name[1:].isdigit() and int(folder.name[1:]) < version - 1):
            shutil.rmtree(folder, ignore_errors=True)
    return version


def _write(path: Path, data: bytes) -> None:
    """Write `path` atomically: a temporary file beside it, flushed to disk, then renamed."""
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(temporary, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

"""The in-memory catalog of images and regions: an immutable snapshot swapped on change.

Region rows are grouped by image (root, regions, segments of image 1, then image 2...)
so that MaxSim over one image's regions is one slice of ``vectors``. A search takes
one snapshot and never sees a half-applied add or delete.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from himir_rag.hierarchy import Level, RegionTree

__all__ = ["ImageRecord", "Snapshot"]

_CACHE_LOCK = threading.RLock()


@dataclass(frozen=True)
class ImageRecord:
    """One indexed image."""

    image_id: int
    path: str
    width: int
    height: int
    size: int = 0
    mtime_ns: int = 0
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        """Stable unique id of the image, derived from its path (same path => same key)."""
        import hashlib

        return "himir-" + hashlib.sha1(self.path.encode("utf-8")).hexdigest()[:20]


@dataclass(frozen=True)
class Snapshot:
    """Immutable view of the whole collection.

    Attributes
    ----------
    images : dict[int, ImageRecord]
        By image id.
    vectors : np.ndarray
        (n_regions, dim) float32, grouped by image.
    region_image : np.ndarray
        (n_regions,) int64 image id of each row.
    levels : np.ndarray
        (n_regions,) int8 :class:`Level`.
    parents : np.ndarray
        (n_regions,) int64 row of the parent region, -1 for global views.
    boxes : np.ndarray
        (n_regions, 4) int32.
    """

    images: dict[int, ImageRecord]
    vectors: np.ndarray
    region_image: np.ndarray
    levels: np.ndarray
    parents: np.ndarray
    boxes: np.ndarray
    _stores: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def empty(cls, dim: int) -> Snapshot:
        """A snapshot holding nothing."""
        return cls({}, np.zeros((0, dim), np.float32), np.zeros(0, np.int64), np.zeros(0, np.int8),
                   np.zeros(0, np.int64), np.zeros((0, 4), np.int32))

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def __len__(self) -> int:
        return len(self.images)

    def with_images(self, records: list[ImageRecord], trees: list[RegionTree], vectors: list[np.ndarray]) -> Snapshot:
        """A new snapshot with images appended (``vectors[i]`` is (len(trees[i]), dim))."""
        if not records:
            return self
        offset = len(self.region_image)
        parts_parent, parts_image = [], []
        for record, tree in zip(records, trees):
            parts_parent.append(np.where(tree.parents >= 0, tree.parents.astype(np.int64) + offset, -1))
            parts_image.append(np.full(len(tree), record.image_id, np.int64))
            offset += len(tree)
        images = dict(self.images)
        images.update({r.image_id: r for r in records})
        return Snapshot(
            images,
            np.concatenate([self.vectors, *vectors]).astype(np.float32, copy=False),
            np.concatenate([self.region_image, *parts_image]),
            np.concatenate([self.levels, *[t.levels for t in trees]]).astype(np.int8),
            np.concatenate([self.parents, *parts_parent]),
            np.concatenate([self.boxes, *[t.boxes for t in trees]]).astype(np.int32),
        )

    def without_images(self, image_ids: set[int]) -> Snapshot:
        """A new snapshot with the given images (and their regions) removed."""
        if not image_ids:
            return self
        keep = ~np.isin(self.region_image, np.fromiter(image_ids, np.int64))
        new_row = np.cumsum(keep) - 1
        parents = np.where(self.parents >= 0, new_row[np.maximum(self.parents, 0)], -1)
        images = {i: r for i, r in self.images.items() if i not in image_ids}
        return Snapshot(images, self.vectors[keep], self.region_image[keep], self.levels[keep],
                        parents[keep], self.boxes[keep])

    def with_records(self, records: list[ImageRecord]) -> Snapshot:
        """A new snapshot with catalog records only (their regions live in an external store)."""
        images = dict(self.images)
        images.update({r.image_id: r for r in records})
        return dataclasses.replace(self, images=images, _stores={})

    def image_rows(self, image_id: int) -> np.ndarray:
        """Rows of one image's regions."""
        return np.flatnonzero(self.region_image == image_id)

    def level_store(self, level: Level, *, kind: str = "flat"):
        """A FAISS store over this snapshot's regions at ``level`` (ids = snapshot rows).

        Built on first use and cached for the snapshot's life (snapshots never change);
        ``kind`` is ``"flat"``, ``"ivf"`` or ``"hnsw"``.
        """
        from himir_rag.store.faiss import FaissStore

        key = (Level(level), kind)
        with _CACHE_LOCK:
            cached = self._stores.get(key)
            if cached is None:
                rows = np.flatnonzero(self.levels == key[0])
                cached = FaissStore(self.dim, kind=kind)
                if len(rows):
                    cached.add(rows, self.vectors[rows])
                self._stores[key] = cached
        return cached

    def parent_radius(self) -> np.ndarray:
        """(n_regions,) float32 ``||v - v_parent||`` per row (0 for global views).

        For unit vectors, ``q . v <= q . v_parent + radius``: the exact bound the
        scheduler uses to skip segments. Query-independent, computed once per snapshot.
        """
        with _CACHE_LOCK:
            radius = self._stores.get("parent_radius")
            if radius is None:
                has_parent = self.parents >= 0
                radius = np.zeros(len(self.parents), np.float32)
                diff = self.vectors[has_parent] - self.vectors[self.parents[has_parent]]
                radius[has_parent] = np.linalg.norm(diff, axis=1)
                self._stores["parent_radius"] = radius
        return radius

    def level_counts(self) -> dict[str, int]:
        """Stored regions per level."""
        return {Level(lv).name.lower(): int((self.levels == lv).sum()) for lv in Level}

    # -- persistence -------------------------------------------------------------------------
    def write_catalog(self, path: Path, *, skipped: list[tuple[str, str]]) -> None:
        """Write images, regions and the skipped-file report into a new SQLite file."""
        with sqlite3.connect(path) as db:
            db.executescript(_SCHEMA)
            db.executemany(
                "INSERT INTO images VALUES (?,?,?,?,?,?,?)",
                [(r.image_id, r.path, r.width, r.height, r.size, r.mtime_ns, json.dumps(r.metadata))
                 for r in self.images.values()],
            )
            db.executemany(
                "INSERT INTO regions VALUES (?,?,?,?,?,?,?,?)",
                zip(range(len(self.levels)), self.region_image.tolist(), self.levels.tolist(),
                    self.parents.tolist(), *self.boxes.T.tolist()),
            )
            db.executemany("INSERT INTO skipped VALUES (?,?)", skipped)
        # the connection context manager commits; close explicitly so the file is complete
        db.close()

    @classmethod
    def read_catalog(cls, path: Path, vectors: np.ndarray, *,
                     records_only: bool = False) -> tuple[Snapshot, list[tuple[str, str]]]:
        """Read a catalog written by :meth:`write_catalog` with its (n_regions, dim) vectors.

        ``records_only``: the regions live in an external store (Qdrant); only images are read.
        """
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            images = {
                row[0]: ImageRecord(row[0], row[1], row[2], row[3], row[4], row[5], json.loads(row[6]))
                for row in db.execute("SELECT * FROM images ORDER BY image_id")
            }
            rows = np.array(db.execute("SELECT * FROM regions ORDER BY row").fetchall(), dtype=np.int64).reshape(-1, 8)
            skipped = [tuple(r) for r in db.execute("SELECT path, reason FROM skipped")]
        finally:
            db.close()
        if len(rows) != len(vectors):
            raise ValueError(f"catalog lists {len(rows)} regions but the vector file holds {len(vectors)}")
        if len(rows) and not (rows[:, 0] == np.arange(len(rows))).all():
            raise ValueError("region rows are not numbered 0..n-1")
        snapshot = cls(images, vectors, rows[:, 1].copy(), rows[:, 2].astype(np.int8), rows[:, 3].copy(),
                       rows[:, 4:8].astype(np.int32))
        if not records_only:
            snapshot.check_integrity()
        return snapshot, skipped  # type: ignore[return-value]

    def check_integrity(self) -> None:
        """Raise ValueError unless every image owns one contiguous run of rows, global view first,
        with valid levels, boxes and parents inside the same image (a damaged catalog never reaches search).
        """
        n = len(self.levels)
        if not (len(self.region_image) == len(self.parents) == len(self.boxes) == self.vectors.shape[0] == n):
            raise ValueError("region arrays differ in length")
        if not np.isin(self.levels, [int(lv) for lv in Level]).all():
            raise ValueError("a region has an unknown level")
        starts = np.flatnonzero(np.r_[True, self.region_image[1:] != self.region_image[:-1]]) if n else np.zeros(0, int)
        owners = self.region_image[starts]
        if len(set(owners.tolist())) != len(owners) or set(owners.tolist()) != set(self.images):
            raise ValueError("images and region rows do not match (every image needs one contiguous run of rows)")
        if (self.levels[starts] != Level.GLOBAL).any() or (self.parents[starts] != -1).any():
            raise ValueError("an image's first region is not its global view")
        has_parent = self.parents >= 0
        if (self.parents >= n).any() or (has_parent != (self.levels != Level.GLOBAL)).any():
            raise ValueError("a region's parent row is out of range or missing")
        parent_rows = self.parents[has_parent]
        if (self.region_image[parent_rows] != self.region_image[has_parent]).any() or \
                (self.levels[parent_rows] >= self.levels[has_parent]).any():
            raise ValueError("a region's parent belongs to another image or is not a coarser level")
        if n and ((self.boxes[:, 2] <= self.boxes[:, 0]) | (self.boxes[:, 3] <= self.boxes[:, 1])).any():
            raise ValueError("a region has an empty box")


_SCHEMA = """
CREATE TABLE images (image_id INTEGER PRIMARY KEY, path TEXT NOT NULL UNIQUE, width INTEGER, height INTEGER,
                     size INTEGER, mtime_ns INTEGER, metadata TEXT NOT NULL);
CREATE TABLE regions (row INTEGER PRIMARY KEY, image_id INTEGER NOT NULL, level INTEGER NOT NULL,
                      parent INTEGER NOT NULL, x0 INTEGER, y0 INTEGER, x1 INTEGER, y1 INTEGER);
CREATE TABLE skipped (path TEXT NOT NULL, reason TEXT NOT NULL);
"""

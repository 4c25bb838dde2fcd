"""The in-memory catalog of images and regions: an immutable snapshot swapped on change.

Region rows are grouped by image (root, regions, segments of image 1, then image 2...)
so that MaxSim over one image's regions is one slice of ``vectors``. A search takes
one snapshot and never sees a half-applied add or delete.

Everything a search needs that is proportional to the collection (image ids in row
order, per-image row offsets, level counts) is computed once per snapshot and cached; appending images writes into capacity-doubling buffers shared
with the previous snapshot (which only ever reads its own prefix), so a build that
commits many small chunks is linear, not quadratic.
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
from himir_rag.paths import stored_resolver

__all__ = ["ImageRecord", "Snapshot", "VECTOR_DTYPES", "run_starts"]

_CACHE_LOCK = threading.RLock()
VECTOR_DTYPES = {"float32": np.float32, "float16": np.float16}
_ROW_BLOCK = 65_536  # rows per block for whole-collection passes (bounded temporary memory)


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
    relpath: str = ""  # POSIX path relative to the index's collection root; "" when stored absolute

    @property
    def key(self) -> str:
        """Stable unique id of the image, derived from its root-relative path (absolute path when outside the root).

        The same photo keeps its key when the collection folder moves (see :mod:`himir_rag.paths`).
        """
        import hashlib

        return "himir-" + hashlib.sha1(self.stored_path.encode("utf-8")).hexdigest()[:20]

    @property
    def stored_path(self) -> str:
        """What the catalog stores: the root-relative path, or the absolute path outside the root."""
        return self.relpath or self.path


class _Buffers:
    """Growable row buffers behind a chain of snapshots: ``filled`` rows are in use.

    Only the snapshot whose length equals ``filled`` may append in place; any other
    (an older snapshot) gets fresh buffers, so no snapshot ever sees its rows change.
    """

    names = ("vectors", "region_image", "levels", "parents", "boxes")

    def __init__(self, arrays: dict[str, np.ndarray], capacity: int) -> None:
        self.arrays = {}
        for name in self.names:
            source = arrays[name]
            buffer = np.empty((capacity, *source.shape[1:]), dtype=source.dtype)
            buffer[: len(source)] = source
            self.arrays[name] = buffer
        self.filled = len(arrays["region_image"])
        self.lock = threading.Lock()

    @property
    def capacity(self) -> int:
        return len(self.arrays["region_image"])

    def append(self, parts: dict[str, np.ndarray]) -> dict[str, np.ndarray] | None:
        """Write ``parts`` after the filled rows; None when full (the caller regrows)."""
        n_new = len(parts["region_image"])
        if self.filled + n_new > self.capacity:
            return None
        start, stop = self.filled, self.filled + n_new
        for name in self.names:
            self.arrays[name][start:stop] = parts[name]
        self.filled = stop
        return {name: self.arrays[name][:stop] for name in self.names}


def run_starts(region_image: np.ndarray) -> np.ndarray:
    """(n_images + 1,) int64 first row of each run of equal image ids, then the row count."""
    n = len(region_image)
    if n == 0:
        return np.zeros(1, np.int64)
    return np.r_[np.flatnonzero(np.r_[True, region_image[1:] != region_image[:-1]]), n].astype(np.int64)


@dataclass(frozen=True)
class Snapshot:
    """Immutable view of the whole collection.

    Attributes
    ----------
    images : dict[int, ImageRecord]
        By image id.
    vectors : np.ndarray
        (n_regions, dim) float32 or float16 (see ``HiMIRConfig.precision``), grouped by image;
        possibly a read-only memory map of the index's vector file.
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
    _cache: dict = field(default_factory=dict, compare=False, repr=False)
    _buffers: _Buffers | None = field(default=None, compare=False, repr=False)

    @classmethod
    def empty(cls, dim: int, *, dtype: Any = np.float32) -> Snapshot:
        """A snapshot holding nothing; ``dtype`` is the storage type of its vectors."""
        return cls({}, np.zeros((0, dim), dtype), np.zeros(0, np.int64), np.zeros(0, np.int8),
                   np.zeros(0, np.int64), np.zeros((0, 4), np.int32))

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def __len__(self) -> int:
        return len(self.images)

    def with_images(self, records: list[ImageRecord], trees: list[RegionTree], vectors: list[np.ndarray]) -> Snapshot:
        """A new snapshot with images appended (``vectors[i]`` is (len(trees[i]), dim)).

        Amortised O(new rows): the rows go into buffers shared with this snapshot.
        """
        if not records:
            return self
        offset = len(self.region_image)
        parts_parent, parts_image = [], []
        for record, tree in zip(records, trees):
            parts_parent.append(np.where(tree.parents >= 0, tree.parents.astype(np.int64) + offset, -1))
            parts_image.append(np.full(len(tree), record.image_id, np.int64))
            offset += len(tree)
        parts = {"vectors": np.concatenate(vectors).astype(self.vectors.dtype, copy=False),
                 "region_image": np.concatenate(parts_image), "parents": np.concatenate(parts_parent),
                 "levels": np.concatenate([t.levels for t in trees]).astype(np.int8),
                 "boxes": np.concatenate([t.boxes for t in trees]).astype(np.int32)}
        buffers, arrays = self._buffers, None
        if buffers is not None:
            with buffers.lock:
                if buffers.filled == len(self.region_image):
                    arrays = buffers.append(parts)
        if arrays is None:
            current = {name: getattr(self, name) for name in _Buffers.names}
            buffers = _Buffers(current, max(2 * (len(self.region_image) + len(parts["region_image"])), 1024))
            arrays = buffers.append(parts)
        images = dict(self.images)
        images.update({r.image_id: r for r in records})
        return Snapshot(images, **arrays, _buffers=buffers)  # type: ignore[arg-type]

    def without_images(self, image_ids: set[int]) -> Snapshot:
        """A new snapshot with the given images (and their regions) removed."""
        image_ids = {i for i in image_ids if i in self.images}
        if not image_ids:
            return self
        keep = ~np.isin(self.region_image, np.fromiter(image_ids, np.int64))
        new_row = np.cumsum(keep) - 1
        parents = np.where(self.parents >= 0, new_row[np.maximum(self.parents, 0)], -1)
        images = {i: r for i, r in self.images.items() if i not in image_ids}
        return Snapshot(images, np.ascontiguousarray(self.vectors[keep]), self.region_image[keep], self.levels[keep],
                        parents[keep], self.boxes[keep])

    def with_records(self, records: list[ImageRecord]) -> Snapshot:
        """A new snapshot with catalog records only (their regions live in an external store)."""
        images = dict(self.images)
        images.update({r.image_id: r for r in records})
        return dataclasses.replace(self, images=images, _cache={}, _buffers=None)

    # -- per-snapshot caches: computed once, read by every search ---------------------------------
    def cached(self, key: str, compute: Any) -> Any:
        """The value cached under ``key`` for this snapshot, computed by ``compute()`` on first use
        (derived tables: row starts, image order; the scheduler's segment geometry)."""
        with _CACHE_LOCK:
            value = self._cache.get(key)
            if value is None:
                value = self._cache[key] = compute()
        return value

    @property
    def image_ids(self) -> np.ndarray:
        """(n_images,) int64 image ids in row order (position ``p`` owns rows ``image_starts[p]:[p+1]``)."""
        return self.cached("image_ids", lambda: self.region_image[self.image_starts[:-1]]
                            if len(self.region_image) else np.zeros(0, np.int64))

    @property
    def image_starts(self) -> np.ndarray:
        """(n_images + 1,) int64 first row of each image position, then the row count."""
        return self.cached("image_starts", lambda: run_starts(self.region_image))

    def positions_of(self, image_ids: np.ndarray) -> np.ndarray:
        """Image positions of ``image_ids`` (any shape); -1 where an id is not in this snapshot."""
        ids = self.image_ids
        order = self.cached("image_order", lambda: np.argsort(ids, kind="stable"))
        wanted = np.asarray(image_ids, dtype=np.int64)
        if len(ids) == 0:
            return np.full(wanted.shape, -1, np.int64)
        at = np.minimum(np.searchsorted(ids, wanted, sorter=order), len(ids) - 1)
        pos = order[at]
        return np.where(ids[pos] == wanted, pos, -1)

    def rows_of(self, positions: np.ndarray) -> np.ndarray:
        """All rows of the images at ``positions`` (sorted), concatenated in that order."""
        positions = np.asarray(positions, dtype=np.int64)
        starts = self.image_starts[positions]
        counts = self.image_starts[positions + 1] - starts
        if len(positions) == 0:
            return np.zeros(0, np.int64)
        offsets = np.repeat(starts - np.r_[0, np.cumsum(counts)[:-1]], counts)
        return np.arange(int(counts.sum()), dtype=np.int64) + offsets

    def image_rows(self, image_id: int) -> np.ndarray:
        """Rows of one image's regions."""
        pos = int(self.positions_of(np.array([image_id]))[0])
        if pos < 0:
            return np.zeros(0, np.int64)
        return np.arange(self.image_starts[pos], self.image_starts[pos + 1], dtype=np.int64)

    def level_counts(self) -> dict[str, int]:
        """Stored regions per level."""
        def compute() -> dict[str, int]:
            counts = np.bincount(self.levels.astype(np.int64), minlength=len(Level))
            return {Level(lv).name.lower(): int(counts[int(lv)]) for lv in Level}
        return dict(self.cached("level_counts", compute))

    def region_vectors(self, rows: np.ndarray) -> np.ndarray:
        """(len(rows), dim) float32 vectors of ``rows`` (converted from float16 storage)."""
        return np.asarray(self.vectors[rows], dtype=np.float32)

    # -- persistence -------------------------------------------------------------------------
    def write_catalog(self, path: Path, *, skipped: list[tuple[str, str]]) -> None:
        """Write images, regions and the skipped-file report into a new SQLite file."""
        with sqlite3.connect(path) as db:
            db.executescript(_SCHEMA)
            db.executemany(
                "INSERT INTO images VALUES (?,?,?,?,?,?,?)",
                [(r.image_id, r.stored_path, r.width, r.height, r.size, r.mtime_ns, json.dumps(r.metadata))
                 for r in self.images.values()],
            )
            db.executemany("INSERT INTO regions VALUES (?,?,?,?,?,?,?,?)", self._region_rows())
            db.executemany("INSERT INTO skipped VALUES (?,?)", skipped)
        # the connection context manager commits; close explicitly so the file is complete
        db.close()

    def _region_rows(self):
        """The regions table's rows, converted a block at a time (no collection-sized Python lists)."""
        for start in range(0, len(self.levels), _ROW_BLOCK):
            stop = min(len(self.levels), start + _ROW_BLOCK)
            yield from zip(range(start, stop), self.region_image[start:stop].tolist(),
                           self.levels[start:stop].tolist(), self.parents[start:stop].tolist(),
                           *self.boxes[start:stop].T.tolist())

    @classmethod
    def read_catalog(cls, path: Path, vectors: np.ndarray, *, records_only: bool = False,
                     root: str | None = None) -> tuple[Snapshot, list[tuple[str, str]]]:
        """Read a catalog written by :meth:`write_catalog` with its (n_regions, dim) vectors.

        ``records_only``: the regions live in an external store (Qdrant); only images are read.
        ``root``: the collection root recorded in the manifest; relative rows are resolved
        against it (see :func:`himir_rag.paths.resolve_stored`).
        """
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            images, resolve = {}, stored_resolver(root)
            for row in db.execute("SELECT * FROM images ORDER BY image_id"):
                absolute, relpath = resolve(row[1])
                images[row[0]] = ImageRecord(row[0], absolute, row[2], row[3], row[4], row[5], json.loads(row[6]),
                                             relpath)
            rows = _read_region_rows(db)
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
        starts, owners = self.image_starts[:-1], self.image_ids  # cached: the first search reuses them
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


def _read_region_rows(db: sqlite3.Connection) -> np.ndarray:
    """(n_regions, 8) int64 rows of the regions table, fetched in blocks into one array."""
    (count,) = db.execute("SELECT COUNT(*) FROM regions").fetchone()
    rows = np.empty((count, 8), np.int64)
    cursor = db.execute("SELECT * FROM regions ORDER BY row")
    filled = 0
    while True:
        block = cursor.fetchmany(_ROW_BLOCK)
        if not block:
            break
        if filled + len(block) > count:
            raise ValueError("the regions table changed while it was read")
        rows[filled : filled + len(block)] = block
        filled += len(block)
    return rows[:filled]


_SCHEMA = """
CREATE TABLE images (image_id INTEGER PRIMARY KEY, path TEXT NOT NULL UNIQUE, width INTEGER, height INTEGER,
                     size INTEGER, mtime_ns INTEGER, metadata TEXT NOT NULL);
CREATE TABLE regions (row INTEGER PRIMARY KEY, image_id INTEGER NOT NULL, level INTEGER NOT NULL,
                      parent INTEGER NOT NULL, x0 INTEGER, y0 INTEGER, x1 INTEGER, y1 INTEGER);
CREATE TABLE skipped (path TEXT NOT NULL, reason TEXT NOT NULL);
"""

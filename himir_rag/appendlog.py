"""The append-only files of a saved index (format 2): what a save appends and a load maps.

A format-2 version directory holds, beside ``manifest.json`` and the candidate stores::

    vectors.bin       (rows, dim) raw float32 / float16 region vectors, C order
    region_image.i64  (rows,) int64 image id of each row
    regions.i32       (rows, 6) int32 per row: level, parent (row within its image, -1 for
                      the global view), x0, y0, x1, y1
    images.jsonl      one JSON array a line: [id, stored path, width, height, size, mtime_ns,
                      metadata] adds an image or replaces its record; [id] deletes it
    skipped.json      [[path, reason], ...] the skipped-file report (rewritten by every save)

The first four are *append-only*. A save hard-links them from the live version into the new
one and appends what changed since (new rows, new or changed records, deletions); the bytes a
published version reads (its manifest's ``appended`` sizes) are never modified afterwards,
so every older version sharing the files still reads exactly what it published, and removing
an old version only drops its links. Before appending, a save truncates the files back to
the live version's sizes (what a killed or failed save may have left beyond them). Rows of
deleted images stay in the files until a full rewrite (:func:`write_full`: the first save,
``compact``, or a save once dead rows pass :data:`COMPACT_SHARE` of the rows); a load then
copies the live rows (without deletes it memory-maps ``vectors.bin``, no copy).

Nothing here is unpickled: raw little-endian arrays and JSON only.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from himir_rag.catalog import ImageRecord, Snapshot, run_starts
from himir_rag.errors import ConfigError, IndexFormatError
from himir_rag.manifest import (APPENDED_FILES, RECORDS, REGION_COLUMNS, REGION_IMAGE, REGIONS, VECTORS,
                                row_file_sizes)
from himir_rag.paths import stored_resolver

__all__ = ["LogState", "VECTORS", "REGION_IMAGE", "REGIONS", "RECORDS", "SKIPPED", "APPENDED_FILES",
           "COMPACT_SHARE", "write_full", "write_appended", "read_version", "row_bytes"]

SKIPPED = "skipped.json"
COMPACT_SHARE = 0.25  # a save rewrites everything once rows of deleted images pass this share of the rows
_BLOCK_ROWS = 65_536  # rows written per step (bounded temporary memory)


@dataclass(frozen=True)
class LogState:
    """What the append-only files of one published version hold (the base of the next append).

    Attributes
    ----------
    chain : str
        Random id of the files (a full rewrite starts a new chain).
    dtype, dim : np.dtype, int
        Vector storage type and dimension.
    rows : int
        Rows in the files, deleted images' rows included.
    records_bytes : int
        Bytes of ``images.jsonl`` the version reads.
    image_ids, image_rows : np.ndarray
        (n_file_images,) int64 ids in row order and their row counts, deleted images included.
    deleted : np.ndarray
        Sorted int64 ids of deleted images whose rows are still in the files.
    records : dict[int, ImageRecord]
        The records as saved (the saved snapshot's ``images``).
    max_id : int
        The largest image id the files ever held.
    """

    chain: str
    dtype: np.dtype
    dim: int
    rows: int
    records_bytes: int
    image_ids: np.ndarray
    image_rows: np.ndarray
    deleted: np.ndarray
    records: dict[int, ImageRecord]
    max_id: int

    @property
    def dead_rows(self) -> int:
        """Rows of deleted images still in the files."""
        return int(self.image_rows[np.isin(self.image_ids, self.deleted)].sum())

    def sizes(self) -> dict[str, int]:
        """The ``appended`` field of the manifest: bytes of each file this version reads."""
        return {**row_file_sizes(self.rows, np.dtype(self.dtype).itemsize, self.dim), RECORDS: self.records_bytes}


def row_bytes(dtype: Any, dim: int) -> int:
    """Bytes of one vector row."""
    return np.dtype(dtype).itemsize * int(dim)


def write_full(target: Path, snapshot: Snapshot, *, skipped: list[tuple[str, str]], fsync: Any) -> LogState:
    """Write the files of a new chain holding exactly ``snapshot`` (regions-less for an external store)."""
    chain = uuid.uuid4().hex[:16]
    for name in APPENDED_FILES:
        (target / name).touch()
    empty = LogState(chain, snapshot.vectors.dtype, snapshot.dim, 0, 0, np.zeros(0, np.int64), np.zeros(0, np.int64),
                     np.zeros(0, np.int64), {}, 0)
    return _append(target, empty, snapshot, kept=0, gone=np.zeros(0, np.int64),
                   changed=list(snapshot.images.values()), skipped=skipped, fsync=fsync)


def write_appended(target: Path, source: Path, state: LogState, snapshot: Snapshot, *,
                   skipped: list[tuple[str, str]], fsync: Any) -> LogState | None:
    """Link the files of the version ``source`` (which ``state`` describes) into ``target`` and append
    what ``snapshot`` adds to them; None when ``snapshot`` is not ``state`` plus appends and deletes
    (the caller then writes in full)."""
    plan = _plan(state, snapshot)
    if plan is None:
        return None
    kept, gone, changed = plan
    dead = state.dead_rows + int(state.image_rows[np.isin(state.image_ids, gone)].sum())
    rows = state.rows + len(snapshot.levels) - (int(snapshot.image_starts[kept]) if len(snapshot.levels) else 0)
    if dead > COMPACT_SHARE * max(rows, 1):
        return None  # deleted photos' rows would pass the share: rewrite (compact) instead
    for name in APPENDED_FILES:
        try:
            os.link(source / name, target / name)
        except OSError:  # no hard links here (some network or FAT file systems): write in full
            for linked in APPENDED_FILES:
                (target / linked).unlink(missing_ok=True)
            return None
    for name, size in state.sizes().items():
        if (target / name).stat().st_size < size:
            raise IndexFormatError(f"{source / name}: shorter than the live version says; compact the index")
        os.truncate(target / name, size)  # drop what a killed or failed save appended after them
    return _append(target, state, snapshot, kept=kept, gone=gone, changed=changed, skipped=skipped, fsync=fsync)


def _plan(state: LogState, snapshot: Snapshot) -> tuple[int, np.ndarray, list[ImageRecord]] | None:
    """(images of ``snapshot`` already in the files, ids deleted since, records added or changed) when
    ``snapshot`` is ``state`` with images deleted and new ones appended after; else None."""
    if snapshot.vectors.dtype != state.dtype or snapshot.dim != state.dim or (
            len(snapshot) and not len(snapshot.levels)):  # regions-less (external store): rewrite the records
        return None
    ids = snapshot.image_ids
    alive = state.image_ids[~np.isin(state.image_ids, state.deleted)]
    on_file = np.isin(ids, alive)
    kept = int(on_file.sum())
    if not on_file[:kept].all() or not np.array_equal(ids[:kept], alive[np.isin(alive, ids[:kept])]):
        return None
    if kept < len(ids) and int(ids[kept:].min()) <= state.max_id:
        return None  # an id the files held before (never reused by an index; a hand-made snapshot may)
    gone = alive[~np.isin(alive, ids[:kept])]
    changed = []
    for image_id, record in snapshot.images.items():
        saved = state.records.get(image_id)
        if saved is not record and saved != record:
            changed.append(record)
    return kept, gone, changed


def _append(target: Path, state: LogState, snapshot: Snapshot, *, kept: int, gone: np.ndarray,
            changed: list[ImageRecord], skipped: list[tuple[str, str]], fsync: Any) -> LogState:
    """Append the rows of ``snapshot``'s images from position ``kept`` on, ``changed`` records and
    tombstones of ``gone``; write ``skipped.json``; return the state of the files now."""
    start = int(snapshot.image_starts[kept]) if len(snapshot.levels) else 0
    stop = len(snapshot.levels)
    with open(target / VECTORS, "ab") as vec_fh, open(target / REGION_IMAGE, "ab") as img_fh, \
            open(target / REGIONS, "ab") as reg_fh:
        for block in range(start, stop, _BLOCK_ROWS):
            rows = slice(block, min(stop, block + _BLOCK_ROWS))
            vec_fh.write(np.ascontiguousarray(snapshot.vectors[rows], dtype=state.dtype.newbyteorder("<")).tobytes())
            img_fh.write(np.ascontiguousarray(snapshot.region_image[rows], dtype="<i8").tobytes())
            reg_fh.write(_region_columns(snapshot, rows).tobytes())
        for fh in (vec_fh, img_fh, reg_fh):
            fsync(fh)
    lines = b"".join(_record_line(record) for record in changed)
    lines += b"".join(json.dumps([int(image_id)]).encode() + b"\n" for image_id in gone.tolist())
    with open(target / RECORDS, "ab") as fh:
        fh.write(lines)
        fsync(fh)
    with open(target / SKIPPED, "w", encoding="utf-8") as fh:
        json.dump([list(item) for item in skipped], fh)
        fsync(fh)
    new_ids = snapshot.image_ids[kept:] if len(snapshot.levels) else np.zeros(0, np.int64)
    starts = snapshot.image_starts[kept:] if len(snapshot.levels) else np.zeros(1, np.int64)
    return replace(state, rows=state.rows + stop - start, records_bytes=state.records_bytes + len(lines),
                   image_ids=np.concatenate([state.image_ids, new_ids]),
                   image_rows=np.concatenate([state.image_rows, np.diff(starts)]),
                   deleted=np.union1d(state.deleted, gone).astype(np.int64), records=snapshot.images,
                   max_id=max(state.max_id, max(snapshot.images, default=0)))


def _region_columns(snapshot: Snapshot, rows: slice) -> np.ndarray:
    """(n, 6) little-endian int32 level, parent within the image, box of ``rows``."""
    image_start = snapshot.image_starts[np.searchsorted(snapshot.image_starts, np.arange(rows.start, rows.stop),
                                                        side="right") - 1]
    parents = snapshot.parents[rows]
    local = np.where(parents >= 0, parents - image_start, -1)
    columns = np.column_stack([snapshot.levels[rows].astype(np.int64), local, snapshot.boxes[rows]])
    return np.ascontiguousarray(columns, dtype="<i4")


def _record_line(record: ImageRecord) -> bytes:
    values = [record.image_id, record.stored_path, record.width, record.height, record.size, record.mtime_ns,
              record.metadata]
    try:
        text = json.dumps(values, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{record.path}: its metadata is not JSON data ({exc}); fix it with update_metadata "
                          "and save again") from None
    return text.encode("utf-8") + b"\n"


# -- reading -----------------------------------------------------------------------------------------
def read_version(version_dir: Path, *, chain: str, sizes: dict[str, int], dim: int, dtype: Any,
                 root: str | None, records_only: bool = False) -> tuple[Snapshot, list[tuple[str, str]], LogState]:
    """Read a format-2 version whose ``sizes`` (the manifest's ``appended``) the schema has checked.

    Returns the snapshot (vectors memory-mapped when nothing was deleted, copied otherwise),
    the skipped-file report and the state of the files (the base of the next append).
    ``records_only``: the regions live in an external store (no region rows).

    Raises
    ------
    ValueError
        Malformed records or region rows (the caller reports the file).
    """
    rows = sizes[VECTORS] // row_bytes(dtype, dim)
    vectors = (np.memmap(version_dir / VECTORS, dtype=np.dtype(dtype).newbyteorder("<"), mode="r",
                         shape=(rows, dim)) if rows else np.zeros((0, dim), dtype))
    region_image = np.fromfile(version_dir / REGION_IMAGE, dtype="<i8", count=rows).astype(np.int64, copy=False)
    columns = np.fromfile(version_dir / REGIONS, dtype="<i4", count=rows * REGION_COLUMNS).reshape(rows, REGION_COLUMNS)
    if len(region_image) != rows or len(columns) != rows:
        raise ValueError("the region files are shorter than the manifest says")
    records, deleted, max_id = _replay(_read_prefix(version_dir / RECORDS, sizes[RECORDS]), root)
    file_starts = run_starts(region_image)
    state = LogState(chain, np.dtype(dtype), dim, rows, sizes[RECORDS], region_image[file_starts[:-1]].copy(),
                     np.diff(file_starts), np.asarray(sorted(deleted), np.int64), records, max_id)
    if len(state.deleted):  # rows of deleted images: the live rows are copied out
        keep = ~np.isin(region_image, state.deleted)
        vectors, region_image, columns = np.ascontiguousarray(vectors[keep]), region_image[keep], columns[keep]
    starts = run_starts(region_image) if len(state.deleted) else file_starts
    image_start = np.repeat(starts[:-1], np.diff(starts))
    local = columns[:, 1].astype(np.int64)
    parents = np.where(local >= 0, local + image_start, -1)
    snapshot = Snapshot(records, vectors, region_image, columns[:, 0].astype(np.int8), parents,
                        np.ascontiguousarray(columns[:, 2:], dtype=np.int32))
    if not records_only:
        snapshot.check_integrity()
    skipped = _read_skipped(version_dir / SKIPPED)
    return snapshot, skipped, state  # the snapshot holds state.records itself


def _read_prefix(path: Path, size: int) -> bytes:
    with open(path, "rb") as fh:
        data = fh.read(size)
    if len(data) != size or (data and not data.endswith(b"\n")):
        raise ValueError(f"{path.name} does not end on a whole record")
    return data


def _replay(data: bytes, root: str | None) -> tuple[dict[int, ImageRecord], set[int], int]:
    """The records, deleted ids and largest id of an ``images.jsonl`` prefix, replayed in order."""
    entries = json.loads(b"[" + data.rstrip(b"\n").replace(b"\n", b",") + b"]") if data else []
    records: dict[int, ImageRecord] = {}
    deleted: set[int] = set()
    max_id = 0
    resolve = stored_resolver(root)
    for entry in entries:
        if not (isinstance(entry, list) and len(entry) in (1, 7) and type(entry[0]) is int and entry[0] >= 1):
            raise ValueError(f"malformed record {str(entry)[:80]}")
        image_id = entry[0]
        max_id = max(max_id, image_id)
        if len(entry) == 1:
            records.pop(image_id, None)
            deleted.add(image_id)
            continue
        if not isinstance(entry[1], str):
            raise ValueError(f"image {image_id}: its path is not a string")
        absolute, relpath = resolve(entry[1])
        records[image_id] = ImageRecord(image_id, absolute, *entry[2:6], entry[6], relpath)
    return records, deleted, max_id


def _read_skipped(path: Path) -> list[tuple[str, str]]:
    entries = json.loads(path.read_text(encoding="utf-8"))
    if not (isinstance(entries, list) and all(isinstance(e, list) and len(e) == 2
                                              and all(isinstance(v, str) for v in e) for e in entries)):
        raise ValueError("skipped.json must be a list of [path, reason]")
    return [(path_text, reason) for path_text, reason in entries]

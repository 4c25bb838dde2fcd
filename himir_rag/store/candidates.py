"""Candidate stores: per-level ANN indexes over region vectors, keyed by image id.

The scheduler asks them which regions are close to a sub-query; it then re-ranks the
images holding them exactly from the snapshot's vectors, so the stores may be compressed
(IVF-PQ fast-scan) and only need to find the right regions, not score them.

A stored vector's id is its *region key*: ``image_id << 16 | local index`` (the region's
row within its image). Keys survive deletes that renumber rows, and :meth:`CandidateStores.locate`
turns a hit back into the image's position and the region's row in any snapshot holding
the image, so a hit's exact similarity costs one dot product.

The stores belong to the index, not to one snapshot: an add or delete updates them
incrementally (new image ids added, removed ones deleted), they are written by
``HiMIRIndex.save`` and read back by ``load``, and they are rebuilt (retrained) only
when their kind changes or the level has grown 4x since they were trained.

On disk an IVF store is a *base* file plus *delta* files (``...level2.ivfpq.delta3.faiss``):
a save onto the version the stores came from hard-links its files and writes one delta
holding only the images added since (encoded by the base's quantizer, which the delta file
leaves out, so a load merges it in with FAISS's ``merge_from``, no re-encoding); deleted images stay in the files and are removed
after loading. Once the deltas hold :data:`DELTA_SHARE` of the base's vectors (or there are
:data:`MAX_DELTAS`), or the store was rebuilt, the next save writes it whole. Flat stores
(at most ``flat_max`` vectors) are always written whole. Hits are
image ids, so a search on a slightly older snapshot simply drops ids it does not hold.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import threading
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from himir_rag.errors import IndexFormatError
from himir_rag.hierarchy import Level
from himir_rag.store.base import KEY_SHIFT, locate, region_keys
from himir_rag.store.faiss import (FLAT_MAX, INDEX_KINDS, PQ_MIN, FaissStore, auto_index_kind, ivf_nlist,
                                   pq_subquantizers, search_cost, training_rows)

__all__ = ["CandidateStores"]

logger = logging.getLogger(__name__)

_ADD_BLOCK = 65_536  # rows converted to float32 and added per step (bounded temporary memory)
_RETRAIN_GROWTH = 4.0
DELTA_SHARE = 0.25  # a store is written whole again once its delta files hold this share of its base file
MAX_DELTAS = 64  # ...or this many delta files
_FILE_PREFIX = "candidates-v2.level"  # v1 ("candidates.level") stored image ids: ignored, rebuilt on first search


class CandidateStores:
    """ANN stores of some levels of one collection (see module docstring).

    Parameters
    ----------
    dim : int
        Vector dimension.
    threads : int
        OpenMP threads for searches.
    scan_workers : int
        Threads a large IVF search splits its lists over (:attr:`FaissStore.scan_workers
        <himir_rag.store.faiss.FaissStore>`); the index sets it from ``HiMIRConfig.scan_workers``.
    """

    def __init__(self, dim: int, *, threads: int = 1, scan_workers: int = 1) -> None:
        self.dim, self.threads, self.scan_workers = dim, threads, scan_workers
        self._stores: dict[Level, FaissStore] = {}
        self._trained_size: dict[Level, int] = {}
        self._images = np.zeros(0, np.int64)  # sorted image ids the stores hold
        self._span = 0  # 1 + the largest local region index stored (bounds the keys of an image)
        self._synced: weakref.ref | None = None
        self._lock = threading.RLock()
        self._saved: dict[Level, _SavedFiles] = {}  # the files of the live saved version, per level
        self._unpublished: dict[Level, _SavedFiles] = {}  # those of the last save, until mark_saved

    def kind_for(self, n_level: int, *, index_kind: str = "auto", flat_max: int = FLAT_MAX, pq_min: int = PQ_MIN) -> str:
        """The store kind used for a level of ``n_level`` vectors."""
        if index_kind != "auto":
            if n_level < 64:  # too few vectors to train IVF lists or PQ codebooks
                return "flat"
            return "ivf" if index_kind == "ivfpq" and not pq_subquantizers(self.dim) else index_kind
        return auto_index_kind(n_level, dim=self.dim, flat_max=flat_max, pq_min=pq_min)

    def estimate_cost(self, kind: str, n_level: int, *, probe_share: float, nprobe: int = 0) -> float:
        """Inner products one sub-query costs at a level of ``n_level`` vectors (before it is built)."""
        nlist = ivf_nlist(n_level, kind)
        return search_cost(kind, n_level, dim=self.dim, nlist=nlist,
                           nprobe=self.nprobe_for(nlist, probe_share=probe_share, nprobe=nprobe),
                           subquantizers=pq_subquantizers(self.dim, n_level))

    @staticmethod
    def nprobe_for(n_lists: int, *, probe_share: float, nprobe: int = 0) -> int:
        """Lists to probe: ``nprobe`` when set, else ``probe_share`` of ``n_lists`` (at least 1)."""
        if nprobe > 0:
            return nprobe
        return max(1, int(math.ceil(probe_share * n_lists)))

    def store(self, level: Level) -> FaissStore | None:
        """The store of ``level``, or None when it was never built."""
        return self._stores.get(Level(level))

    def sync(self, snapshot, levels: Iterable[Level], *, index_kind: str = "auto", flat_max: int = FLAT_MAX,
             pq_min: int = PQ_MIN, retrain_codes: bool = False) -> None:
        """Make the stores of ``levels`` (and every store already built) hold exactly ``snapshot``'s images.

        ``retrain_codes`` also rebuilds IVF stores this version would build otherwise
        (:meth:`~himir_rag.store.faiss.FaissStore.is_current`: IVF-PQ codes, IVF-Flat list counts; e.g.
        stores saved by an older version, or an IVF-Flat level grown since training):
        ``HiMIRIndex.compact`` asks for it, a search never does (it would retrain at query time).
        """
        levels = {Level(lv) for lv in levels}
        counts = snapshot.level_counts()
        with self._lock:
            kinds = {level: self.kind_for(counts[level.name.lower()], index_kind=index_kind, flat_max=flat_max,
                                          pq_min=pq_min) for level in levels | set(self._stores)}
            in_sync = self._synced is not None and self._synced() is snapshot
            if in_sync and not retrain_codes and \
                    all(lv in self._stores and self._stores[lv].kind == kinds[lv] for lv in levels):
                return  # same snapshot, and the requested levels already have the kind these settings ask for
            current = np.sort(snapshot.image_ids)
            removed = np.setdiff1d(self._images, current, assume_unique=True)
            added = np.setdiff1d(current, self._images, assume_unique=True)
            for level, kind in kinds.items():
                n_level = counts[level.name.lower()]
                store = self._stores.get(level)
                if store is None or store.kind != kind or self._outgrown(level, n_level) or \
                        (retrain_codes and not store.is_current(n_level)):
                    self._build(snapshot, level, kind)
                else:
                    store.remove(self._keys_of(removed))
                    self._add_rows(store, snapshot, level, snapshot.positions_of(added))
            self._images = current
            self._synced = weakref.ref(snapshot)

    def _outgrown(self, level: Level, n_level: int) -> bool:
        """An IVF store whose level has grown 4x since training needs more lists (flat stores never do)."""
        return self._stores[level].kind != "flat" and n_level > _RETRAIN_GROWTH * max(self._trained_size[level], 1)

    def _build(self, snapshot, level: Level, kind: str) -> None:
        rows_all = np.flatnonzero(snapshot.levels == level)
        store = FaissStore(self.dim, kind=kind, threads=self.threads,
                           subquantizers=pq_subquantizers(self.dim, len(rows_all)) if kind == "ivfpq" else None)
        if kind != "flat" and len(rows_all):
            store.nlist = ivf_nlist(len(rows_all), kind)
            # sample the rows first: only the training sample is converted to float32
            store.train(snapshot.region_vectors(rows_all[training_rows(len(rows_all), store.nlist)]))
        for start in range(0, len(rows_all), _ADD_BLOCK):
            rows = rows_all[start : start + _ADD_BLOCK]
            store.add(self._region_keys(snapshot, rows), snapshot.region_vectors(rows))
        logger.info("built the %s candidate store of level %s (%d vectors)", kind, level.name.lower(), len(rows_all))
        self._stores[level] = store
        self._trained_size[level] = len(rows_all)

    def search(self, level: Level, queries: np.ndarray, k: int, *, probe_share: float = 1.0,
               nprobe: int = 0, list_ranking: str = "auto") -> tuple[np.ndarray, np.ndarray, int, bool]:
        """The top-``k`` regions of ``level`` per query, probing ``probe_share`` of the store's own lists
        (a store trained at a smaller size keeps its list count until it is retrained), picked by
        ``list_ranking`` (:attr:`FaissStore.list_ranking <himir_rag.store.faiss.FaissStore>`).

        Returns
        -------
        scores, keys : np.ndarray
            (q, k) similarities and region keys (see :meth:`locate`), padded with -inf / -1.
        inner_products : int
            What the search cost.
        exact_scores : bool
            True when ``scores`` are exact inner products (flat and IVF-Flat; PQ scores are estimates).
        """
        store = self._stores[Level(level)]
        store.nprobe = self.nprobe_for(store.lists, probe_share=probe_share, nprobe=nprobe)
        store.scan_workers, store.list_ranking = self.scan_workers, list_ranking
        before = store.distance_computations
        scores, ids = store.search(queries, k)
        return scores, ids, store.distance_computations - before, store.kind in ("flat", "ivf")

    @staticmethod
    def locate(snapshot, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Image positions and rows in ``snapshot`` of region ``keys``: see :func:`himir_rag.store.base.locate`."""
        return locate(snapshot, keys)

    def _region_keys(self, snapshot, rows: np.ndarray) -> np.ndarray:
        """Region keys of snapshot ``rows``."""
        images = snapshot.region_image[rows]
        local = rows - snapshot.image_starts[np.searchsorted(snapshot.image_starts, rows, side="right") - 1]
        keys = region_keys(images, local)
        if len(local):
            self._span = max(self._span, int(local.max()) + 1)
        return keys

    def _keys_of(self, image_ids: np.ndarray) -> np.ndarray:
        """Every region key the stores may hold for ``image_ids``."""
        return ((np.asarray(image_ids, np.int64)[:, None] << KEY_SHIFT) + np.arange(self._span)).ravel()

    def _add_rows(self, store: FaissStore, snapshot, level: Level, positions: np.ndarray) -> None:
        """Add the ``level`` rows of the images at ``positions`` to ``store``, in blocks."""
        positions = positions[positions >= 0]
        for start in range(0, len(positions), _ADD_BLOCK // 16):
            rows = snapshot.rows_of(np.sort(positions[start : start + _ADD_BLOCK // 16]))
            rows = rows[snapshot.levels[rows] == level]
            store.add(self._region_keys(snapshot, rows), snapshot.region_vectors(rows))

    # -- persistence -------------------------------------------------------------------------------
    def save(self, directory: Path, snapshot, *, previous: Path | None = None) -> list[str]:
        """Write the stores in sync with ``snapshot`` into ``directory``; returns the file names.

        With ``previous`` (the live version this index's stores were last saved to or loaded
        from), an IVF store not rebuilt since links that version's files and adds one delta
        file holding only the images added since (see the module docstring); otherwise, and
        once its deltas pass :data:`DELTA_SHARE` of its base file, the store is written whole.
        Call :meth:`mark_saved` once the version is published.
        """
        names = []
        with self._lock:
            if self._synced is None or self._synced() is not snapshot:
                self.sync(snapshot, list(self._stores))
            self._unpublished = {}
            for level, store in sorted(self._stores.items()):
                if not (len(store) or store.kind == "flat"):
                    continue
                saved = self._with_delta(directory, snapshot, level, store, previous)
                if saved is None:
                    base = f"{_FILE_PREFIX}{int(level)}.{store.kind}.faiss"
                    store.save(directory / base)
                    saved = _SavedFiles(store, "", base, (), self._images.copy(), len(store), 0)
                self._unpublished[level] = saved
                names.extend((saved.base, *saved.deltas))
        return names

    def mark_saved(self, version_dir: Path) -> None:
        """The version the last :meth:`save` wrote is published at ``version_dir``: later saves may link it."""
        with self._lock:
            version = os.path.realpath(version_dir)
            self._saved = {level: dataclasses.replace(saved, version=version)
                           for level, saved in self._unpublished.items()}
            self._unpublished = {}

    def _with_delta(self, directory: Path, snapshot, level: Level, store: FaissStore,
                    previous: Path | None) -> _SavedFiles | None:
        """Link ``previous``'s files of ``level`` and write the images added since as a delta file; None
        when the store must be written whole (no such files, rebuilt since, flat, or deltas too large)."""
        saved = self._saved.get(level)
        if previous is None or saved is None or saved.store is not store or store.kind == "flat" or \
                saved.version != os.path.realpath(previous) or len(saved.deltas) >= MAX_DELTAS:
            return None
        added = snapshot.positions_of(np.setdiff1d(self._images, saved.images, assume_unique=True))
        delta = None
        if len(added):  # an empty copy clones the store's lists: only made when there is something to add
            delta = store.empty_copy()
            self._add_rows(delta, snapshot, level, added)
        new_vectors = len(delta) if delta is not None else 0
        if saved.delta_vectors + new_vectors > DELTA_SHARE * max(saved.base_vectors, 1):
            return None
        names = (saved.base, *saved.deltas)
        try:
            for name in names:
                os.link(previous / name, directory / name)
        except OSError:  # no hard links on this file system: write whole
            for name in names:
                (directory / name).unlink(missing_ok=True)
            return None
        deltas = saved.deltas
        if new_vectors:
            deltas += (f"{_FILE_PREFIX}{int(level)}.{store.kind}.delta{len(saved.deltas) + 1}.faiss",)
            delta.save_delta(directory / deltas[-1])
        return _SavedFiles(store, "", saved.base, deltas, self._images.copy(), saved.base_vectors,
                           saved.delta_vectors + new_vectors)

    @classmethod
    def load(cls, directory: Path, snapshot, *, threads: int = 1) -> CandidateStores:
        """Read the stores written by :meth:`save` (each base file with its deltas merged in), drop the
        images deleted since they were written; counts that disagree with the catalog raise IndexFormatError."""
        stores = cls(snapshot.dim, threads=threads)
        held = [np.zeros(0, np.int64)]
        for level, (kind, base, deltas) in _store_files(directory).items():
            store = FaissStore.load(base, dim=snapshot.dim, kind=kind, threads=threads)
            base_vectors = len(store)
            for delta in deltas:
                try:
                    store.merge(FaissStore.load(delta, dim=snapshot.dim, kind=kind, threads=threads))
                except RuntimeError as exc:  # FAISS refuses a delta trained otherwise
                    raise IndexFormatError(f"{delta}: does not fit {base.name} ({exc}); rebuild the index") from exc
            keys = store.ids()
            images = _distinct(keys >> KEY_SHIFT)
            stores._span = max(stores._span, int((keys & ((1 << KEY_SHIFT) - 1)).max(initial=-1)) + 1)
            stores._stores[level], stores._trained_size[level] = store, base_vectors
            stores._saved[level] = _SavedFiles(store, os.path.realpath(directory), base.name,
                                               tuple(d.name for d in deltas), images, base_vectors,
                                               len(store) - base_vectors)
            held.append(images)
        stores._reconcile(snapshot, _distinct(np.concatenate(held)))
        counts = snapshot.level_counts()
        for level, store in stores._stores.items():
            if len(store) != counts[level.name.lower()]:
                raise IndexFormatError(f"{directory}: the {level.name.lower()} candidate store holds {len(store)} "
                                       f"vectors, the catalog has {counts[level.name.lower()]}; the index is damaged, "
                                       "rebuild it")
        return stores

    def _reconcile(self, snapshot, held: np.ndarray) -> None:
        """Stores just read hold the images ``held``: remove those ``snapshot`` lacks, add those it has more."""
        current = np.sort(snapshot.image_ids)
        self._span = max(self._span, int(np.diff(snapshot.image_starts).max(initial=0)))
        removed = np.setdiff1d(held, current, assume_unique=True)
        added = snapshot.positions_of(np.setdiff1d(current, held, assume_unique=True))
        for level, store in self._stores.items():
            store.remove(self._keys_of(removed))
            self._add_rows(store, snapshot, level, added)
        self._images = current
        self._synced = weakref.ref(snapshot)


@dataclass(frozen=True)
class _SavedFiles:
    """The files of one level's store in a saved version: a whole ``base`` and ``deltas`` added since."""

    store: FaissStore  # the in-memory store they were written from (a rebuilt store writes a new base)
    version: str  # real path of the published version holding them ("" until published)
    base: str
    deltas: tuple[str, ...]
    images: np.ndarray  # sorted ids of the images the files hold (deleted ones included)
    base_vectors: int
    delta_vectors: int


def _distinct(ids: np.ndarray) -> np.ndarray:
    """Sorted distinct non-negative ``ids``; a scatter into a mask when they are dense (10x faster than np.unique)."""
    if len(ids) == 0:
        return np.zeros(0, np.int64)
    top = int(ids.max())
    if int(ids.min()) < 0 or top > 4 * len(ids) + (1 << 20):
        return np.unique(ids)
    seen = np.zeros(top + 1, bool)
    seen[ids] = True
    return np.flatnonzero(seen).astype(np.int64)


def _store_files(directory: Path) -> dict[Level, tuple[str, Path, list[Path]]]:
    """``{level: (kind, base file, delta files in order)}`` of the candidate store files in ``directory``."""
    found: dict[Level, tuple[str, Path, list[tuple[int, Path]]]] = {}
    deltas = []
    for path in sorted(directory.glob(f"{_FILE_PREFIX}*.faiss")):
        parts = path.name.removeprefix(_FILE_PREFIX).removesuffix(".faiss").split(".")
        number = parts[2].removeprefix("delta") if len(parts) == 3 and parts[2].startswith("delta") else ""
        if not (len(parts) in (2, 3) and parts[0].isdigit() and int(parts[0]) in {int(lv) for lv in Level}
                and parts[1] in INDEX_KINDS and (len(parts) == 2 or number.isdigit())):
            raise IndexFormatError(f"{path}: unexpected candidate store name; the index directory is damaged")
        if len(parts) == 2:
            found[Level(int(parts[0]))] = (parts[1], path, [])
        else:
            deltas.append((Level(int(parts[0])), parts[1], int(number), path))
    for level, kind, number, path in deltas:
        if level not in found or found[level][0] != kind:
            raise IndexFormatError(f"{path}: a delta without its base file; the index directory is damaged")
        found[level][2].append((number, path))
    return {level: (kind, base, [p for _, p in sorted(items)]) for level, (kind, base, items) in found.items()}

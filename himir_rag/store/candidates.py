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
when their kind changes or the level has grown 4x since they were trained. Hits are
image ids, so a search on a slightly older snapshot simply drops ids it does not hold.
"""

from __future__ import annotations

import logging
import math
import threading
import weakref
from collections.abc import Iterable
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
_FILE_PREFIX = "candidates-v2.level"  # v1 ("candidates.level") stored image ids: ignored, rebuilt on first search


class CandidateStores:
    """ANN stores of some levels of one collection (see module docstring).

    Parameters
    ----------
    dim : int
        Vector dimension.
    threads : int
        OpenMP threads for searches.
    """

    def __init__(self, dim: int, *, threads: int = 1) -> None:
        self.dim, self.threads = dim, threads
        self._stores: dict[Level, FaissStore] = {}
        self._trained_size: dict[Level, int] = {}
        self._images = np.zeros(0, np.int64)  # sorted image ids the stores hold
        self._span = 0  # 1 + the largest local region index stored (bounds the keys of an image)
        self._synced: weakref.ref | None = None
        self._lock = threading.RLock()

    def kind_for(self, n_level: int, *, index_kind: str = "auto", flat_max: int = FLAT_MAX, pq_min: int = PQ_MIN) -> str:
        """The store kind used for a level of ``n_level`` vectors."""
        if index_kind != "auto":
            if n_level < 64:  # too few vectors to train IVF lists or PQ codebooks
                return "flat"
            return "ivf" if index_kind == "ivfpq" and not pq_subquantizers(self.dim) else index_kind
        return auto_index_kind(n_level, dim=self.dim, flat_max=flat_max, pq_min=pq_min)

    def estimate_cost(self, kind: str, n_level: int, *, probe_share: float, nprobe: int = 0) -> float:
        """Inner products one sub-query costs at a level of ``n_level`` vectors (before it is built)."""
        nlist = ivf_nlist(n_level)
        return search_cost(kind, n_level, dim=self.dim, nlist=nlist,
                           nprobe=self.nprobe_for(nlist, probe_share=probe_share, nprobe=nprobe))

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
             pq_min: int = PQ_MIN) -> None:
        """Make the stores of ``levels`` (and every store already built) hold exactly ``snapshot``'s images."""
        levels = {Level(lv) for lv in levels}
        counts = snapshot.level_counts()
        with self._lock:
            kinds = {level: self.kind_for(counts[level.name.lower()], index_kind=index_kind, flat_max=flat_max,
                                          pq_min=pq_min) for level in levels | set(self._stores)}
            in_sync = self._synced is not None and self._synced() is snapshot
            if in_sync and all(lv in self._stores and self._stores[lv].kind == kinds[lv] for lv in levels):
                return  # same snapshot, and the requested levels already have the kind these settings ask for
            current = np.sort(snapshot.image_ids)
            removed = np.setdiff1d(self._images, current, assume_unique=True)
            added = np.setdiff1d(current, self._images, assume_unique=True)
            for level, kind in kinds.items():
                n_level = counts[level.name.lower()]
                store = self._stores.get(level)
                if store is None or store.kind != kind or self._outgrown(level, n_level):
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
        store = FaissStore(self.dim, kind=kind, threads=self.threads)
        if kind != "flat" and len(rows_all):
            store.nlist = ivf_nlist(len(rows_all))
            # sample the rows first: only the training sample is converted to float32
            store.train(snapshot.region_vectors(rows_all[training_rows(len(rows_all), store.nlist)]))
        for start in range(0, len(rows_all), _ADD_BLOCK):
            rows = rows_all[start : start + _ADD_BLOCK]
            store.add(self._region_keys(snapshot, rows), snapshot.region_vectors(rows))
        logger.info("built the %s candidate store of level %s (%d vectors)", kind, level.name.lower(), len(rows_all))
        self._stores[level] = store
        self._trained_size[level] = len(rows_all)

    def search(self, level: Level, queries: np.ndarray, k: int, *, probe_share: float = 1.0,
               nprobe: int = 0) -> tuple[np.ndarray, np.ndarray, int, bool]:
        """The top-``k`` regions of ``level`` per query, probing ``probe_share`` of the store's own lists
        (a store trained at a smaller size keeps its list count until it is retrained).

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
    def save(self, directory: Path, snapshot) -> list[str]:
        """Write the stores in sync with ``snapshot`` into ``directory``; returns the file names."""
        names = []
        with self._lock:
            if self._synced is None or self._synced() is not snapshot:
                self.sync(snapshot, list(self._stores))
            for level, store in sorted(self._stores.items()):
                if len(store) or store.kind == "flat":
                    name = f"{_FILE_PREFIX}{int(level)}.{store.kind}.faiss"
                    store.save(directory / name)
                    names.append(name)
        return names

    @classmethod
    def load(cls, directory: Path, snapshot, *, threads: int = 1) -> CandidateStores:
        """Read the stores written by :meth:`save`; counts that disagree with the catalog raise IndexFormatError."""
        stores = cls(snapshot.dim, threads=threads)
        counts = snapshot.level_counts()
        for path in sorted(directory.glob(f"{_FILE_PREFIX}*.faiss")):
            level_text, _, kind = path.name.removeprefix(_FILE_PREFIX).removesuffix(".faiss").partition(".")
            if not level_text.isdigit() or int(level_text) not in {int(lv) for lv in Level} or kind not in INDEX_KINDS:
                raise IndexFormatError(f"{path}: unexpected candidate store name; the index directory is damaged")
            level = Level(int(level_text))
            store = FaissStore.load(path, dim=snapshot.dim, kind=kind, threads=threads)
            if len(store) != counts[level.name.lower()]:
                raise IndexFormatError(f"{path}: holds {len(store)} vectors, the catalog has "
                                       f"{counts[level.name.lower()]}; the index is damaged, rebuild it")
            stores._stores[level] = store
            stores._trained_size[level] = len(store)
        stores._images = np.sort(snapshot.image_ids)
        stores._span = int(np.diff(snapshot.image_starts).max(initial=0))
        stores._synced = weakref.ref(snapshot)
        return stores

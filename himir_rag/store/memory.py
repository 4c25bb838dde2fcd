"""The default image store: region vectors in memory (a :class:`Snapshot`), candidates from FAISS.

Implements :class:`~himir_rag.store.base.ImageStore` over a snapshot and the index's
per-level FAISS :class:`~himir_rag.store.candidates.CandidateStores`. Reading costs no
copy: :meth:`MemoryStore.vectors` hands the scheduler the snapshot itself with the
candidates' positions, so a hit's row is a snapshot row. ``HiMIRIndex`` writes the
snapshot, the catalog and the candidate stores to its own directory (``index.py``);
this class is what its searches and the tuner read through.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from himir_rag.catalog import ImageRecord, Snapshot
from himir_rag.hierarchy import Level, RegionTree
from himir_rag.store.base import Candidates, RegionView

__all__ = ["MemoryStore"]


class MemoryStore:
    """Images of a :class:`Snapshot` with FAISS candidate stores (see module docstring).

    Parameters
    ----------
    snapshot : Snapshot
        The collection (its vectors float32 or float16; read as float32).
    candidate_stores : CandidateStores, optional
        The index's stores; default: new ones (built at the first candidate search).

    Example
    -------
    >>> store = MemoryStore(Snapshot.empty(4))
    >>> len(store), store.level_counts()["segment"]
    (0, 0)
    """

    in_memory = True
    applies_filters = False

    def __init__(self, snapshot: Snapshot, candidate_stores: Any = None) -> None:
        self.snapshot = snapshot
        self.dim = snapshot.dim
        self._stores = candidate_stores

    @property
    def candidate_stores(self) -> Any:
        """The per-level FAISS stores the candidates come from."""
        if self._stores is None:
            from himir_rag.store.candidates import CandidateStores

            self._stores = CandidateStores(self.dim)
        return self._stores

    def __len__(self) -> int:
        return len(self.snapshot)

    # -- writing ------------------------------------------------------------------------------------
    def add_images(self, records: list[ImageRecord], trees: list[RegionTree], vectors: list[np.ndarray]) -> None:
        """Append images (an id already stored is replaced); the candidate stores follow at the next search."""
        replaced = {r.image_id for r in records} & set(self.snapshot.images)
        self.snapshot = self.snapshot.without_images(replaced).with_images(records, trees, vectors)

    def delete_images(self, image_ids: list[int]) -> int:
        """Delete images by id; returns how many were stored."""
        present = {int(i) for i in image_ids} & set(self.snapshot.images)
        self.snapshot = self.snapshot.without_images(present)
        return len(present)

    def set_metadata(self, records: list[ImageRecord]) -> None:
        """Replace stored images' records (metadata)."""
        self.snapshot = self.snapshot.with_records(records)

    # -- reading ------------------------------------------------------------------------------------
    def records(self) -> Iterator[ImageRecord]:
        """Catalog records in the snapshot's order (ascending image id for an index's images)."""
        return iter(self.snapshot.images.values())

    def level_counts(self) -> dict[str, int]:
        """Stored regions per level (cached on the snapshot)."""
        return self.snapshot.level_counts()

    def _count(self, level: Level) -> int:
        return self.level_counts()[Level(level).name.lower()]

    def _kind(self, n_level: int, params: Any) -> str:
        return self.candidate_stores.kind_for(n_level, index_kind=params.index_kind, flat_max=params.flat_max,
                                              pq_min=params.pq_min)

    def candidate_cost(self, level: Level, params: Any) -> float:
        """Inner products of one sub-query's search of ``level``'s store, of the kind ``params`` pick."""
        n_level = self._count(level)
        kind = self._kind(n_level, params)
        return self.candidate_stores.estimate_cost(kind, n_level, probe_share=params.probe_share_for(n_level, kind),
                                                   nprobe=params.nprobe)

    def candidates(self, queries: np.ndarray, level: Level, k: int, *, params: Any,
                   allowed: np.ndarray | None = None, filters: Mapping[str, Any] | None = None) -> Candidates:
        """Top ``k`` regions of ``level`` per query (``pq_refine`` x as many from an IVF-PQ store); unfiltered.

        The store is brought in sync with the snapshot first (incremental after add/delete).
        """
        level = Level(level)
        stores = self.candidate_stores
        n_level = self._count(level)
        kind = self._kind(n_level, params)
        stores.sync(self.snapshot, [level], index_kind=params.index_kind, flat_max=params.flat_max,
                    pq_min=params.pq_min)
        wanted = min(k * (params.pq_refine if kind == "ivfpq" else 1), max(n_level, 1))
        scores, keys, cost, exact = stores.search(level, queries, wanted,
                                                  probe_share=params.probe_share_for(n_level, kind), nprobe=params.nprobe,
                                                  list_ranking=params.list_ranking)
        return Candidates(scores, keys, int(cost), exact=exact)

    def vectors(self, image_ids: np.ndarray) -> RegionView:
        """The snapshot itself, at the sorted positions of ``image_ids`` (no copy)."""
        positions = self.snapshot.positions_of(np.asarray(image_ids, np.int64))
        return RegionView(self.snapshot, np.sort(positions[positions >= 0]))

    def scan(self, allowed: np.ndarray | None = None, *, levels: Any = None) -> Iterator[RegionView]:
        """One view: the whole snapshot (``allowed``: at those images' positions; every level is in memory)."""
        yield RegionView(self.snapshot) if allowed is None else self.vectors(allowed)

    def describe(self) -> dict[str, Any]:
        """The manifest's store entry."""
        return {"kind": "faiss"}

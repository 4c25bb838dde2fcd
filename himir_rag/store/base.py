"""The store contracts: what every image store backend implements and the core types against.

Two layers:

- :class:`ImageStore` holds a collection's images: their catalog records, their region
  trees and region vectors. It *finds* candidates (per level, the regions closest to each
  sub-query, see :meth:`ImageStore.candidates`) and *returns* the candidates' region
  vectors (:meth:`ImageStore.vectors`); it never ranks images. Ranking is the
  scheduler's alone (:mod:`himir_rag.scheduler`), so every mode, every bound and every
  compute counter means the same on every backend. Backends: :class:`~himir_rag.store.memory.MemoryStore`
  (regions in memory, FAISS candidate stores; the default) and
  :class:`~himir_rag.store.qdrant.QdrantImageStore` (regions in Qdrant).
- :class:`VectorStore` is one inner-product index keyed by int64 ids (FAISS:
  :class:`~himir_rag.store.faiss.FaissStore`), the building block of the memory store's
  per-level candidate stores.

A region's *key* is ``image_id << KEY_SHIFT | local index`` (its row within its image's
tree); :func:`locate` turns keys back into positions and rows of a :class:`Snapshot` that
holds the image. Adding a backend = one file implementing :class:`ImageStore` + its entry
in ``tests/test_store_contract.py``'s parametrisation.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from himir_rag.catalog import ImageRecord, Snapshot
from himir_rag.hierarchy import Level, RegionTree

__all__ = ["VectorStore", "ImageStore", "Candidates", "RegionView", "KEY_SHIFT", "locate", "region_keys"]

KEY_SHIFT = 16  # region key = image id << KEY_SHIFT | the region's index within its image


@dataclass(frozen=True)
class Candidates:
    """What a candidate search of one level found, per sub-query.

    Attributes
    ----------
    scores : np.ndarray
        (s, n_hits) float32 similarities, best first, ``-inf`` for padding.
    keys : np.ndarray
        (s, n_hits) int64 region keys (see :func:`locate`), ``-1`` for padding.
    dot_products : int
        Inner products (dot-product equivalents) the search cost.
    exact : bool
        ``scores`` are exact inner products (else estimates, e.g. IVF-PQ codes).
    """

    scores: np.ndarray
    keys: np.ndarray
    dot_products: int
    exact: bool = True


@dataclass(frozen=True)
class RegionView:
    """Region vectors of some images: ``snapshot`` holds them, at ``positions`` (sorted; None = every image)."""

    snapshot: Snapshot
    positions: np.ndarray | None = None


@runtime_checkable
class ImageStore(Protocol):
    """A collection's images, region trees and region vectors (see module docstring).

    ``in_memory`` says whether the region vectors are in this process's memory: then
    scoring every image costs only dot products, and the scheduler does so when that is
    cheaper than a candidate search; a remote store is always asked for candidates.
    ``applies_filters`` says whether :meth:`candidates` returns only regions of allowed
    images (else the scheduler fetches more hits and drops the others itself).
    """

    dim: int
    in_memory: bool
    applies_filters: bool

    def __len__(self) -> int:
        """Images stored."""
        ...

    def add_images(self, records: list[ImageRecord], trees: list[RegionTree], vectors: list[np.ndarray]) -> None:
        """Store images (an id already stored is replaced): ``vectors[i]`` is (len(trees[i]), dim) float32,
        rows in tree order."""
        ...

    def delete_images(self, image_ids: list[int]) -> int:
        """Delete images and their regions (unknown ids are ignored); returns how many were stored."""
        ...

    def set_metadata(self, records: list[ImageRecord]) -> None:
        """Replace the user metadata of stored images (regions and vectors untouched)."""
        ...

    def records(self) -> Iterator[ImageRecord]:
        """Every stored image's catalog record, by ascending image id."""
        ...

    def level_counts(self) -> dict[str, int]:
        """Stored regions per level name (``global``, ``region``, ``segment``), kept up to date by add/delete."""
        ...

    def candidate_cost(self, level: Level, params: Any) -> float:
        """Inner products one sub-query's candidate search of ``level`` is expected to cost."""
        ...

    def candidates(self, queries: np.ndarray, level: Level, k: int, *, params: Any,
                   allowed: np.ndarray | None = None, filters: Mapping[str, Any] | None = None) -> Candidates:
        """The ``k`` regions of ``level`` closest to each (s, dim) query (``params``: SchedulerParams).

        ``allowed`` (sorted image ids) and ``filters`` (the dict they came from) describe the
        metadata filter, for a store that ``applies_filters``.
        """
        ...

    def vectors(self, image_ids: np.ndarray) -> RegionView:
        """The regions of ``image_ids`` (ids not stored are left out), in the store's order (see :meth:`scan`)."""
        ...

    def scan(self, allowed: np.ndarray | None = None, *, levels: Any = None) -> Iterator[RegionView]:
        """Every image (or the ``allowed`` ids) in blocks of whole images, in insertion (= ascending id) order.

        ``levels`` (a tuple of :class:`Level`) are the levels the caller scores: a store may
        leave the vectors of the other rows as zeros instead of fetching them.
        """
        ...

    def describe(self) -> dict[str, Any]:
        """What the manifest records to reopen this store (``{"kind": ...}``)."""
        ...


@runtime_checkable
class VectorStore(Protocol):
    """Inner-product vector storage keyed by int64 ids.

    ``search`` returns ``(scores, ids)`` of shapes (n_queries, k), best first, padded
    with ``-inf`` / ``-1`` when fewer than k vectors are stored. ``distance_computations``
    counts query x stored-vector inner products spent by searches so far.
    """

    dim: int
    distance_computations: int

    def __len__(self) -> int: ...

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Store (n, dim) float32 ``vectors`` under (n,) int64 ``ids``."""
        ...

    def remove(self, ids: np.ndarray) -> int:
        """Delete ids; returns how many were present."""
        ...

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k by inner product -> (scores (q, k) float32, ids (q, k) int64)."""
        ...

    def get(self, ids: np.ndarray) -> np.ndarray:
        """Vectors of ``ids`` -> (n, dim) float32."""
        ...

    def save(self, path: Path) -> None:
        """Write to ``path`` (a file or directory the store owns)."""
        ...


def region_keys(image_ids: np.ndarray, local: np.ndarray) -> np.ndarray:
    """Keys of regions at tree index ``local`` of images ``image_ids`` (same shapes); ValueError past the key range."""
    local = np.asarray(local, np.int64)
    if local.size and int(local.max()) >= 1 << KEY_SHIFT:
        raise ValueError(f"an image holds more than {1 << KEY_SHIFT} regions")
    return (np.asarray(image_ids, np.int64) << KEY_SHIFT) | local


def locate(snapshot: Snapshot, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Image positions and rows in ``snapshot`` of region ``keys`` (any shape); -1 for padding
    and for regions of images the snapshot does not hold."""
    keys = np.asarray(keys, dtype=np.int64)
    positions = snapshot.positions_of(np.where(keys >= 0, keys >> KEY_SHIFT, -1))
    held = positions >= 0
    safe = np.where(held, positions, 0)
    starts = snapshot.image_starts[safe]
    local = keys & ((1 << KEY_SHIFT) - 1)
    held &= (keys >= 0) & (local < snapshot.image_starts[safe + 1] - starts)
    return np.where(held, positions, -1), np.where(held, starts + local, -1)

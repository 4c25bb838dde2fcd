"""FAISS vector store: exact (flat), IVF or HNSW; CPU by default, GPU when faiss has one."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import numpy as np

from himir_rag.errors import ConfigError, IndexFormatError

__all__ = ["FaissStore", "faiss_gpu_available", "auto_index_kind"]

logger = logging.getLogger(__name__)

INDEX_KINDS = ("flat", "ivf", "hnsw")


def _faiss():
    try:
        import faiss
    except ImportError as exc:  # pragma: no cover - faiss-cpu is a core dependency
        raise ImportError("faiss is missing: pip install faiss-cpu (or a GPU build of faiss)") from exc
    return faiss


def faiss_gpu_available() -> bool:
    """True when the installed faiss is a GPU build and sees at least one GPU."""
    faiss = _faiss()
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def auto_index_kind(n_vectors: int, *, flat_max: int = 256) -> str:
    """Exact search for small stores, IVF above ``flat_max`` vectors (where exact costs too much)."""
    return "flat" if n_vectors <= flat_max else "ivf"


_TRAIN_POINTS_PER_LIST = 64


def _training_sample(vectors: np.ndarray, index) -> np.ndarray:
    """A fixed random subset large enough for k-means (64 points per IVF list): training on
    millions of vectors costs minutes and buys no recall."""
    inner = _faiss().extract_index_ivf(index) if hasattr(index, "index") and "IVF" in type(
        _faiss().downcast_index(index.index)).__name__ else None
    if inner is None:
        return vectors
    limit = _TRAIN_POINTS_PER_LIST * inner.nlist
    if len(vectors) <= limit:
        return vectors
    rows = np.sort(np.random.default_rng(0).choice(len(vectors), limit, replace=False))
    return vectors[rows]


class FaissStore:
    """Vectors in a FAISS ``IndexIDMap2``.

    Parameters
    ----------
    dim : int
        Vector dimension.
    kind : {"flat", "ivf", "hnsw"}
        ``flat`` is exact. ``ivf`` (IVF-Flat, trained on the first add) and ``hnsw``
        are approximate, for collections where exact search is too slow.
    nprobe : int
        IVF lists visited per query.
    use_gpu : bool or None
        Search on GPU; None = when a GPU build of faiss with a GPU is installed.

    Example
    -------
    >>> store = FaissStore(4)
    >>> store.add(np.array([7]), np.eye(4, dtype=np.float32)[:1])
    >>> store.search(np.eye(4, dtype=np.float32)[:1], 1)[1]
    array([[7]])
    """

    def __init__(self, dim: int, *, kind: str = "flat", nlist: int | None = None, nprobe: int = 16,
                 use_gpu: bool | None = None) -> None:
        if kind not in INDEX_KINDS:
            raise ConfigError(f"faiss index kind {kind!r} is unknown; use one of {INDEX_KINDS}")
        self.dim, self.kind, self.nlist, self.nprobe = dim, kind, nlist, nprobe
        self.use_gpu = faiss_gpu_available() if use_gpu is None else use_gpu
        self.distance_computations = 0
        self._index = None if kind == "ivf" else self._new_index(0)
        self._gpu_index = None
        self._lock = threading.RLock()

    def _new_index(self, n_train: int):
        faiss = _faiss()
        if self.kind == "flat":
            inner = faiss.IndexFlatIP(self.dim)
        elif self.kind == "hnsw":
            inner = faiss.IndexHNSWFlat(self.dim, 32, faiss.METRIC_INNER_PRODUCT)
        else:
            # ~2 sqrt(n) lists, but at least 39 training points per list (k-means needs them)
            nlist = self.nlist or max(1, min(4096, int(2 * np.sqrt(max(n_train, 1))), n_train // 39))
            inner = faiss.IndexIVFFlat(faiss.IndexFlatIP(self.dim), self.dim, nlist, faiss.METRIC_INNER_PRODUCT)
        return faiss.IndexIDMap2(inner)

    def __len__(self) -> int:
        return 0 if self._index is None else int(self._index.ntotal)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Store (n, dim) ``vectors`` under (n,) int64 ``ids``."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        n, dim = vectors.shape
        if dim != self.dim or ids.shape != (n,):
            raise ValueError(f"expected ids ({n},) and vectors (n, {self.dim}), got {ids.shape} and {vectors.shape}")
        with self._lock:
            if self._index is None:
                self._index = self._new_index(n)
                self._index.train(_training_sample(vectors, self._index))
            self._index.add_with_ids(vectors, ids)
            self._gpu_index = None

    def remove(self, ids: np.ndarray) -> int:
        """Delete ``ids``; returns how many were present."""
        if self._index is None:
            return 0
        if self.kind == "hnsw":
            raise NotImplementedError("FAISS HNSW indexes cannot delete vectors; rebuild the store without them "
                                      "(HiMIRIndex rebuilds its candidate stores per snapshot)")
        faiss = _faiss()
        with self._lock:
            removed = int(self._index.remove_ids(faiss.IDSelectorArray(np.ascontiguousarray(ids, dtype=np.int64))))
            self._gpu_index = None
        return removed

    def _searchable(self):
        if not self.use_gpu or self.kind == "hnsw":
            return self._index
        if self._gpu_index is None:
            faiss = _faiss()
            self._gpu_index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, self._index)
        return self._gpu_index

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` by inner product -> (scores (q, k) float32, ids (q, k) int64)."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        n_queries = queries.shape[0]
        if len(self) == 0 or k <= 0:
            return np.full((n_queries, max(k, 0)), -np.inf, np.float32), np.full((n_queries, max(k, 0)), -1, np.int64)
        with self._lock:
            index = self._searchable()
            self._set_search_params(index)
            scores, ids = index.search(queries, k)
            self.distance_computations += n_queries * self._cost_per_query()
        scores = np.where(ids >= 0, scores, -np.inf).astype(np.float32)
        return scores, ids

    def _set_search_params(self, index) -> None:
        if self.kind == "ivf":
            _faiss().extract_index_ivf(index).nprobe = self.nprobe

    def _cost_per_query(self) -> int:
        """Inner products one query costs: all vectors (flat); centroids + probed lists (IVF,
        estimated with the mean list size); for HNSW, efSearch x M x levels as an upper estimate."""
        n = len(self)
        if self.kind == "flat":
            return n
        faiss = _faiss()
        inner = faiss.downcast_index(self._index.index)
        if self.kind == "ivf":
            probed = min(self.nprobe, inner.nlist)
            return int(inner.nlist + probed * n / max(inner.nlist, 1))
        return int(min(n, inner.hnsw.efSearch * 32 * max(1, int(np.log2(max(n, 2))) // 4 + 1)))

    def get(self, ids: np.ndarray) -> np.ndarray:
        """Vectors of ``ids`` -> (n, dim) float32; unknown ids raise KeyError."""
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        try:
            return self._index.reconstruct_batch(ids) if len(ids) else np.zeros((0, self.dim), np.float32)
        except RuntimeError as exc:
            raise KeyError(f"some ids are not in the store: {exc}") from exc

    def save(self, path: Path) -> None:
        """Write the CPU index to ``path`` in FAISS's own binary format."""
        if self._index is None:
            raise ValueError("cannot save an empty IVF store (it is trained on the first add)")
        _faiss().write_index(self._index, str(path))

    @classmethod
    def load(cls, path: Path, *, dim: int, kind: str, nprobe: int = 16, use_gpu: bool | None = None) -> FaissStore:
        """Read a store written by :meth:`save`; a wrong dimension raises IndexFormatError."""
        faiss = _faiss()
        try:
            index = faiss.read_index(str(path))
        except RuntimeError as exc:
            raise IndexFormatError(f"{path}: not a readable FAISS index ({exc}); rebuild the index") from exc
        if index.d != dim:
            raise IndexFormatError(f"{path}: FAISS index has dim={index.d}, the manifest says {dim}")
        store = cls(dim, kind=kind, nprobe=nprobe, use_gpu=use_gpu)
        store._index = index
        return store

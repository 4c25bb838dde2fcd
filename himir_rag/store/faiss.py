"""FAISS vector store: exact (flat), IVF-Flat, or IVF-PQ fast-scan; CPU by default, GPU when faiss has one."""

from __future__ import annotations

import logging
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

import numpy as np

from himir_rag.errors import ConfigError, IndexFormatError, MissingDependencyError
from himir_rag.threads import MAX_WORKERS, limit_threads, worker_count

__all__ = ["FaissStore", "import_faiss", "faiss_gpu_available", "auto_index_kind", "ivf_nlist", "search_cost",
           "training_rows", "scan_workers_for", "INDEX_KINDS", "LARGE_LEVEL", "FAISS_MISSING", "FLAT_MAX", "PQ_MIN",
           "SPLIT_MIN_SCAN"]

logger = logging.getLogger(__name__)

INDEX_KINDS = ("flat", "ivf", "ivfpq")
FLAT_MAX = 256  # exact search up to this many vectors
LARGE_LEVEL = 100_000  # vectors in a level from which its candidate scan is a large part of a query
# IVF-PQ fast-scan from this many vectors on, IVF-Flat below. On the three composite tuning sets
# (seeds 1, 11, 12; 1,600 / 6,400 vectors a level) IVF-Flat kept more of himir-full's top-10 than
# IVF-PQ at every cost (0.941 at 6% of the lists against 0.896 for PQ at 10%, at 3.7-3.8x fewer
# dot products than mvr): its hits are exact, so the segment caps are too. On the synthetic
# tuning collections of 5,000 and 20,000 images (seed 1; levels of 20k-320k vectors) PQ at 10%
# was as accurate for 55-80% of the dot products and half the time, so IVF-Flat covers the sizes
# it was chosen on and PQ starts at the next power of two above them.
PQ_MIN = 8192
_TRAIN_POINTS_PER_LIST = 64
_PQ_LUT_DOTS = 16  # 4-bit codes: 16 centroids per sub-quantizer, one dim-long table per query
# An IVF search scanning at least this many vectors splits its probed lists over the store's
# scan workers (a thread each, one OpenMP thread per thread). On 2 idle cores: at 1M images
# (16M segments, 15% probed: ~6M vectors a search) 18-19 ms a query instead of 29 ms; on the
# 100k tuning collection (seed 1; ~0.6M segment and ~0.15M region vectors a search) 6.0 ms
# instead of 7.0 ms, with thresholds of 0, 100k and 300k alike. Smaller scans (a few thousand
# photos) stay on one thread: a hand-off to another thread costs more than they take.
SPLIT_MIN_SCAN = 200_000


FAISS_MISSING = ("faiss is not installed; install himir-rag with a faiss extra: pip install 'himir-rag[cpu]' "
                 "(faiss-cpu) or 'himir-rag[gpu]' (faiss-gpu-cu12, CUDA 12)")


def import_faiss():
    """The ``faiss`` module; MissingDependencyError naming the ``[cpu]`` / ``[gpu]`` extras when it is not installed."""
    try:
        import faiss
    except ImportError as exc:
        raise MissingDependencyError(FAISS_MISSING) from exc
    return faiss



def faiss_gpu_available() -> bool:
    """True when the installed faiss is a GPU build and sees at least one GPU."""
    faiss = import_faiss()
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


_IVF_FLAT_MIN_POINTS = 10  # training points a list of an IVF-Flat store needs at least
_IVF_PQ_MIN_POINTS = 39  # FAISS's k-means minimum, kept by IVF-PQ stores


def ivf_nlist(n_vectors: int, kind: str) -> int:
    """IVF list count for ``n_vectors`` in a store of ``kind``, at most 4096.

    IVF-PQ (``"ivfpq"``): ~2 sqrt(n), at least :data:`_IVF_PQ_MIN_POINTS` training points a list
    (FAISS's k-means minimum); at 100k images twice the lists did not help (benchmarks/README.md, "Candidate
    codes"). IVF-Flat (``"ivf"``, the automatic kind below :data:`PQ_MIN`): ~3 sqrt(n), at least
    :data:`_IVF_FLAT_MIN_POINTS` a list. Text sub-queries' best regions lie spread over many
    lists, so finer lists probed at a smaller share find more of them for the same scan: on
    the seed-1 composite tuning set (1,600 / 6,400 vectors a level) 120 / 240 lists probed at
    5% kept 0.958 of himir-full's top-10 at 4,447 dot products a query, where 41 / 160 lists at
    6% kept 0.944 at 4,566.
    """
    factor, min_points = (3, _IVF_FLAT_MIN_POINTS) if kind == "ivf" else (2, _IVF_PQ_MIN_POINTS)
    return max(1, min(4096, int(factor * math.sqrt(max(n_vectors, 1))), n_vectors // min_points))


_PQ_MIN_SUBQUANTIZERS = 32  # below this many codes a vector is ranked too coarsely


def pq_subquantizers(dim: int, n_vectors: int = 0) -> int:
    """Sub-quantizers of the 4-bit fast-scan PQ of a level of ``n_vectors``; 0 = not possible
    (``dim`` not a multiple of 4).

    One per 4 dimensions (96 at dim 384: 48 bytes a vector); from :data:`LARGE_LEVEL` vectors
    on, one per 8 (24 bytes) when that still gives 32 or more. Coarser codes scan in ~60% of
    the time and pay off only where the scan is much of a query: on the 100k synthetic tuning
    collection they kept himir-full's Recall@10 as the finer ones do at 0.8x the latency, while
    on the 400-photo composite sets (1,600 and 6,400 vectors a level) they found worse
    candidates (2-3 points of Recall@10 on seeds 0 and 2; benchmarks/README.md, "Candidate codes").
    The automatic choice uses IVF-PQ from :data:`PQ_MIN` vectors (IVF-Flat below).
    """
    if dim % 4 or dim < 8:
        return 0
    if n_vectors >= LARGE_LEVEL and dim % 8 == 0 and dim // 8 >= _PQ_MIN_SUBQUANTIZERS:
        return dim // 8
    return dim // 4


def search_cost(kind: str, n_vectors: int, *, dim: int, nlist: int, nprobe: int, n_queries: int = 1,
                scanned: int | None = None, subquantizers: int | None = None,
                centroid_dots: float | None = None) -> float:
    """Inner products (dot-product equivalents) a search of ``n_queries`` costs.

    flat: every vector. IVF: ranking the lists (``centroid_dots`` a query: the ``nlist``
    centroids by default, less with a :class:`ListRanking`) plus the vectors of the probed
    lists (``scanned``, or the mean list size times ``nprobe``). IVF-PQ: the same, 16
    look-up-table rows, and each scanned 4-bit code as ``M / dim`` of a dot product (``M``
    table look-ups of one byte instead of ``dim`` multiply-adds; ``subquantizers`` = ``M``,
    default :func:`pq_subquantizers`).
    """
    if kind == "flat" or n_vectors == 0:
        return float(n_queries * n_vectors)
    if scanned is None:
        scanned = n_queries * min(nprobe, nlist) * n_vectors / nlist
    ranking = n_queries * (nlist if centroid_dots is None else centroid_dots)
    if kind == "ivf":
        return float(ranking + scanned)
    return ranking + n_queries * _PQ_LUT_DOTS + scanned * (subquantizers or pq_subquantizers(dim)) / dim


LIST_RANKINGS = ("auto", "exact")
_RANKING_ENERGY = 0.97  # share of the centroids' energy a projection must keep to rank the lists
_RANKING_DIMS = (32, 64)  # projections tried, smallest first (at most a quarter of the dimension)
_RANKING_RERANK = 2  # lists a projection keeps per list probed, re-ranked by their exact centroid scores


class ListRanking:
    """Which IVF lists a query probes, ranked through a projection of the centroids.

    Scoring every centroid costs ``nlist`` dot products a query, a third of a 400-photo
    collection's candidate search. Where the centroids lie close to a subspace (the top
    ``r`` singular directions hold :data:`_RANKING_ENERGY` of their energy; ``r`` the
    smallest of :data:`_RANKING_DIMS` that does, at most ``dim / 4``), the query is
    projected (``r`` dot products), every centroid scored in ``r`` dimensions (``r / dim``
    of a dot product each), and the ``_RANKING_RERANK x nprobe`` best re-scored exactly:
    their top ``nprobe`` are the probed lists, with exact centroid scores. Where no
    projection keeps that much (isotropic vectors, e.g. the synthetic scale benchmark:
    14-17% in 32 dimensions) :meth:`build` returns None and every centroid is scored.
    On the composite tuning set (seed 1: 94% of the energy in 32 dimensions, 98-99% in 64)
    the scheduled pass kept its Recall@10 and 0.957 of himir-full's top-10 (0.958 with every
    centroid scored) at 7% fewer dot products; 32 dimensions re-ranking 3x as many lists
    saved 11% and kept 0.956 (benchmarks/README.md, "Projected list ranking").
    """

    def __init__(self, centroids: np.ndarray, basis: np.ndarray) -> None:
        self.centroids = np.ascontiguousarray(centroids, np.float32)  # (nlist, dim)
        self.basis = np.ascontiguousarray(basis, np.float32)  # (r, dim)
        self.projected = np.ascontiguousarray(self.centroids @ self.basis.T)  # (nlist, r)

    @classmethod
    def build(cls, centroids: np.ndarray) -> ListRanking | None:
        """A ranking for these (nlist, dim) centroids, or None when no projection keeps enough energy."""
        nlist, dim = centroids.shape
        dims = [r for r in _RANKING_DIMS if r <= dim // 4 and r < nlist]
        if not dims:
            return None
        # the centroids' right singular vectors from their (dim, dim) Gram matrix: 15-20 ms at up to 4,096
        # lists where their SVD takes 110-170 ms (paid on a store's first search, e.g. the first after load)
        centroids = np.asarray(centroids, np.float32)
        values, vectors = np.linalg.eigh((centroids.T @ centroids).astype(np.float64))
        values, vectors = values[::-1].clip(min=0.0), vectors[:, ::-1]  # largest first
        energy = np.cumsum(values) / max(float(values.sum()), 1e-30)
        for r in dims:
            if energy[r - 1] >= _RANKING_ENERGY:
                return cls(centroids, vectors[:, :r].T)
        return None

    @property
    def dims(self) -> int:
        return int(self.basis.shape[0])

    def cost(self, nprobe: int) -> float:
        """Dot products a query spends picking ``nprobe`` lists: the projection, every centroid in
        :attr:`dims` dimensions, the kept lists re-scored (more than ``nlist`` when most lists are probed)."""
        nlist, dim = self.centroids.shape
        return self.dims + nlist * self.dims / dim + min(nlist, _RANKING_RERANK * nprobe)

    def probed(self, queries: np.ndarray, nprobe: int) -> tuple[np.ndarray, np.ndarray]:
        """(q, nprobe) exact centroid scores and lists, best first (``nprobe`` < ``nlist``), for :meth:`cost`."""
        keep = min(len(self.centroids), _RANKING_RERANK * nprobe)
        approx = (queries @ self.basis.T) @ self.projected.T
        kept = np.argpartition(-approx, keep - 1, axis=1)[:, :keep]
        exact = np.einsum("qd,qmd->qm", queries, self.centroids[kept])
        best = np.argsort(-exact, axis=1, kind="stable")[:, :nprobe]
        return (np.take_along_axis(exact, best, axis=1).astype(np.float32),
                np.take_along_axis(kept, best, axis=1).astype(np.int64))


def auto_index_kind(n_vectors: int, *, dim: int = 384, flat_max: int = FLAT_MAX, pq_min: int = PQ_MIN) -> str:
    """Exact search up to ``flat_max`` vectors, IVF-Flat up to ``pq_min``, IVF-PQ fast-scan above
    (4-bit codes: dim/8 bytes a vector instead of 4 dim, scanned with SIMD look-ups)."""
    if n_vectors <= flat_max:
        return "flat"
    return "ivfpq" if n_vectors >= pq_min and pq_subquantizers(dim) else "ivf"


class FaissStore:
    """Vectors in a FAISS index under int64 ids (ids may repeat: e.g. one image id per region).

    Parameters
    ----------
    dim : int
        Vector dimension.
    kind : {"flat", "ivf", "ivfpq"}
        ``flat`` is exact. ``ivf`` (IVF-Flat) and ``ivfpq`` (IVF with 4-bit PQ fast-scan
        codes, :func:`pq_subquantizers`) are approximate and trained on the first add; rerank their hits exactly.
    nlist : int, optional
        IVF lists; default :func:`ivf_nlist` of the first add's size.
    nprobe : int
        IVF lists visited per query.
    threads : int
        OpenMP threads for search (1 is fastest for a handful of queries on small machines).
    scan_workers : int
        Threads a large IVF search (at least :data:`SPLIT_MIN_SCAN` vectors scanned) splits
        its probed lists over, each on one OpenMP thread; the hits are merged (the top-k of
        one scan, up to ties at the k-th score). 1 = never split.
    list_ranking : {"auto", "exact"}
        How an IVF search on CPU picks its lists: ``"auto"`` through a projection of the
        centroids where one keeps nearly all their energy (:class:`ListRanking`), else, and
        with ``"exact"``, by every centroid's score.
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
                 threads: int = 1, use_gpu: bool | None = None, subquantizers: int | None = None,
                 scan_workers: int = 1, list_ranking: str = "auto") -> None:
        if kind not in INDEX_KINDS:
            raise ConfigError(f"faiss index kind {kind!r} is unknown; use one of {INDEX_KINDS}")
        if list_ranking not in LIST_RANKINGS:
            raise ConfigError(f"list_ranking {list_ranking!r} is unknown; use one of {LIST_RANKINGS}")
        if kind == "ivfpq" and not pq_subquantizers(dim):
            raise ConfigError(f"ivfpq needs a dimension divisible by 4 (>= 8), got dim={dim}; use kind='ivf'")
        self.dim, self.kind, self.nlist, self.nprobe, self.threads = dim, kind, nlist, nprobe, threads
        self.subquantizers = subquantizers  # PQ codes of an ivfpq store trained here; None = pq_subquantizers(dim)
        self.use_gpu = faiss_gpu_available() if use_gpu is None else use_gpu
        self.scan_workers = scan_workers
        self.list_ranking = list_ranking
        self.distance_computations = 0
        self._index = self._new_index(0) if kind == "flat" else None
        self._list_sizes: np.ndarray | None = None  # vectors per IVF list (what a probe scans), until the next change
        self._ranking: ListRanking | None | bool = False  # the lists' projected ranking (False: not built yet)
        self._gpu_index = None
        self._lock = threading.RLock()

    def _new_index(self, n_train: int):
        faiss = import_faiss()
        if self.kind == "flat":
            return faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))
        nlist = self.nlist or ivf_nlist(n_train, self.kind)
        if self.kind == "ivf":
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(self.dim), self.dim, nlist, faiss.METRIC_INNER_PRODUCT)
            index.cp.min_points_per_centroid = _IVF_FLAT_MIN_POINTS  # ivf_nlist's own minimum: no k-means warning
            return index
        return faiss.IndexIVFPQFastScan(faiss.IndexFlatIP(self.dim), self.dim, nlist,
                                        self.subquantizers or pq_subquantizers(self.dim), 4,
                                        faiss.METRIC_INNER_PRODUCT)

    def __len__(self) -> int:
        return 0 if self._index is None else int(self._index.ntotal)

    def is_current(self, n_level: int) -> bool:
        """False for a store this version would build otherwise for a level of ``n_level`` vectors: IVF-PQ
        codes other than :func:`pq_subquantizers` gives, or IVF-Flat lists other than :func:`ivf_nlist` gives."""
        if self._index is None or self.kind == "flat":
            return True
        if self.kind == "ivf":
            return self.lists == ivf_nlist(n_level, "ivf")
        return int(self._index.M) == pq_subquantizers(self.dim, n_level)

    @property
    def lists(self) -> int:
        """IVF lists (1 for flat)."""
        return 1 if self._index is None or self.kind == "flat" else int(self._index.nlist)

    def train(self, vectors: np.ndarray) -> None:
        """Train an IVF store on a (n, dim) sample of the vectors it will hold (before the first add)."""
        if self.kind == "flat":
            return
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        with self._lock, limit_threads(None):
            self._index, self._list_sizes, self._ranking = self._new_index(len(vectors)), None, False
            self._index.train(_training_sample(vectors, int(self._index.nlist)))

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Store (n, dim) ``vectors`` under (n,) int64 ``ids``; an IVF store is trained on its first add."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        n, dim = vectors.shape
        if dim != self.dim or ids.shape != (n,):
            raise ValueError(f"expected ids ({n},) and vectors (n, {self.dim}), got {ids.shape} and {vectors.shape}")
        if n == 0:
            return
        with self._lock, limit_threads(None):  # building uses every core
            if self._index is None:
                self.train(vectors)
            self._index.add_with_ids(vectors, ids)
            self._gpu_index = self._list_sizes = None

    def remove(self, ids: np.ndarray) -> int:
        """Delete every vector stored under ``ids``; returns how many were removed."""
        if self._index is None or len(ids) == 0:
            return 0
        faiss = import_faiss()
        with self._lock:
            selector = faiss.IDSelectorBatch(np.ascontiguousarray(ids, dtype=np.int64))
            removed = int(self._index.remove_ids(selector))
            self._gpu_index = self._list_sizes = None
        return removed

    def _searchable(self):
        if not self.use_gpu or self.kind == "ivfpq":
            return self._index
        if self._gpu_index is None:
            faiss = import_faiss()
            self._gpu_index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, self._index)
        return self._gpu_index

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` by inner product -> (scores (q, k) float32, ids (q, k) int64), padded with -inf / -1.

        Adds the inner products spent to :attr:`distance_computations` (see :func:`search_cost`).
        """
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        n_queries = queries.shape[0]
        if len(self) == 0 or k <= 0:
            return np.full((n_queries, max(k, 0)), -np.inf, np.float32), np.full((n_queries, max(k, 0)), -1, np.int64)
        with self._lock, limit_threads(self.threads):
            index = self._searchable()
            if self.kind != "flat" and index is self._index:
                scores, ids, scanned, centroid_dots = self._ivf_search(queries, k)
            else:  # exact, or an IVF store on GPU (its scan is estimated from the mean list size)
                if self.kind != "flat":
                    index.nprobe = min(self.nprobe, self.lists)
                scores, ids = index.search(queries, k)
                scanned = centroid_dots = None
            self.distance_computations += self._cost(n_queries, scanned, centroid_dots)
        scores = np.where(ids >= 0, scores, -np.inf).astype(np.float32)
        return scores, ids

    def _ivf_search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, int, float]:
        """An IVF search on CPU from its coarse assignment: (scores, ids, vectors scanned, dot products a
        query spent ranking the lists): the lists by :meth:`_list_ranking` where it applies, else by
        every centroid's score.

        The probed lists of every query are split over up to :attr:`scan_workers` threads
        when the scan is large (:data:`SPLIT_MIN_SCAN`); each thread returns its lists' top
        ``k`` and the merge keeps the best ``k``: every vector lies in one list, so that is
        the top ``k`` of one scan, up to which of several vectors tied at the k-th score is
        kept (IVF-PQ scores are quantized; the merge keeps the smallest ids). The count of
        scanned vectors comes from the list sizes (FAISS's global search statistics are not
        safe under concurrent searches).
        """
        nprobe = min(self.nprobe, self.lists)
        ranking = self._list_ranking()
        centroid_dots = float(self.lists) if ranking is None else min(ranking.cost(nprobe), float(self.lists))
        if centroid_dots < self.lists:
            centroid_scores, lists = ranking.probed(queries, nprobe)
        else:  # every centroid scored: no projection, or one that saves nothing at this many lists probed
            centroid_scores, lists = self._index.quantizer.search(queries, nprobe)
        scanned = int(self._sizes()[lists[lists >= 0]].sum())
        workers = min(self.scan_workers, nprobe) if scanned >= SPLIT_MIN_SCAN else 1
        if workers <= 1:
            return (*_scan_lists(self._index, queries, k, lists, centroid_scores), scanned, centroid_dots)
        parts = [_scan_pool(workers - 1).submit(_scan_lists, self._index, queries, k, lists[:, w::workers],
                                                centroid_scores[:, w::workers]) for w in range(1, workers)]
        try:
            found = [_scan_lists(self._index, queries, k, lists[:, 0::workers], centroid_scores[:, 0::workers])]
        finally:  # no thread may still read the index once the caller releases the lock
            wait(parts)
        found += [part.result() for part in parts]
        scores = np.concatenate([np.where(i >= 0, d, -np.inf) for d, i in found], axis=1)
        ids = np.concatenate([i for _, i in found], axis=1)
        best = np.lexsort((ids, -scores), axis=1)[:, :k]  # ties (PQ scores are quantized) by id
        return np.take_along_axis(scores, best, axis=1), np.take_along_axis(ids, best, axis=1), scanned, centroid_dots

    def _list_ranking(self) -> ListRanking | None:
        """The lists' projected ranking (None: score every centroid), built once per training."""
        if self.list_ranking == "exact":
            return None
        if self._ranking is False:
            quantizer = self._index.quantizer
            self._ranking = ListRanking.build(quantizer.reconstruct_n(0, quantizer.ntotal))
        return self._ranking

    def _sizes(self) -> np.ndarray:
        """(nlist,) vectors in each IVF list (cached until the store changes)."""
        if self._list_sizes is None:
            lists = self._index.invlists
            self._list_sizes = np.fromiter((lists.list_size(i) for i in range(lists.nlist)), np.int64, lists.nlist)
        return self._list_sizes

    def _cost(self, n_queries: int, scanned: int | None, centroid_dots: float | None = None) -> int:
        """Inner products of one search of ``n_queries`` (see :func:`search_cost`); ``scanned`` = the
        probed lists' vectors, or None (GPU) to estimate it from the mean list size; ``centroid_dots``
        what ranking the lists cost a query (None: every centroid)."""
        if self.kind == "flat":
            return n_queries * len(self)
        return int(math.ceil(search_cost(self.kind, len(self), dim=self.dim, nlist=self.lists, nprobe=self.nprobe,
                                         n_queries=n_queries, scanned=scanned, centroid_dots=centroid_dots,
                                         subquantizers=int(self._index.M) if self.kind == "ivfpq" else None)))

    def get(self, ids: np.ndarray) -> np.ndarray:
        """Vectors of ``ids`` -> (n, dim) float32 (flat stores only: IVF stores keep no exact copy by id)."""
        if self.kind != "flat":
            raise NotImplementedError(f"a {self.kind} store does not return vectors by id; read them from the snapshot")
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        try:
            return self._index.reconstruct_batch(ids) if len(ids) else np.zeros((0, self.dim), np.float32)
        except RuntimeError as exc:
            raise KeyError(f"some ids are not in the store: {exc}") from exc

    def empty_copy(self) -> FaissStore:
        """A store of this one's kind and training (IVF lists, PQ codebooks) holding no vectors."""
        faiss = import_faiss()
        copy = FaissStore(self.dim, kind=self.kind, nlist=self.nlist, nprobe=self.nprobe, threads=self.threads,
                          use_gpu=self.use_gpu, subquantizers=self.subquantizers, scan_workers=self.scan_workers,
                          list_ranking=self.list_ranking)
        if self._index is not None:
            with self._lock:
                copy._index = faiss.clone_index(self._index)
            copy._index.reset()
        return copy

    def merge(self, other: FaissStore) -> None:
        """Move the vectors of ``other`` (an :meth:`empty_copy` of this store, filled, maybe read back from
        :meth:`save_delta`) into this one."""
        if other._index is None or len(other) == 0:
            return
        with self._lock:
            if self.kind != "flat":  # a delta shares this store's coarse quantizer (save_delta leaves it out)
                other._index.quantizer, other._index.own_fields = self._index.quantizer, False
            self._index.merge_from(other._index, 0)
            self._gpu_index = self._list_sizes = None

    def save_delta(self, path: Path) -> None:
        """:meth:`save` an IVF :meth:`empty_copy` filled with vectors, without the coarse quantizer it shares
        with the store it was copied from (nlist x dim floats): such a file is only :meth:`merge`-d into that store."""
        faiss = import_faiss()
        index = self._index
        with self._lock:
            quantizer, owned = index.quantizer, index.own_fields
            index.quantizer, index.own_fields = faiss.IndexFlatIP(self.dim), False
            try:
                data = faiss.serialize_index(index)
            finally:
                index.quantizer, index.own_fields = quantizer, owned
        with open(path, "wb") as fh:
            fh.write(data.tobytes())

    def ids(self) -> np.ndarray:
        """(n,) int64 every id stored, in no particular order."""
        faiss = import_faiss()
        if self._index is None:
            return np.zeros(0, np.int64)
        if self.kind == "flat":
            return faiss.vector_to_array(self._index.id_map).astype(np.int64)
        lists = self._index.invlists
        parts = [faiss.rev_swig_ptr(lists.get_ids(i), lists.list_size(i)).copy()
                 for i in range(lists.nlist) if lists.list_size(i)]
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)

    def save(self, path: Path) -> None:
        """Write the CPU index to ``path`` in FAISS's own binary format."""
        if self._index is None:
            raise ValueError("cannot save an empty IVF store (it is trained on the first add)")
        # serialized here and written by Python, so a full disk or a read-only folder is an OSError with its
        # errno (faiss.write_index would raise a bare RuntimeError)
        data = import_faiss().serialize_index(self._index)
        with open(path, "wb") as fh:
            fh.write(data.tobytes())

    @classmethod
    def load(cls, path: Path, *, dim: int, kind: str, nprobe: int = 16, threads: int = 1,
             use_gpu: bool | None = None) -> FaissStore:
        """Read a store written by :meth:`save`; a wrong dimension or kind raises IndexFormatError."""
        faiss = import_faiss()
        try:
            index = faiss.read_index(str(path))
        except RuntimeError as exc:
            raise IndexFormatError(f"{path}: not a readable FAISS index ({exc}); rebuild the index") from exc
        expected = {"flat": "IndexIDMap2", "ivf": "IndexIVFFlat", "ivfpq": "IndexIVFPQFastScan"}.get(kind)
        if index.d != dim or type(index).__name__ != expected:
            raise IndexFormatError(f"{path}: FAISS index {type(index).__name__} dim={index.d}, expected {expected} "
                                   f"dim={dim}; rebuild the index")
        store = cls(dim, kind=kind, nprobe=nprobe, threads=threads, use_gpu=use_gpu)
        store._index = index
        return store


def training_rows(n_vectors: int, nlist: int) -> np.ndarray:
    """Sorted rows of a fixed random subset large enough for k-means (64 points per IVF list):
    training on millions of vectors costs minutes and buys no recall."""
    limit = _TRAIN_POINTS_PER_LIST * nlist
    if n_vectors <= limit:
        return np.arange(n_vectors)
    return np.sort(np.random.default_rng(0).choice(n_vectors, limit, replace=False))


def _training_sample(vectors: np.ndarray, nlist: int) -> np.ndarray:
    """The rows of ``vectors`` that :func:`training_rows` picks."""
    rows = training_rows(len(vectors), nlist)
    return vectors if len(rows) == len(vectors) else vectors[rows]


def scan_workers_for(setting: int) -> int:
    """The scan workers of a setting: ``setting`` when >= 1, else (0) one per available core, at most 8."""
    return setting if setting >= 1 else worker_count()


def _scan_lists(index, queries: np.ndarray, k: int, lists: np.ndarray,
                centroid_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The top ``k`` of an IVF ``index`` over the given probed ``lists`` (q, p) per query."""
    faiss = import_faiss()
    lists = np.ascontiguousarray(lists, dtype=np.int64)
    centroid_scores = np.ascontiguousarray(centroid_scores, dtype=np.float32)
    n = len(queries)
    scores, ids = np.empty((n, k), np.float32), np.empty((n, k), np.int64)
    params = faiss.SearchParametersIVF()
    params.nprobe = lists.shape[1]
    index.search_preassigned_c(n, faiss.swig_ptr(queries), k, faiss.swig_ptr(lists), faiss.swig_ptr(centroid_scores),
                               faiss.swig_ptr(scores), faiss.swig_ptr(ids), False, params, None)
    return scores, ids


_POOL_LOCK = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_pool_size = 0


def _scan_pool(workers: int) -> ThreadPoolExecutor:
    """The process's scan threads (at least ``workers``, started as needed), each running FAISS on
    one OpenMP thread. A larger pool replaces a smaller one without shutting it down: a search
    may still be submitting to it."""
    global _pool, _pool_size
    with _POOL_LOCK:
        if _pool is None or _pool_size < workers:
            _pool_size = max(workers, MAX_WORKERS)
            _pool = ThreadPoolExecutor(max_workers=_pool_size, thread_name_prefix="himir-scan",
                                       initializer=lambda: import_faiss().omp_set_num_threads(1))
        return _pool


def _forget_pool() -> None:
    """In a forked child the parent's pool threads do not exist: start a new pool there."""
    global _pool, _pool_size
    _pool, _pool_size = None, 0


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)

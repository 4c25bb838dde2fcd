"""Matching: the shared MaxSim scorer, the baselines, and the compute meter.

Every mode scores images by late interaction: for each sub-query, the best
inner product over the image's regions at the allowed levels (MaxSim); the image
score is the mean over sub-queries. Modes differ only in which levels they match
and how much of that work they skip: :data:`himir_rag.modes.MODES` says which, and
:func:`score_mode` runs a mode's scorer (:func:`score_exhaustive` or the scheduled
pruning pass, :func:`scheduled_search`).

The compute meter counts query-vector x region-vector inner products.

This module is the only place that scores, whatever holds the regions: a store
(:class:`himir_rag.store.base.ImageStore`) finds candidates per level and hands over the
candidates' region vectors (or every image's, block by block, for the exhaustive modes),
and :func:`rank` -- every search's entry point -- scores them here, so a mode ranks and
counts alike on the in-memory/FAISS store and on Qdrant.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from himir_rag.catalog import Snapshot
from himir_rag.errors import ConfigError
from himir_rag.hierarchy import Level
from himir_rag.modes import MODE_LEVELS, MODES, ModeSpec, RetrievalMode, Scorer, parse_mode
from himir_rag.store.base import KEY_SHIFT, Candidates, ImageStore, RegionView, locate
from himir_rag.store.faiss import FLAT_MAX, LARGE_LEVEL, LIST_RANKINGS, PQ_MIN, auto_index_kind

__all__ = [
    "RetrievalMode", "MaxSimScores", "SearchStats", "SchedulerParams", "maxsim", "segment_max", "score_exhaustive",
    "scheduled_search", "scheduled_pass", "score_mode", "rank", "Ranking", "gather", "parse_mode", "top_k",
    "MODE_LEVELS", "default_stores",
]


@dataclass
class SearchStats:
    """What one search cost and what it skipped.

    Attributes
    ----------
    dot_products : int
        Query-vector x stored-vector inner products, candidate generation included.
    latency_ms : dict[str, float]
        Wall time per stage (``decompose``, ``encode``, ``search``, ``total``).
    images_scored : int
        Images whose score was computed (at any level).
    extra : dict
        Mode-specific counters (images pruned, levels skipped, segments visited...).
    """

    mode: str
    dot_products: int = 0
    images_scored: int = 0
    latency_ms: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "dot_products": self.dot_products, "images_scored": self.images_scored,
                "latency_ms": dict(self.latency_ms), **self.extra}


@dataclass(frozen=True)
class MaxSimScores:
    """Per-image MaxSim result.

    Attributes
    ----------
    image_ids : np.ndarray
        (n_images,) int64.
    best : np.ndarray
        (n_subqueries, n_images) float32 best similarity per sub-query.
    best_rows : np.ndarray
        (n_subqueries, n_images) int64 snapshot row of the best region.
    dot_products : int
    """

    image_ids: np.ndarray
    best: np.ndarray
    best_rows: np.ndarray
    dot_products: int

    @property
    def scores(self) -> np.ndarray:
        """(n_images,) image score: mean over sub-queries of the best similarity."""
        return self.best.mean(axis=0)


def maxsim(queries: np.ndarray, vectors: np.ndarray, groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Segment-wise max of inner products.

    Parameters
    ----------
    queries : np.ndarray
        (s, dim) sub-query vectors.
    vectors : np.ndarray
        (r, dim) region vectors, rows of one group contiguous.
    groups : np.ndarray
        (r,) group label per row, non-decreasing runs (e.g. image ids in row order).

    Returns
    -------
    best : np.ndarray
        (s, n_groups) max inner product per group.
    arg : np.ndarray
        (s, n_groups) index into ``vectors`` of the first row reaching the max.
    """
    if vectors.shape[0] == 0:
        return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
    return segment_max(similarities(queries, vectors), groups)


def similarities(queries: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """(s, r) inner products of (s, dim) ``queries`` with (r, dim) ``vectors``, float32, C order.

    Computed as ``vectors @ queries.T``: OpenBLAS multiplies a few query rows by a long matrix
    several times slower the other way round (3 x 384 by 768 rows: 0.24 against 0.05 ms;
    32,768 rows: 13.8 against 9.2 ms, one thread).
    """
    return np.ascontiguousarray((vectors @ np.ascontiguousarray(queries.T)).T)


def segment_max(sims: np.ndarray, groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Max and first argmax of ``sims`` (s, r) over runs of equal ``groups`` (r,) -> (s, n_groups) each."""
    n_rows = sims.shape[1]
    first = np.empty(n_rows, bool)  # a row that opens a run (np.r_ costs more than the rest on small inputs)
    first[:1] = True
    np.not_equal(groups[1:], groups[:-1], out=first[1:])
    starts = np.flatnonzero(first)
    best = np.maximum.reduceat(sims, starts, axis=1)
    group_of_row = np.cumsum(first) - 1
    rows = np.where(sims >= best[:, group_of_row], np.arange(n_rows), n_rows)
    return best, np.minimum.reduceat(rows, starts, axis=1)


_BLOCK_ROWS = 32_768  # rows scored per step by the exhaustive modes (bounded temporary memory)


def score_exhaustive(snapshot: Snapshot, queries: np.ndarray, *, levels: tuple[Level, ...],
                     allowed: np.ndarray | None = None) -> MaxSimScores:
    """MaxSim of ``queries`` (s, dim) over every region at ``levels`` of every allowed image.

    Scores blocks of whole images straight from the stored vectors (a slice per block,
    no copy of the collection; float16 storage is converted one block at a time).

    Parameters
    ----------
    allowed : np.ndarray, optional
        Sorted image positions to score (metadata filter); None = every image.

    Returns
    -------
    MaxSimScores
        One entry per scored image, in row order.
    """
    queries = np.asarray(queries, dtype=np.float32)
    wanted = np.zeros(len(Level), bool)
    wanted[[int(lv) for lv in levels]] = True
    starts = snapshot.image_starts
    positions = np.arange(len(starts) - 1) if allowed is None else np.asarray(allowed, np.int64)
    ids, bests, args, dots = [], [], [], 0
    for block in _position_blocks(starts, positions):
        if allowed is None:  # contiguous images: a view of the stored rows
            rows = np.arange(starts[block[0]], starts[block[-1] + 1])
        else:
            rows = snapshot.rows_of(block)
        keep = wanted[snapshot.levels[rows]]
        contiguous = allowed is None
        if contiguous and keep.mean() >= 0.5:  # most rows match: score the slice, mask the rest
            sims = similarities(queries, _float32(snapshot.vectors[rows[0] : rows[-1] + 1]))
            if not keep.all():
                sims[:, ~keep] = -np.inf
        else:
            rows = rows[keep]
            sims = similarities(queries, _float32(snapshot.vectors[rows]))
        best, arg = segment_max(sims, snapshot.region_image[rows])
        ids.append(snapshot.image_ids[block])
        bests.append(best)
        args.append(rows[arg])
        dots += len(queries) * int(keep.sum())
    if not ids:
        empty = np.zeros((len(queries), 0), np.float32)
        return MaxSimScores(np.zeros(0, np.int64), empty, empty.astype(np.int64), 0)
    return MaxSimScores(np.concatenate(ids), np.concatenate(bests, axis=1).astype(np.float32),
                        np.concatenate(args, axis=1), int(dots))


def _float32(block: np.ndarray) -> np.ndarray:
    """``block`` as float32; float16 storage is converted by torch (SIMD, ~10x numpy's cast:
    the conversion, not the product, bounds exhaustive scans of float16 indexes)."""
    if block.dtype != np.float16:
        return np.asarray(block, np.float32)
    import torch  # a core dependency; imported only by exhaustive scans of float16 indexes

    out = np.empty(block.shape, np.float32)
    with warnings.catch_warnings():  # a read-only memory map is only read here
        warnings.simplefilter("ignore", UserWarning)
        torch.from_numpy(out).copy_(torch.from_numpy(np.asarray(block)))
    return out


def _position_blocks(starts: np.ndarray, positions: np.ndarray):
    """Split sorted image ``positions`` into runs of about ``_BLOCK_ROWS`` rows (whole images)."""
    if len(positions) == 0:
        return
    sizes = starts[positions + 1] - starts[positions]
    cut = np.searchsorted(np.cumsum(sizes), np.arange(_BLOCK_ROWS, int(sizes.sum()), _BLOCK_ROWS), side="right")
    for block in np.split(positions, np.unique(cut)):
        if len(block):
            yield block


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Positions of the ``k`` largest scores, best first (ties broken by position)."""
    k = min(k, len(scores))
    if k <= 0:
        return np.zeros(0, np.int64)
    part = np.argpartition(-scores, k - 1)[:k] if k < len(scores) else np.arange(len(scores))
    return part[np.lexsort((part, -scores[part]))]


# -- ranking over a store: the one entry point every caller and every store goes through ---------
@dataclass(frozen=True)
class Ranking:
    """The top images of one search, best first, with each sub-query's best region.

    Attributes
    ----------
    image_ids, scores : np.ndarray
        (n,) int64 and float32.
    best : np.ndarray
        (s, n) float32 best similarity per sub-query.
    levels, boxes : np.ndarray
        (s, n) int8 level and (s, n, 4) int32 box of that best region.
    """

    image_ids: np.ndarray
    scores: np.ndarray
    best: np.ndarray
    levels: np.ndarray
    boxes: np.ndarray

    @classmethod
    def of(cls, snapshot: Snapshot, scored: MaxSimScores, picks: np.ndarray) -> Ranking:
        """The images at ``picks`` (indices into ``scored``), in that order; rows read from ``snapshot``."""
        rows = scored.best_rows[:, picks]
        return cls(scored.image_ids[picks], scored.scores[picks].astype(np.float32), scored.best[:, picks],
                   snapshot.levels[rows], snapshot.boxes[rows])

    def take(self, picks: np.ndarray) -> Ranking:
        return Ranking(self.image_ids[picks], self.scores[picks], self.best[:, picks], self.levels[:, picks],
                       self.boxes[:, picks])

    @staticmethod
    def concat(parts: list[Ranking], n_queries: int) -> Ranking:
        if not parts:
            return Ranking(np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros((n_queries, 0), np.float32),
                           np.zeros((n_queries, 0), np.int8), np.zeros((n_queries, 0, 4), np.int32))
        return Ranking(*(np.concatenate([getattr(p, name) for p in parts], axis=axis) for name, axis in
                         (("image_ids", 0), ("scores", 0), ("best", 1), ("levels", 1), ("boxes", 1))))


def rank(store: ImageStore, queries: np.ndarray, *, mode: str | RetrievalMode, k: int,
         params: dict[str, Any] | SchedulerParams | None = None, stats: SearchStats,
         allowed: np.ndarray | None = None, filters: Any = None) -> Ranking:
    """The top ``k`` images of ``store`` for (s, dim) ``queries`` in ``mode``; its cost goes into ``stats``.

    ``himir`` runs :func:`scheduled_pass`; the exhaustive modes score every allowed image
    with :func:`score_exhaustive`, block by block as the store hands them over
    (:meth:`ImageStore.scan`), keeping each block's top ``k``. Ties are broken by the
    store's image order (insertion order, i.e. ascending image id), on every store.

    Parameters
    ----------
    allowed : np.ndarray, optional
        Sorted image ids a metadata filter allows (None = all).
    filters : mapping, optional
        The filter ``allowed`` came from (a store that applies filters pushes it down).

    Example
    -------
    >>> from himir_rag.store.memory import MemoryStore
    >>> rank(MemoryStore(snapshot), queries, mode="himir", k=5, stats=SearchStats("himir"))  # doctest: +SKIP
    """
    spec = MODES[parse_mode(mode)]
    queries = np.asarray(queries, dtype=np.float32)
    if spec.scorer is Scorer.SCHEDULED:
        snapshot, scored = scheduled_pass(store, queries, k=k, allowed=allowed, filters=filters, params=params,
                                          stats=stats)
        return Ranking.of(snapshot, scored, top_k(scored.scores, k))
    parts, scored_images = [], 0
    for view in store.scan(allowed, levels=spec.levels):
        scored = score_mode(spec, view.snapshot, queries, k=k, allowed=view.positions, stats=stats)
        scored_images += len(scored.image_ids)
        parts.append(Ranking.of(view.snapshot, scored, np.sort(top_k(scored.scores, k))))  # in store order
    stats.images_scored = scored_images
    merged = Ranking.concat(parts, len(queries))
    return merged.take(top_k(merged.scores, k))


# -- the scheduled pruning pass ----------------------------------------------------------------
@dataclass(frozen=True)
class SchedulerParams:
    """Tunables of the scheduled pass (``HiMIRConfig.scheduler``; saved as :meth:`overrides`).

    Attributes
    ----------
    candidate_k : int
        Region hits fetched per sub-query and level from the candidate stores; 0 =
        ``max(2k, 16)``; -1 = every image is a candidate (no candidate generation: exact).
    candidate_levels : tuple of str
        Levels searched for candidates (``global``, ``region``, ``segment``).
        Small objects are found best at the fine level, where ANN search is also most
        accurate (a segment holding the object is close to the sub-query).
    index_kind : str
        Candidate store kind: ``"auto"`` (flat up to ``flat_max`` vectors per level,
        IVF-Flat below ``pq_min`` (8,192), IVF-PQ fast-scan from it), ``"flat"``, ``"ivf"`` or ``"ivfpq"``.
    probe_share : float
        Share of a level's IVF lists visited per sub-query. The list count grows as
        ~sqrt(n) (:func:`himir_rag.store.faiss.ivf_nlist`), so a fixed probe count finds ever
        fewer true neighbours as the collection grows; a fixed share keeps the recall of the
        candidates. None (the default) = by the level's size and store (:meth:`probe_share_for`):
        0.05 in IVF-Flat levels (below ``pq_min`` vectors), 0.1 in IVF-PQ levels below
        :data:`LARGE_LEVEL`, 0.15 from it. Chosen on the tuning sets: on the seed-1 composite
        tuning set (600 queries; 1,600 / 6,400 vectors a level, 120 / 240 lists) 0.05 kept 0.958
        of himir-full's top-10 at fewer dot products than the earlier 41 / 160 lists at 0.06
        (0.944; 0.055 and 0.06 kept more at 3.52x / 3.42x fewer dot products than mvr, too close
        to the engine's 3.5x); on the 100k synthetic seed-1 collection 0.1 lost 0.9 points of
        Recall@10 where 0.15 kept it.
    nprobe : int
        A fixed count of IVF lists instead of ``probe_share`` (0 = use the share).
    consistency_overlap, consistency_margin : float
        Hierarchy-depth skipping: when the top-k by the global view and by global +
        regions overlap at least this much (fraction of k) and the k-th coarse score
        leads the next by at least the margin, the fine level is not visited.
        ``consistency_overlap > 1`` (the default) never skips: the heuristic is not
        exact (on a 6-photo test collection it skipped the segments that held the only
        evidence for the right photo); the exact per-image bounds of the descent already
        skip the fine level of every image that cannot reach the top-k.
    bound_scale : float
        A segment's bound is ``parent sim + bound_scale * (exact bound - parent sim)``, the
        exact bound being the angular one of :func:`_segment_bound`. 1.0 (the default) is
        exact (no accuracy loss); lower values prune harder and lose accuracy.
    sparsity_margin : float
        Hierarchy sparsity: for a sub-query, only segments under regions scoring within
        this margin of the image's best region are visited (``inf``, the default, = off:
        the pass then ranks its candidates exactly as ``himir-full`` does).
    pq_refine : int
        Hits fetched from an IVF-PQ store per wanted hit (its scores are estimates; more hits
        go to the exact re-ranking). 1 by default: at 1M synthetic images, 2 and 4 gave the
        same Recall@10 on the tuning queries at 1.5x and 2.5x the latency.
    ann_bound : bool
        Cap segment bounds with what the segment-level candidate search returned (its hits
        are located by region key and, for IVF-PQ, re-scored exactly: one dot product a
        hit): a candidate's best segment is its best hit, with that hit's row, and one
        without a hit cannot beat the lowest hit. Exact for flat stores; for IVF as exact
        as the probed lists and for IVF-PQ as its codes' ranking (the approximations the
        candidates already make). None (the default) = on while the segment level holds
        fewer than :data:`LARGE_LEVEL` vectors (:meth:`ann_bound_for`). With IVF-PQ the caps
        rest on estimates: "nothing the search did not return beats the lowest hit by more
        than the hits' errors" is a claim about the extreme of every scanned code, which
        weakens as the scan grows. On the seed-1 composite set they save 8% of the dot
        products at no loss; on the 100k synthetic seed-1 collection they cost 1 point of
        Recall@10 and save no time (benchmarks/README.md, "Candidate codes").
    candidate_pool : int
        Levels below ``pq_min`` vectors whose hits are exact (flat and IVF-Flat stores, Qdrant):
        hits fetched per sub-query and level, as a multiple of the hits wanted (``candidate_k``,
        or its default), for the *upper-bound pick*: per sub-query, an image's bound is its best
        pooled hit or, without one, the highest of the levels' lowest pooled scores; the images
        wanted with the highest mean bound over the sub-queries join the candidates. It finds
        photos that match every sub-query fairly well but none of them best (the multi-object
        questions). With FAISS the probed lists are scanned anyway (the same dot products, a
        longer heap); a Qdrant server returns 16x the hits. 1 = off. 16 (the default) kept the
        most of himir-full's top-10 on the composite tuning sets (seeds 1, 11, 12: 0.955 against
        0.939 without, of the pools 1, 4, 8 and 16) for 1.4% more dot products; the segment caps
        still come from each level's own top hits.
    pq_error_quantile : float
        With ``ann_bound``: IVF-PQ hits are re-scored exactly; a segment the search did not
        return is taken to score at most the lowest hit's estimate plus this quantile of the
        hits' estimate errors (1.0 = the largest error seen: safest, prunes least; 0 = trust
        the codes).
    list_ranking : {"auto", "exact"}
        How an IVF candidate search picks the lists it probes: ``"auto"`` (the default) ranks
        them through a projection of the centroids where one keeps 97% of their energy, and
        re-scores the best twice as many exactly (:class:`himir_rag.store.faiss.ListRanking`:
        7-8% fewer dot products a query on the five composite sets, Recall@10 unchanged on
        four and 0.16 points lower on the fifth; the synthetic scale benchmark's isotropic
        centroids keep every centroid scored); ``"exact"`` scores every centroid.
    """

    candidate_k: int = 0
    candidate_levels: tuple[str, ...] = ("region", "segment")
    index_kind: str = "auto"
    flat_max: int = FLAT_MAX
    pq_min: int = PQ_MIN
    probe_share: float | None = None
    nprobe: int = 0
    consistency_overlap: float = 2.0
    consistency_margin: float = 0.05
    bound_scale: float = 1.0
    sparsity_margin: float = float("inf")
    ann_bound: bool | None = None
    pq_refine: int = 1
    candidate_pool: int = 16
    pq_error_quantile: float = 0.75
    list_ranking: str = "auto"

    @classmethod
    def from_dict(cls, values: dict[str, Any] | SchedulerParams | None) -> SchedulerParams:
        """Build from a dict; unknown keys or out-of-range values raise ConfigError."""
        import dataclasses

        if isinstance(values, SchedulerParams):
            return values
        values = dict(values or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ConfigError(f"unknown scheduler parameters {sorted(unknown)}; valid: {sorted(known)}")
        if "candidate_levels" in values:
            values["candidate_levels"] = tuple(values["candidate_levels"])
        try:
            params = cls(**values)
            params._validate()
        except TypeError as exc:
            raise ConfigError(f"scheduler parameters {values}: {exc}") from None
        return params

    def _validate(self) -> None:
        bad_levels = set(self.candidate_levels) - {lv.name.lower() for lv in Level}
        if bad_levels or not self.candidate_levels:
            raise ConfigError(f"candidate_levels {self.candidate_levels} must name global, region or segment")
        if self.index_kind not in ("auto", "flat", "ivf", "ivfpq"):
            raise ConfigError(f"index_kind {self.index_kind!r} is unknown; use auto, flat, ivf or ivfpq")
        for name in ("pq_refine", "candidate_pool"):
            if isinstance(getattr(self, name), bool) or not isinstance(getattr(self, name), int):
                raise ConfigError(f"{name} must be an int >= 1, got {getattr(self, name)!r}")
        if self.bound_scale < 0 or self.nprobe < 0 or self.pq_refine < 1 or self.candidate_pool < 1:
            raise ConfigError("bound_scale and nprobe must be >= 0, pq_refine and candidate_pool >= 1")
        if not 0 <= self.pq_error_quantile <= 1:
            raise ConfigError(f"pq_error_quantile must be in [0, 1], got {self.pq_error_quantile}")
        if self.list_ranking not in LIST_RANKINGS:
            raise ConfigError(f"list_ranking {self.list_ranking!r} is unknown; use one of {LIST_RANKINGS}")
        if self.probe_share is not None and not 0 < self.probe_share <= 1:
            raise ConfigError(f"probe_share must be in (0, 1] (a share of the IVF lists), got {self.probe_share}")

    def overrides(self) -> dict[str, Any]:
        """The parameters that differ from the defaults, JSON-ready (tuples as lists): what a manifest stores.

        Example
        -------
        >>> SchedulerParams(candidate_k=8).overrides()
        {'candidate_k': 8}
        """
        import dataclasses

        default = SchedulerParams()
        return {f.name: list(value) if isinstance(value, tuple) else value for f in dataclasses.fields(self)
                if (value := getattr(self, f.name)) != getattr(default, f.name)}

    def probe_share_for(self, n_level: int, kind: str | None = None) -> float:
        """The share of the lists probed in a level of ``n_level`` vectors searched by a store of
        ``kind`` (None: the kind ``index_kind="auto"`` picks; see ``probe_share``)."""
        if self.probe_share is not None:
            return self.probe_share
        if n_level >= LARGE_LEVEL:
            return 0.15
        if kind is None:
            kind = auto_index_kind(n_level, flat_max=self.flat_max, pq_min=self.pq_min)
        return 0.1 if kind == "ivfpq" else 0.05

    def ann_bound_for(self, n_segments: int) -> bool:
        """Whether the segment hits cap the bounds, for a segment level of ``n_segments`` (see ``ann_bound``)."""
        return n_segments < LARGE_LEVEL if self.ann_bound is None else self.ann_bound

    @classmethod
    def exact(cls) -> SchedulerParams:
        """Settings that never prune: the pass then ranks exactly as ``himir-full``."""
        return cls(candidate_k=-1, consistency_overlap=2.0, bound_scale=1e6, sparsity_margin=float("inf"))


def scheduled_search(snapshot: Snapshot, queries: np.ndarray, *, k: int, allowed: np.ndarray | None = None,
                     params: dict[str, Any] | SchedulerParams | None = None, stats: SearchStats,
                     stores: Any = None) -> MaxSimScores:
    """:func:`scheduled_pass` over a snapshot in memory (``allowed``: sorted image positions).

    ``stores`` are the index's candidate stores (default: stores cached on the snapshot).
    The returned rows are rows of ``snapshot``.
    """
    from himir_rag.store.memory import MemoryStore

    store = MemoryStore(snapshot, stores if stores is not None else default_stores(snapshot))
    ids = None if allowed is None else np.sort(snapshot.image_ids[np.asarray(allowed, np.int64)])
    return scheduled_pass(store, queries, k=k, allowed=ids, params=params, stats=stats)[1]


def scheduled_pass(store: ImageStore, queries: np.ndarray, *, k: int, allowed: np.ndarray | None = None,
                   filters: Any = None, params: dict[str, Any] | SchedulerParams | None = None,
                   stats: SearchStats) -> tuple[Snapshot, MaxSimScores]:
    """HiMIR's scheduled pruning pass over the 1+M+N hierarchy, on any image store.

    1. candidate generation: the store's search of the candidate levels, per sub-query;
       the candidates' region vectors are then read from the store;
    2. exact coarse MaxSim (global view, then regions) of the candidates;
    3. cross-hierarchy consistency: if the global-only and the coarse top-k agree with a
       clear margin, the fine level is skipped (hierarchy-depth skipping);
    4. otherwise descend to fine segments, only where a segment's upper bound can still
       beat the sub-query's best so far and its region matches the sub-query well
       (hierarchy sparsity), and only for images whose upper bound can still reach the
       top-k (two rounds: the first k images by upper bound set the threshold, the rest
       are pruned against it).

    Nothing here is proportional to the collection: candidates are found by the store,
    then only their rows are touched.

    Parameters
    ----------
    store : ImageStore
        Where the regions live (:mod:`himir_rag.store.base`).
    queries : np.ndarray
        (s, dim) sub-query vectors.
    allowed : np.ndarray, optional
        Sorted image ids allowed by the metadata filter (None = all).
    filters : mapping, optional
        The filter ``allowed`` came from, for a store that applies it itself.

    Returns
    -------
    snapshot : Snapshot
        The candidates' regions (the rows of the scores index it).
    scored : MaxSimScores
        Scores of the candidate images (pruned images keep their coarse lower bound).
    """
    p = SchedulerParams.from_dict(params)
    queries = np.asarray(queries, dtype=np.float32)
    view, caps = _candidates(store, queries, k=k, allowed=allowed, filters=filters, params=p, stats=stats)
    snapshot = view.snapshot
    positions = np.arange(len(snapshot), dtype=np.int64) if view.positions is None else view.positions
    rows = snapshot.rows_of(positions)
    row_levels = snapshot.levels[rows]
    coarse_rows = rows[row_levels <= Level.REGION]
    coarse_vectors = snapshot.region_vectors(coarse_rows)
    coarse_sims = similarities(queries, coarse_vectors)
    on_global, coarse = _coarse_scores(snapshot, coarse_rows, coarse_sims)
    stats.dot_products += coarse.dot_products
    stats.extra["coarse_dot_products"] = coarse.dot_products
    stats.images_scored = len(coarse.image_ids)
    stats.extra.update(levels_skipped=0, images_descended=0, images_pruned=0, segments_visited=0)
    if _consistent(on_global, coarse, k=k, params=p):
        stats.extra["levels_skipped"] = 1
        return snapshot, coarse
    counts = snapshot.image_starts[positions + 1] - snapshot.image_starts[positions]
    owner = np.repeat(np.arange(len(positions)), counts)  # candidate index of each row
    is_segment = row_levels == Level.SEGMENT
    segments = (rows[is_segment], owner[is_segment])
    cap = None if caps is None else _segment_caps(positions, *caps)
    return snapshot, _descend(snapshot, queries, coarse, (coarse_rows, coarse_sims, coarse_vectors), segments, k=k,
                              params=p, stats=stats, cap=cap)


def score_mode(mode: ModeSpec | RetrievalMode | str, snapshot: Snapshot, queries: np.ndarray, *, k: int,
               allowed: np.ndarray | None = None, params: dict[str, Any] | SchedulerParams | None = None,
               stats: SearchStats, stores: Any = None) -> MaxSimScores:
    """Rank with ``mode``'s scorer (:data:`himir_rag.modes.MODES`): its counters go into ``stats``.

    Parameters
    ----------
    mode : ModeSpec, RetrievalMode or str
    queries : np.ndarray
        (s, dim) query vectors: the sub-queries, or one vector for a mode without sub-queries.
    allowed : np.ndarray, optional
        Sorted image positions allowed by the metadata filter (None = all).
    params, stores
        The scheduled pass's parameters and candidate stores (unused by exhaustive modes).

    Returns
    -------
    MaxSimScores
        Scores of the images scored (every allowed one for an exhaustive mode).

    Example
    -------
    >>> scored = score_mode("mvr", snapshot, queries, k=10, stats=SearchStats("mvr"))  # doctest: +SKIP
    """
    spec = mode if isinstance(mode, ModeSpec) else MODES[parse_mode(mode)]
    if spec.scorer is Scorer.SCHEDULED:
        return scheduled_search(snapshot, queries, k=k, allowed=allowed, params=params, stats=stats, stores=stores)
    scored = score_exhaustive(snapshot, queries, levels=spec.levels, allowed=allowed)
    stats.dot_products += scored.dot_products
    stats.images_scored = len(scored.image_ids)
    return scored


def default_stores(snapshot: Snapshot) -> Any:
    """Candidate stores cached on ``snapshot`` (for callers that hold no index, e.g. tests)."""
    from himir_rag.store.candidates import CandidateStores

    return snapshot.cached("candidate_stores", lambda: CandidateStores(snapshot.dim))


def _coarse_scores(snapshot: Snapshot, rows: np.ndarray, sims: np.ndarray) -> tuple[MaxSimScores, MaxSimScores]:
    """Global-only and global+region MaxSim of the candidates, from one (s, n_rows) product."""
    n_queries = sims.shape[0]
    images = snapshot.region_image[rows]
    is_global = snapshot.levels[rows] == Level.GLOBAL
    on_global = MaxSimScores(images[is_global], sims[:, is_global], np.broadcast_to(rows[is_global], (n_queries, int(is_global.sum()))).copy(), 0)
    if len(rows) == 0:
        return on_global, on_global
    best, arg = segment_max(sims, images)
    coarse = MaxSimScores(on_global.image_ids, best, rows[arg], int(sims.size))
    return on_global, coarse


def _candidates(store: ImageStore, queries: np.ndarray, *, k: int, allowed: np.ndarray | None, filters: Any,
                params: SchedulerParams, stats: SearchStats) -> tuple[RegionView, Any]:
    """The regions of the images worth scoring, from the store's hits at the candidate levels.

    Also returns, when ``ann_bound`` is on, the segment level's hits as ``(exact scores,
    image positions, rows, level below which nothing was returned)`` in the returned
    view's snapshot (else None): see :func:`_segment_caps`.
    """
    n_allowed = len(store) if allowed is None else len(allowed)
    want = params.candidate_k or max(2 * k, 16)
    stats.extra["candidate_dot_products"] = 0
    stats.extra["candidates"] = n_allowed
    if params.candidate_k < 0 or n_allowed <= want:
        return _every(store, allowed), None
    levels = [Level[name.upper()] for name in params.candidate_levels]
    share = n_allowed / max(len(store), 1)
    counts = store.level_counts()
    if store.in_memory and params.index_kind == "auto":
        if sum(store.candidate_cost(level, params) for level in levels) >= (counts["global"] + counts["region"]) * share:
            return _every(store, allowed), None  # small collection: scoring everything is cheaper
    # a metadata filter the store cannot apply hides images from it: fetch more hits, in proportion
    fetch = want if store.applies_filters else int(want / max(share, 1e-9))
    found, spent, segment_hits, pooled = [], 0, None, []
    ann_bound = params.ann_bound_for(counts["segment"])
    pool = params.candidate_pool if params.index_kind in ("auto", "flat", "ivf") else 1
    for level in levels:
        pooling = pool > 1 and counts[level.name.lower()] < params.pq_min  # flat / IVF-Flat: exact hits
        hits = store.candidates(queries, level, max(fetch, min(fetch * pool, _POOL_MAX)) if pooling else fetch,
                                params=params, allowed=allowed, filters=filters)
        own = hits
        if pooling:  # the level's own top hits (best first) name candidates and cap segments as without a pool:
            # the pool's lowest hits are no bound on the lists not probed (caps from them: 3.5x fewer segments
            # visited, 2 points of agreement with himir-full lost on the composite tuning sets)
            own = Candidates(hits.scores[:, :fetch], hits.keys[:, :fetch], hits.dot_products, hits.exact)
            if hits.exact:
                pooled.append(hits)
        found.append(own.keys[own.keys >= 0] >> KEY_SHIFT)
        if level is Level.SEGMENT and ann_bound:  # only these hits' scores are used
            segment_hits = own
        spent += hits.dot_products
    if pooled:
        found.append(_upper_bound_pick(pooled, fetch))
    ids = np.unique(np.concatenate(found))
    if allowed is not None:
        ids = ids[np.isin(ids, allowed, assume_unique=True)]
    view = store.vectors(ids)
    if _view_size(view) < k:  # too few left after the filter: every allowed image is a candidate
        view = _every(store, allowed)
    else:
        stats.extra["candidates"] = _view_size(view)
    caps = None
    if segment_hits is not None:
        caps, rescored = _hit_caps(view.snapshot, queries, segment_hits, params)
        spent += rescored
    stats.dot_products += spent
    stats.extra["candidate_dot_products"] = spent
    return view, caps


_POOL_MAX = 2048  # most hits a pooled search asks for (FAISS's GPU k limit; a filter scales the hits wanted up)


def _upper_bound_pick(pooled: list[Candidates], count: int) -> np.ndarray:
    """The ``count`` image ids whose mean over the sub-queries of an upper bound of their similarity,
    as far as the pooled hits tell, is highest.

    Per sub-query, an image's bound is its best hit over the pooled levels; an image without a
    hit at that sub-query is bounded by the highest of the levels' lowest pooled scores (what
    the scanned lists hold beyond the pool). An image matching every sub-query fairly well
    ranks here above one that matches a single sub-query best and the others not at all.
    """
    keys = np.concatenate([h.keys for h in pooled], axis=1)
    scores = np.concatenate([h.scores for h in pooled], axis=1)
    valid = keys >= 0
    if not valid.any():
        return np.zeros(0, np.int64)
    n_queries = keys.shape[0]
    lowest = [np.where(h.keys >= 0, h.scores, np.inf).min(axis=1) for h in pooled]
    # a level without hits at a sub-query (e.g. an empty level) says nothing: the other levels' floor holds
    floor = np.max([np.where(np.isfinite(low), low, -np.inf) for low in lowest], axis=0)
    floor = np.where(valid.any(axis=1), floor, 0.0)  # no hit anywhere: the sub-query ranks no image
    images, column = np.unique(keys[valid] >> KEY_SHIFT, return_inverse=True)
    bound = np.broadcast_to(floor[:, None], (n_queries, len(images))).astype(np.float64)
    np.maximum.at(bound, (np.nonzero(valid)[0], column), scores[valid])
    mean = bound.mean(axis=0)
    return images[np.argsort(-mean, kind="stable")[:count]]


def _hit_caps(snapshot: Snapshot, queries: np.ndarray, hits: Candidates,
              params: SchedulerParams) -> tuple[tuple[np.ndarray, ...], int]:
    """The segment hits located in ``snapshot`` with the score below which nothing was returned
    (see :func:`_segment_caps`), and the dot products spent making estimated scores exact."""
    scores = hits.scores
    hit_positions, hit_rows = locate(snapshot, hits.keys)
    valid = hit_rows >= 0
    last = np.where(valid.any(axis=1), np.where(valid, scores, np.inf).min(axis=1), np.inf)
    spent = 0
    if not hits.exact:  # PQ estimates: one exact dot product a hit makes them exact
        estimates, scores = scores, _exact_hit_scores(snapshot, queries, hit_rows)
        spent = int(valid.sum())
        last = last + _estimate_error(scores, estimates, valid, params.pq_error_quantile)
    return (scores, hit_positions, hit_rows, last.astype(np.float32)), spent


def _view_size(view: RegionView) -> int:
    return len(view.snapshot) if view.positions is None else len(view.positions)


def _every(store: ImageStore, allowed: np.ndarray | None) -> RegionView:
    """Every allowed image's regions, as one view."""
    views = list(store.scan(allowed))
    return views[0] if len(views) == 1 else RegionView(gather([(v.snapshot, v.positions) for v in views],
                                                              dim=store.dim))


def gather(parts: list[tuple[Snapshot, np.ndarray | None]], *, dim: int) -> Snapshot:
    """One snapshot of the images at ``positions`` (None = all) of each snapshot, in that order
    (a single whole snapshot is returned as it is, not copied)."""
    if not parts:
        return Snapshot.empty(dim)
    if len(parts) == 1 and parts[0][1] is None:
        return parts[0][0]
    images, arrays = {}, {name: [] for name in ("vectors", "region_image", "levels", "parents", "boxes")}
    offset = 0
    for snapshot, positions in parts:
        positions = np.arange(len(snapshot)) if positions is None else np.asarray(positions, np.int64)
        rows = snapshot.rows_of(positions)
        sizes = snapshot.image_starts[positions + 1] - snapshot.image_starts[positions]
        shift = np.repeat(offset + np.r_[0, np.cumsum(sizes)[:-1]] - snapshot.image_starts[positions], sizes)
        parents = snapshot.parents[rows]
        arrays["parents"].append(np.where(parents >= 0, parents + shift, -1))
        for name in ("vectors", "region_image", "levels", "boxes"):
            arrays[name].append(getattr(snapshot, name)[rows])
        images.update({int(i): snapshot.images[int(i)] for i in snapshot.image_ids[positions]})
        offset += len(rows)
    return Snapshot(images, **{name: np.concatenate(values) for name, values in arrays.items()})


def _estimate_error(exact: np.ndarray, estimates: np.ndarray, valid: np.ndarray, quantile: float) -> np.ndarray:
    """(s,) the ``quantile`` of the hits' underestimates ``exact - estimate`` per sub-query (>= 0; 0 without hits)."""
    spread = np.zeros(len(exact))
    for q in range(len(exact)):  # a handful of sub-queries, a few dozen hits each
        errors = np.sort(exact[q, valid[q]] - estimates[q, valid[q]])
        if len(errors):  # numpy's default ("linear") quantile, without np.quantile's overhead
            at = quantile * (len(errors) - 1)
            low = int(at)
            spread[q] = errors[low] + (at - low) * (errors[min(low + 1, len(errors) - 1)] - errors[low])
    return spread.clip(min=0.0)


def _exact_hit_scores(snapshot: Snapshot, queries: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """(s, fetch) exact similarity of each sub-query to its hits' ``rows`` (-inf where a row is -1)."""
    scores = np.full(rows.shape, -np.inf, np.float32)
    held = rows >= 0
    if held.any():
        unique, inverse = np.unique(rows[held], return_inverse=True)  # each row read once
        sub, _ = np.nonzero(held)
        scores[held] = np.einsum("ij,ij->i", snapshot.region_vectors(unique)[inverse], queries[sub])
    return scores


def _segment_caps(positions: np.ndarray, scores: np.ndarray, hit_positions: np.ndarray, hit_rows: np.ndarray,
                  last: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """What the segment ANN hits tell about each candidate's best segment, per sub-query.

    The store returned, per sub-query, the ``fetch`` most similar segments of the lists it
    probed, with exact ``scores``; a segment it did not return scores at most ``last``
    (the lowest hit for exact stores; for IVF-PQ the lowest estimate plus the
    ``pq_error_quantile`` of the estimate errors seen on the hits). So a candidate's segments are capped by
    ``max(best hit, last)``, and its best segment is *known* -- its best hit, with that
    hit's row -- when that hit reaches ``last``. Exact for a flat store; for IVF it holds
    for the probed lists, for IVF-PQ up to the codes' error: the approximations the
    candidates themselves already make.

    Returns
    -------
    cap : np.ndarray
        (s, n_candidates) float32 upper bound of the candidate's segments.
    hit_best, hit_rows : np.ndarray
        (s, n_candidates) best hit's exact score (-inf: none) and row (-1: none).
    known : np.ndarray
        (s, n_candidates) bool: the best hit is the candidate's best segment.
    """
    n_queries = scores.shape[0]
    valid = hit_rows >= 0
    # no hit at all (e.g. only empty lists probed) says nothing: no cap
    last = np.where(valid.any(axis=1), last, np.inf).astype(np.float32)
    hit_best = np.full((n_queries, len(positions)), -np.inf, np.float32)
    best_rows = np.full(hit_best.shape, -1, np.int64)
    column = np.minimum(np.searchsorted(positions, hit_positions), max(len(positions) - 1, 0))
    found = valid & (len(positions) > 0)
    found[found] &= positions[column[found]] == hit_positions[found]
    for q in range(n_queries):
        cols, vals, rows = column[q, found[q]], scores[q, found[q]], hit_rows[q, found[q]]
        order = np.argsort(vals, kind="stable")  # ascending: each candidate's best hit is written last
        hit_best[q, cols[order]] = vals[order]
        best_rows[q, cols[order]] = rows[order]
    known = hit_best >= last[:, None]
    return np.maximum(hit_best, last[:, None]), hit_best, best_rows, known


def _consistent(on_global: MaxSimScores, coarse: MaxSimScores, *, k: int, params: SchedulerParams) -> bool:
    """Cross-hierarchy consistency: the global-only and coarse top-k agree, with a clear margin."""
    n = len(coarse.image_ids)
    if params.consistency_overlap > 1.0 or n <= k:
        return False
    coarse_top = top_k(coarse.scores, k + 1)
    margin = float(coarse.scores[coarse_top[k - 1]] - coarse.scores[coarse_top[k]])
    overlap = len(np.intersect1d(top_k(on_global.scores, k), coarse_top[:k])) / k
    return overlap >= params.consistency_overlap and margin >= params.consistency_margin


def _descend(snapshot: Snapshot, queries: np.ndarray, coarse: MaxSimScores,
             coarse_scored: tuple[np.ndarray, np.ndarray, np.ndarray], segments: tuple[np.ndarray, np.ndarray], *,
             k: int, params: SchedulerParams, stats: SearchStats, cap: np.ndarray | None = None) -> MaxSimScores:
    """Score fine segments where they can still change the top-k (bounds + sparsity).

    ``coarse_scored`` is (coarse rows, their (s, n) similarities, their vectors);
    ``segments`` is (segment rows, candidate index of each row's image). The bounds come from
    the segments' query-independent geometry (:func:`cached_geometry`: computed once a
    snapshot); only the segments some sub-query visits are read.
    """
    seg_rows, image_pos = segments
    if len(seg_rows) == 0:
        return coarse
    rows, sims, coarse_vectors = coarse_scored  # a segment's parent is a coarse row of its image: already scored
    parent_col = np.searchsorted(rows, snapshot.parents[seg_rows])
    parent_sim = sims[:, parent_col]
    best_region = coarse.best[:, image_pos]  # (s, n_seg) best coarse similarity of the segment's image
    geometry, computed = cached_geometry(snapshot, seg_rows, coarse_vectors, parent_col)
    stats.extra["geometry_dot_products"] = 3 * computed  # once per segment and snapshot, not per query
    exact = _segment_bound(queries, geometry, parent_sim)
    bound_known = None
    if cap is not None:  # what the segment ANN search already showed (see _segment_caps)
        cap_values, hit_best, hit_rows, known = cap
        exact = np.minimum(exact, cap_values[:, image_pos] + _BOUND_SLACK)
        better = hit_best > coarse.best  # a hit is a real segment: its score is a lower bound
        coarse = MaxSimScores(coarse.image_ids, np.maximum(coarse.best, hit_best).astype(np.float32),
                              np.where(better, hit_rows, coarse.best_rows), coarse.dot_products)
        bound_known = known[:, image_pos]
    bound = parent_sim + params.bound_scale * (exact - parent_sim)
    useful = (bound > best_region) & (parent_sim >= best_region - params.sparsity_margin)
    if bound_known is not None:
        useful &= ~bound_known  # nothing to learn from a candidate whose best segment is known
    image_bound = coarse.best.copy()
    for q in range(len(queries)):  # per sub-query (a handful), never per region
        np.maximum.at(image_bound[q], image_pos[useful[q]], bound[q, useful[q]])
    upper = image_bound.mean(axis=0)
    order = np.argsort(-upper, kind="stable")
    read = useful.any(axis=0)  # the segments a sub-query may visit: the only vectors needed
    if read.all():
        seg_vectors = snapshot.region_vectors(seg_rows)
    else:
        seg_vectors = np.zeros((len(seg_rows), queries.shape[1]), np.float32)
        seg_vectors[read] = snapshot.region_vectors(seg_rows[read])
    segments = (seg_rows, image_pos, seg_vectors)
    refined = _visit(queries, coarse, segments, useful, order[:k], stats)
    threshold = np.sort(refined.scores)[::-1][min(k, len(order)) - 1] if len(order) else -np.inf
    rest = order[k:][upper[order[k:]] >= threshold]
    stats.extra["images_pruned"] = int(len(order) - k - len(rest)) if len(order) > k else 0
    refined = _visit(queries, refined, segments, useful, rest, stats)
    stats.extra["images_descended"] = int(min(k, len(order)) + len(rest))
    stats.extra["segments_total"] = int(len(seg_rows) * len(queries))
    return refined


_BOUND_SLACK = 1e-4  # float32 / float16 rounding: a bound never falls below the true similarity
_GEOMETRY_SLACK = 2e-5  # relative rounding of a float32 dot product of a few hundred terms, with a margin
_NORM, _PARENT_NORM, _ANGLE, _DISTANCE = range(4)  # columns of segment_geometry


def segment_geometry(segments: np.ndarray, parents: np.ndarray, parent_of: np.ndarray | None = None) -> np.ndarray:
    """(n, 4) float32 query-independent geometry of (n, dim) ``segments`` against their parents:
    the segment's norm ``|v|``, the parent's norm ``|p|``, the angle between them and ``||v - p||``.

    ``parent_of`` (n,) picks each segment's parent among the rows of ``parents`` (None: row i
    is segment i's parent). Three dot products a segment (no (n, dim) temporaries); the angle
    and the distance are rounded up by more than float32 rounding can take away, so the bounds
    built on them stay upper bounds.
    """
    parent_sq = np.einsum("ij,ij->i", parents, parents)
    if parent_of is not None:  # one parent row per segment (a parent's norm computed once)
        parents, parent_sq = parents[parent_of], parent_sq[parent_of]
    seg_sq = np.einsum("ij,ij->i", segments, segments)
    dot = np.einsum("ij,ij->i", segments, parents)
    seg_norm, par_norm = np.sqrt(seg_sq), np.sqrt(parent_sq)
    cos_vp = dot / np.maximum(seg_norm * par_norm, 1e-12) - _GEOMETRY_SLACK
    distance = np.sqrt(np.maximum(seg_sq + parent_sq - 2 * dot, 0) + _GEOMETRY_SLACK * (seg_sq + parent_sq))
    return np.stack([seg_norm, par_norm, np.arccos(np.clip(cos_vp, -1, 1)), distance], axis=1).astype(np.float32)


def cached_geometry(snapshot: Snapshot, seg_rows: np.ndarray, parents: np.ndarray,
                    parent_of: np.ndarray) -> tuple[np.ndarray, int]:
    """:func:`segment_geometry` of the snapshot's ``seg_rows``, from a per-snapshot table filled
    as searches reach them, and how many rows this call computed.

    ``parents`` holds the parents' vectors, ``parent_of`` (n,) picks each segment's among them.
    The geometry depends only on the stored vectors, so a snapshot (immutable) keeps it: its
    three dot products a segment are paid once, not on every query (they cost as much as
    visiting the segment with three sub-queries). The table takes 16 bytes a stored row,
    allocated on the first scheduled pass; rows are written whole and a row still holding a
    NaN is computed again, so concurrent searches only ever repeat work.
    """
    table = snapshot.cached("segment_geometry", lambda: np.full((len(snapshot.levels), 4), np.nan, np.float32))
    geometry = table[seg_rows]
    missing = np.flatnonzero(np.isnan(geometry).any(axis=1))
    if len(missing):
        geometry[missing] = segment_geometry(snapshot.region_vectors(seg_rows[missing]), parents,
                                             parent_of[missing])
        table[seg_rows[missing]] = geometry[missing]
    return geometry, len(missing)


def _segment_bound(queries: np.ndarray, geometry: np.ndarray, parent_sim: np.ndarray) -> np.ndarray:
    """(s, n_seg) exact upper bound of ``q . v`` for each segment ``v`` from its parent ``p``.

    On the sphere the angle between q and v is at least |angle(q, p) - angle(v, p)|, so
    ``q . v <= |q| |v| cos(max(0, angle(q, p) - angle(v, p)))``; the Cauchy-Schwarz bound
    ``q . p + |q| ||v - p||`` also holds, and the smaller of the two is used. Both need only
    the parent's similarity (already computed) and the segments' query-independent
    ``geometry`` (:func:`segment_geometry`).
    """
    seg_norm, par_norm = geometry[:, _NORM], geometry[:, _PARENT_NORM]
    q_norm = np.linalg.norm(queries, axis=1)[:, None]
    cos_qp = parent_sim / np.maximum(q_norm * par_norm[None, :], 1e-12)
    gap = np.maximum(np.arccos(np.clip(cos_qp, -1, 1)) - geometry[None, :, _ANGLE], 0.0)
    angular = q_norm * seg_norm[None, :] * np.cos(gap)
    radius = parent_sim + q_norm * geometry[None, :, _DISTANCE]
    return (np.minimum(angular, radius) + _BOUND_SLACK).astype(np.float32)


def _visit(queries: np.ndarray, scored: MaxSimScores, segments: tuple[np.ndarray, np.ndarray, np.ndarray],
           useful: np.ndarray, images: np.ndarray, stats: SearchStats) -> MaxSimScores:
    """Score the useful segments of ``images`` (candidate indices) and fold them into ``scored``.

    ``segments`` is (rows, candidate index of each row's image (non-decreasing), (n, dim) float32 vectors).
    """
    seg_rows, image_pos, seg_vectors = segments
    chosen = np.zeros(len(scored.image_ids), bool)
    chosen[images] = True
    visit = useful & chosen[image_pos][None, :]
    best, rows = scored.best.copy(), scored.best_rows.copy()
    visited = 0
    same = len(queries) > 1 and (visit == visit[:1]).all()  # the same segments for every sub-query: one product
    sel = np.flatnonzero(visit[0]) if same else np.zeros(0, np.int64)
    if len(sel):
        top, arg = segment_max(similarities(queries, seg_vectors[sel]), image_pos[sel])
        first = sel[arg]  # (s, images) row of each image's first best segment, per sub-query
        pos, at = image_pos[first], np.arange(len(queries))[:, None]
        better = top > best[at, pos]
        best[at, pos] = np.where(better, top, best[at, pos])
        rows[at, pos] = np.where(better, seg_rows[first], rows[at, pos])
        visited = len(sel) * len(queries)
    for q in range(0 if same else len(queries)):
        sel = np.flatnonzero(visit[q])
        if len(sel) == 0:
            continue
        sims = seg_vectors[sel] @ queries[q]
        visited += len(sel)
        top, arg = segment_max(sims[None, :], image_pos[sel])  # per image, its first best segment
        first, top = sel[arg[0]], top[0]
        pos = image_pos[first]
        better = top > best[q, pos]
        best[q, pos[better]] = top[better]
        rows[q, pos[better]] = seg_rows[first[better]]
    stats.dot_products += visited
    stats.extra["segments_visited"] = stats.extra.get("segments_visited", 0) + visited
    return MaxSimScores(scored.image_ids, best, rows, scored.dot_products + visited)

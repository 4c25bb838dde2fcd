"""Matching: the shared MaxSim scorer, the baselines, and the compute meter.

Every mode scores images by late interaction: for each sub-query, the best
inner product over the image's regions at the allowed levels (MaxSim); the image
score is the mean over sub-queries. Modes differ only in which levels they match
and how much of that work they skip:

============  ===========================================================
``single``    whole query vs the global view (conventional single vector)
``mvr``       sub-queries vs the global view + fine segments, exhaustive
``himir-full``  sub-queries vs all 1+M+N levels, exhaustive
``himir``     the scheduled pruning pass over 1+M+N (:func:`scheduled_search`)
============  ===========================================================

The compute meter counts query-vector x region-vector inner products.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import numpy as np

from himir_rag.catalog import Snapshot
from himir_rag.errors import ConfigError
from himir_rag.hierarchy import Level

__all__ = [
    "RetrievalMode", "MaxSimScores", "SearchStats", "SchedulerParams", "maxsim", "segment_max", "score_exhaustive",
    "scheduled_search", "parse_mode", "top_k", "MODE_LEVELS",
]


class RetrievalMode(str, Enum):
    """What is matched (see module docstring)."""

    SINGLE = "single"
    MVR = "mvr"
    HIMIR_FULL = "himir-full"
    HIMIR = "himir"


MODE_LEVELS: dict[RetrievalMode, tuple[Level, ...]] = {
    RetrievalMode.SINGLE: (Level.GLOBAL,),
    RetrievalMode.MVR: (Level.GLOBAL, Level.SEGMENT),
    RetrievalMode.HIMIR_FULL: (Level.GLOBAL, Level.REGION, Level.SEGMENT),
    RetrievalMode.HIMIR: (Level.GLOBAL, Level.REGION, Level.SEGMENT),
}


def parse_mode(mode: str | RetrievalMode) -> RetrievalMode:
    """Mode by name; unknown names raise ConfigError listing the valid ones."""
    try:
        return RetrievalMode(mode)
    except ValueError:
        valid = ", ".join(m.value for m in RetrievalMode)
        raise ConfigError(f"mode {mode!r} is unknown; valid modes: {valid}") from None


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
    return segment_max(queries @ vectors.T, groups)


def segment_max(sims: np.ndarray, groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Max and first argmax of ``sims`` (s, r) over runs of equal ``groups`` (r,) -> (s, n_groups) each."""
    n_rows = sims.shape[1]
    starts = np.flatnonzero(np.r_[True, groups[1:] != groups[:-1]])
    best = np.maximum.reduceat(sims, starts, axis=1)
    group_of_row = np.repeat(np.arange(len(starts)), np.diff(np.r_[starts, n_rows]))
    rows = np.where(sims >= best[:, group_of_row], np.arange(n_rows), n_rows)
    return best, np.minimum.reduceat(rows, starts, axis=1)


def score_exhaustive(
    snapshot: Snapshot, queries: np.ndarray, *, levels: tuple[Level, ...], row_mask: np.ndarray | None = None
) -> MaxSimScores:
    """MaxSim of ``queries`` (s, dim) over every region at ``levels`` of every allowed image.

    ``row_mask`` (n_regions,) bool restricts the rows (metadata filter, candidates).
    """
    mask = np.isin(snapshot.levels, [int(lv) for lv in levels])
    if row_mask is not None:
        mask &= row_mask
    rows = np.flatnonzero(mask)
    image_of_row = snapshot.region_image[rows]
    best, arg = maxsim(queries, snapshot.vectors[rows], image_of_row)
    starts = np.flatnonzero(np.r_[True, image_of_row[1:] != image_of_row[:-1]]) if len(rows) else rows
    return MaxSimScores(image_of_row[starts], best.astype(np.float32), rows[arg], int(len(queries) * len(rows)))


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Positions of the ``k`` largest scores, best first (ties broken by position)."""
    k = min(k, len(scores))
    if k <= 0:
        return np.zeros(0, np.int64)
    part = np.argpartition(-scores, k - 1)[:k] if k < len(scores) else np.arange(len(scores))
    return part[np.lexsort((part, -scores[part]))]


# -- the scheduled pruning pass ----------------------------------------------------------------
@dataclass(frozen=True)
class SchedulerParams:
    """Tunables of the scheduled pass (``HiMIRConfig.scheduler`` holds them as a dict).

    Attributes
    ----------
    candidate_k : int
        Region hits fetched per sub-query and level by FAISS; 0 = ``max(2k, 16)``;
        -1 = every image is a candidate (no candidate generation: exact).
    candidate_levels : tuple of str
        Levels searched by FAISS for candidates (``global``, ``region``, ``segment``).
        Small objects are found best at the fine level, where ANN search is also most
        accurate (a segment holding the object is close to the sub-query).
    index_kind : str
        FAISS index for candidate generation: ``"auto"`` (flat up to ``flat_max``
        vectors per level, IVF above), ``"flat"``, ``"ivf"`` or ``"hnsw"``.
    nprobe : int
        IVF lists visited per sub-query.
    consistency_overlap, consistency_margin : float
        Hierarchy-depth skipping: when the top-k by the global view and by global +
        regions overlap at least this much (fraction of k) and the k-th coarse score
        leads the next by at least the margin, the fine level is not visited.
        ``consistency_overlap > 1`` never skips.
    bound_scale : float
        A segment can score at most ``parent sim + bound_scale * ||seg - parent||``.
        1.0 is an exact bound (no accuracy loss); lower values prune harder.
    sparsity_margin : float
        Hierarchy sparsity: for a sub-query, only segments under regions scoring within
        this margin of the image's best region are visited (``inf`` = off).
    """

    candidate_k: int = 0
    candidate_levels: tuple[str, ...] = ("region", "segment")
    index_kind: str = "auto"
    flat_max: int = 256
    nprobe: int = 8
    consistency_overlap: float = 1.0
    consistency_margin: float = 0.05
    bound_scale: float = 0.5
    sparsity_margin: float = 0.1

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> SchedulerParams:
        """Build from a dict; unknown keys raise ConfigError naming the valid ones."""
        import dataclasses

        values = dict(values or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ConfigError(f"unknown scheduler parameters {sorted(unknown)}; valid: {sorted(known)}")
        if "candidate_levels" in values:
            values["candidate_levels"] = tuple(values["candidate_levels"])
        params = cls(**values)
        bad_levels = set(params.candidate_levels) - {lv.name.lower() for lv in Level}
        if bad_levels or not params.candidate_levels:
            raise ConfigError(f"candidate_levels {params.candidate_levels} must name global, region or segment")
        if params.index_kind not in ("auto", "flat", "ivf", "hnsw"):
            raise ConfigError(f"index_kind {params.index_kind!r} is unknown; use auto, flat, ivf or hnsw")
        if params.bound_scale < 0 or params.nprobe < 1:
            raise ConfigError("bound_scale must be >= 0 and nprobe >= 1")
        return params

    @classmethod
    def exact(cls) -> SchedulerParams:
        """Settings that never prune: the pass then ranks exactly as ``himir-full``."""
        return cls(candidate_k=-1, consistency_overlap=2.0, bound_scale=1e6, sparsity_margin=float("inf"))


def scheduled_search(snapshot: Snapshot, queries: np.ndarray, *, k: int, row_mask: np.ndarray | None,
                     params: dict[str, Any] | SchedulerParams | None, stats: SearchStats) -> MaxSimScores:
    """HiMIR's scheduled pruning pass over the 1+M+N hierarchy.

    1. candidate generation: FAISS over the global and region levels, per sub-query;
    2. exact coarse MaxSim (global view, then regions) of the candidates;
    3. cross-hierarchy consistency: if the global-only and the coarse top-k agree with a
       clear margin, the fine level is skipped (hierarchy-depth skipping);
    4. otherwise descend to fine segments, only where a segment's upper bound can still
       beat the sub-query's best so far and its region matches the sub-query well
       (hierarchy sparsity), and only for images whose upper bound can still reach the
       top-k (two rounds: the first k images by upper bound set the threshold, the rest
       are pruned against it).

    Parameters
    ----------
    queries : np.ndarray
        (s, dim) sub-query vectors.
    row_mask : np.ndarray, optional
        (n_regions,) rows allowed by the metadata filter.

    Returns
    -------
    MaxSimScores
        Scores of the candidate images (pruned images keep their coarse lower bound).
    """
    p = params if isinstance(params, SchedulerParams) else SchedulerParams.from_dict(params)
    candidates = _candidates(snapshot, queries, k=k, row_mask=row_mask, params=p, stats=stats)
    mask = np.isin(snapshot.region_image, candidates)
    if row_mask is not None:
        mask &= row_mask
    coarse_rows = np.flatnonzero(mask & (snapshot.levels <= Level.REGION))
    coarse_sims = queries @ snapshot.vectors[coarse_rows].T
    on_global, coarse = _coarse_scores(snapshot, coarse_rows, coarse_sims)
    stats.dot_products += coarse.dot_products
    stats.extra["coarse_dot_products"] = coarse.dot_products
    stats.images_scored = len(coarse.image_ids)
    stats.extra.update(levels_skipped=0, images_descended=0, images_pruned=0, segments_visited=0)
    if _consistent(on_global, coarse, k=k, params=p):
        stats.extra["levels_skipped"] = 1
        return coarse
    return _descend(snapshot, queries, coarse, (coarse_rows, coarse_sims), mask=mask, k=k, params=p, stats=stats)


def _candidate_plan(snapshot: Snapshot, params: SchedulerParams) -> list[tuple[Level, str, float]]:
    """(level, FAISS kind, estimated inner products per sub-query) for each candidate level."""
    plan = []
    for level in (Level[name.upper()] for name in params.candidate_levels):
        n_level = int((snapshot.levels == level).sum())
        kind = params.index_kind if params.index_kind != "auto" else ("flat" if n_level <= params.flat_max else "ivf")
        if kind == "ivf":
            nlist = max(1, min(4096, int(2 * np.sqrt(max(n_level, 1))), n_level // 39))
            cost = nlist + min(params.nprobe, nlist) * n_level / nlist
        else:
            cost = n_level  # flat scans everything; HNSW is counted as its upper estimate too
        plan.append((level, kind, float(cost)))
    return plan


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


def _candidates(snapshot: Snapshot, queries: np.ndarray, *, k: int, row_mask: np.ndarray | None,
                params: SchedulerParams, stats: SearchStats) -> np.ndarray:
    """Image ids worth scoring, from FAISS hits at the coarse levels (sorted)."""
    allowed = np.unique(snapshot.region_image if row_mask is None else snapshot.region_image[row_mask])
    want = params.candidate_k or max(2 * k, 16)
    stats.extra["candidate_dot_products"] = 0
    if params.candidate_k < 0 or len(allowed) <= want:
        stats.extra["candidates"] = len(allowed)
        return allowed
    # a metadata filter hides rows from FAISS: fetch more hits, in proportion to what is hidden
    fetch = int(want * max(1.0, len(snapshot) / max(len(allowed), 1)))
    plan = _candidate_plan(snapshot, params)
    coarse_rows = snapshot.levels <= Level.REGION
    coarse_all = int((coarse_rows if row_mask is None else coarse_rows & row_mask).sum())
    if sum(cost for _, _, cost in plan) >= coarse_all:  # small collection: scoring everything is cheaper
        stats.extra["candidates"] = len(allowed)
        return allowed
    found, spent = [], 0
    for level, kind, _ in plan:
        n_level = int((snapshot.levels == level).sum())
        store = snapshot.level_store(level, kind=kind)
        store.nprobe = params.nprobe
        before = store.distance_computations
        _, rows = store.search(queries, min(fetch, max(n_level, 1)))
        spent += store.distance_computations - before
        found.append(rows[rows >= 0])
    stats.dot_products += spent
    stats.extra["candidate_dot_products"] = spent
    images = np.unique(snapshot.region_image[np.concatenate(found)])
    images = images[np.isin(images, allowed)]
    if len(images) < k:  # too few left after the filter: every allowed image is a candidate
        images = allowed
    stats.extra["candidates"] = len(images)
    return images


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
             coarse_sims: tuple[np.ndarray, np.ndarray], *, mask: np.ndarray, k: int,
             params: SchedulerParams, stats: SearchStats) -> MaxSimScores:
    """Score fine segments where they can still change the top-k (bounds + sparsity)."""
    seg_rows = np.flatnonzero(mask & (snapshot.levels == Level.SEGMENT))
    if len(seg_rows) == 0:
        return coarse
    image_pos = np.searchsorted(coarse.image_ids, snapshot.region_image[seg_rows])
    parent_rows = snapshot.parents[seg_rows]
    rows, sims = coarse_sims  # a segment's parent is a coarse row of the same image: already scored
    parent_sim = sims[:, np.searchsorted(rows, parent_rows)]
    best_region = coarse.best[:, image_pos]  # (s, n_seg) best coarse similarity of the segment's image
    bound = parent_sim + params.bound_scale * snapshot.parent_radius()[seg_rows][None, :]
    useful = (bound > best_region) & (parent_sim >= best_region - params.sparsity_margin)
    image_bound = coarse.best.copy()
    for q in range(len(queries)):  # per sub-query (a handful), never per region
        np.maximum.at(image_bound[q], image_pos[useful[q]], bound[q, useful[q]])
    upper = image_bound.mean(axis=0)
    order = np.argsort(-upper, kind="stable")
    refined = _visit(snapshot, queries, coarse, seg_rows, image_pos, useful, order[:k], stats)
    threshold = np.sort(refined.scores)[::-1][min(k, len(order)) - 1] if len(order) else -np.inf
    rest = order[k:][upper[order[k:]] >= threshold]
    stats.extra["images_pruned"] = int(len(order) - k - len(rest)) if len(order) > k else 0
    refined = _visit(snapshot, queries, refined, seg_rows, image_pos, useful, rest, stats)
    stats.extra["images_descended"] = int(min(k, len(order)) + len(rest))
    stats.extra["segments_total"] = int(len(seg_rows) * len(queries))
    return refined


def _visit(snapshot: Snapshot, queries: np.ndarray, scored: MaxSimScores, seg_rows: np.ndarray,
           image_pos: np.ndarray, useful: np.ndarray, images: np.ndarray, stats: SearchStats) -> MaxSimScores:
    """Score the useful segments of ``images`` (positions) and fold them into ``scored``."""
    best, rows = scored.best.copy(), scored.best_rows.copy()
    chosen = np.isin(image_pos, images)
    visited = 0
    for q in range(len(queries)):
        sel = np.flatnonzero(useful[q] & chosen)
        if len(sel) == 0:
            continue
        sims = snapshot.vectors[seg_rows[sel]] @ queries[q]
        visited += len(sel)
        order = np.lexsort((-sims, image_pos[sel]))  # per image, best segment first
        first = order[np.r_[True, image_pos[sel][order][1:] != image_pos[sel][order][:-1]]]
        pos, top_sims = image_pos[sel][first], sims[first]
        better = top_sims > best[q, pos]
        best[q, pos[better]] = top_sims[better]
        rows[q, pos[better]] = seg_rows[sel][first][better]
    stats.dot_products += visited
    stats.extra["segments_visited"] = stats.extra.get("segments_visited", 0) + visited
    return MaxSimScores(scored.image_ids, best, rows, scored.dot_products + visited)

"""Matching: the shared MaxSim scorer, the baselines, and the compute meter.

Every mode scores images by late interaction: for each sub-query, the best
inner product over the image's regions at the allowed levels (MaxSim); the image
score is the mean over sub-queries. Modes differ only in which levels they match
and how much of that work they skip:

============  ===========================================================
``single``    whole query vs the global view (conventional single vector)
``mvr``       sub-queries vs the global view + fine segments, exhaustive
``himir-full``  sub-queries vs all 1+M+N levels, exhaustive
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

__all__ = ["RetrievalMode", "MaxSimScores", "SearchStats", "maxsim", "score_exhaustive", "parse_mode", "MODE_LEVELS"]


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
    n_rows = vectors.shape[0]
    starts = np.flatnonzero(np.r_[True, groups[1:] != groups[:-1]]) if n_rows else np.zeros(0, np.int64)
    if n_rows == 0:
        return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
    sims = queries @ vectors.T
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

"""Retrieval metrics for the benchmark report: recall, hit rate, nDCG, MRR, box IoU, latency.

Every ranking metric takes one query's ranked ids (best first) and its set of relevant
ids. A query with no relevant item has no defined recall, nDCG or MRR, so all of them
raise ``ValueError`` for an empty relevant set instead of returning a value that would
silently shift the mean. An id repeated in a ranking counts once, at its first rank.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Mapping, Sequence
from numbers import Real

import numpy as np

__all__ = [
    "recall_at_k",
    "hit_at_k",
    "ndcg_at_k",
    "mrr",
    "box_iou",
    "summarize",
    "percentile",
]


def _check(relevant: Iterable[Hashable], k: int | None) -> None:
    if not relevant:
        raise ValueError("relevant set is empty; a query needs at least one relevant item to be scored")
    if k is not None and k < 1:
        raise ValueError(f"k={k}; expected k >= 1")


def _first_ranks(ranked: Sequence[Hashable], relevant: Iterable[Hashable], k: int | None) -> list[int]:
    """0-based ranks, within the top ``k``, at which distinct relevant ids first appear."""
    seen: set[Hashable] = set()
    ranks = []
    for rank, item in enumerate(ranked if k is None else ranked[:k]):
        if item in relevant and item not in seen:
            ranks.append(rank)
        seen.add(item)
    return ranks


def recall_at_k(ranked: Sequence[Hashable], relevant: set[Hashable], k: int) -> float:
    """Share of the relevant items found in the top ``k``: ``|top_k & relevant| / |relevant|``.

    Parameters
    ----------
    ranked : sequence of hashable
        Retrieved ids, best first.
    relevant : set of hashable
        The query's relevant ids.
    k : int
        Cut-off, at least 1.

    Returns
    -------
    float
        In [0, 1].

    Raises
    ------
    ValueError
        If ``relevant`` is empty or ``k < 1``.

    Example
    -------
    >>> recall_at_k(["a", "x", "b"], {"a", "b", "c", "d"}, 2)
    0.25
    """
    _check(relevant, k)
    return len(_first_ranks(ranked, relevant, k)) / len(relevant)


def hit_at_k(ranked: Sequence[Hashable], relevant: set[Hashable], k: int) -> float:
    """1.0 if any relevant item is in the top ``k``, else 0.0.

    Parameters
    ----------
    ranked : sequence of hashable
        Retrieved ids, best first.
    relevant : set of hashable
        The query's relevant ids.
    k : int
        Cut-off, at least 1.

    Returns
    -------
    float
        0.0 or 1.0.

    Raises
    ------
    ValueError
        If ``relevant`` is empty or ``k < 1``.

    Example
    -------
    >>> hit_at_k(["x", "a"], {"a"}, 1), hit_at_k(["x", "a"], {"a"}, 2)
    (0.0, 1.0)
    """
    _check(relevant, k)
    return 1.0 if _first_ranks(ranked, relevant, k) else 0.0


def ndcg_at_k(ranked: Sequence[Hashable], relevant: set[Hashable], k: int) -> float:
    """Normalised discounted cumulative gain at ``k`` with binary gains.

    ``DCG = sum(1 / log2(rank + 1))`` over relevant items at 1-based ranks <= k,
    divided by the DCG of an ideal ranking, which puts ``min(k, |relevant|)``
    relevant items first.

    Parameters
    ----------
    ranked : sequence of hashable
        Retrieved ids, best first.
    relevant : set of hashable
        The query's relevant ids.
    k : int
        Cut-off, at least 1.

    Returns
    -------
    float
        In [0, 1].

    Raises
    ------
    ValueError
        If ``relevant`` is empty or ``k < 1``.

    Example
    -------
    >>> round(ndcg_at_k(["x", "a"], {"a"}, 2), 4)  # 1 / log2(3)
    0.6309
    """
    _check(relevant, k)
    dcg = sum(1.0 / math.log2(rank + 2) for rank in _first_ranks(ranked, relevant, k))
    ideal = sum(1.0 / math.log2(rank + 2) for rank in range(min(k, len(relevant))))
    return dcg / ideal


def mrr(ranked: Sequence[Hashable], relevant: set[Hashable], k: int | None = None) -> float:
    """Reciprocal rank of the first relevant item (0.0 if none); average it over queries for MRR.

    Parameters
    ----------
    ranked : sequence of hashable
        Retrieved ids, best first.
    relevant : set of hashable
        The query's relevant ids.
    k : int, optional
        Only the top ``k`` count (MRR@k); default: the whole ranking.

    Returns
    -------
    float
        ``1 / rank`` with 1-based rank, in (0, 1], or 0.0.

    Raises
    ------
    ValueError
        If ``relevant`` is empty or ``k < 1``.

    Example
    -------
    >>> mrr(["x", "y", "a"], {"a"})
    0.3333333333333333
    """
    _check(relevant, k)
    ranks = _first_ranks(ranked, relevant, k)
    return 1.0 / (ranks[0] + 1) if ranks else 0.0


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two ``[x0, y0, x1, y1]`` boxes.

    Parameters
    ----------
    a, b : sequence of 4 floats
        Boxes with ``x0 <= x1`` and ``y0 <= y1`` (pixels; right/bottom exclusive).

    Returns
    -------
    float
        In [0, 1]; 0.0 when both boxes are empty.

    Raises
    ------
    ValueError
        If a box does not have 4 coordinates or has ``x1 < x0`` or ``y1 < y0``.

    Example
    -------
    >>> box_iou([0, 0, 2, 2], [1, 1, 3, 3])  # 1 / (4 + 4 - 1)
    0.14285714285714285
    """
    for box in (a, b):
        if len(box) != 4 or box[2] < box[0] or box[3] < box[1]:
            raise ValueError(f"box {list(box)!r}; expected [x0, y0, x1, y1] with x0 <= x1 and y0 <= y1")
    inter_w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    inter_h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = inter_w * inter_h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def summarize(per_query: Sequence[Mapping[str, object]]) -> dict[str, float]:
    """Mean of every numeric field over the per-query rows.

    Non-numeric fields (query ids, texts) are skipped; a numeric field missing from
    some rows is averaged over the rows that have it. Booleans count as 0/1.

    Parameters
    ----------
    per_query : sequence of mapping
        One row per query, e.g. ``{"query_id": "q1", "recall@10": 0.5, "mrr": 1.0}``.

    Returns
    -------
    dict
        ``{field: mean}`` in first-seen field order, plus ``"n_queries"``.

    Raises
    ------
    ValueError
        If ``per_query`` is empty.

    Example
    -------
    >>> summarize([{"id": "a", "mrr": 1.0}, {"id": "b", "mrr": 0.5}])
    {'mrr': 0.75, 'n_queries': 2.0}
    """
    if not per_query:
        raise ValueError("no per-query rows to summarize; run at least one query")
    columns: dict[str, list[float]] = {}
    for row in per_query:
        for key, value in row.items():
            if isinstance(value, Real):
                columns.setdefault(key, []).append(float(value))
    summary = {key: float(np.mean(values)) for key, values in columns.items()}
    summary["n_queries"] = float(len(per_query))
    return summary


def percentile(values: Iterable[float], q: float) -> float:
    """The ``q``-th percentile of ``values`` (linear interpolation), e.g. latency p50/p95.

    Parameters
    ----------
    values : iterable of float
        Samples, e.g. per-query latencies in milliseconds.
    q : float
        Percentile in [0, 100].

    Returns
    -------
    float

    Raises
    ------
    ValueError
        If ``values`` is empty or ``q`` is outside [0, 100].

    Example
    -------
    >>> percentile([10, 20, 30, 40], 50)
    25.0
    """
    samples = np.asarray(list(values), dtype=np.float64)
    if samples.size == 0:
        raise ValueError("no samples; percentile needs at least one value")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"q={q}; expected a percentile in [0, 100]")
    return float(np.percentile(samples, q))

"""Per-stage accounting of the scheduled pass: what each pruning stage saves and what it costs.

Each stage of ``himir`` (candidate generation with its upper-bound pick and projected list
ranking, ANN caps on the segment bounds, the segment bounds with image pruning,
cross-hierarchy consistency, hierarchy sparsity) is switched off,
or on for the ones off by default, one at a time, against the index's own settings; every
setting runs the same queries through :meth:`HiMIRIndex.search_vectors`. A row reports its
Recall@k, its agreement with the reference mode's top-k, mean dot products, median search
time, how often the stage's own counter fired, and the differences to the index's settings
(``dots_saved`` > 0 and ``recall_cost`` > 0 mean the stage saves work and loses accuracy).

``himir bench run --stages`` and ``himir bench scale --stages`` add the table to their
report; ``benchmarks/sweep_scheduler.py --stages`` prints the same rows.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from himir_rag.index import HiMIRIndex, SearchHit
from himir_rag.modes import RetrievalMode

__all__ = ["STAGES", "StageQuery", "measure_stages", "measure_setting"]

# name -> scheduler overrides against the index's settings ({} = the settings themselves); rows
# whose name ends "on" switch a stage on, the others switch one off
STAGES: dict[str, dict[str, Any]] = {
    "index settings": {},
    "no candidate generation (every image scored)": {"candidate_k": -1},
    "no upper-bound pick of candidates": {"candidate_pool": 1},
    "no projected list ranking (every centroid scored)": {"list_ranking": "exact"},
    "no ANN caps on segment bounds": {"ann_bound": False},
    "ANN caps of segment bounds on": {"ann_bound": True},
    "no segment bounds, no image pruning": {"ann_bound": False, "bound_scale": 1e6},
    "consistency depth skipping on (overlap 0.8)": {"consistency_overlap": 0.8},
    "hierarchy sparsity on (margin 0.1)": {"sparsity_margin": 0.1},
}

# the counter of SearchStats.extra that says a stage acted on a query
_FIRED_BY = {"consistency depth skipping on (overlap 0.8)": "levels_skipped", "index settings": "images_pruned"}
_COUNTERS = ("candidates", "segments_visited", "images_pruned", "levels_skipped")


@dataclass(frozen=True)
class StageQuery:
    """One query of the stage table: its sub-query vectors, relevant keys, reference top-k keys."""

    vectors: np.ndarray
    relevant: frozenset[Hashable]
    reference: frozenset[Hashable] | None = None


def measure_stages(index: HiMIRIndex, queries: Sequence[StageQuery], *, k: int = 10,
                   key: Callable[[SearchHit], Hashable] = lambda hit: hit.image_id,
                   stages: Mapping[str, Mapping[str, Any]] = STAGES, skip: Sequence[str] = ()) -> list[dict[str, Any]]:
    """One row per stage setting (see module docstring); the index's settings are restored after.

    Parameters
    ----------
    queries : sequence of StageQuery
    key : callable
        The key of a hit compared with ``relevant`` and ``reference`` (e.g. its scene id).
    skip : sequence of str
        Stage names left out (e.g. "no candidate generation" at a scale where it is the
        exhaustive scan).
    """
    if not queries:
        raise ValueError("no query to measure the stages on")
    base = index.config
    rows = []
    try:
        for name, overrides in stages.items():
            if name in skip:
                continue
            params = base.scheduler.overrides() | dict(overrides)
            index.set_config(base.replace(scheduler=params))
            index.search_vectors(queries[0].vectors, k=k, mode=RetrievalMode.HIMIR)  # builds what it asks for
            rows.append({"stage": name, "setting": dict(overrides),
                         **measure_setting(index, queries, k=k, key=key, fired_by=_FIRED_BY.get(name))})
    finally:
        index.set_config(base)
    reference = rows[0] if rows and rows[0]["stage"] == "index settings" else None
    for row in rows[1:] if reference is not None else ():
        # from the stage's side: switched off, its savings are what the row spends more
        sign = -1.0 if " on (" in row["stage"] else 1.0
        row["dots_saved"] = sign * (row["dot_products"] - reference["dot_products"])
        row["recall_cost"] = sign * (row["recall@k"] - reference["recall@k"])
    return rows


def measure_setting(index: HiMIRIndex, queries: Sequence[StageQuery], *, k: int,
                    key: Callable[[SearchHit], Hashable], fired_by: str | None = None,
                    mode: RetrievalMode | str = RetrievalMode.HIMIR,
                    counters: Sequence[str] = _COUNTERS) -> dict[str, Any]:
    """``queries`` in ``mode`` at the index's settings: mean Recall@k (hits keyed by ``key``), share of
    each query's reference top-k, mean dot products, search ms (p50, mean), the share of queries on
    which counter ``fired_by`` was positive and the mean of each of ``counters``."""
    recall, agree, dots, times, fired = [], [], [], [], []
    seen: dict[str, list[float]] = {name: [] for name in counters}
    for query in queries:
        tick = time.perf_counter()
        result = index.search_vectors(query.vectors, k=k, mode=mode)
        times.append(1000 * (time.perf_counter() - tick))
        found = {key(hit) for hit in result.hits}
        recall.append(len(found & query.relevant) / max(len(query.relevant), 1))
        if query.reference is not None:
            agree.append(len(found & query.reference) / max(len(query.reference), 1))
        dots.append(result.stats.dot_products)
        for name in counters:
            seen[name].append(float(result.stats.extra.get(name, 0)))
        if fired_by is not None:
            fired.append(float(result.stats.extra.get(fired_by, 0)) > 0)
    return {"recall@k": float(np.mean(recall)), "agreement": float(np.mean(agree)) if agree else None,
            "dot_products": float(np.mean(dots)), "search_ms_p50": float(np.median(times)),
            "search_ms_mean": float(np.mean(times)),
            "fired_share": float(np.mean(fired)) if fired else None, "fired_by": fired_by,
            "counters": {name: float(np.mean(values)) for name, values in seen.items()}}


def stage_markdown(rows: Sequence[Mapping[str, Any]], k: int = 10) -> list[str]:
    """The stage table as markdown lines (for the benchmark reports)."""
    header = (f"| stage | Recall@{k} | vs reference top-{k} | dot products | dots saved by the stage | "
              f"Recall@{k} cost | fired (counter) | search ms p50 |")
    lines = [header, "|" + "---|" * 8]
    for row in rows:
        fired = "-" if row.get("fired_share") is None else f"{row['fired_share']:.0%} ({row['fired_by']})"
        agreement = "-" if row.get("agreement") is None else f"{row['agreement']:.3f}"
        saved = row.get("dots_saved")
        cost = row.get("recall_cost")
        lines.append(f"| {row['stage']} | {row['recall@k']:.4f} | {agreement} | {row['dot_products']:,.0f} | "
                     f"{'-' if saved is None else f'{saved:+,.0f}'} | {'-' if cost is None else f'{cost:+.4f}'} | "
                     f"{fired} | {row['search_ms_p50']:.2f} |")
    return lines

"""Benchmark runner: index a composite benchmark once, run every mode on the same queries, report.

``himir bench run OUT_DIR`` calls :func:`run_benchmark`. It

1. opens or builds the index of ``OUT_DIR/images`` (saved to ``OUT_DIR/index`` and reused by
   a rerun when the encoder and layout match; ``index_dir`` reuses any existing index);
2. times the encoder alone on the crops of a sample of the same images, in batches of the
   index's batch size, so the indexing throughput can be read against the encoder's own;
3. decomposes every query once (``rule``, ``llm``, ``none`` or ``oracle``: the query's
   ground-truth object names) and runs every mode on the same sub-queries; each mode embeds
   the same texts with the same encoder, so every mode matches the same query vectors;
4. scores rankings against the qrels (Recall@1/5/10, nDCG@10, MRR), collects the compute
   meter (dot products) and per-stage latencies, the index size and peak memory;
5. measures region-level grounding on each query's source scene (see :func:`grounding_rows`);
6. writes ``report.json``, ``report.md`` and PNG plots (:mod:`himir_rag.bench.report`).

A mode the installed core cannot run (``himir`` before the scheduler lands) is detected on
its first query and skipped with a logged note; the report lists it under ``skipped_modes``.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import resource
import sys
import threading
import time
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from himir_rag.bench.metrics import box_iou, mrr, ndcg_at_k, percentile, recall_at_k
from himir_rag.bench.scenes import read_jsonl
from himir_rag.config import FOCUS_FIELDS, HiMIRConfig
from himir_rag.encoders import Encoder, RegionEncoder, get_encoder, set_inference_threads
from himir_rag.errors import ConfigError, HiMIRError
from himir_rag.hierarchy import Level, focus_boxes
from himir_rag.index import HiMIRIndex, SearchResult
from himir_rag.modes import MODES, RetrievalMode, Scorer, mode_names, parse_mode, reference_mode

__all__ = [
    "DEFAULT_MODES",
    "DECOMPOSERS",
    "GROUNDING_IOU",
    "UNAVAILABLE_MODE_ERRORS",
    "OracleDecomposer",
    "PeakMemory",
    "ModeRuns",
    "parse_modes",
    "ranking_metrics",
    "aggregate_mode",
    "compare_modes",
    "target_checks",
    "match_objects",
    "grounding_rows",
    "summarize_grounding",
    "run_modes",
    "run_benchmark",
]

logger = logging.getLogger(__name__)

DEFAULT_MODES = mode_names()
DECOMPOSERS = ("rule", "oracle", "llm", "none")
GROUNDING_IOU = 0.3
CUTOFFS = (1, 5, 10)
STAGES = ("decompose", "encode", "search", "total")
# What a mode missing from the installed core raises on first use (e.g. `scheduled_search`
# not yet in scheduler.py): the mode is skipped, never faked.
UNAVAILABLE_MODE_ERRORS = (ImportError, AttributeError, NotImplementedError)
_LEVEL_NAMES = tuple(level.name.lower() for level in Level)
# what grounding scores: each level's best region, and the box each exhaustive mode (mvr, himir-full) reports
_GROUNDED_MODES = {spec.name: tuple(int(level) for level in spec.levels) for spec in MODES.values()
                   if spec.subqueries and spec.scorer is Scorer.EXHAUSTIVE}
_GROUNDED = {**{name: (int(level),) for name, level in zip(_LEVEL_NAMES, Level)}, **_GROUNDED_MODES}
_CROP_MAX_SIDE = 1024  # index.py cuts crops from a copy at most this large


# -- inputs ------------------------------------------------------------------------------------
def parse_modes(modes: str | Iterable[str | RetrievalMode]) -> list[RetrievalMode]:
    """Modes from ``"single,mvr,himir-full,himir"`` or a list, deduplicated, order kept.

    Raises
    ------
    ConfigError
        For an unknown mode name or an empty list.
    """
    items = modes.split(",") if isinstance(modes, str) else list(modes)
    parsed: list[RetrievalMode] = []
    for item in items:
        name = item.value if isinstance(item, RetrievalMode) else str(item).strip()
        if name and parse_mode(name) not in parsed:
            parsed.append(parse_mode(name))
    if not parsed:
        raise ConfigError(f"no mode given in {modes!r}; pass e.g. 'single,mvr,himir-full,himir'")
    return parsed


class OracleDecomposer:
    """Sub-queries = the ground-truth object names of the benchmark query.

    The upper bound of query decomposition: every sub-query is exactly one object's name.

    Parameters
    ----------
    objects_by_query : mapping
        ``{query text: [object names]}`` (from ``queries.jsonl``).

    Example
    -------
    >>> OracleDecomposer({"a cat and a dog": ["a cat", "a dog"]}).decompose("a cat and a dog")
    ['a cat', 'a dog']
    """

    name = "oracle"

    def __init__(self, objects_by_query: Mapping[str, Sequence[str]]) -> None:
        self._objects = {query: list(names) for query, names in objects_by_query.items()}

    def decompose(self, query: str, *, callbacks: Any = None) -> list[str]:
        """The query's object names; a query unknown to the benchmark raises KeyError."""
        try:
            return list(self._objects[query])
        except KeyError:
            raise KeyError(f"query {query!r} is not in the benchmark; the oracle only knows benchmark queries") from None


def _make_decomposer(name: str, queries: Sequence[_Query]) -> Any:
    key = name.strip().lower()
    if key == "oracle":
        return OracleDecomposer({q.text: q.objects for q in queries})
    if key not in DECOMPOSERS:
        raise ConfigError(f"decomposer {name!r} is unknown; use one of {', '.join(DECOMPOSERS)}")
    from himir_rag.decompose import get_decomposer

    return get_decomposer(key)


# -- metrics -----------------------------------------------------------------------------------
def ranking_metrics(ranked: Sequence[Hashable], relevant: set[Hashable]) -> dict[str, float]:
    """Recall@1/5/10, nDCG@10 and MRR@10 of one ranking (ids best first).

    Example
    -------
    >>> ranking_metrics(["x", "a"], {"a"})["recall@5"]
    1.0
    """
    row = {f"recall@{k}": recall_at_k(ranked, relevant, k) for k in CUTOFFS}
    row["ndcg@10"] = ndcg_at_k(ranked, relevant, 10)
    row["mrr"] = mrr(ranked, relevant, 10)
    return row


def aggregate_mode(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Summary of one mode's per-query rows: mean quality, dot products, latency p50/p95.

    Each row holds the :func:`ranking_metrics` fields, ``dot_products``, ``images_scored``
    and ``latency_ms`` (``{stage: ms}``).

    Returns
    -------
    dict
        ``n_queries``, the mean of every quality metric, ``dot_products`` (median, mean,
        min, max), ``images_scored`` (mean) and ``latency_ms`` (``{stage: {p50, p95, mean}}``).
    """
    if not rows:
        raise ValueError("no per-query rows for this mode; run at least one query")
    summary: dict[str, Any] = {"n_queries": len(rows)}
    for name in [f"recall@{k}" for k in CUTOFFS] + ["ndcg@10", "mrr"]:
        summary[name] = float(np.mean([row[name] for row in rows]))
    dots = np.array([row["dot_products"] for row in rows], dtype=np.float64)
    summary["dot_products"] = {"median": float(np.median(dots)), "mean": float(dots.mean()),
                               "min": float(dots.min()), "max": float(dots.max())}
    summary["images_scored"] = float(np.mean([row.get("images_scored", 0) for row in rows]))
    summary["latency_ms"] = {}
    for stage in STAGES:
        values = [row["latency_ms"][stage] for row in rows if stage in row["latency_ms"]]
        if values:
            summary["latency_ms"][stage] = {"p50": percentile(values, 50), "p95": percentile(values, 95),
                                            "mean": float(np.mean(values))}
    return summary


def compare_modes(modes: Mapping[str, Mapping[str, Any]],
                  per_query: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Dot-product ratios and Recall@10 differences between the modes that ran.

    ``dot_products_ratio["mvr/himir"]``: ``mean`` and ``median`` are ratios of the modes'
    mean and median dot products; ``per_query_median`` is the median over queries of the
    per-query ratio. ``recall@10_points["himir-full - mvr"]`` is in percentage points.
    """
    ratios: dict[str, dict[str, float]] = {}
    dots = {m: {row["query_id"]: row["dot_products"] for row in per_query if row["mode"] == m} for m in modes}
    for base in ("mvr", "himir-full"):
        for other in ("himir", "himir-full", "single"):
            if base == other or base not in modes or other not in modes:
                continue
            a, b = modes[base]["dot_products"], modes[other]["dot_products"]
            shared = [q for q in dots[base] if dots[other].get(q)]
            ratios[f"{base}/{other}"] = {
                "mean": a["mean"] / b["mean"] if b["mean"] else float("inf"),
                "median": a["median"] / b["median"] if b["median"] else float("inf"),
                "per_query_median": (float(np.median([dots[base][q] / dots[other][q] for q in shared]))
                                     if shared else float("nan")),
            }
    points = {f"{a} - {b}": 100.0 * (modes[a]["recall@10"] - modes[b]["recall@10"])
              for a in ("himir", "himir-full") for b in ("mvr", "single") if a in modes and b in modes}
    return {"dot_products_ratio": ratios, "recall@10_points": points}


def target_checks(comparison: Mapping[str, Any], ran: Iterable[str]) -> list[dict[str, Any]]:
    """The project's accuracy/compute targets, checked against the measured figures.

    Targets: himir and himir-full Recall@10 at least 5 points above mvr and 20 above
    single; himir at most 1/3.5 of mvr's dot products (ratio of means). A target whose
    modes did not run is listed with ``met: None``.
    """
    ran = set(ran)
    checks = []
    for mode in ("himir-full", "himir"):
        for base, need in (("mvr", 5.0), ("single", 20.0)):
            value = comparison["recall@10_points"].get(f"{mode} - {base}")
            checks.append({"target": f"Recall@10 {mode} >= {base} + {need:g} points", "value": value,
                           "unit": "points", "met": None if value is None else bool(value >= need)})
    ratio = comparison["dot_products_ratio"].get("mvr/himir", {}).get("mean")
    checks.append({"target": "dot products mvr/himir >= 3.5", "value": ratio, "unit": "x",
                   "met": None if ratio is None or not {"mvr", "himir"} <= ran else bool(ratio >= 3.5)})
    return checks


# -- memory ------------------------------------------------------------------------------------
class PeakMemory:
    """Peak resident memory of this process during a ``with`` block (psutil sampler thread).

    ``peak_mb`` is the highest RSS seen (sampled every ``interval`` s; falls back to the
    process-lifetime ``ru_maxrss`` when psutil is missing), ``start_mb`` the RSS on entry.
    """

    def __init__(self, *, interval: float = 0.05) -> None:
        self.interval = interval
        self.start_mb = self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakMemory:
        self._rss = _rss_reader()
        self.start_mb = self.peak_mb = self._rss()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak_mb = max(self.peak_mb, self._rss())

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak_mb = max(self.peak_mb, self._rss())

    def to_dict(self) -> dict[str, float]:
        return {"start_rss_mb": round(self.start_mb, 1), "peak_rss_mb": round(self.peak_mb, 1)}


def _rss_reader() -> Callable[[], float]:
    try:
        import psutil
    except ImportError:
        return lambda: process_max_rss_mb()
    process = psutil.Process()
    return lambda: process.memory_info().rss / 2**20


def process_max_rss_mb() -> float:
    """Lifetime peak RSS of this process in MiB (``getrusage``; Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def directory_bytes(path: Path) -> int:
    """Total size of the files under ``path``."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def machine_info() -> dict[str, Any]:
    """CPU, Python and library versions of the machine the benchmark ran on.

    torch and faiss are described only when already imported (importing torch takes seconds).
    """
    info: dict[str, Any] = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                            "cpu_count": os.cpu_count(), "python": platform.python_version(), "numpy": np.__version__}
    if hasattr(os, "getloadavg"):  # other jobs on the machine skew every timing: say how busy it was
        info["load_average"] = [round(v, 2) for v in os.getloadavg()]
    torch = sys.modules.get("torch")
    if torch is not None:
        info.update(torch=torch.__version__, torch_threads=torch.get_num_threads(), cuda=torch.cuda.is_available())
    faiss = sys.modules.get("faiss")
    if faiss is not None:
        info["faiss"] = getattr(faiss, "__version__", "?")
    return info


# -- running the modes -------------------------------------------------------------------------
@dataclass(frozen=True)
class _Query:
    query_id: str
    text: str
    objects: tuple[str, ...]
    scene_id: str
    relevant: frozenset[str]


SearchFn = Callable[[RetrievalMode, Any, list[str]], SearchResult]


@dataclass
class ModeRuns:
    """What :func:`run_modes` collected.

    Attributes
    ----------
    per_query : list of dict
        One row per (query, mode): ``query_id``, ``mode``, quality metrics,
        ``dot_products``, ``images_scored``, ``latency_ms`` and ``extra`` (mode counters).
    skipped : dict
        ``{mode: reason}`` for the modes that could not run.
    subqueries : dict
        ``{query_id: sub-queries}``.
    first_query_ms : dict
        ``{mode: ms}`` of the untimed warm-up query (lazy FAISS level stores are built there).
    """

    per_query: list[dict[str, Any]]
    skipped: dict[str, str]
    subqueries: dict[str, list[str]]
    first_query_ms: dict[str, float]


def run_modes(queries: Sequence[Any], modes: Sequence[RetrievalMode], search: SearchFn, *,
              decompose: Callable[[Any], list[str]], rank_ids: Callable[[SearchResult], list[Hashable]],
              progress: bool = False, time_decompose: bool = True, mode_major: bool = False) -> ModeRuns:
    """Run every mode on every query: query-major (every mode on a query, then the next query,
    so caches warm up evenly), or with ``mode_major`` every query in one mode, then the next mode.

    Mode-major is what the scale benchmark uses: there an exhaustive query streams the whole
    collection (3.2 GB at 100k) through the CPU caches, and query-major order made the next
    scheduled query start from cold caches, a cost a process serving that mode never pays.

    ``queries`` need ``query_id`` and ``relevant`` (a set of the ids ``rank_ids`` gives).
    ``time_decompose=False`` leaves the decomposition out of the latency (synthetic
    queries have nothing to decompose). Each mode first answers one untimed warm-up query
    (lazy stores, first-call costs); a mode whose warm-up raises one of
    :data:`UNAVAILABLE_MODE_ERRORS` is skipped.
    """
    if not queries:
        raise ValueError("no query to run; the benchmark has no query (check --limit-queries)")
    first = queries[0]
    active, skipped, first_ms = _probe_modes(modes, lambda mode: search(mode, first, decompose(first)))
    rows, subqueries, decompose_ms = [], {}, {}
    for query in queries:
        tick = time.perf_counter()
        subqueries[query.query_id] = decompose(query)
        decompose_ms[query.query_id] = (time.perf_counter() - tick) * 1000 if time_decompose else None
    order = [(mode, query) for mode in active for query in queries] if mode_major else \
        [(mode, query) for query in queries for mode in active]
    for mode, query in tqdm(order, desc="queries", unit="search", disable=not progress):
        result = search(mode, query, subqueries[query.query_id])
        rows.append(_query_row(query, mode, result, rank_ids(result), decompose_ms[query.query_id]))
    return ModeRuns(rows, skipped, subqueries, first_ms)


def _probe_modes(modes: Sequence[RetrievalMode], warm_up: Callable[[RetrievalMode], Any]
                 ) -> tuple[list[RetrievalMode], dict[str, str], dict[str, float]]:
    active, skipped, first_ms = [], {}, {}
    for mode in modes:
        tick = time.perf_counter()
        try:
            warm_up(mode)
        except UNAVAILABLE_MODE_ERRORS as exc:
            skipped[mode.value] = f"{type(exc).__name__}: {exc}"
            logger.warning("mode %r is not available in this build of himir_rag (%s); skipped", mode.value,
                           skipped[mode.value])
            continue
        first_ms[mode.value] = (time.perf_counter() - tick) * 1000
        active.append(mode)
    return active, skipped, first_ms


def _query_row(query: _Query, mode: RetrievalMode, result: SearchResult, ranked: list[Hashable],
               decompose_ms: float | None) -> dict[str, Any]:
    latency = {stage: float(result.stats.latency_ms[stage]) for stage in ("encode", "search")
               if stage in result.stats.latency_ms}
    if decompose_ms is not None:
        latency["decompose"] = decompose_ms
    latency["total"] = sum(latency.values())
    return {"query_id": query.query_id, "mode": mode.value, **ranking_metrics(ranked, set(query.relevant)),
            "dot_products": int(result.stats.dot_products), "images_scored": int(result.stats.images_scored),
            "latency_ms": latency, "top": [str(i) for i in ranked[:10]],
            "extra": _jsonable(result.stats.extra)}


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=lambda v: v.item() if hasattr(v, "item") else str(v)))


def summarize_run(per_query: Sequence[Mapping[str, Any]], modes: Sequence[RetrievalMode],
                  skipped: Mapping[str, str]) -> dict[str, Any]:
    """``modes`` (per-mode aggregates), ``comparison`` and ``targets`` of one run."""
    summary = {mode.value: aggregate_mode([r for r in per_query if r["mode"] == mode.value])
               for mode in modes if mode.value not in skipped}
    comparison = compare_modes(summary, per_query)
    return {"modes": summary, "comparison": comparison, "targets": target_checks(comparison, summary)}


# -- grounding ---------------------------------------------------------------------------------
def match_objects(subqueries: Sequence[str], objects: Sequence[str]) -> list[tuple[str, str]]:
    """Pair sub-queries with object names: exact match, else string containment.

    Each object is used once; when several names are contained, the longest wins.

    Example
    -------
    >>> match_objects(["a red apple", "lobster"], ["a spiny lobster", "a red apple"])
    [('a red apple', 'a red apple'), ('lobster', 'a spiny lobster')]
    """
    pairs, used = [], set()
    for sub in subqueries:
        s = sub.strip().lower()
        names = [n for n in objects if n not in used]
        exact = [n for n in names if n.strip().lower() == s]
        contained = sorted((n for n in names if n.lower() in s or s in n.lower()), key=len, reverse=True)
        choice = (exact or contained or [None])[0]
        if choice is not None:
            used.add(choice)
            pairs.append((sub, choice))
    return pairs


def grounding_rows(index: HiMIRIndex, queries: Sequence[_Query], subqueries: Mapping[str, list[str]],
                   scenes: Mapping[str, dict[str, Any]], image_ids: Mapping[str, int]) -> list[dict[str, Any]]:
    """Where each sub-query lands in its query's source scene, per level.

    A dedicated per-image scorer (not a ranking): every stored region of the source scene
    is matched against the sub-query's text vector; for each level the best region of that
    level is compared with the ground-truth box of the object the sub-query names
    (:func:`match_objects`). ``mvr`` is the best region over the global view and the
    segments, ``himir-full`` over all levels (the region the search reports).

    Returns
    -------
    list of dict
        One row per matched (query, sub-query): ``object``, ``area_frac``, ``iou`` per level
        and per mode (of the best-matching region), ``iou_ceiling`` (the largest IoU any
        region of those levels has), ``himir_full_level`` (the level himir-full picks).
    """
    snapshot, rows = index.snapshot, []
    for query in queries:
        image_id = image_ids.get(query.scene_id)
        scene = scenes.get(query.scene_id)
        pairs = match_objects(subqueries.get(query.query_id, []), query.objects)
        if image_id is None or scene is None or not pairs:
            continue
        region_rows = snapshot.image_rows(image_id)
        sims = index.encoder.embed_texts([sub for sub, _ in pairs]) @ snapshot.vectors[region_rows].T
        boxes_by_name = {obj["name"]: obj for obj in scene["objects"]}
        for (sub, name), sim in zip(pairs, sims):
            rows.append(_ground_one(query, sub, boxes_by_name[name], sim, snapshot.levels[region_rows],
                                    snapshot.boxes[region_rows], index.config))
    return rows


def _ground_one(query: _Query, sub: str, obj: dict[str, Any], sim: np.ndarray, levels: np.ndarray,
                boxes: np.ndarray, config: HiMIRConfig) -> dict[str, Any]:
    """One sub-query's IoUs: per level of the best region there; per exhaustive mode (mvr, himir-full)
    of the box a search reports (the focus box at the ``config``'s temperature and spread), and for the reference
    mode also of its best region's own box (``"<mode> region"``)."""
    iou: dict[str, float | None] = {}
    ceiling: dict[str, float | None] = {}
    overlaps = np.array([box_iou(box.tolist(), obj["bbox"]) for box in boxes])
    chosen_level = None
    for name, allowed in _GROUNDED.items():
        candidates = np.flatnonzero(np.isin(levels, allowed))
        if not len(candidates):
            iou[name] = ceiling[name] = None
            continue
        best = candidates[int(np.argmax(sim[candidates]))]
        iou[name], ceiling[name] = float(overlaps[best]), float(overlaps[candidates].max())
        if name in _GROUNDED_MODES:
            focus = focus_boxes(sim[candidates, None], boxes[candidates], config.focus_temperature,
                                config.focus_spread)[0]
            if name == reference_mode().value:
                chosen_level = _LEVEL_NAMES[int(levels[best])]
                iou[f"{name} region"], ceiling[f"{name} region"] = iou[name], ceiling[name]
            iou[name] = float(box_iou(focus.tolist(), obj["bbox"]))
    return {"query_id": query.query_id, "subquery": sub, "object": obj["name"],
            "area_frac": float(obj.get("area_frac", 0.0)), "iou": iou, "iou_ceiling": ceiling,
            "himir_full_level": chosen_level}


def summarize_grounding(rows: Sequence[Mapping[str, Any]], *, threshold: float = GROUNDING_IOU) -> dict[str, Any]:
    """Share of sub-queries whose best region has IoU >= ``threshold``, per level/mode and object size.

    ``reachable_rate`` is the geometric ceiling: the share for which *some* region of those
    levels has IoU >= ``threshold`` (what a perfect encoder would reach with this layout).
    """
    if not rows:
        return {"n_subqueries": 0, "threshold": threshold, "hit_rate": {}, "mean_iou": {}, "by_size": {}}
    names = list(rows[0]["iou"])
    out: dict[str, Any] = {"n_subqueries": len(rows), "threshold": threshold, "hit_rate": {}, "mean_iou": {},
                           "reachable_rate": {}}
    for name in names:
        values = [r["iou"][name] for r in rows if r["iou"][name] is not None]
        out["hit_rate"][name] = float(np.mean([v >= threshold for v in values])) if values else None
        out["mean_iou"][name] = float(np.mean(values)) if values else None
        best = [r["iou_ceiling"][name] for r in rows if r.get("iou_ceiling", {}).get(name) is not None]
        out["reachable_rate"][name] = float(np.mean([v >= threshold for v in best])) if best else None
    buckets = {"small (<5%)": (0.0, 0.05), "medium (5-20%)": (0.05, 0.2), "large (>=20%)": (0.2, 1.01)}
    out["by_size"] = {}
    for label, (low, high) in buckets.items():
        subset = [r for r in rows if low <= r["area_frac"] < high]
        out["by_size"][label] = {
            "n": len(subset),
            **{name: (float(np.mean([r["iou"][name] >= threshold for r in subset if r["iou"][name] is not None]))
                      if subset else None) for name in names},
        }
    levels = [r["himir_full_level"] for r in rows if r["himir_full_level"]]
    out["himir_full_level_share"] = {name: levels.count(name) / len(levels) for name in _LEVEL_NAMES} if levels else {}
    return out


# -- the composite benchmark -------------------------------------------------------------------
def _load_benchmark(bench_dir: Path, limit_queries: int | None) -> tuple[list[_Query], dict[str, dict[str, Any]]]:
    for name in ("scenes.jsonl", "queries.jsonl", "qrels.jsonl"):
        if not (bench_dir / name).is_file():
            raise FileNotFoundError(f"{bench_dir / name} is missing; build the benchmark first: "
                                    f"himir bench build {bench_dir}")
    scenes = {row["scene_id"]: row for row in read_jsonl(bench_dir / "scenes.jsonl")}
    qrels = {row["query_id"]: frozenset(row["scene_ids"]) for row in read_jsonl(bench_dir / "qrels.jsonl")}
    queries = [_Query(row["id"], row["query"], tuple(row["objects"]), row["scene_id"], qrels.get(row["id"], frozenset()))
               for row in read_jsonl(bench_dir / "queries.jsonl")]
    no_qrels = [q.query_id for q in queries if not q.relevant]
    if no_qrels:
        logger.warning("%d queries have no relevant scene in qrels.jsonl and are left out: %s", len(no_qrels),
                       ", ".join(no_qrels[:5]))
        queries = [q for q in queries if q.relevant]
    if limit_queries is not None:
        if limit_queries < 1:
            raise ConfigError(f"limit_queries={limit_queries}; expected at least 1")
        queries = queries[:limit_queries]
    return queries, scenes


def _encoder_matches(manifest: Mapping[str, Any], encoder: Encoder | str) -> bool:
    recorded = manifest.get("encoder", {})
    if isinstance(encoder, str) and encoder.startswith("offline"):  # the spec's defaults may have changed
        return get_encoder(encoder).name == recorded.get("name")  # builds the object only: loads nothing
    if isinstance(encoder, str):
        return recorded.get("spec") == encoder or recorded.get("name") == encoder
    return recorded.get("name") == getattr(encoder, "name", None)


def _open_index(bench_dir: Path, *, encoder: Encoder | str, layout: str, device: str, batch_size: int,
                index_dir: Path | None, progress: bool, region_encoding: str = "crops",
                image_decomposer: str = HiMIRConfig.decomposer,
                segment_work_size: int = HiMIRConfig.segment_work_size) -> tuple[HiMIRIndex, dict[str, Any], Path]:
    """Load a matching index (``index_dir``, or the encoding's default folder under ``bench_dir``), or
    build and save one there (``index_dir`` is built only when it holds no index yet)."""
    loaded_encoder = encoder if not isinstance(encoder, str) else None
    config = HiMIRConfig(layout=str(layout), batch_size=batch_size, region_encoding=region_encoding,
                         decomposer=image_decomposer, segment_work_size=segment_work_size)
    segmenting = image_decomposer != "grid"  # the grid ignores the work size
    if index_dir is not None and (index_dir / "CURRENT").is_file():
        index = HiMIRIndex.load(index_dir, encoder=loaded_encoder, device=device)
        if isinstance(encoder, str) and not _encoder_matches(HiMIRIndex.read_manifest(index_dir), encoder):
            raise ConfigError(f"{index_dir} was built with encoder {index.encoder_spec!r}, asked for {encoder!r}; "
                              "drop --index-dir to build a new index or pass the same --encoder")
        if index.config.region_encoding != region_encoding:
            raise ConfigError(f"{index_dir} was built with region encoding {index.config.region_encoding!r}, asked "
                              f"for {region_encoding!r}; pass --region-encoding {index.config.region_encoding} or "
                              "an --index-dir that does not exist yet (it is built there)")
        if index.config.decomposer != image_decomposer:
            raise ConfigError(f"{index_dir} was built with image decomposer {index.config.decomposer!r}, asked for "
                              f"{image_decomposer!r}; pass --image-decomposer {index.config.decomposer} or an "
                              "--index-dir that does not exist yet (it is built there)")
        if segmenting and index.config.segment_work_size != segment_work_size:
            raise ConfigError(f"{index_dir} segments photos at {index.config.segment_work_size} pixels, asked for "
                              f"{segment_work_size}; pass --segment-work-size {index.config.segment_work_size} or an "
                              "--index-dir that does not exist yet (it is built there)")
        return index, _stored_build_info(bench_dir, index_dir) or {"reused": True, "measured": False}, index_dir
    if index_dir is not None:
        index = HiMIRIndex(encoder, config, device=device)
        return index, _build_index(index, bench_dir, index_dir, progress=progress), index_dir
    target = default_index_dir(bench_dir, region_encoding)
    if (target / "CURRENT").is_file():
        manifest = HiMIRIndex.read_manifest(target)
        saved = manifest.get("config", {})
        if (_encoder_matches(manifest, encoder) and saved.get("layout") == str(layout)
                and saved.get("region_encoding", "crops") == region_encoding
                and saved.get("decomposer", "grid") == image_decomposer
                and (not segmenting or HiMIRConfig.from_dict(saved).segment_work_size == segment_work_size)):
            index = HiMIRIndex.load(target, encoder=loaded_encoder, device=device)
            update = index.add(bench_dir / "images", progress=progress)
            if update.added or update.updated:
                logger.warning("the saved index lacked %d scenes: added them; throughput figures are those of "
                               "the first build", update.added + update.updated)
                index.save(target)
            return index, _stored_build_info(bench_dir, target) or {"reused": True, "measured": False}, target
        logger.warning("%s was built with encoder %r / layout %r, asked for %r / %r: rebuilding it", target,
                       manifest.get("encoder", {}).get("spec"), saved.get("layout"),
                       encoder if isinstance(encoder, str) else encoder.name, layout)
    index = HiMIRIndex(encoder, config, device=device)
    return index, _build_index(index, bench_dir, target, progress=progress), target


def default_index_dir(bench_dir: Path, region_encoding: str) -> Path:
    """Where a run builds (or reuses) its index: ``bench_dir/index`` for crops, ``index-roi`` for roi."""
    return Path(bench_dir) / ("index" if region_encoding == "crops" else f"index-{region_encoding}")


def _build_info_path(bench_dir: Path, index_dir: Path) -> Path:
    """``index_build.json`` for ``bench_dir/index`` (as before), ``index_build-<folder>.json`` for others."""
    if Path(index_dir).resolve() == (bench_dir / "index").resolve():
        return bench_dir / "index_build.json"
    return bench_dir / f"index_build-{Path(index_dir).name}.json"


def _build_index(index: HiMIRIndex, bench_dir: Path, target: Path, *, progress: bool) -> dict[str, Any]:
    tick = time.perf_counter()
    # encoders load their models lazily: one tiny call of each kind, before the clock of `add` starts
    warm = Image.new("RGB", (64, 64))
    index.encoder.embed_images([warm])
    if index.config.region_encoding == "roi" and isinstance(index.encoder, RegionEncoder):
        index.encoder.embed_regions([warm], [np.array([[0, 0, 64, 64]])])
    index.encoder.embed_texts(["warm-up"])
    load_s = time.perf_counter() - tick
    with PeakMemory() as memory:
        report = index.add(bench_dir / "images", progress=progress)
    index.save(target)
    if not report.added:
        raise HiMIRError(f"no image could be indexed from {bench_dir / 'images'} ({len(report.skipped)} skipped)")
    info = {
        "reused": False, "measured": True, "encoder_load_s": load_s, "seconds": report.seconds,
        "images": report.added, "crops_encoded": report.crops_encoded, "regions_stored": report.regions_stored,
        "regions_pruned": report.regions_pruned, "skipped": len(report.skipped),
        "images_per_s": report.added / report.seconds, "crops_per_s": report.crops_encoded / report.seconds,
        "memory": memory.to_dict(), "batch_size": index.config.batch_size,
        "region_encoding": index.config.region_encoding, "index_dir": str(Path(target).resolve()),
    }
    _build_info_path(bench_dir, target).write_text(json.dumps(info, indent=2), encoding="utf-8")
    return info


def _stored_build_info(bench_dir: Path, index_dir: Path) -> dict[str, Any] | None:
    path = _build_info_path(bench_dir, index_dir)
    if not path.is_file():
        return None
    info = json.loads(path.read_text(encoding="utf-8"))
    if info.get("index_dir", str(Path(index_dir).resolve())) != str(Path(index_dir).resolve()):
        return None  # written for another folder of the same name
    return {**info, "reused": True}


def encoder_throughput(index: HiMIRIndex, paths: Sequence[Path], *, batch_size: int) -> dict[str, Any]:
    """The encoder alone on the crops of ``paths``: crops/s, in batches of ``batch_size``.

    Crops are cut as the index cuts them (same decomposer, layout and overlap); decoding and
    cropping are not timed. One 1-crop call warms the encoder up first. For a ``roi`` index,
    the encoder's one pass per photo is timed instead (regions/s, reported as crops/s).
    """
    from himir_rag.images import load_image
    from himir_rag.ingest import region_decomposer

    decomposer = region_decomposer(index.config)
    if index.config.region_encoding == "roi":
        return _roi_throughput(index, paths, decomposer)
    crops = []
    for path in paths:
        image = load_image(path, max_pixels=index.config.max_image_pixels)
        scale = min(1.0, _CROP_MAX_SIDE / max(image.size))  # as the index: crops of a copy <= 1024 px
        work = image if scale == 1.0 else image.resize((round(image.width * scale), round(image.height * scale)))
        crops.extend(work.crop(tuple(int(round(v * scale)) for v in box)) for box in decomposer.decompose(image).boxes)
    if not crops:
        return {"images": 0, "crops": 0}
    index.encoder.embed_images(crops[:1])
    tick = time.perf_counter()
    for start in range(0, len(crops), batch_size):
        index.encoder.embed_images(crops[start : start + batch_size])
    seconds = time.perf_counter() - tick
    return {"images": len(paths), "crops": len(crops), "batch_size": batch_size, "seconds": seconds,
            "crops_per_s": len(crops) / seconds, "ms_per_crop": 1000 * seconds / len(crops)}


def _roi_throughput(index: HiMIRIndex, paths: Sequence[Path], decomposer: Any) -> dict[str, Any]:
    """``encode_views`` timed photo by photo, as a roi index encodes (decoding and cutting not timed)."""
    from himir_rag.images import load_image
    from himir_rag.ingest import cut, encode_views

    cuts = [cut(load_image(path, max_pixels=index.config.max_image_pixels), decomposer,
                min_region_frac=index.config.min_region_frac, crops=False) for path in paths]
    if not cuts:
        return {"images": 0, "crops": 0}
    encode_views([cuts[0][2]], [cuts[0][0]], index.encoder)
    tick = time.perf_counter()
    for tree, _, view in cuts:
        encode_views([view], [tree], index.encoder)
    seconds = time.perf_counter() - tick
    regions = sum(len(tree) for tree, _, _ in cuts)
    return {"images": len(paths), "crops": regions, "batch_size": 1, "region_encoding": "roi", "seconds": seconds,
            "crops_per_s": regions / seconds, "ms_per_crop": 1000 * seconds / regions}


def _scene_ids_by_image(index: HiMIRIndex, bench_dir: Path,
                        scenes: Mapping[str, dict[str, Any]]) -> tuple[dict[str, str], dict[str, int]]:
    """``{indexed path: scene_id}`` and ``{scene_id: image_id}``; paths compared after realpath."""
    scene_by_real = {os.path.realpath(bench_dir / row["path"]): sid for sid, row in scenes.items()}
    by_path, image_ids = {}, {}
    for record in index.images:
        sid = scene_by_real.get(os.path.realpath(record.path))
        if sid is not None:
            by_path[record.path] = sid
            image_ids[sid] = record.image_id
    return by_path, image_ids


@dataclass
class _EncodingRun:
    """One region encoding's index and its runs over the benchmark's queries."""

    index: HiMIRIndex
    indexing: dict[str, Any]
    index_dir: Path
    runs: Any
    grounding: list[dict[str, Any]]
    search_k: int
    throughput: dict[str, Any]
    search_memory: Any

    def summary(self, modes: Sequence[RetrievalMode]) -> dict[str, Any]:
        """Quality per mode, grounding and indexing photos/s: one column of the side-by-side table."""
        summary = summarize_run(self.runs.per_query, modes, self.runs.skipped)
        return {"index_dir": str(self.index_dir), "indexing": {k: self.indexing.get(k) for k in
                                                               ("measured", "reused", "images_per_s", "seconds")},
                "modes": {name: {k: row.get(k) for k in ("recall@1", "recall@5", "recall@10", "ndcg@10", "mrr")}
                          for name, row in summary["modes"].items()},
                "grounding": summarize_grounding(self.grounding)}


def parse_region_encodings(value: str | Iterable[str]) -> list[str]:
    """``"crops,roi"`` or a list -> the encodings in order, each known and given once.

    Raises
    ------
    ConfigError
        For an unknown, repeated or empty list.
    """
    from himir_rag.config import REGION_ENCODINGS

    names = [v.strip() for v in (value.split(",") if isinstance(value, str) else value) if v.strip()]
    unknown = [n for n in names if n not in REGION_ENCODINGS]
    if not names or unknown or len(set(names)) != len(names):
        raise ConfigError(f"region encodings {value!r}: expected a comma list of distinct "
                          f"{' / '.join(REGION_ENCODINGS)}, e.g. 'crops,roi'")
    return names


def _index_dirs(index_dir: Any, encodings: Sequence[str]) -> list[Path | None]:
    """One index folder (or None: the default) per encoding."""
    if index_dir is None:
        return [None] * len(encodings)
    dirs = [Path(index_dir)] if isinstance(index_dir, (str, os.PathLike)) else [Path(d) for d in index_dir]
    if len(dirs) != len(encodings):
        raise ConfigError(f"{len(dirs)} --index-dir for {len(encodings)} region encodings ({', '.join(encodings)}); "
                          "give one per encoding, in the same order, or none")
    return dirs


def _run_encoding(bench_dir: Path, queries: list[Any], scenes: Mapping[str, dict[str, Any]],
                  mode_list: list[RetrievalMode], decomposer_obj: Any, *, encoder: Encoder | str, layout: str,
                  device: str, batch_size: int, index_dir: Path | None, progress: bool, region_encoding: str, k: int,
                  scheduler: Mapping[str, Any] | None, throughput_images: int,
                  image_decomposer: str, segment_work_size: int, focus: Mapping[str, float] | None) -> _EncodingRun:
    """Open or build the index of one region encoding and run every mode's queries on it."""
    index, indexing, used_index_dir = _open_index(
        bench_dir, encoder=encoder, layout=layout, device=device, batch_size=batch_size,
        index_dir=index_dir, progress=progress, region_encoding=region_encoding, image_decomposer=image_decomposer,
        segment_work_size=segment_work_size)
    if scheduler is not None:
        index.set_config(index.config.replace(scheduler=dict(scheduler)))
    if focus:  # query time only, like the scheduler: not saved
        index.set_config(index.config.replace(**focus))
    scene_of_path, image_ids = _scene_ids_by_image(index, bench_dir, scenes)
    missing = [q.scene_id for q in queries if q.scene_id not in image_ids]
    if missing:
        raise ConfigError(f"the index in {used_index_dir} lacks {len(missing)} source scenes of the queries "
                          f"(e.g. {missing[0]}); index {bench_dir / 'images'} into it or drop --index-dir")
    throughput = (encoder_throughput(index, _spread_sample(bench_dir, scenes, throughput_images),
                                     batch_size=index.config.batch_size) if throughput_images else {})
    search_k = min(max(k, 10), len(index))

    def search(mode: RetrievalMode, query: Any, subs: list[str]) -> SearchResult:
        return index.search(query.text, k=search_k, mode=mode, subqueries=subs)

    with PeakMemory() as search_memory:
        runs = run_modes(queries, mode_list, search, decompose=lambda q: list(decomposer_obj.decompose(q.text)),
                         rank_ids=lambda result: [scene_of_path.get(hit.path, hit.path) for hit in result.hits],
                         progress=progress)
    grounding = grounding_rows(index, queries, runs.subqueries, scenes, image_ids)
    return _EncodingRun(index, indexing, used_index_dir, runs, grounding, search_k, throughput, search_memory)


def run_benchmark(bench_dir: str | os.PathLike[str], *, modes: str | Iterable[str] = DEFAULT_MODES,
                  encoder: Encoder | str = "offline", decomposer: str = "rule", layout: str = "1+4+16",
                  k: int = 10, limit_queries: int | None = None, index_dir: str | os.PathLike[str] | None = None,
                  device: str = "cpu", batch_size: int = 2, throughput_images: int = 20,
                  plots: bool = True, report_dir: str | os.PathLike[str] | None = None,
                  scheduler: Mapping[str, Any] | None = None, torch_threads: int | None = None,
                  progress: bool = True,
                  region_encodings: str | Iterable[str] = "crops", stages: bool = False,
                  image_decomposer: str = HiMIRConfig.decomposer,
                  segment_work_size: int = HiMIRConfig.segment_work_size,
                  focus: Mapping[str, float] | None = None) -> dict[str, Any]:
    """Run every mode on a composite benchmark and write its report (see module docstring).

    Parameters
    ----------
    bench_dir : path
        A directory written by ``himir bench build`` (``images/``, ``*.jsonl``). The report
        (``report.json``, ``report.md``, ``*.png``) and the index (``index/``) go here.
    modes : str or list of str
        Any of ``single``, ``mvr``, ``himir-full``, ``himir``.
    encoder : Encoder or str
        An encoder object or a spec (``"offline"``, ``"clip"``...).
    decomposer : str
        ``rule``, ``oracle`` (ground-truth object names), ``llm`` (``HIMIR_LLM``) or ``none``.
    layout : str
        ``"1+M+N"`` when the index is built here.
    k : int
        Hits per query (at least 10 are retrieved so that Recall@10 is defined).
    limit_queries : int, optional
        Run only the first N queries.
    index_dir : path or list of paths, optional
        The index of ``bench_dir/images``, one per region encoding: reused when it exists,
        built there when it does not. Default: ``bench_dir/index`` (crops), ``bench_dir/index-roi``.
    throughput_images : int
        Images whose crops time the encoder alone (0 skips that measurement).
    plots : bool
        Draw the PNG plots (matplotlib; a few seconds).
    report_dir : path, optional
        Where the report goes; default ``bench_dir`` (e.g. one folder per decomposer).
    scheduler : dict, optional
        ``HiMIRConfig.scheduler`` parameters for mode ``himir`` in this run (the saved
        index keeps its own).
    torch_threads : int, optional
        ``torch.set_num_threads`` for this process and the encoders' CPU inference threads
        (:func:`~himir_rag.encoders.set_inference_threads`); default: the encoders' own (1 on CPU).
        On a CPU shared with other jobs, 1 thread avoids OpenMP oversubscription stalls.
    stages : bool
        Add the per-stage table of the scheduled pass (:mod:`himir_rag.bench.stages`) on the
        first region encoding's index: each pruning stage switched off (or on) in turn, with
        its savings and its Recall@10 cost.
    image_decomposer : str
        How a new index cuts photos into regions: ``"objects"`` (default, as ``HiMIRConfig``),
        ``"grid"`` or ``"segments"`` (:func:`himir_rag.hierarchy.get_decomposer`); a reused index
        must match (an index a bench run saved before ``objects`` was the default is ``"grid"``).
    segment_work_size : int
        The longest side ``segments`` and ``objects`` segment a new index's photos at
        (``HiMIRConfig.segment_work_size``); a reused one must match.
    focus : dict, optional
        ``focus_temperature`` and/or ``focus_spread`` (``HiMIRConfig``) for this run: how the
        reported boxes that grounding scores are drawn (query time; a reused index otherwise
        keeps the values it was saved with, the saved index is not changed).
    region_encodings : str or list of str
        ``"crops"``, ``"roi"`` or both (``"crops,roi"``): one index per encoding, the same
        queries on each; the report's main sections are the first encoding's, and
        ``report["region_encodings"]`` puts quality, grounding and indexing photos/s side by side.

    Returns
    -------
    dict
        The report (also written to ``report_dir/report.json``).

    Raises
    ------
    FileNotFoundError
        ``bench_dir`` does not hold a built benchmark.
    ConfigError
        Unknown mode, decomposer, layout, or an index built with another encoder.
    """
    bench_dir = Path(bench_dir)
    mode_list = parse_modes(modes)
    unknown = sorted(set(focus or {}) - set(FOCUS_FIELDS))
    if unknown:
        raise ConfigError(f"focus takes {' and '.join(FOCUS_FIELDS)}, got {', '.join(unknown)}")
    if focus:
        HiMIRConfig(**focus)  # validated before any index is opened
    if torch_threads is not None:
        _set_torch_threads(torch_threads)
    queries, scenes = _load_benchmark(bench_dir, limit_queries)
    decomposer_obj = _make_decomposer(decomposer, queries)
    started = time.perf_counter()
    encodings = parse_region_encodings(region_encodings)
    runs_by_encoding = {}
    for number, (encoding, directory) in enumerate(zip(encodings, _index_dirs(index_dir, encodings))):
        runs_by_encoding[encoding] = _run_encoding(
            bench_dir, queries, scenes, mode_list, decomposer_obj, encoder=encoder, layout=layout, device=device,
            batch_size=batch_size, index_dir=directory, progress=progress, region_encoding=encoding, k=k,
            scheduler=scheduler, throughput_images=throughput_images if number == 0 else 0,
            image_decomposer=image_decomposer, segment_work_size=segment_work_size, focus=focus)
    first = runs_by_encoding[encodings[0]]
    index, indexing, used_index_dir, runs, grounding = (first.index, first.indexing, first.index_dir, first.runs,
                                                         first.grounding)
    search_k, throughput, search_memory = first.search_k, first.throughput, first.search_memory
    report = {
        "kind": "composite", "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine_info(),
        "benchmark": {"dir": str(bench_dir.absolute()), "scenes": len(scenes), "queries": len(queries),
                      "indexed_images": len(index), **_read_manifest_counts(bench_dir)},
        "config": {"modes": [m.value for m in mode_list], "encoder": index.encoder.name,
                   "encoder_spec": index.encoder_spec, "decomposer": decomposer,
                   "image_decomposer": index.config.decomposer, "layout": index.config.layout,
                   "segment_work_size": index.config.segment_work_size,
                   "k": k, "search_k": search_k, "scheduler": index.config.scheduler.overrides(),
                   "focus_temperature": index.config.focus_temperature, "focus_spread": index.config.focus_spread,
                   "torch_threads": torch_threads, "region_encoding": index.config.region_encoding,
                   "limit_queries": limit_queries, "index_dir": str(used_index_dir), "device": device},
        "autoconfig": index.autoconfig,  # how the scheduler parameters above were chosen (auto_tune), or None
        "skipped_modes": runs.skipped, **summarize_run(runs.per_query, mode_list, runs.skipped),
        "first_query_ms": runs.first_query_ms,
        "indexing": indexing, "encoder_throughput": throughput,
        "index": {"bytes_on_disk": directory_bytes(used_index_dir), "regions": int(len(index.snapshot.levels)),
                  "vector_bytes": int(index.snapshot.vectors.nbytes), **index.snapshot.level_counts()},
        "memory": {"search": search_memory.to_dict(), "process_peak_rss_mb": round(process_max_rss_mb(), 1)},
        "grounding": summarize_grounding(grounding), "wall_s": time.perf_counter() - started,
        "region_encodings": {name: run.summary(mode_list) for name, run in runs_by_encoding.items()},
        "subqueries": runs.subqueries, "per_query": runs.per_query, "grounding_rows": grounding,
    }
    if stages:
        report["stages"] = composite_stages(first, queries, scenes, bench_dir, k=10)
    from himir_rag.bench.report import write_report

    write_report(report, bench_dir if report_dir is None else Path(report_dir), plots=plots)
    return report


def composite_stages(run: _EncodingRun, queries: Sequence[_Query], scenes: Mapping[str, dict[str, Any]],
                     bench_dir: Path, *, k: int) -> list[dict[str, Any]]:
    """The per-stage table on one encoding's index: the run's sub-queries, scenes as keys, the
    reference mode's top-k of the run (when it ran) as the agreement target."""
    from himir_rag.bench.stages import StageQuery, measure_stages

    scene_of_path, _ = _scene_ids_by_image(run.index, bench_dir, scenes)
    reference = {row["query_id"]: frozenset(row["top"][:k]) for row in run.runs.per_query
                 if row["mode"] == reference_mode().value}
    work = [StageQuery(run.index.encoder.embed_texts(run.runs.subqueries[q.query_id] or [q.text]),
                       frozenset(q.relevant), reference.get(q.query_id)) for q in queries]
    return measure_stages(run.index, work, k=k, key=lambda hit: scene_of_path.get(hit.path, hit.path))


def _set_torch_threads(count: int) -> None:
    if count < 1:
        raise ConfigError(f"torch_threads={count}; expected at least 1")
    import torch

    torch.set_num_threads(count)
    set_inference_threads(count)  # encoders otherwise run CPU inference on their default of 1


def _spread_sample(bench_dir: Path, scenes: Mapping[str, dict[str, Any]], count: int) -> list[Path]:
    """``count`` scene paths spread evenly over the collection."""
    ids = sorted(scenes)
    return [bench_dir / scenes[sid]["path"] for sid in ids[:: max(1, len(ids) // max(1, count))][:count]]


def _read_manifest_counts(bench_dir: Path) -> dict[str, Any]:
    path = bench_dir / "manifest.json"
    if not path.is_file():
        return {}
    manifest = json.loads(path.read_text(encoding="utf-8"))
    return {"seed": manifest.get("seed"), "image_size": manifest.get("image_size"),
            "queries_with_several_relevant": manifest.get("counts", {}).get("queries_with_several_relevant")}

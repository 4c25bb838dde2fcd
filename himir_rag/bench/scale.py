"""Scale benchmark: a synthetic-vector collection with planted multi-object targets.

``himir bench scale`` measures the matching engine (the scheduler and the exhaustive
baselines) on collections far larger than the encoder could index here. No encoder
runs: the vectors are drawn directly.

Generative model (every image uses the same ``1+M+N`` grid tree of a 640x480 frame):

- **background**: every stored region vector is an independent random unit vector;
- **queries**: each query has 2-3 sub-query vectors (random unit vectors, shared with no
  other query); its single-vector form (mode ``single``) is their normalised sum;
- **objects**: an object is a sub-query vector placed in a random box (2% to 40% of the
  frame, aspect 0.6-1.6). Every region ``j`` of the image holding it becomes
  ``normalise(background_j + signal * IoU(object box, region box) * subquery)``: the
  region that holds the object tightly matches best, the whole frame sees a diluted
  object, a small segment a fragment of a large one;
- **targets** (the qrels): 1-3 images per query hold all its sub-queries;
- **distractors**: ``distractors`` images per query hold a strict subset of them (hard
  negatives: they match some sub-queries very well but not all).

Searching uses :meth:`HiMIRIndex._search_vectors` (private) with explicit query vectors,
the same code path ``HiMIRIndex.search`` takes after encoding the texts; the collection is
put into an encoder-less :class:`HiMIRIndex` through its (private) ``_snapshot``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from himir_rag.bench.runner import (
    DEFAULT_MODES,
    PeakMemory,
    machine_info,
    parse_modes,
    process_max_rss_mb,
    run_modes,
    summarize_run,
)
from himir_rag.catalog import ImageRecord, Snapshot
from himir_rag.config import HiMIRConfig
from himir_rag.encoders import l2_normalize
from himir_rag.errors import ConfigError
from himir_rag.hierarchy import GridDecomposer, RegionTree
from himir_rag.index import HiMIRIndex, SearchResult
from himir_rag.scheduler import RetrievalMode, SearchStats

__all__ = ["VectorsOnlyEncoder", "PlantedQuery", "SyntheticCollection", "build_synthetic_collection",
           "run_scale_benchmark"]

logger = logging.getLogger(__name__)

FRAME = (640, 480)
OBJECT_AREA = (0.02, 0.4)
_CHUNK_IMAGES = 4096


class VectorsOnlyEncoder:
    """Stand-in encoder of a synthetic collection: a name and a dimension; embedding raises."""

    def __init__(self, dim: int) -> None:
        self.dim = int(dim)
        self.name = f"synthetic-vectors:dim{self.dim}"

    def embed_images(self, images: list[Image.Image]) -> np.ndarray:
        raise NotImplementedError("a synthetic-vector collection has no image encoder; search with explicit vectors")

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        raise NotImplementedError("a synthetic-vector collection has no text encoder; search with explicit vectors")


@dataclass(frozen=True)
class PlantedQuery:
    """One synthetic query.

    Attributes
    ----------
    subquery_vectors : np.ndarray
        (n_subqueries, dim) float32 unit vectors.
    query_vector : np.ndarray
        (1, dim) float32: the normalised sum, matched by mode ``single``.
    relevant : frozenset of int
        Image ids of the targets (every sub-query planted).
    distractors : tuple of int
        Image ids holding a strict subset of the sub-queries.
    """

    query_id: str
    text: str
    subquery_vectors: np.ndarray
    query_vector: np.ndarray
    relevant: frozenset[int]
    distractors: tuple[int, ...]

    @property
    def subqueries(self) -> list[str]:
        return [f"{self.query_id}/sub{i}" for i in range(len(self.subquery_vectors))]


@dataclass
class SyntheticCollection:
    """An encoder-less index over synthetic vectors, its queries and build figures."""

    index: HiMIRIndex
    queries: list[PlantedQuery]
    tree: RegionTree
    build_seconds: float
    planted_images: int


def _object_box(rng: np.random.Generator) -> np.ndarray:
    width, height = FRAME
    area = math.exp(rng.uniform(math.log(OBJECT_AREA[0]), math.log(OBJECT_AREA[1]))) * width * height
    aspect = rng.uniform(0.6, 1.6)
    w = min(width, math.sqrt(area * aspect))
    h = min(height, area / w)
    x0, y0 = rng.uniform(0, width - w), rng.uniform(0, height - h)
    return np.array([x0, y0, x0 + w, y0 + h], dtype=np.float64)


def _iou(boxes: np.ndarray, box: np.ndarray) -> np.ndarray:
    """IoU of each of ``boxes`` (n, 4) with one ``box`` (4,)."""
    boxes = boxes.astype(np.float64)
    inter = (np.clip(np.minimum(boxes[:, 2], box[2]) - np.maximum(boxes[:, 0], box[0]), 0, None)
             * np.clip(np.minimum(boxes[:, 3], box[3]) - np.maximum(boxes[:, 1], box[1]), 0, None))
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / (areas + (box[2] - box[0]) * (box[3] - box[1]) - inter)


def _place_objects(count: int, rng: np.random.Generator) -> list[np.ndarray]:
    """``count`` boxes overlapping each other by IoU <= 0.3 (best effort, 20 tries each)."""
    boxes: list[np.ndarray] = []
    for _ in range(count):
        for _ in range(20):
            box = _object_box(rng)
            if not boxes or _iou(np.stack(boxes), box).max() <= 0.3:
                break
        boxes.append(box)
    return boxes


def _plant(rows: np.ndarray, tree: RegionTree, subqueries: np.ndarray, signal: float,
           rng: np.random.Generator) -> None:
    """Write the objects of ``subqueries`` (s, dim) into one image's region ``rows`` (in place)."""
    mix = rows.astype(np.float64)
    for vector, box in zip(subqueries, _place_objects(len(subqueries), rng)):
        mix += signal * _iou(tree.boxes, box)[:, None] * vector[None, :]
    rows[:] = l2_normalize(mix)


def _validate(images: int, dim: int, queries: int, distractors: int, signal: float) -> None:
    if dim < 8:
        raise ConfigError(f"dim={dim}; expected at least 8")
    if queries < 1 or distractors < 0 or signal <= 0:
        raise ConfigError(f"queries={queries}, distractors={distractors}, signal={signal}; expected "
                          "queries >= 1, distractors >= 0, signal > 0")
    need = queries * (3 + distractors)
    if images < need:
        raise ConfigError(f"images={images} is too small for {queries} queries with up to 3 targets and "
                          f"{distractors} distractors each ({need} planted images); pass more --images or fewer --queries")


def build_synthetic_collection(*, images: int = 100_000, dim: int = 384, layout: str = "1+4+16",
                               queries: int = 200, seed: int = 0, signal: float = 2.0, distractors: int = 30,
                               scheduler: dict[str, Any] | None = None, progress: bool = True) -> SyntheticCollection:
    """Draw a synthetic collection and wrap it in an encoder-less :class:`HiMIRIndex`.

    Parameters
    ----------
    images : int
        Collection size.
    dim : int
        Vector dimension (memory: ``images * (1+M+N) * dim * 4`` bytes, twice that while
        the snapshot is assembled).
    layout : str
        ``"1+M+N"`` grid layout.
    queries : int
        Queries, each with 2-3 sub-queries, 1-3 targets and ``distractors`` hard negatives.
    signal : float
        Weight of a planted sub-query in a region that holds it exactly (IoU 1).
    scheduler : dict, optional
        ``HiMIRConfig.scheduler`` parameters of mode ``himir`` (e.g. ``{"index_kind": "flat"}``).

    Returns
    -------
    SyntheticCollection

    Raises
    ------
    ConfigError
        If the counts are out of range or ``images`` cannot hold every planted image.

    Example
    -------
    >>> collection = build_synthetic_collection(images=500, dim=32, queries=5, progress=False)
    >>> len(collection.index), len(collection.queries)
    (500, 5)
    """
    _validate(images, dim, queries, distractors, signal)
    started = time.perf_counter()
    rng = np.random.default_rng(seed)
    tree = GridDecomposer(layout).decompose(Image.new("RGB", FRAME))
    per_image = len(tree)
    vectors = np.empty((images * per_image, dim), dtype=np.float32)
    for start in tqdm(range(0, images, _CHUNK_IMAGES), desc="drawing vectors", unit="chunk", disable=not progress):
        stop = min(images, start + _CHUNK_IMAGES)
        block = rng.standard_normal(((stop - start) * per_image, dim), dtype=np.float32)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        vectors[start * per_image : stop * per_image] = block
    planted = rng.permutation(images)[: queries * (3 + distractors)]
    planted_queries = _plant_queries(vectors, tree, planted, queries=queries, distractors=distractors,
                                     signal=signal, rng=rng)
    index = HiMIRIndex(VectorsOnlyEncoder(dim), HiMIRConfig(layout=layout, scheduler=dict(scheduler or {})))
    records = [ImageRecord(i + 1, f"synthetic://image/{i + 1:07d}", *FRAME) for i in range(images)]
    views = [vectors[i * per_image : (i + 1) * per_image] for i in range(images)]
    index._snapshot = Snapshot.empty(dim).with_images(records, [tree] * images, views)  # documented private use
    index._next_id = images + 1
    del views, vectors
    used = sum(len(q.relevant) + len(q.distractors) for q in planted_queries)
    return SyntheticCollection(index, planted_queries, tree, time.perf_counter() - started, used)


def _plant_queries(vectors: np.ndarray, tree: RegionTree, planted: np.ndarray, *, queries: int, distractors: int,
                   signal: float, rng: np.random.Generator) -> list[PlantedQuery]:
    per_image, dim = len(tree), vectors.shape[1]
    out, cursor = [], 0
    for q in range(queries):
        n_subs, n_targets = int(rng.integers(2, 4)), int(rng.integers(1, 4))
        subs = l2_normalize(rng.standard_normal((n_subs, dim)))
        targets = planted[cursor : cursor + n_targets]
        negatives = planted[cursor + n_targets : cursor + n_targets + distractors]
        cursor += n_targets + distractors
        for image in targets:
            _plant(vectors[image * per_image : (image + 1) * per_image], tree, subs, signal, rng)
        for image in negatives:
            keep = rng.choice(n_subs, size=int(rng.integers(1, n_subs)), replace=False)
            _plant(vectors[image * per_image : (image + 1) * per_image], tree, subs[np.sort(keep)], signal, rng)
        out.append(PlantedQuery(f"q{q:05d}", f"planted query {q}", subs,
                                l2_normalize(subs.sum(axis=0, keepdims=True)),
                                frozenset(int(i) + 1 for i in targets), tuple(int(i) + 1 for i in negatives)))
    return out


def _search(index: HiMIRIndex, mode: RetrievalMode, query: PlantedQuery, k: int) -> SearchResult:
    vectors = query.query_vector if mode is RetrievalMode.SINGLE else query.subquery_vectors
    stats = SearchStats(mode=mode.value)
    return index._search_vectors(query.text, query.subqueries, vectors, k=k, mode=mode, filters=None, stats=stats,
                                 started=time.perf_counter())


def run_scale_benchmark(out_dir: str | Path, *, images: int = 100_000, dim: int = 384, layout: str = "1+4+16",
                        queries: int = 200, seed: int = 0, modes: str | Iterable[str] = DEFAULT_MODES, k: int = 10,
                        signal: float = 2.0, distractors: int = 30, scheduler: dict[str, Any] | None = None,
                        plots: bool = True, progress: bool = True) -> dict[str, Any]:
    """Build a synthetic collection, run every mode on its queries, write the report to ``out_dir``.

    Same report fields as the composite benchmark without encoding: quality against the
    planted targets, dot products, search latency p50/p95, memory.

    Returns
    -------
    dict
        The report (also written to ``out_dir/report.json``).

    Example
    -------
    >>> report = run_scale_benchmark("scale-out", images=2000, dim=64, queries=20)  # doctest: +SKIP
    >>> report["modes"]["himir-full"]["recall@10"]  # doctest: +SKIP
    1.0
    """
    mode_list = parse_modes(modes)
    started = time.perf_counter()
    with PeakMemory() as build_memory:
        collection = build_synthetic_collection(images=images, dim=dim, layout=layout, queries=queries, seed=seed,
                                                signal=signal, distractors=distractors, scheduler=scheduler,
                                                progress=progress)
    index, search_k = collection.index, min(max(k, 10), images)
    with PeakMemory() as search_memory:
        runs = run_modes(
            collection.queries, mode_list, lambda mode, query, subs: _search(index, mode, query, search_k),
            decompose=lambda query: query.subqueries, rank_ids=lambda result: [hit.image_id for hit in result.hits],
            progress=progress, time_decompose=False)
    snapshot = index.snapshot
    report = {
        "kind": "scale", "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": machine_info(),
        "benchmark": {"images": images, "dim": dim, "layout": layout, "queries": queries, "seed": seed,
                      "signal": signal, "distractors_per_query": distractors,
                      "planted_images": collection.planted_images,
                      "mean_targets_per_query": float(np.mean([len(q.relevant) for q in collection.queries])),
                      "mean_subqueries": float(np.mean([len(q.subquery_vectors) for q in collection.queries]))},
        "config": {"modes": [m.value for m in mode_list], "k": k, "search_k": search_k,
                   "scheduler": dict(scheduler or {}),
                   "search_api": "HiMIRIndex._search_vectors (explicit vectors)"},
        "skipped_modes": runs.skipped, **summarize_run(runs.per_query, mode_list, runs.skipped),
        "first_query_ms": runs.first_query_ms,
        "collection": {"build_s": collection.build_seconds},
        "index": {"regions": int(len(snapshot.levels)), "vector_bytes": int(snapshot.vectors.nbytes),
                  "catalog_array_bytes": int(snapshot.region_image.nbytes + snapshot.levels.nbytes
                                             + snapshot.parents.nbytes + snapshot.boxes.nbytes),
                  **snapshot.level_counts()},
        "memory": {"build": build_memory.to_dict(), "search": search_memory.to_dict(),
                   "process_peak_rss_mb": round(process_max_rss_mb(), 1)},
        "wall_s": time.perf_counter() - started, "per_query": runs.per_query,
    }
    from himir_rag.bench.report import write_report

    write_report(report, Path(out_dir), plots=plots)
    return report

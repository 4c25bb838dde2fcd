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

Searching uses :meth:`HiMIRIndex.search_vectors` with explicit query vectors, the code
path ``HiMIRIndex.search`` takes after encoding the texts; the collection is wrapped in an
encoder-less :class:`HiMIRIndex` with :meth:`HiMIRIndex.from_vectors`, saved, and read
back with :meth:`HiMIRIndex.load` before the queries run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from himir_rag.bench.runner import (
    DEFAULT_MODES,
    UNAVAILABLE_MODE_ERRORS,
    PeakMemory,
    directory_bytes,
    machine_info,
    parse_modes,
    process_max_rss_mb,
    run_modes,
    summarize_run,
)
from himir_rag.catalog import VECTOR_DTYPES
from himir_rag.config import HiMIRConfig
from himir_rag.encoders import l2_normalize
from himir_rag.errors import ConfigError
from himir_rag.hierarchy import GridDecomposer, Level, RegionTree
from himir_rag.index import HiMIRIndex, SearchResult
from himir_rag.modes import MODES, RetrievalMode, reference_mode

__all__ = ["VectorsOnlyEncoder", "PlantedQuery", "SyntheticCollection", "build_synthetic_collection",
           "run_scale_benchmark", "saved_collection"]

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
                               scheduler: dict[str, Any] | None = None, precision: str = "float32",
                               vectors_file: str | Path | None = None, progress: bool = True) -> SyntheticCollection:
    """Draw a synthetic collection and wrap it in an encoder-less :class:`HiMIRIndex`.

    Parameters
    ----------
    images : int
        Collection size.
    dim : int
        Vector dimension (memory: ``images * (1+M+N) * dim`` x 4 bytes, or 2 for float16).
    layout : str
        ``"1+M+N"`` grid layout.
    queries : int
        Queries, each with 2-3 sub-queries, 1-3 targets and ``distractors`` hard negatives.
    signal : float
        Weight of a planted sub-query in a region that holds it exactly (IoU 1).
    scheduler : dict, optional
        ``HiMIRConfig.scheduler`` parameters of mode ``himir`` (e.g. ``{"index_kind": "flat"}``).
    precision : str
        ``"float32"`` or ``"float16"``: the vectors are drawn straight into that type.
    vectors_file : path, optional
        Draw into a memory-mapped ``.npy`` file there instead of RAM (1M images).

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
    config = HiMIRConfig(layout=layout, scheduler=dict(scheduler or {}), precision=precision)
    started = time.perf_counter()
    rng = np.random.default_rng(seed)
    tree = GridDecomposer(layout).decompose(Image.new("RGB", FRAME))
    per_image = len(tree)
    shape, dtype = (images * per_image, dim), VECTOR_DTYPES[precision]
    vectors = (np.empty(shape, dtype) if vectors_file is None
               else np.lib.format.open_memmap(str(vectors_file), mode="w+", dtype=dtype, shape=shape))
    for start in tqdm(range(0, images, _CHUNK_IMAGES), desc="drawing vectors", unit="chunk", disable=not progress):
        stop = min(images, start + _CHUNK_IMAGES)
        block = rng.standard_normal(((stop - start) * per_image, dim), dtype=np.float32)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        vectors[start * per_image : stop * per_image] = block
    planted = rng.permutation(images)[: queries * (3 + distractors)]
    planted_queries = _plant_queries(vectors, tree, planted, queries=queries, distractors=distractors,
                                     signal=signal, rng=rng)
    index = HiMIRIndex.from_vectors(vectors, tree, encoder=VectorsOnlyEncoder(dim), config=config,
                                    paths=[f"synthetic://image/{i:07d}" for i in range(1, images + 1)])
    index.sync_candidate_stores()  # what HiMIRIndex.add does when it finishes
    used = sum(len(q.relevant) + len(q.distractors) for q in planted_queries)
    return SyntheticCollection(index, planted_queries, tree, time.perf_counter() - started, used)


def _plant_queries(vectors: np.ndarray, tree: RegionTree, planted: np.ndarray, *, queries: int, distractors: int,
                   signal: float, rng: np.random.Generator) -> list[PlantedQuery]:
    per_image, dim = len(tree), vectors.shape[1]
    out, cursor = [], 0

    def plant(image: int, subs: np.ndarray) -> None:
        rows = np.asarray(vectors[image * per_image : (image + 1) * per_image], np.float32)
        _plant(rows, tree, subs, signal, rng)
        vectors[image * per_image : (image + 1) * per_image] = rows

    for q in range(queries):
        n_subs, n_targets = int(rng.integers(2, 4)), int(rng.integers(1, 4))
        subs = l2_normalize(rng.standard_normal((n_subs, dim)))
        targets = planted[cursor : cursor + n_targets]
        negatives = planted[cursor + n_targets : cursor + n_targets + distractors]
        cursor += n_targets + distractors
        for image in targets:
            plant(int(image), subs)
        for image in negatives:
            keep = rng.choice(n_subs, size=int(rng.integers(1, n_subs)), replace=False)
            plant(int(image), subs[np.sort(keep)])
        out.append(PlantedQuery(f"q{q:05d}", f"planted query {q}", subs,
                                l2_normalize(subs.sum(axis=0, keepdims=True)),
                                frozenset(int(i) + 1 for i in targets), tuple(int(i) + 1 for i in negatives)))
    return out


def _search(index: HiMIRIndex, mode: RetrievalMode, query: PlantedQuery, k: int) -> SearchResult:
    if MODES[mode].subqueries:
        vectors, labels = query.subquery_vectors, query.subqueries
    else:  # one vector: the sub-queries' normalised sum
        vectors, labels = query.query_vector, [query.text]
    return index.search_vectors(vectors, k=k, mode=mode, labels=labels, query=query.text)


def _warm(index: HiMIRIndex, modes: Sequence[RetrievalMode], queries: Sequence[PlantedQuery], k: int, *,
          progress: bool) -> None:
    """Every query once in every mode, untimed: reads the pages the timed pass will touch."""
    for mode in modes:
        for query in tqdm(queries, desc=f"warm pass ({mode.value})", unit="search", disable=not progress, leave=False):
            try:
                _search(index, mode, query, k)
            except UNAVAILABLE_MODE_ERRORS:  # a mode this build cannot run: run_modes reports it as skipped
                break


def run_scale_benchmark(out_dir: str | Path, *, images: int = 100_000, dim: int = 384, layout: str = "1+4+16",
                        queries: int = 200, seed: int = 0, modes: str | Iterable[str] = DEFAULT_MODES, k: int = 10,
                        signal: float = 2.0, distractors: int = 30, scheduler: dict[str, Any] | None = None,
                        precision: str = "float32", save: bool = True, reuse: bool = False,
                        query_range: tuple[int, int] | None = None, plots: bool = True,
                        progress: bool = True, stages: bool = False, warm_pass: bool = False,
                        auto_tune: bool = False) -> dict[str, Any]:
    """Build a synthetic collection, save and reload it, run every mode on its queries, write the report.

    Same report fields as the composite benchmark without encoding: quality against the
    planted targets, agreement with ``himir-full``'s top-k, dot products, search latency
    p50/p95, the first query after ``load``, build / save / load times, bytes on disk,
    peak RSS. With ``save`` the queries run on the index read back from
    ``out_dir/index`` (vectors memory-mapped, candidate stores loaded), as a user's would.
    With ``reuse`` an index saved by an earlier run with the same recipe (size, dim,
    layout, queries, seed...) is loaded instead of rebuilt, and ``scheduler`` overrides its
    parameters: a second setting costs only the queries. ``query_range=(a, b)`` evaluates
    planted queries ``a:b`` only (e.g. tune on one range, report on another). ``stages`` adds
    the per-stage table of the scheduled pass (:mod:`himir_rag.bench.stages`; above 20,000
    images without the "no candidate generation" row, which is the exhaustive scan).
    ``warm_pass`` runs every evaluated query once, untimed, in each mode before the timed
    pass: the latency is then that of a service whose memory-mapped vectors and candidate
    lists are already in the page cache, not of one reading them from disk for the first time.
    ``auto_tune`` tunes the scheduler on probes drawn from the collection
    (:func:`himir_rag.autoconfig.auto_tune`, as ``add`` does at index time; a synthetic
    collection is built without ``add``) after the first query and before the timed pass;
    the record is the report's ``autoconfig``, the saved index is not changed.

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
    if auto_tune and scheduler:
        raise ConfigError("give scheduler parameters or auto_tune, not both")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    recipe = {"images": images, "dim": dim, "layout": layout, "queries": queries, "seed": seed, "signal": signal,
              "distractors": distractors, "precision": precision}
    saved = saved_collection(out_dir, recipe) if reuse else None
    if saved is not None:  # the same collection was built and saved before: only the queries run
        index, load_s = _load(out_dir / "index")
        planted, build = saved
        persisted = {**build, "reused": True, "load_s": load_s}
        if scheduler:
            index.set_config(index.config.replace(scheduler=dict(scheduler)))
    else:
        index, planted, persisted = _build_and_save(out_dir, recipe, scheduler=scheduler, save=save,
                                                    progress=progress)
    search_k = min(max(k, 10), images)
    evaluated = planted[query_range[0] : query_range[1]] if query_range else planted
    with PeakMemory() as search_memory:
        tick = time.perf_counter()
        _search(index, RetrievalMode(index.config.default_mode), evaluated[0], search_k)
        persisted["first_query_after_load_ms"] = (time.perf_counter() - tick) * 1000
        autoconfig = index.auto_tune_now() if auto_tune else None
        if warm_pass:
            _warm(index, mode_list, evaluated, search_k, progress=progress)
        runs = run_modes(
            evaluated, mode_list, lambda mode, query, subs: _search(index, mode, query, search_k),
            decompose=lambda query: query.subqueries, rank_ids=lambda result: [hit.image_id for hit in result.hits],
            progress=progress, time_decompose=False, mode_major=True)
    snapshot = index.snapshot
    summary = summarize_run(runs.per_query, mode_list, runs.skipped)
    _add_agreement(summary, runs.per_query, k=min(k, images))
    report = {
        "kind": "scale", "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": machine_info(),
        "benchmark": {"images": images, "dim": dim, "layout": layout, "queries": queries, "seed": seed,
                      "signal": signal, "distractors_per_query": distractors, "precision": precision,
                      "planted_images": persisted.get("planted_images"),
                      "evaluated_queries": [evaluated[0].query_id, evaluated[-1].query_id, len(evaluated)],
                      "mean_targets_per_query": float(np.mean([len(q.relevant) for q in evaluated])),
                      "mean_subqueries": float(np.mean([len(q.subquery_vectors) for q in evaluated]))},
        "config": {"modes": [m.value for m in mode_list], "k": k, "search_k": search_k,
                   "scheduler": index.config.scheduler.overrides(),
                   "scheduler_params": dataclasses.asdict(index.config.scheduler_params),
                   "search_api": "HiMIRIndex.search_vectors (explicit vectors)", "warm_pass": warm_pass,
                   "auto_tune": auto_tune},
        "autoconfig": autoconfig,
        "skipped_modes": runs.skipped, **summary,
        "first_query_ms": runs.first_query_ms,
        "collection": persisted,
        "index": {"regions": int(len(snapshot.levels)), "vector_bytes": int(snapshot.vectors.nbytes),
                  "vector_dtype": str(snapshot.vectors.dtype),
                  "catalog_array_bytes": int(snapshot.region_image.nbytes + snapshot.levels.nbytes
                                             + snapshot.parents.nbytes + snapshot.boxes.nbytes),
                  "candidate_stores": {lv.name.lower(): {"kind": st.kind, "vectors": len(st), "lists": st.lists}
                                       for lv in Level if (st := index.candidate_stores.store(lv)) is not None},
                  **snapshot.level_counts()},
        "memory": {"build": persisted.get("build_memory"), "search": search_memory.to_dict(),
                   "process_peak_rss_mb": round(process_max_rss_mb(), 1)},
        "wall_s": time.perf_counter() - started, "per_query": runs.per_query,
    }
    if stages:
        report["stages"] = _scale_stages(index, evaluated, runs.per_query, k=min(k, images))
    from himir_rag.bench.report import write_report

    write_report(report, out_dir, plots=plots)
    return report


def _scale_stages(index: HiMIRIndex, evaluated: list[PlantedQuery], per_query: list[dict[str, Any]], *,
                  k: int) -> list[dict[str, Any]]:
    from himir_rag.bench.stages import STAGES, StageQuery, measure_stages

    reference = {row["query_id"]: frozenset(int(i) for i in row["top"][:k]) for row in per_query
                 if row["mode"] == reference_mode().value}
    work = [StageQuery(q.subquery_vectors, q.relevant, reference.get(q.query_id)) for q in evaluated]
    skip = [name for name, setting in STAGES.items() if setting.get("candidate_k") == -1] if len(index) > 20_000 else []
    return measure_stages(index, work, k=k, skip=skip)


def _build_and_save(out_dir: Path, recipe: dict[str, Any], *, scheduler: dict[str, Any] | None, save: bool,
                    progress: bool) -> tuple[HiMIRIndex, list[PlantedQuery], dict[str, Any]]:
    """Draw the collection, build its candidate stores, save it and load it back (``save``)."""
    staging = out_dir / "vectors-staging.npy" if save else None
    with PeakMemory() as build_memory:
        collection = build_synthetic_collection(**recipe, scheduler=scheduler, vectors_file=staging,
                                                progress=progress)
    index, planted = collection.index, collection.queries
    persisted: dict[str, Any] = {"build_s": collection.build_seconds, "planted_images": collection.planted_images,
                                 "build_memory": build_memory.to_dict()}
    if save:
        del collection  # the built copy goes before the reload
        tick = time.perf_counter()
        index.save(out_dir / "index")
        persisted["save_s"] = time.perf_counter() - tick
        del index
        if staging is not None:
            staging.unlink(missing_ok=True)
        index, load_s = _load(out_dir / "index")
        persisted.update(load_s=load_s, bytes_on_disk=directory_bytes(out_dir / "index"))
        _write_collection(out_dir, recipe, planted, persisted)
    return index, planted, persisted


def _load(directory: Path) -> tuple[HiMIRIndex, float]:
    """The saved index and the seconds ``HiMIRIndex.load`` took."""
    tick = time.perf_counter()
    index = HiMIRIndex.load(directory)
    return index, time.perf_counter() - tick


def _write_collection(out_dir: Path, recipe: dict[str, Any], planted: list[PlantedQuery],
                      build: dict[str, Any]) -> None:
    """The recipe, build figures and planted queries (plain JSON) beside the saved index."""
    queries = [{"query_id": q.query_id, "text": q.text, "subquery_vectors": q.subquery_vectors.tolist(),
                "relevant": sorted(q.relevant), "distractors": list(q.distractors)} for q in planted]
    payload = {"recipe": recipe, "build": build, "queries": queries}
    (out_dir / "collection.json").write_text(json.dumps(payload), encoding="utf-8")


def saved_collection(out_dir: Path, recipe: dict[str, Any]) -> tuple[list[PlantedQuery], dict[str, Any]] | None:
    """The planted queries and build figures of a saved collection with this recipe, else None."""
    path = out_dir / "collection.json"
    if not (path.is_file() and (out_dir / "index" / "CURRENT").is_file()):
        return None
    payload = json.loads(path.read_text(encoding="utf-8"))
    if payload.get("recipe") != recipe:
        logger.warning("%s was built with %s, not %s: rebuilding", path, payload.get("recipe"), recipe)
        return None
    planted = []
    for item in payload["queries"]:
        subs = np.asarray(item["subquery_vectors"], np.float32)
        planted.append(PlantedQuery(item["query_id"], item["text"], subs, l2_normalize(subs.sum(axis=0, keepdims=True)),
                                    frozenset(item["relevant"]), tuple(item["distractors"])))
    return planted, dict(payload["build"])


def _add_agreement(summary: dict[str, Any], per_query: list[dict[str, Any]], *, k: int) -> None:
    """``recall@k_vs_himir_full`` per mode: the share of himir-full's top-k that the mode returns."""
    reference = {r["query_id"]: r["top"][:k] for r in per_query if r["mode"] == reference_mode().value}
    if not reference:
        return
    for mode, aggregate in summary["modes"].items():
        shares = [len(set(r["top"][:k]) & set(reference[r["query_id"]])) / max(len(reference[r["query_id"]]), 1)
                  for r in per_query if r["mode"] == mode and r["query_id"] in reference]
        aggregate[f"recall@{k}_vs_himir_full"] = float(np.mean(shares)) if shares else None

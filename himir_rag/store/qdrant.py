"""Qdrant backend of the store contract: one point per region, searched per level, scored by the scheduler.

Each region is a point whose id is its region key (``image_id << 16 | index in the
image's tree``, :mod:`himir_rag.store.base`) holding one named vector, that of its level:

============  ==========================================  ======================
``global``    the global view (tree index 0)              ``single`` candidates
``region``    the M regions                               candidate level
``segment``   the N fine segments                         candidate level
============  ==========================================  ======================

Every point's payload carries ``image_id``, ``level``, ``path`` and the user ``metadata``
(so a payload filter selects an image's regions at any level); the global view's point
also carries the catalog record (size, mtime, width, height) and the region tree (levels,
parents, boxes).

The store never ranks images. It answers the scheduler's two questions
(:class:`~himir_rag.store.base.ImageStore`): the ``k`` regions of a level closest to each
sub-query (one batched Qdrant query; exact scores, the metadata filter pushed down as a
payload filter or sent as image ids), and the region vectors of the candidate images
(points retrieved by id: work in proportion to the candidates, never to the collection).
The scheduled pass, its bounds, its compute meter and the exhaustive baselines then run
in :mod:`himir_rag.scheduler` exactly as for the in-memory store.

A candidate search is counted as sub-queries x vectors of the level: exact for Qdrant's
embedded (local) mode, which scans every point; an upper bound for a server's HNSW
search, whose real count Qdrant does not report. Region counts per level are counted once
when the store opens and kept up to date by add and delete.
"""

from __future__ import annotations

import atexit
import logging
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from himir_rag.catalog import ImageRecord, Snapshot
from himir_rag.errors import ConfigError, IncompatibleIndexError
from himir_rag.hierarchy import Level, RegionTree
from himir_rag.store.base import KEY_SHIFT, Candidates, RegionView, region_keys

__all__ = ["QdrantImageStore", "qdrant_filter"]

logger = logging.getLogger(__name__)

_CLIENTS: dict[str, Any] = {}


@atexit.register
def _close_clients() -> None:
    """Close shared clients before interpreter teardown (local mode flushes its storage)."""
    for client in _CLIENTS.values():
        client.close()
    _CLIENTS.clear()

_LEVEL_VECTOR = {Level.GLOBAL: "global", Level.REGION: "region", Level.SEGMENT: "segment"}
_RECORD_FIELDS = ["image_id", "path", "width", "height", "size", "mtime_ns", "metadata"]
_BATCH = 1024  # points per upsert / retrieve call
_SCAN_IMAGES = 256  # images per block of an exhaustive scan


def _qdrant():
    try:
        from qdrant_client import QdrantClient, models
    except ImportError as exc:
        raise ImportError("the Qdrant store needs qdrant-client: pip install 'himir-rag[qdrant]'") from exc
    return QdrantClient, models


def qdrant_filter(filters: Mapping[str, Any] | None):
    """A :mod:`himir_rag.filters` dict as an exact Qdrant payload ``Filter``, or None.

    Only what Qdrant evaluates exactly as :func:`himir_rag.filters.compile_filter` does is
    pushed down: ``$eq``, ``$ne``, ``$in``, ``$nin`` with string values on user metadata
    keys or ``path``, under ``$and`` / ``$or`` / ``$not``. For anything else (numbers,
    whose bool/int distinction Qdrant does not keep, ranges, ``file_name``...) this
    returns None and the index evaluates the filter on its catalog with the core evaluator
    and sends the matching image ids instead, so both stores answer alike.

    Raises
    ------
    ConfigError
        For a callable filter (it runs on the client: pass ``image_ids=``), or a
        malformed filter.
    """
    from himir_rag.filters import compile_filter

    if filters is None:
        return None
    if callable(filters) and not isinstance(filters, Mapping):
        raise ConfigError("a callable filter runs on the client: pass image_ids= to search, or a dict "
                          "{key: value or [values]} for a server-side payload filter")
    compile_filter(filters)  # validates
    _, models = _qdrant()
    return _payload_filter(filters, models)


_PUSHED_KEY = re.compile(r"^[A-Za-z0-9_-]+$")  # no '.' or '[': Qdrant would read those as nested paths


def _payload_filter(filters: Mapping[str, Any], models: Any) -> Any:
    """``filters`` (validated) as a Qdrant ``Filter``, or None when it cannot be pushed down exactly."""
    must, must_not = [], []
    for key, value in filters.items():
        if key in ("$and", "$or"):
            parts = [_payload_filter(part, models) for part in value]
            if any(part is None for part in parts) or (key == "$or" and not parts):
                return None
            must.append(models.Filter(must=parts) if key == "$and" else models.Filter(should=parts))
        elif key == "$not":
            inner = _payload_filter(value, models)
            if inner is None:
                return None
            must_not.append(inner)
        else:
            conditions = _field_conditions(key, value, models)
            if conditions is None:
                return None
            must.extend(conditions[0])
            must_not.extend(conditions[1])
    return models.Filter(must=must, must_not=must_not)


def _field_conditions(key: str, value: Any, models: Any) -> tuple[list[Any], list[Any]] | None:
    """(must, must_not) conditions of one field, or None when Qdrant would not match it exactly."""
    if key in ("file_name", "width", "height") or not _PUSHED_KEY.match(key):
        return None
    field = key if key == "path" else f"metadata.{key}"
    operators = value if isinstance(value, Mapping) else {"$in" if isinstance(value, (list, tuple, set, frozenset))
                                                          else "$eq": value}
    must, must_not = [], []
    for operator, operand in operators.items():
        values = list(operand) if operator in ("$in", "$nin") else [operand]
        if operator not in ("$eq", "$ne", "$in", "$nin") or not values or \
                not all(isinstance(v, str) for v in values):
            return None
        match = models.MatchAny(any=values) if len(values) > 1 else models.MatchValue(value=values[0])
        (must if operator in ("$eq", "$in") else must_not).append(models.FieldCondition(key=field, match=match))
    return must, must_not


class QdrantImageStore:
    """Images, their region trees and region vectors in a Qdrant collection (see module docstring).

    Parameters
    ----------
    collection : str
        Collection name (one per index).
    dim : int
        Vector dimension.
    url : str, optional
        A Qdrant server or cluster (``http://host:6333``).
    path : str, optional
        Embedded local mode, persisted in this folder (``":memory:"`` for RAM only).
    client : QdrantClient, optional
        An open client to use instead (``url`` / ``path`` then only say where it points).
    shards, replicas : int
        Sharding and replication of a new collection on a cluster.
    on_disk : bool
        Keep the segment vectors on disk (server mode).

    Raises
    ------
    IncompatibleIndexError
        The collection holds another layout (an index written by an older himir-rag).

    Example
    -------
    >>> store = QdrantImageStore("photos", dim=384, path=":memory:")  # doctest: +SKIP
    """

    in_memory = False
    applies_filters = True

    def __init__(self, collection: str, *, dim: int, url: str | None = None, path: str | None = None,
                 client: Any = None, shards: int = 1, replicas: int = 1, on_disk: bool = False) -> None:
        QdrantClient, models = _qdrant()
        if client is None:
            if (url is None) == (path is None):
                raise ConfigError("give the Qdrant store exactly one of url= (server) or path= (local mode)")
            client = QdrantClient(url=url) if url is not None else QdrantClient(location=path) \
                if path == ":memory:" else QdrantClient(path=path)
        self.client, self.collection, self.dim = client, collection, dim
        self.url, self.path = url, path
        if not client.collection_exists(collection):
            client.create_collection(
                collection,
                vectors_config={name: models.VectorParams(size=dim, distance=models.Distance.DOT,
                                                          on_disk=on_disk and level is Level.SEGMENT)
                                for level, name in _LEVEL_VECTOR.items()},
                shard_number=shards, replication_factor=replicas)
            if url is not None:  # payload indexes for the filters of every call (local mode has none)
                for key in ("image_id", "level"):
                    client.create_payload_index(collection, key, field_schema=models.PayloadSchemaType.INTEGER)
        self._check_layout()
        self._counts = {name: self._count(level) for level, name in _LEVEL_VECTOR.items()}

    @classmethod
    def open(cls, collection: str, *, dim: int, url: str | None = None, path: str | None = None,
             **options: Any) -> QdrantImageStore:
        """Open (or create) a collection, sharing one client per server or local folder in this
        process: Qdrant's local mode locks its folder, so a second client on it would fail."""
        key = url or str(path)
        client = _CLIENTS.get(key)
        if client is None and path is not None and path != ":memory:":
            QdrantClient, _ = _qdrant()
            client = _CLIENTS[key] = QdrantClient(path=path)
        elif client is None and url is not None:
            QdrantClient, _ = _qdrant()
            client = _CLIENTS[key] = QdrantClient(url=url)
        return cls(collection, dim=dim, url=url, path=path, client=client, **options)

    def _check_layout(self) -> None:
        vectors = self.client.get_collection(self.collection).config.params.vectors
        names = set(vectors) if isinstance(vectors, Mapping) else set()
        if names != set(_LEVEL_VECTOR.values()):
            raise IncompatibleIndexError(
                f"Qdrant collection {self.collection!r} holds the named vectors {sorted(names)}, not one per level "
                f"{sorted(_LEVEL_VECTOR.values())} (it was written by an older himir-rag); rebuild the index "
                "into a new collection")

    def _count(self, level: Level) -> int:
        _, models = _qdrant()
        at_level = models.Filter(must=[models.FieldCondition(key="level", match=models.MatchValue(value=int(level)))])
        return int(self.client.count(self.collection, count_filter=at_level, exact=True).count)

    def __len__(self) -> int:
        return self._counts["global"]

    def level_counts(self) -> dict[str, int]:
        """Stored regions per level (counted when the store opened, kept by add and delete)."""
        return dict(self._counts)

    # -- writing ------------------------------------------------------------------------------------
    def add_images(self, records: list[ImageRecord], trees: list[RegionTree], vectors: list[np.ndarray]) -> None:
        """Store images (an id already stored is replaced): ``vectors[i]`` is (len(trees[i]), dim), in tree order."""
        _, models = _qdrant()
        self.delete_images([r.image_id for r in records])
        points = [point for record, tree, vecs in zip(records, trees, vectors)
                  for point in _points(record, tree, np.asarray(vecs, np.float32), models)]
        for start in range(0, len(points), _BATCH):
            self.client.upsert(self.collection, points=points[start : start + _BATCH], wait=True)
        for tree in trees:
            for level, name in _LEVEL_VECTOR.items():
                self._counts[name] += int((tree.levels == level).sum())

    def delete_images(self, image_ids: Sequence[int]) -> int:
        """Delete images and all their region points (unknown ids are ignored); returns how many were stored."""
        _, models = _qdrant()
        trees = self._trees(image_ids)
        keys = [int(key) for image_id, (levels, _, _) in trees.items()
                for key in region_keys(np.full(len(levels), image_id), np.arange(len(levels)))]
        for start in range(0, len(keys), _BATCH):
            self.client.delete(self.collection, points_selector=models.PointIdsList(points=keys[start : start + _BATCH]),
                               wait=True)
        for levels, _, _ in trees.values():
            for level, name in _LEVEL_VECTOR.items():
                self._counts[name] -= int((levels == level).sum())
        return len(trees)

    def set_metadata(self, records: list[ImageRecord]) -> None:
        """Replace the user metadata on every region point of stored images (vectors untouched)."""
        trees = self._trees([r.image_id for r in records])
        for record in records:
            if record.image_id in trees:
                n_regions = len(trees[record.image_id][0])
                keys = region_keys(np.full(n_regions, record.image_id), np.arange(n_regions)).tolist()
                self.client.set_payload(self.collection, payload={"metadata": dict(record.metadata)}, points=keys,
                                        wait=True)

    @staticmethod
    def pushes_down(filters: Any) -> bool:
        """Whether ``filters`` becomes an exact payload filter (else the caller sends image ids, see :func:`qdrant_filter`)."""
        return isinstance(filters, Mapping) and qdrant_filter(filters) is not None

    # -- reading ------------------------------------------------------------------------------------
    def records(self) -> Iterator[ImageRecord]:
        """Every stored image's catalog record by ascending id (scrolls the global views, no vectors)."""
        for point in self._scroll_globals(_RECORD_FIELDS):
            yield _record(point.payload)

    def _scroll_globals(self, payload: Any) -> Iterator[Any]:
        """The global-view points by ascending id, with ``payload`` (a field list or False)."""
        _, models = _qdrant()
        at_global = models.Filter(must=[models.FieldCondition(key="level", match=models.MatchValue(value=0))])
        offset = None
        while True:
            points, offset = self.client.scroll(self.collection, scroll_filter=at_global, limit=_BATCH, offset=offset,
                                                with_payload=payload, with_vectors=False)
            yield from points
            if offset is None:
                return

    def _trees(self, image_ids: Sequence[int] | np.ndarray, *,
               with_records: bool = False) -> dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """``{image id: (levels, parents, boxes)}`` of the stored ones of ``image_ids`` (one retrieve per batch);
        with ``with_records`` each value also ends with the image's :class:`ImageRecord`."""
        ids = [int(i) for i in image_ids]
        fields = ["levels", "parents", "boxes", *(_RECORD_FIELDS if with_records else [])]
        found = {}
        for start in range(0, len(ids), _BATCH):
            keys = (np.asarray(ids[start : start + _BATCH], np.int64) << KEY_SHIFT).tolist()
            for point in self.client.retrieve(self.collection, ids=keys, with_payload=fields, with_vectors=False):
                payload = point.payload
                tree = (np.asarray(payload["levels"], np.int8), np.asarray(payload["parents"], np.int64),
                        np.asarray(payload["boxes"], np.int32).reshape(-1, 4))
                found[int(point.id) >> KEY_SHIFT] = (*tree, _record(payload)) if with_records else tree
        return found

    def candidate_cost(self, level: Level, params: Any) -> float:
        """One sub-query's search of ``level``: every vector of the level (exact in local mode, a bound on a server)."""
        return float(self._counts[_LEVEL_VECTOR[Level(level)]])

    def candidates(self, queries: np.ndarray, level: Level, k: int, *, params: Any = None,
                   allowed: np.ndarray | None = None, filters: Mapping[str, Any] | None = None) -> Candidates:
        """The ``k`` regions of ``level`` closest to each query, among the allowed images (one batched query).

        ``filters`` is pushed down when Qdrant evaluates it exactly (:func:`qdrant_filter`), else
        ``allowed`` (sorted image ids) is sent as an ``image_id`` condition.
        """
        _, models = _qdrant()
        queries = np.asarray(queries, np.float32)
        n_queries = len(queries)
        scores = np.full((n_queries, k), -np.inf, np.float32)
        keys = np.full((n_queries, k), -1, np.int64)
        condition = self._filter(allowed, filters)
        if k > 0 and not (allowed is not None and len(allowed) == 0):
            using = _LEVEL_VECTOR[Level(level)]
            requests = [models.QueryRequest(query=q.tolist(), using=using, limit=k, filter=condition,
                                            with_payload=False, with_vector=False) for q in queries]
            for s, response in enumerate(self.client.query_batch_points(self.collection, requests=requests)):
                for j, point in enumerate(response.points[:k]):
                    scores[s, j], keys[s, j] = point.score, int(point.id)
        return Candidates(scores, keys, int(n_queries * self.candidate_cost(level, params)), exact=True)

    def _filter(self, allowed: np.ndarray | None, filters: Mapping[str, Any] | None) -> Any:
        """The payload filter selecting the allowed images' points (None: every image)."""
        _, models = _qdrant()
        pushed = qdrant_filter(filters) if isinstance(filters, Mapping) else None
        if pushed is not None or allowed is None:
            return pushed
        return models.Filter(must=[models.FieldCondition(key="image_id",
                                                         match=models.MatchAny(any=[int(i) for i in allowed]))])

    def vectors(self, image_ids: np.ndarray, *, levels: Sequence[Level] | None = None) -> RegionView:
        """The regions of the stored ones of ``image_ids``: a snapshot of just those images, by ascending id.

        Two retrieves by point id per batch (the global views' trees, then the regions'
        vectors): work in proportion to ``image_ids``, not to the collection. With
        ``levels``, only those levels' vectors are fetched; the other rows hold zeros.
        """
        ids = np.unique(np.asarray(image_ids, np.int64))
        trees = self._trees(ids, with_records=True)
        found = sorted(trees)
        records = [trees[i][3] for i in found]
        tree_list = [trees[i][:3] for i in found]
        keys = np.concatenate([region_keys(np.full(len(lv), image_id), np.arange(len(lv)))
                               for image_id, (lv, _, _) in zip(found, tree_list)]) if found else np.zeros(0, np.int64)
        row_levels = np.concatenate([lv for lv, _, _ in tree_list]) if found else np.zeros(0, np.int8)
        fetched = np.ones(len(keys), bool) if levels is None else np.isin(row_levels, [int(lv) for lv in levels])
        vectors = np.zeros((len(keys), self.dim), np.float32)
        vectors[fetched] = self._region_vectors(keys[fetched].tolist(), row_levels[fetched])
        return RegionView(_snapshot(self.dim, records, tree_list, vectors), None)

    def _region_vectors(self, keys: list[int], levels: np.ndarray) -> np.ndarray:
        """(len(keys), dim) float32 vectors of region points ``keys`` (of ``levels``), in ``keys`` order."""
        out = np.zeros((len(keys), self.dim), np.float32)
        where = {key: i for i, key in enumerate(keys)}
        for start in range(0, len(keys), _BATCH * 4):
            for point in self.client.retrieve(self.collection, ids=keys[start : start + _BATCH * 4],
                                              with_payload=False, with_vectors=True):
                row = where[int(point.id)]
                out[row] = point.vector[_LEVEL_VECTOR[Level(int(levels[row]))]]
        return out

    def scan(self, allowed: np.ndarray | None = None, *,
             levels: Sequence[Level] | None = None) -> Iterator[RegionView]:
        """Every image (or the ``allowed`` ids) by ascending id, ``_SCAN_IMAGES`` images a block (exhaustive
        modes); with ``levels``, only those levels' vectors are fetched (``single``: one point a photo)."""
        if allowed is None:
            ids = [int(point.id) >> KEY_SHIFT for point in self._scroll_globals(False)]
        else:
            ids = np.sort(np.asarray(allowed, np.int64)).tolist()
        for start in range(0, len(ids), _SCAN_IMAGES):
            yield self.vectors(np.asarray(ids[start : start + _SCAN_IMAGES], np.int64), levels=levels)

    def describe(self) -> dict[str, Any]:
        """What the manifest records to reopen this store."""
        return {"kind": "qdrant", "collection": self.collection, "url": self.url, "path": self.path}


def _points(record: ImageRecord, tree: RegionTree, vectors: np.ndarray, models: Any) -> list[Any]:
    """The region points of one image (see module docstring)."""
    shared = {"image_id": int(record.image_id), "path": record.path, "metadata": dict(record.metadata)}
    keys = region_keys(np.full(len(tree), record.image_id), np.arange(len(tree)))
    points = []
    for row, (key, level) in enumerate(zip(keys.tolist(), tree.levels.tolist())):
        payload = {**shared, "level": int(level)}
        if row == 0:
            payload.update(width=record.width, height=record.height, size=record.size, mtime_ns=record.mtime_ns,
                           levels=tree.levels.tolist(), parents=tree.parents.tolist(), boxes=tree.boxes.tolist())
        points.append(models.PointStruct(id=key, vector={_LEVEL_VECTOR[Level(level)]: vectors[row].tolist()},
                                         payload=payload))
    return points


def _snapshot(dim: int, records: list[ImageRecord], trees: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
              vectors: np.ndarray) -> Snapshot:
    """A snapshot of just these images (``trees``: (levels, parents, boxes) each, parents within the image;
    ``vectors``: their rows, image after image)."""
    if not records:
        return Snapshot.empty(dim)
    sizes = np.array([len(levels) for levels, _, _ in trees], np.int64)
    offsets = np.repeat(np.r_[0, np.cumsum(sizes)[:-1]], sizes)
    parents = np.concatenate([p for _, p, _ in trees])
    return Snapshot({r.image_id: r for r in records}, vectors,
                    np.repeat(np.array([r.image_id for r in records], np.int64), sizes),
                    np.concatenate([lv for lv, _, _ in trees]).astype(np.int8),
                    np.where(parents >= 0, parents + offsets, -1), np.concatenate([b for _, _, b in trees]))


def _record(payload: Mapping[str, Any]) -> ImageRecord:
    return ImageRecord(int(payload["image_id"]), payload["path"], int(payload["width"]), int(payload["height"]),
                       int(payload.get("size", 0)), int(payload.get("mtime_ns", 0)), dict(payload.get("metadata", {})))

"""Qdrant backend: one point per image, its regions as multivectors with MaxSim.

Each image is a point (id = image id) with named vectors:

============  ===============================================  =====================
``global``    the global view (dense)                          ``single``
``coarse``    global view + regions (multivector, MaxSim)      ``himir`` prefetch
``fine``      global view + segments (multivector, MaxSim)     ``mvr``
``full``      all 1+M+N regions (multivector, MaxSim)          ``himir-full``, rescoring
============  ===============================================  =====================

and a payload holding the catalog fields (path, size, mtime, width, height), the
user's metadata under ``metadata`` (so payload filters do metadata filtering) and
the region tree (boxes, levels, parents) so a hit can say which region matched.

``himir`` maps the scheduler's stages onto one Qdrant query: a coarse prefetch of
``candidate_k`` images on ``coarse`` (global + regions), then MaxSim rescoring of those
candidates on ``full``. Qdrant's MaxSim sums over the query's vectors; dividing by the
number of sub-queries gives the mean that the FAISS backend reports.

The compute meter counts the exact-equivalent work: Qdrant's embedded (local) mode
scans every point, so a query costs sub-queries x stored vectors of the named vector
it scores; on a server with HNSW the real count is lower (documented upper bound).
"""

from __future__ import annotations

import atexit
import logging
import re
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from himir_rag.catalog import ImageRecord
from himir_rag.errors import ConfigError
from himir_rag.hierarchy import Level, RegionTree

__all__ = ["QdrantImageStore", "qdrant_filter"]

logger = logging.getLogger(__name__)

_CLIENTS: dict[str, Any] = {}


@atexit.register
def _close_clients() -> None:
    """Close shared clients before interpreter teardown (local mode flushes its storage)."""
    for client in _CLIENTS.values():
        client.close()
    _CLIENTS.clear()
_MODE_VECTOR = {"single": "global", "mvr": "fine", "himir-full": "full"}


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
    returns None and :meth:`QdrantImageStore.search` evaluates the filter on the catalog
    records with the core evaluator, so both stores answer alike.

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
    """Images, their region trees and vectors in a Qdrant collection.

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
    shards, replicas : int
        Sharding and replication of a new collection on a cluster.
    on_disk : bool
        Keep the multivectors on disk (server mode), RAM for the global vectors only.

    Example
    -------
    >>> store = QdrantImageStore("photos", dim=384, path=":memory:")  # doctest: +SKIP
    """

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
        self._counts: dict[str, int] | None = None  # vector_counts(), until this store adds or deletes
        if not client.collection_exists(collection):
            multi = models.MultiVectorConfig(comparator=models.MultiVectorComparator.MAX_SIM)
            no_graph = models.HnswConfigDiff(m=0)  # rescoring-only vectors need no HNSW graph
            client.create_collection(
                collection,
                vectors_config={
                    "global": models.VectorParams(size=dim, distance=models.Distance.DOT),
                    "coarse": models.VectorParams(size=dim, distance=models.Distance.DOT, multivector_config=multi),
                    "fine": models.VectorParams(size=dim, distance=models.Distance.DOT, multivector_config=multi,
                                                hnsw_config=no_graph, on_disk=on_disk),
                    "full": models.VectorParams(size=dim, distance=models.Distance.DOT, multivector_config=multi,
                                                hnsw_config=no_graph, on_disk=on_disk),
                },
                shard_number=shards, replication_factor=replicas,
            )

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
        store = cls(collection, dim=dim, client=client, **options) if client is not None else \
            cls(collection, dim=dim, path=path, **options)
        store.url, store.path = url, path
        return store

    def __len__(self) -> int:
        return int(self.client.count(self.collection, exact=True).count)

    def add_images(self, records: list[ImageRecord], trees: list[RegionTree], vectors: list[np.ndarray]) -> None:
        """Upsert images: ``vectors[i]`` is (len(trees[i]), dim), rows in tree order."""
        _, models = _qdrant()
        points = [models.PointStruct(id=int(r.image_id), vector=_named_vectors(t, v), payload=_payload(r, t))
                  for r, t, v in zip(records, trees, vectors)]
        self._counts = None
        for start in range(0, len(points), 256):
            self.client.upsert(self.collection, points=points[start : start + 256], wait=True)

    def delete_images(self, image_ids: list[int]) -> None:
        """Delete images by id (unknown ids are ignored)."""
        _, models = _qdrant()
        if image_ids:
            self._counts = None
            self.client.delete(self.collection, points_selector=models.PointIdsList(points=[int(i) for i in image_ids]),
                               wait=True)

    @staticmethod
    def pushes_down(filters: Any) -> bool:
        """Whether ``filters`` becomes an exact payload filter (else the caller evaluates it, see :func:`qdrant_filter`)."""
        return isinstance(filters, Mapping) and qdrant_filter(filters) is not None

    def set_metadata(self, records: list[ImageRecord]) -> None:
        """Replace the user metadata of stored images (their vectors and regions are untouched)."""
        for record in records:
            self.client.set_payload(self.collection, payload={"metadata": dict(record.metadata)},
                                    points=[int(record.image_id)], wait=True)

    def records(self) -> Iterator[ImageRecord]:
        """Every stored image's catalog record (scrolls the collection, no vectors)."""
        offset = None
        while True:
            points, offset = self.client.scroll(self.collection, limit=1024, offset=offset, with_payload=True,
                                                with_vectors=False)
            for point in points:
                yield _record(int(point.id), point.payload)
            if offset is None:
                return

    def vector_counts(self) -> dict[str, int]:
        """Stored vectors per named vector, summed over images (for the compute meter).

        Counted by scrolling the collection once, then kept until this store adds or deletes
        images: a search no longer scrolls the whole collection to meter itself.
        """
        if self._counts is None:
            counts = {"global": 0, "coarse": 0, "fine": 0, "full": 0}
            for record_payload in self._payloads():
                levels = np.asarray(record_payload["levels"])
                n_global, n_region = int((levels == 0).sum()), int((levels == 1).sum())
                counts["global"] += n_global
                counts["coarse"] += n_global + n_region
                counts["fine"] += len(levels) - n_region
                counts["full"] += len(levels)
            self._counts = counts
        return dict(self._counts)

    def _payloads(self) -> Iterator[dict[str, Any]]:
        offset = None
        while True:
            points, offset = self.client.scroll(self.collection, limit=1024, offset=offset,
                                                with_payload=["levels"], with_vectors=False)
            yield from (p.payload for p in points)
            if offset is None:
                return

    def search(self, queries: np.ndarray, *, mode: str, k: int, filters: Mapping[str, Any] | None = None,
               image_ids: list[int] | None = None,
               candidate_k: int = 0) -> tuple[list[dict[str, Any]], dict[str, int]]:
        """Rank images; returns hits (id, record, score, per-sub-query best row) and work counters.

        Parameters
        ----------
        queries : np.ndarray
            (s, dim) sub-query vectors (for ``single``, (1, dim): the whole query).
        mode : str
            ``single``, ``mvr``, ``himir-full`` or ``himir``.
        image_ids : list of int, optional
            Only these images (a client-side filter, e.g. a callable over metadata).
        candidate_k : int
            Images kept by the coarse prefetch of ``himir`` (0 = ``max(4k, 32)``).
        """
        _, models = _qdrant()
        n_queries = len(queries)
        query_filter = qdrant_filter(filters)
        if filters is not None and query_filter is None:  # not expressible exactly: the core evaluator decides
            from himir_rag.filters import matching_ids

            found = set(matching_ids(self.records(), filters))
            image_ids = sorted(found if image_ids is None else found & {int(i) for i in image_ids})
        if image_ids is not None:
            by_id = models.HasIdCondition(has_id=[int(i) for i in image_ids])
            query_filter = models.Filter(must=[by_id] if query_filter is None else [by_id, query_filter])
        counts = self.vector_counts()
        if mode == "himir":
            limit = candidate_k or max(4 * k, 32)
            result = self.client.query_points(
                self.collection, query=queries.tolist(), using="full", limit=k, query_filter=query_filter,
                prefetch=models.Prefetch(query=queries.tolist(), using="coarse", limit=limit, filter=query_filter),
                with_payload=True, with_vectors=["full"])
            work = {"candidate_dot_products": n_queries * counts["coarse"]}
            rescored = min(limit, len(self))
            work["rescoring_dot_products"] = n_queries * rescored * (counts["full"] // max(counts["global"], 1))
        else:
            using = _MODE_VECTOR[mode]
            query = queries[0].tolist() if using == "global" else queries.tolist()
            result = self.client.query_points(self.collection, query=query, using=using, limit=k,
                                              query_filter=query_filter, with_payload=True, with_vectors=["full"])
            work = {"scan_dot_products": n_queries * counts[using]}
        hits = [self._hit(point, queries, mode) for point in result.points]
        work["explain_dot_products"] = sum(h["explain_cost"] for h in hits)
        return hits, work

    @staticmethod
    def _hit(point: Any, queries: np.ndarray, mode: str) -> dict[str, Any]:
        """Score and per-sub-query best region of one returned point (from its ``full`` vectors)."""
        payload = point.payload
        levels = np.asarray(payload["levels"])
        vectors = np.asarray(point.vector["full"], dtype=np.float32)
        allowed = {"single": levels == Level.GLOBAL, "mvr": levels != Level.REGION}.get(mode, np.ones(len(levels), bool))
        sims = np.where(allowed[None, :], queries @ vectors.T, -np.inf)
        best_rows = sims.argmax(axis=1)
        best = sims[np.arange(len(queries)), best_rows]
        return {"image_id": int(point.id), "record": _record(int(point.id), payload), "score": float(best.mean()),
                "best": best, "levels": levels[best_rows], "boxes": np.asarray(payload["boxes"])[best_rows],
                "explain_cost": int(len(queries) * len(levels))}

    def describe(self) -> dict[str, Any]:
        """What the manifest records to reopen this store."""
        return {"kind": "qdrant", "collection": self.collection, "url": self.url, "path": self.path}


def _named_vectors(tree: RegionTree, vectors: np.ndarray) -> dict[str, Any]:
    levels = tree.levels
    rows = {
        "coarse": np.flatnonzero(levels != Level.SEGMENT),
        "fine": np.flatnonzero(levels != Level.REGION),
        "full": np.arange(len(levels)),
    }
    named: dict[str, Any] = {"global": vectors[0].tolist()}
    named.update({name: vectors[idx].tolist() for name, idx in rows.items()})
    return named


def _payload(record: ImageRecord, tree: RegionTree) -> dict[str, Any]:
    return {"path": record.path, "width": record.width, "height": record.height, "size": record.size,
            "mtime_ns": record.mtime_ns, "metadata": dict(record.metadata), "boxes": tree.boxes.tolist(),
            "levels": tree.levels.tolist(), "parents": tree.parents.tolist()}


def _record(image_id: int, payload: Mapping[str, Any]) -> ImageRecord:
    return ImageRecord(image_id, payload["path"], int(payload["width"]), int(payload["height"]),
                       int(payload.get("size", 0)), int(payload.get("mtime_ns", 0)), dict(payload.get("metadata", {})))

"""Distributed indexing on Ray: decoding, region cropping and encoding spread over a cluster.

Ray Data reads the list of files, ``map_batches`` runs them through encoder actors
(each loads the encoder once, on a GPU where the cluster has them), and the driver
commits the results into the index's store in the original order, with the same
granularity pruning and bookkeeping as a single-process build. Worker results travel
as ``.npz`` bytes (``allow_pickle=False`` on the way back): no pickled arrays.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from himir_rag.catalog import ImageRecord
from himir_rag.hierarchy import RegionTree
from himir_rag.ingest import (MetadataSource, PreparedPhoto, encode_photos, metadata_for, prepare_or_skip,
                              region_decomposer)

if TYPE_CHECKING:  # pragma: no cover
    from himir_rag.index import BuildReport, HiMIRIndex

__all__ = ["encode_with_ray", "actor_count"]

logger = logging.getLogger(__name__)


def _ray():
    try:
        import ray
    except ImportError as exc:
        raise ImportError("distributed indexing needs Ray: pip install 'himir-rag[ray]'") from exc
    return ray


def _connect(address: str, *, num_cpus: int | None = None) -> None:
    """Join ``address`` ("auto", "ray://...") or start a local Ray ("local"), unless already connected."""
    ray = _ray()
    if ray.is_initialized():
        return
    if address == "local":
        ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
    else:
        ray.init(address=address, log_to_driver=False, configure_logging=False)


class _EncodeActor:
    """Ray Data callable class: one encoder per actor, a batch of file paths per call.

    Photos are prepared and encoded by :mod:`himir_rag.ingest` as in a local build (the same
    skip policy); metadata is attached on the driver (:func:`_unpack`).
    """

    def __init__(self, encoder: Any, config: dict[str, Any], device: str) -> None:
        from himir_rag.config import HiMIRConfig
        from himir_rag.encoders import get_encoder

        self.config = HiMIRConfig.from_dict(config)
        self.encoder = get_encoder(encoder, device=device) if isinstance(encoder, str) else encoder
        self.decomposer = region_decomposer(self.config)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        paths = [str(p) for p in batch["path"]]
        outcomes = [prepare_or_skip(Path(path), None, None, decomposer=self.decomposer, config=self.config)
                    for path in paths]
        encoded, nonfinite = encode_photos([o for o in outcomes if not isinstance(o, str)], self.encoder,
                                           batch_size=self.config.batch_size,
                                           region_encoding=self.config.region_encoding)
        vectors = {item.record.path: rows for item, rows in encoded}
        reasons = {**dict(nonfinite), **{path: o for path, o in zip(paths, outcomes) if isinstance(o, str)}}
        errors = [reasons.get(path, "") for path in paths]
        payloads = [_pack(o.record, o.tree, vectors[path]) if path in vectors else b""
                    for path, o in zip(paths, outcomes)]
        return {"path": np.array(paths, dtype=object), "error": np.array(errors, dtype=object),
                "payload": np.array(payloads, dtype=object)}


def _pack(record: ImageRecord, tree: RegionTree, vectors: np.ndarray) -> bytes:
    """One image's tree and vectors as ``.npz`` bytes (plain arrays only)."""
    buffer = io.BytesIO()
    np.savez(buffer, boxes=tree.boxes, levels=tree.levels, parents=tree.parents, vectors=vectors,
             shape=np.array([record.width, record.height, record.size, record.mtime_ns], dtype=np.int64))
    return buffer.getvalue()


def _unpack(path: str, payload: bytes, replaces: int | None,
            metadata: MetadataSource) -> tuple[PreparedPhoto, np.ndarray]:
    with np.load(io.BytesIO(payload), allow_pickle=False) as arrays:
        width, height, size, mtime_ns = (int(v) for v in arrays["shape"])
        tree = RegionTree(arrays["boxes"], arrays["levels"], arrays["parents"], width, height)
        vectors = arrays["vectors"]
    record = ImageRecord(0, path, width, height, size, mtime_ns, metadata_for(Path(path), metadata))
    return PreparedPhoto(record, tree, [], replaces), vectors


def actor_count(resources: dict[str, float], *, actors: int | None, gpus_per_actor: float) -> int:
    """Encoder actors for a cluster with ``resources``: ``actors`` when given, else one per GPU
    share (GPU clusters) or one per 2 CPUs; always at least 1."""
    if actors is not None:
        if isinstance(actors, bool) or not isinstance(actors, int) or actors < 1:
            raise ValueError(f"actors must be an int >= 1, got {actors!r}")
        return actors
    if gpus_per_actor:
        return max(1, int(resources.get("GPU", 0) / gpus_per_actor))
    return max(1, int(resources.get("CPU", 2)) // 2)


def encode_with_ray(index: HiMIRIndex, paths: list[tuple[Path, int | None]], *, metadata: MetadataSource,
                    report: BuildReport, address: str, chunk_images: int = 16, actors: int | None = None,
                    gpus_per_actor: float | None = None) -> Iterator[tuple[int, list[tuple[PreparedPhoto, np.ndarray]]]]:
    """Encode ``paths`` on Ray; yields ``(files done, [(prepared image, vectors)])`` in input order.

    Parameters
    ----------
    index : HiMIRIndex
        Its encoder (spec string, or an object Ray can serialise) and config are sent to
        the actors; results are committed by the caller (:meth:`HiMIRIndex.add`).
    address : str
        ``"local"``, ``"auto"`` or a Ray client address.
    actors : int, optional
        Encoder actors (default: one per 2 CPUs of the cluster, or one per GPU).
    gpus_per_actor : float, optional
        Default: 1 when the cluster has GPUs (the actors then encode on ``cuda``).

    Raises
    ------
    ImportError
        When Ray is not installed.
    """
    ray = _ray()
    if not paths:
        return
    _connect(address)
    resources = ray.cluster_resources()
    gpus = gpus_per_actor if gpus_per_actor is not None else (1.0 if resources.get("GPU", 0) >= 1 else 0.0)
    n_actors = actor_count(resources, actors=actors, gpus_per_actor=gpus)
    encoder = index.encoder_or_spec
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # commit in input order, like a local build
    dataset = ray.data.from_items([{"path": str(p)} for p, _ in paths])
    dataset = dataset.map_batches(
        _EncodeActor, batch_size=chunk_images, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=n_actors),
        fn_constructor_kwargs={"encoder": encoder, "config": index.config.to_dict(),
                               "device": "cuda" if gpus else "cpu"},
        num_gpus=gpus or None,
    )
    replaces = {str(p): r for p, r in paths}
    for batch in dataset.iter_batches(batch_size=chunk_images, batch_format="numpy"):
        encoded = []
        for path, error, payload in zip(batch["path"], batch["error"], batch["payload"]):
            if error:
                report.skipped.append((str(path), str(error)))
                continue
            encoded.append(_unpack(str(path), payload, replaces[str(path)], metadata))
        report.crops_encoded += sum(len(item.tree) for item, _ in encoded)
        yield len(batch["path"]), encoded

"""HiMIRIndex: build / add / delete / save / load / search over a photo collection.

On disk an index is a directory::

    INDEX_DIR/
      CURRENT                 name of the live version directory (replaced atomically)
      v<stamp>/manifest.json  format version, encoder name and dim, config, file sizes
      v<stamp>/vectors.bin, region_image.i64, regions.i32, images.jsonl
                              the append-only files (see himir_rag.appendlog), hard-linked between versions
      v<stamp>/skipped.json   the skipped-file report
      v<stamp>/candidates-v2.level*.faiss   FAISS stores of the coarse levels (candidate generation)

``save`` writes a new version beside the live one (appending to the live version's files
when the index came from it), verifies it and then swaps ``CURRENT``, so a crash at any
point leaves the previous index loadable. Format-1 versions (``vectors.npy`` +
``catalog.sqlite``) are still read. Writers hold the directory's
lock (``INDEX_DIR/.lock``, see :mod:`himir_rag.locking`); readers take none and retry when
``CURRENT`` moves during a load. What a load trusts is validated by :mod:`himir_rag.manifest`.
Nothing is unpickled.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import json
import logging
import math
import os
import re
import shutil
import sqlite3
import threading
import time
import uuid
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from himir_rag import manifest as manifest_schema
from himir_rag.appendlog import LogState, read_version, write_appended, write_full
from himir_rag.catalog import VECTOR_DTYPES, ImageRecord, Snapshot
from himir_rag.config import HiMIRConfig
from himir_rag.encoders import Encoder, get_encoder, saved_encoder_spec
from himir_rag.errors import (ConfigError, EmptyIndexError, HiMIRError, IncompatibleIndexError,
                              IndexConflictError, IndexFormatError, IndexWriteError)
from himir_rag.filters import compile_filter, matching_ids
from himir_rag.hierarchy import Level, RegionTree, grouped_focus_boxes
from himir_rag.images import decode_image, image_header_problem, iter_image_files
from himir_rag.ingest import (MetadataLookup, MetadataSource, PreparedPhoto, checked_metadata, cut, encode_crops,
                              encode_photos, encode_views, encode_workers, granularity_keep, prepare_or_skip,
                              region_decomposer)
from himir_rag.locking import DEFAULT_LOCK_TIMEOUT, lock_index
from himir_rag.manifest import APPENDED_FILES, FORMAT_VERSION, VECTORS
from himir_rag.paths import outside_reason, photo_base, relative_to_root, resolve_stored
from himir_rag.modes import MODES, RetrievalMode, parse_mode
from himir_rag.scheduler import Ranking, SchedulerParams, SearchStats, rank
from himir_rag.threads import limit_threads
from himir_rag.thumbnails import ThumbnailStore

__all__ = ["HiMIRIndex", "BuildReport", "SearchHit", "SearchResult", "RegionMatch", "RelocateReport",
           "CompactReport", "FORMAT_VERSION"]

logger = logging.getLogger(__name__)

Filters = Mapping[str, Any] | Callable[[Mapping[str, Any]], bool] | None
QueryImage = str | os.PathLike[str] | bytes | Image.Image
_CHECK_ROWS = 262_144  # vector rows checked for NaN/inf per step (load, from_snapshot)
_LOAD_ATTEMPTS = 3  # a load that finds its version replaced mid-way (CURRENT moved) reads the new one
_VERSION_RE = re.compile(r"^v(\d+)-\w+$")  # v<time_ns>-<random>: a published version
_STAGING_RE = re.compile(r"^\.v\d+(-\w+)?\.tmp$")  # a version being written (or left by a killed save)


@dataclass(frozen=True)
class RegionMatch:
    """Where one sub-query matched an image.

    ``level`` and ``score`` are the best region's (the MaxSim the ranking used); ``bbox`` is
    where the match is reported: the focus box of the regions' similarities
    (:func:`himir_rag.hierarchy.focus_boxes`, ``HiMIRConfig.focus_temperature`` and
    ``focus_spread``), and
    ``region_bbox`` the best region's own box (``bbox`` equals it at temperature 0).
    """

    subquery: str
    level: str
    bbox: tuple[int, int, int, int]
    score: float
    region_bbox: tuple[int, int, int, int] | None = None


@dataclass(frozen=True)
class SearchHit:
    """One ranked image."""

    image_id: int
    key: str
    path: str
    score: float
    metadata: dict[str, Any]
    regions: tuple[RegionMatch, ...]
    width: int = 0
    height: int = 0
    relpath: str = ""  # path relative to the collection root ("" when the photo is stored by absolute path)


@dataclass(frozen=True)
class SearchResult:
    """Ranked hits for one query, with the sub-queries used and the search's cost."""

    query: str
    subqueries: tuple[str, ...]
    hits: tuple[SearchHit, ...]
    stats: SearchStats
    image: str | None = None  # the query photo (its path, or "query image" for bytes / PIL input)


@dataclass
class BuildReport:
    """What one ``add`` did. ``skipped`` lists ``(path, reason)``."""

    added: int = 0
    updated: int = 0
    unchanged: int = 0
    regions_stored: int = 0
    regions_pruned: int = 0
    crops_encoded: int = 0
    metadata_updated: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    auto_tuned: bool = False  # the scheduler was tuned on probes when this add finished

    def to_dict(self) -> dict[str, Any]:
        return {**{k: v for k, v in self.__dict__.items() if k != "skipped"},
                "skipped": [{"path": p, "reason": r} for p, r in self.skipped]}


@dataclass(frozen=True)
class RelocateReport:
    """What :meth:`HiMIRIndex.relocate` did: the new root, photos rebased onto it, and how many are missing there."""

    root: str
    rebased: int
    missing: int
    outside_root: int


@dataclass(frozen=True)
class CompactReport:
    """What :meth:`HiMIRIndex.compact` did: the new version and the live version's bytes before and after."""

    version: Path
    bytes_before: int
    bytes_after: int


class HiMIRIndex:
    """A hierarchical multi-vector image index.

    Parameters
    ----------
    encoder : Encoder or str
        An encoder object, or a spec for :func:`himir_rag.encoders.get_encoder`
        (``"offline"``, ``"clip"``, ``"clip:/path"``).
    config : HiMIRConfig, optional
        Layout, decomposer, pruning and scheduler settings.
    device : str
        torch device when ``encoder`` is a spec.

    Example
    -------
    >>> index = HiMIRIndex("offline")  # doctest: +SKIP
    >>> index.add("photos/")  # doctest: +SKIP
    >>> index.search("a dog next to a red bicycle", k=5).hits[0].path  # doctest: +SKIP
    """

    def __init__(self, encoder: Encoder | str = "offline", config: HiMIRConfig | None = None, *,
                 device: str = "cpu", store: Any = None) -> None:
        self.config = config or HiMIRConfig()
        # None: regions in memory + FAISS (default); a QdrantImageStore: regions in Qdrant
        self.store = store
        self.encoder_spec = encoder if isinstance(encoder, str) else getattr(encoder, "spec", None) or getattr(
            encoder, "name", "custom")
        self._encoder: Encoder | None = None if isinstance(encoder, str) else encoder
        self._device = device
        self._decomposer = region_decomposer(self.config)
        self._dim: int | None = None if self._encoder is None else int(self._encoder.dim)
        self._encoder_name: str | None = None if self._encoder is None else self._encoder.name
        self._snapshot: Snapshot | None = None
        self._skipped: list[tuple[str, str]] = []
        self._next_id = 1
        self._write_lock = threading.RLock()
        # (real path of an index dir, version name) this index was loaded from or last saved to
        self._disk_version: tuple[str, str] | None = None
        self._dirty = False  # changed since then
        self._log: LogState | None = None  # the append-only files of that version (format 2), the next save's base
        self._stores_pending = False  # that version is a checkpoint: its candidate stores are still to be written
        self._candidate_stores: Any = None  # CandidateStores, created with the first snapshot
        # how the scheduler parameters were chosen (auto_tune / himir tune record), saved with the index
        self.autoconfig: dict[str, Any] | None = None
        # the collection root: photos under it are stored relative to it (see himir_rag.paths)
        self.root: str | None = None
        self._thumbnails = ThumbnailStore()  # with config.thumbnails (see himir_rag.thumbnails)

    # -- properties ----------------------------------------------------------------------------
    @property
    def encoder(self) -> Encoder:
        """The encoder, loaded on first use."""
        if self._encoder is None:
            self._encoder = get_encoder(self.encoder_spec, device=self._device)
            self._check_encoder(self._encoder)
        return self._encoder

    @property
    def encoder_or_spec(self) -> Encoder | str:
        """The encoder object when one was given or loaded, else :attr:`encoder_spec` (loads nothing)."""
        return self.encoder_spec if self._encoder is None else self._encoder

    @property
    def snapshot(self) -> Snapshot:
        """The current immutable view of the collection."""
        if self._snapshot is None:
            self._snapshot = Snapshot.empty(self.encoder.dim, dtype=VECTOR_DTYPES[self.config.precision])
        return self._snapshot

    @property
    def candidate_stores(self) -> Any:
        """The :class:`~himir_rag.store.candidates.CandidateStores` the scheduler searches for candidates."""
        from himir_rag.store.faiss import scan_workers_for

        if self._candidate_stores is None:
            from himir_rag.store.candidates import CandidateStores

            self._candidate_stores = CandidateStores(self.snapshot.dim, threads=self.config.search_threads)
        self._candidate_stores.scan_workers = scan_workers_for(self.config.scan_workers)  # follows set_config
        return self._candidate_stores

    @property
    def image_store(self) -> Any:
        """The :class:`~himir_rag.store.base.ImageStore` searches and the tuner read: the external store
        (Qdrant) when the index has one, else a :class:`~himir_rag.store.memory.MemoryStore` over the
        snapshot and its candidate stores."""
        if self.store is not None:
            return self.store
        from himir_rag.store.memory import MemoryStore

        return MemoryStore(self.snapshot, self.candidate_stores)

    def sync_candidate_stores(self, *, retrain_codes: bool = False) -> None:
        """Bring the candidate stores up to date with the collection (incremental; done after add/delete).

        ``retrain_codes``: also rebuild IVF stores built otherwise than this version builds them (IVF-PQ
        codes, IVF-Flat list counts; compact does).
        """
        if self.store is not None or self._snapshot is None:
            return
        params = self.config.scheduler_params
        self.candidate_stores.sync(self.snapshot, [Level[name.upper()] for name in params.candidate_levels],
                                   index_kind=params.index_kind, flat_max=params.flat_max, pq_min=params.pq_min,
                                   retrain_codes=retrain_codes)

    @property
    def images(self) -> list[ImageRecord]:
        """Indexed images, in insertion order."""
        return list(self.snapshot.images.values())

    @property
    def skipped(self) -> list[tuple[str, str]]:
        """Files that could not be indexed, with the reason (the build report)."""
        return list(self._skipped)

    def __len__(self) -> int:
        return 0 if self._snapshot is None else len(self._snapshot)

    def __repr__(self) -> str:
        return f"HiMIRIndex(images={len(self)}, encoder={self._encoder_name or self.encoder_spec!r}, layout={self.config.layout!r})"

    def _check_encoder(self, encoder: Encoder) -> None:
        if self._encoder_name is not None and encoder.name != self._encoder_name:
            raise IncompatibleIndexError(
                f"index was built with encoder {self._encoder_name!r} (dim={self._dim}) but the encoder "
                f"given is {encoder.name!r} (dim={encoder.dim}); load with the same encoder or rebuild with --encoder"
            )
        if self._dim is not None and encoder.dim != self._dim:
            raise IncompatibleIndexError(
                f"index dim={self._dim} but the encoder gives {encoder.dim}; rebuild the index with this encoder"
            )
        self._encoder_name, self._dim = encoder.name, int(encoder.dim)

    # -- building ------------------------------------------------------------------------------
    @classmethod
    def build(cls, source: str | os.PathLike[str] | Iterable[Any], *,
              encoder: Encoder | str = "offline", config: HiMIRConfig | None = None,
              metadata: MetadataSource = None, progress: bool = True, device: str = "cpu",
              thumbnails: bool | None = None, follow_symlinks: bool | None = None) -> HiMIRIndex:
        """Create an index and add ``source``: a directory (searched recursively), paths, or documents.

        Documents are LlamaIndex ``ImageDocument`` / ``Document`` (e.g. from
        ``SimpleDirectoryReader(folder).load_data()``) or LangChain ``Document`` with the
        image path in ``image_path`` or metadata ``image_path`` / ``file_path`` / ``source``;
        their metadata becomes the photos' metadata and their id is kept as ``doc_id``
        (see :mod:`himir_rag.documents`). ``thumbnails`` / ``follow_symlinks`` override the
        config's fields of the same names.

        Example
        -------
        >>> from llama_index.core import SimpleDirectoryReader  # doctest: +SKIP
        >>> index = HiMIRIndex.build(SimpleDirectoryReader("photos/").load_data())  # doctest: +SKIP
        """
        config = config or HiMIRConfig()
        overrides = {name: value for name, value in (("thumbnails", thumbnails), ("follow_symlinks", follow_symlinks))
                     if value is not None}
        index = cls(encoder, config.replace(**overrides) if overrides else config, device=device)
        index.add(source, metadata=metadata, progress=progress)
        return index

    @classmethod
    def from_snapshot(cls, snapshot: Snapshot, *, encoder: Encoder | str, config: HiMIRConfig | None = None,
                      device: str = "cpu") -> HiMIRIndex:
        """An index over regions embedded elsewhere (e.g. synthetic vectors, or a pipeline of your own).

        ``snapshot`` must pass :meth:`Snapshot.check_integrity`; its vectors must have the
        encoder's dimension and the config's ``precision``.

        Raises
        ------
        IncompatibleIndexError
            Another dimension or storage type.
        """
        index = cls(encoder, config, device=device)
        dtype = np.dtype(VECTOR_DTYPES[index.config.precision])
        if index._dim is not None and snapshot.dim != index._dim:
            raise IncompatibleIndexError(f"snapshot dim={snapshot.dim} but the encoder gives {index._dim}")
        if snapshot.vectors.dtype != dtype:
            raise IncompatibleIndexError(f"snapshot vectors are {snapshot.vectors.dtype}, the config's precision is "
                                         f"{index.config.precision}")
        try:
            snapshot.check_integrity()
            if not _all_finite(snapshot.vectors):
                raise ValueError("its vectors hold NaN or infinite values")
        except ValueError as exc:
            raise IndexFormatError(f"the snapshot is inconsistent: {exc}") from exc
        index._snapshot = snapshot
        index._next_id = max(snapshot.images, default=0) + 1
        return index

    @classmethod
    def from_vectors(cls, vectors: np.ndarray, tree: RegionTree, *, encoder: Encoder | str,
                     config: HiMIRConfig | None = None, paths: Sequence[str] | None = None,
                     device: str = "cpu") -> HiMIRIndex:
        """An index over images whose regions were embedded elsewhere, every image cut as ``tree``.

        For benchmarks and pipelines of your own: no photo is read and no encoder runs
        (search it with :meth:`search_vectors`, or with text when ``encoder`` can embed it).

        Parameters
        ----------
        vectors : np.ndarray
            (n_images * len(tree), dim) L2-normalised region vectors, image-major: image ``i``
            holds rows ``i * len(tree)`` to ``(i + 1) * len(tree) - 1``, in ``tree``'s order.
            Kept as given (a memory map stays one) when already in the config's ``precision``.
        tree : RegionTree
            The regions of every image, e.g. ``GridDecomposer("1+4+16").decompose(frame)``.
        encoder : Encoder or str
            The encoder that embeds queries (its ``dim`` must match the vectors').
        paths : list of str, optional
            One path or URI per image (default ``vectors://image/<id>``); image ids are 1..n.

        Returns
        -------
        HiMIRIndex
            The candidate stores are built by the first ``himir`` search (or
            :meth:`sync_candidate_stores`).

        Raises
        ------
        ValueError
            If the row count is not a multiple of ``len(tree)`` or ``paths`` has another length.
        IncompatibleIndexError, IndexFormatError
            As :meth:`from_snapshot`.

        Example
        -------
        >>> tree = GridDecomposer("1+4+16").decompose(Image.new("RGB", (640, 480)))  # doctest: +SKIP
        >>> index = HiMIRIndex.from_vectors(vectors, tree, encoder="offline")  # doctest: +SKIP
        """
        config = config or HiMIRConfig()
        per_image = len(tree)
        if vectors.ndim != 2 or per_image == 0 or len(vectors) % per_image:
            raise ValueError(f"vectors must be (n_images * {per_image}, dim) for a tree of {per_image} regions, "
                             f"got {vectors.shape}")
        images = len(vectors) // per_image
        if paths is not None and len(paths) != images:
            raise ValueError(f"{len(paths)} paths for {images} images")
        dtype = VECTOR_DTYPES[config.precision]
        vectors = vectors if vectors.dtype == dtype else np.asarray(vectors, dtype=dtype)
        ids = np.arange(1, images + 1, dtype=np.int64)
        offsets = np.repeat(np.arange(images, dtype=np.int64) * per_image, per_image)
        parents = np.tile(tree.parents.astype(np.int64), images)
        records = {int(i): ImageRecord(int(i), paths[i - 1] if paths is not None else f"vectors://image/{int(i)}",
                                       tree.width, tree.height) for i in ids}
        snapshot = Snapshot(records, vectors, np.repeat(ids, per_image), np.tile(tree.levels.astype(np.int8), images),
                            np.where(parents >= 0, parents + offsets, -1), np.tile(tree.boxes.astype(np.int32),
                                                                                    (images, 1)))
        return cls.from_snapshot(snapshot, encoder=encoder, config=config, device=device)

    def with_precision(self, precision: str) -> HiMIRIndex:
        """A copy of this index whose vectors are stored as ``precision`` (``"float32"`` or ``"float16"``).

        Example
        -------
        >>> HiMIRIndex.load("photos.himir").with_precision("float16").save("photos-f16.himir")  # doctest: +SKIP
        """
        config = self.config.replace(precision=precision)
        snapshot = self.snapshot
        converted = Snapshot(dict(snapshot.images), np.asarray(snapshot.vectors, dtype=VECTOR_DTYPES[precision]),
                             snapshot.region_image, snapshot.levels, snapshot.parents, snapshot.boxes)
        copy = HiMIRIndex.from_snapshot(converted, encoder=self.encoder_or_spec, config=config,
                                        device=self._device)
        copy._encoder_name, copy._dim = self._encoder_name, self._dim
        copy._skipped, copy._next_id = list(self._skipped), self._next_id
        copy.root, copy._thumbnails, copy.autoconfig = self.root, self._thumbnails.copy(), self.autoconfig
        return copy

    def add(self, source: str | os.PathLike[str] | Iterable[str | os.PathLike[str]], *,
            metadata: MetadataSource = None, progress: bool = True, chunk_images: int = 16,
            on_chunk: Callable[[BuildReport], None] | None = None,
            checkpoint_dir: str | os.PathLike[str] | None = None, checkpoint_every: int = 256,
            ray_address: str | None = None, lock_timeout: float | None = DEFAULT_LOCK_TIMEOUT) -> BuildReport:
        """Index new or changed images; unchanged ones (same path, size, mtime) are kept.

        Unreadable or non-image files are skipped with a warning and listed in the
        report (and in :attr:`skipped`), never abort the run.

        Parameters
        ----------
        source : path or iterable of paths or documents
            A directory (recursive), image files, or LlamaIndex / LangChain documents
            naming image files (see :meth:`build`). In a directory, symlinks out of it
            are skipped unless ``config.follow_symlinks``; so are listed files whose real
            path leaves their folder (or the collection root).
        metadata : mapping or callable, optional
            User metadata per image, JSON values: ``fn(path) -> {...}``, or ``{key: {...}}``
            whose keys are absolute paths, paths relative to the working directory or to
            the ``source`` folder, or bare file names (when only one photo has that name).
            Keys that match no photo are listed in one logged warning. Unchanged photos
            whose entry differs from the stored metadata get the new metadata without
            being re-encoded (``report.metadata_updated``).
        chunk_images : int
            Images decoded, encoded and committed together; ``on_chunk`` runs after each
            (the progress bar, in photos and photos/s, moves photo by photo as they are encoded).
        checkpoint_dir : path-like, optional
            Save the index there (atomically, see :meth:`save`) whenever ``checkpoint_every``
            more files were processed, and once at the end. A run killed at any point
            leaves the last checkpoint loadable; running ``add`` again on the loaded
            index resumes (files already indexed are unchanged and not re-encoded).
        checkpoint_every : int
            Files to index (indexed or skipped on reading) between checkpoints: chunks end
            at every multiple of it, so a checkpoint follows each ``checkpoint_every`` files.
            Checkpoints are append-only saves without the candidate stores (see :meth:`save`).
        ray_address : str, optional
            Spread decoding, cropping and encoding over a Ray cluster (``"auto"``, an
            address such as ``"ray://head:10001"``, or ``"local"`` for a local Ray);
            the results are committed here exactly as a single-process build would.
        lock_timeout : float or None
            With ``checkpoint_dir``: seconds to wait for another writer of it. The lock is held
            for the whole run; before anything is encoded, the directory must still hold the
            version this index came from, be writable and have room for the result.

        Returns
        -------
        BuildReport

        Raises
        ------
        IndexLockedError, IndexConflictError, IndexWriteError
            With ``checkpoint_dir``: see :meth:`save`. Raised before encoding when foreseeable.

        Example
        -------
        >>> index.add("photos/", checkpoint_dir="index/", checkpoint_every=500)  # doctest: +SKIP
        """
        if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) or checkpoint_every < 1:
            raise ConfigError(f"checkpoint_every must be an int >= 1, got {checkpoint_every!r}")
        options = dict(metadata=metadata, progress=progress, chunk_images=chunk_images, on_chunk=on_chunk,
                       checkpoint_every=checkpoint_every, ray_address=ray_address)
        if checkpoint_dir is None:
            return self._add(source, checkpoint_dir=None, **options)
        checkpoint_dir = Path(checkpoint_dir)
        with lock_index(checkpoint_dir, timeout=lock_timeout, create=True):
            self._check_not_stale(checkpoint_dir)
            return self._add(source, checkpoint_dir=checkpoint_dir, **options)

    def _add(self, source: Any, *, metadata: MetadataSource, progress: bool, chunk_images: int,
             on_chunk: Callable[[BuildReport], None] | None, checkpoint_dir: Path | None, checkpoint_every: int,
             ray_address: str | None) -> BuildReport:
        """:meth:`add` (holding ``checkpoint_dir``'s lock when given)."""
        started = time.perf_counter()
        report = BuildReport()
        if not isinstance(source, (str, os.PathLike)):
            from himir_rag.documents import documents_to_paths

            source, metadata = documents_to_paths(source, metadata)
        paths, metadata = self._collect_paths(source, report, metadata)
        self._choose_root(source, paths)
        if checkpoint_dir is not None and paths:
            self._preflight(checkpoint_dir, len(paths))
        saved_at = done = 0
        every = None if checkpoint_dir is None else checkpoint_every
        bar = tqdm(total=len(paths), desc="indexing", unit="photo", disable=not progress)
        shown = [0]  # photos of the current chunk the bar already moved for, as they were encoded

        def moved(n: int) -> None:
            bar.update(n)
            shown[0] += n
        if ray_address is None:
            if paths:  # said on the bar: loading the models can take longer than the first photos
                bar.set_description("loading models")
                self._load_models()
                bar.set_description("indexing")
            batches = self._encode_locally(paths, metadata, report, chunk_images, every, on_photos=moved)
        else:
            from himir_rag.distributed import encode_with_ray

            batches = encode_with_ray(self, paths, metadata=metadata, report=report, address=ray_address,
                                      chunk_images=min(chunk_images, every or chunk_images))
        for n_files, encoded in batches:
            self._commit(encoded, report)
            bar.update(max(0, n_files - shown[0]))  # the chunk's unchanged, skipped or remote files
            shown[0] = 0
            done += n_files
            if checkpoint_dir is not None and done - saved_at >= checkpoint_every:
                self._record_skipped(report)
                self.save(checkpoint_dir, checkpoint=True)
                saved_at = done
            if on_chunk is not None:
                on_chunk(report)
        bar.close()
        if isinstance(metadata, MetadataLookup):
            metadata.warn_unmatched()
        self._record_skipped(report)
        self.sync_candidate_stores()
        if report.added or report.updated:
            report.auto_tuned = self._auto_tune_if_due()
        if checkpoint_dir is not None and self._needs_save(checkpoint_dir):
            self.save(checkpoint_dir)  # unless the directory already holds everything (a no-op run writes nothing)
        report.seconds = time.perf_counter() - started
        for path, reason in report.skipped:
            logger.warning("skipped %s: %s", path, reason)
        return report

    def auto_tune_now(self) -> dict[str, Any]:
        """Tune the scheduler now on ``config.auto_tune_probes`` probes drawn from the collection
        (:func:`himir_rag.autoconfig.auto_tune`), whatever its size, growth or parameters, and keep
        the choice and its record (:attr:`autoconfig`, saved with the index); returns the record.
        ``add`` calls it when tuning is due (see ``HiMIRConfig.auto_tune``)."""
        from himir_rag.autoconfig import apply_record, auto_tune

        record = auto_tune(self, probes=self.config.auto_tune_probes)
        apply_record(self, record)
        return record

    def _auto_tune_if_due(self) -> bool:
        """Label-free tuning of the scheduler (see :func:`himir_rag.autoconfig.auto_tune`) when the
        collection reached ``auto_tune_min_images`` or grew ``auto_tune_growth`` x since the last
        one, up to ``auto_tune_max_images``; never over parameters the user set or tuned with ``himir tune``."""
        config, record = self.config, self.autoconfig
        if not config.auto_tune or self.store is not None or not (
                config.auto_tune_min_images <= len(self) <= config.auto_tune_max_images):
            return False
        if record is None and config.scheduler.overrides():
            return False  # hand-set parameters
        if record is not None and (record.get("source") != "auto"
                                   or not _tuned_params_in_use(config, record.get("params"))
                                   or len(self) < config.auto_tune_growth * int(record.get("images", 0))):
            return False
        logger.info("auto-tuning the scheduler on probes drawn from %d photos", len(self))
        record = self.auto_tune_now()
        logger.info("auto-tuned in %.1fs: %s (probe Recall@%d %.3f, himir-full %.3f; %.0f dot products)",
                    record["seconds"], record["params"], record["k"], record["recall"],
                    record["himir_full"]["recall"], record["dot_products"])
        return True

    def _encode_locally(self, paths: list[tuple[Path, int | None]], metadata: MetadataSource, report: BuildReport,
                        chunk_images: int, every: int | None, on_photos: Callable[[int], None] | None = None
                        ) -> Iterator[tuple[int, list[tuple[PreparedPhoto, np.ndarray]]]]:
        """Decode and crop the next chunk in a worker thread while this one is encoded (chunks of at most
        ``chunk_images`` files that end at every multiple of ``every``); ``on_photos(n)`` as photos are encoded."""
        with ThreadPoolExecutor(max_workers=1) as pool:
            for n_files, chunk in _prefetch(pool, _chunks(paths, chunk_images, every), self._prepare_chunk, metadata,
                                            report):
                yield n_files, self._encode_chunk(chunk, report, on_photos)

    def _record_skipped(self, report: BuildReport) -> None:
        """Merge the report's skipped files into :attr:`skipped`; earlier entries indexed since are dropped."""
        with self._write_lock:
            indexed = {r.path for r in self.snapshot.images.values()}
            earlier = [(path, reason) for path, reason in self._skipped if path not in indexed]
            merged = _merge_skipped(earlier, report.skipped)
            self._dirty = self._dirty or merged != self._skipped
            self._skipped = merged

    def _choose_root(self, source: Any, paths: list[tuple[Path, int | None]]) -> None:
        """Set the collection root on the first ``add`` of an empty index: its folder, or the files' common folder."""
        if self.root is not None or len(self):
            return
        if isinstance(source, (str, os.PathLike)) and os.path.isdir(source):
            self.root = os.path.abspath(source)
        else:
            self.root = _common_folder([str(path) for path, _ in paths])

    def _refused_path(self, path: str) -> str | None:
        """Why a listed file is not indexed: its real path leaves its base (root or folder); None when fine."""
        if self.config.follow_symlinks:
            return None
        return outside_reason(path, photo_base(path, relative_to_root(path, self.root), self.root))

    def _collect_paths(self, source: Any, report: BuildReport,
                       metadata: MetadataSource = None) -> tuple[list[tuple[Path, int | None]], MetadataSource]:
        """Files to (re)index, each with the id of the image it replaces (changed files), and
        ``metadata`` as a callable (a mapping's keys resolved against these files).

        Unchanged files whose ``metadata`` entry differs from the stored one get it here.
        """
        listed = not isinstance(source, (str, os.PathLike))
        if not listed:
            candidates: Iterable[Path] = iter_image_files(
                source, on_skip=lambda path, reason: report.skipped.append((str(path.absolute()), reason)),
                follow_symlinks=self.config.follow_symlinks)
        else:
            candidates = (Path(p) for p in source)
        by_path = {r.path: r for r in self.snapshot.images.values()}
        todo: list[tuple[Path, int | None]] = []
        unchanged: list[ImageRecord] = []
        seen: set[str] = set()
        for path in candidates:
            absolute = str(Path(path).absolute())
            if absolute in seen:
                continue
            seen.add(absolute)
            refused = self._refused_path(absolute) if listed else None
            if refused is not None:
                report.skipped.append((absolute, refused))
                continue
            try:
                stat = os.stat(absolute)
            except OSError as exc:
                report.skipped.append((absolute, f"cannot stat: {exc.strerror or exc}"))
                continue
            old = by_path.get(absolute)
            if old is not None and (old.size, old.mtime_ns) == (stat.st_size, stat.st_mtime_ns):
                report.unchanged += 1
                unchanged.append(old)
            else:
                todo.append((Path(absolute), None if old is None else old.image_id))
        metadata = MetadataLookup.wrap(metadata, source, [*todo, *((Path(r.path), None) for r in unchanged)])
        if metadata is not None and unchanged:  # an empty answer keeps what is stored (partial mappings)
            report.metadata_updated = self._set_metadata(unchanged, metadata, clear_with_empty=False)
        return todo, metadata

    def update_metadata(self, metadata: Mapping[str, Mapping[str, Any]] | Callable[[Path], Mapping[str, Any]]) -> int:
        """Replace the user metadata of indexed photos without re-encoding them (vectors untouched).

        Parameters
        ----------
        metadata : mapping or callable
            ``{key: {...}}`` (keys as in :meth:`add`: absolute, relative to the working
            directory, or bare file names when unambiguous) or ``fn(path) -> {...}``. A
            photo with no entry (or for which ``fn`` returns None) keeps its metadata;
            ``{}`` clears it. Keys that match no photo are listed in one logged warning.

        Returns
        -------
        int
            Photos whose metadata changed.

        Raises
        ------
        ConfigError
            A value that is not JSON data (NaN and infinity included).

        Example
        -------
        >>> index.update_metadata({"beach.jpg": {"album": "holiday"}})  # doctest: +SKIP
        1
        """
        with self._write_lock:
            records = list(self.snapshot.images.values())
            lookup = MetadataLookup.wrap(metadata, None, [(Path(r.path), None) for r in records])
            changed = self._set_metadata(records, lookup, clear_with_empty=True)
        if isinstance(lookup, MetadataLookup):
            lookup.warn_unmatched()
        return changed

    def _set_metadata(self, records: list[ImageRecord], lookup: Callable[[Path], Any], *,
                      clear_with_empty: bool) -> int:
        """Give ``records`` their ``lookup`` metadata where it differs (None keeps it); returns how many changed."""
        changed = []
        for record in records:
            found = lookup(Path(record.path))
            if found is None or (not found and not clear_with_empty):
                continue
            value = checked_metadata(Path(record.path), found)
            if value != record.metadata:
                changed.append(dataclasses.replace(record, metadata=value))
        if changed:
            with self._write_lock:
                if self.store is not None:
                    self.store.set_metadata(changed)
                self._snapshot = self.snapshot.with_records(changed)
                self._dirty = True
        return len(changed)

    def _prepare_chunk(self, chunk: list[tuple[Path, int | None]], metadata: MetadataSource,
                       report: BuildReport) -> tuple[int, list[PreparedPhoto]]:
        """The photos of ``chunk`` prepared; the files to skip (see :func:`prepare_or_skip`) go to the report."""
        prepared = []
        for path, replaces in chunk:
            photo = prepare_or_skip(path, replaces, metadata, decomposer=self._decomposer, config=self.config)
            if isinstance(photo, str):
                report.skipped.append((str(path), photo))
            else:
                prepared.append(photo)
        return len(chunk), prepared

    def _encode_chunk(self, chunk: list[PreparedPhoto], report: BuildReport,
                      on_photos: Callable[[int], None] | None = None) -> list[tuple[PreparedPhoto, np.ndarray]]:
        encoded, skipped = encode_photos(chunk, self.encoder, batch_size=self.config.batch_size,
                                         region_encoding=self.config.region_encoding, on_photos=on_photos,
                                         workers=encode_workers(self.encoder))
        report.crops_encoded += sum(len(item.tree) for item in chunk)
        report.skipped.extend(skipped)
        return encoded

    def _commit(self, encoded: list[tuple[PreparedPhoto, np.ndarray]], report: BuildReport) -> None:
        records, trees, vectors, replaced = [], [], [], set()
        with self._write_lock:
            for item, vecs in encoded:
                keep = granularity_keep(item.tree, vecs, self.config.prune_cosine)
                report.regions_pruned += int((~keep).sum())
                report.regions_stored += int(keep.sum())
                records.append(dataclasses.replace(item.record, image_id=self._next_id,
                                                   relpath=relative_to_root(item.record.path, self.root)))
                if item.thumbnail is not None:
                    self._thumbnails.keep(self._next_id, item.thumbnail)
                self._next_id += 1
                trees.append(item.tree.select(keep))
                vectors.append(vecs[keep])
                if item.replaces is not None:
                    replaced.add(item.replaces)
            report.updated += len(replaced)
            report.added += len(records) - len(replaced)
            self._dirty = self._dirty or bool(records or replaced)
            if self.store is not None:
                self.store.delete_images(sorted(replaced))
                # stored as the config's precision would keep them, so every store scores the same numbers
                dtype = VECTOR_DTYPES[self.config.precision]
                self.store.add_images(records, trees, [np.asarray(v, dtype).astype(np.float32) for v in vectors])
                self._snapshot = self.snapshot.without_images(replaced).with_records(records)
                return
            self._snapshot = self.snapshot.without_images(replaced).with_images(records, trees, vectors)

    def delete(self, targets: int | str | os.PathLike[str] | Iterable[int | str | os.PathLike[str]]) -> int:
        """Remove images by id or path; returns how many were removed (unknown ones are ignored)."""
        if isinstance(targets, (int, str, os.PathLike)):
            targets = [targets]
        with self._write_lock:
            snapshot = self.snapshot
            by_path = {r.path: r.image_id for r in snapshot.images.values()}
            ids = set()
            for target in targets:
                if isinstance(target, (int, np.integer)):
                    ids.add(int(target)) if int(target) in snapshot.images else None
                elif str(Path(target).absolute()) in by_path:
                    ids.add(by_path[str(Path(target).absolute())])
            if self.store is not None:
                self.store.delete_images(sorted(ids))
            self._snapshot = snapshot.without_images(ids)
            self._dirty = self._dirty or bool(ids)
        if ids:
            self.sync_candidate_stores()
        return len(ids)

    # -- search --------------------------------------------------------------------------------
    def search(self, query: str | None = None, *, image: QueryImage | None = None, k: int = 10,
               mode: str | RetrievalMode | None = None, subqueries: Sequence[str] | None = None,
               decomposer: Any = None, filters: Filters = None, image_weight: float = 0.5) -> SearchResult:
        """Rank images for ``query``, for a query photo (``image``), or for both.

        A query photo is cut into its own 1+M+N regions by the index's decomposer and
        encoded by its encoder, exactly as an indexed photo is; each kept region is one
        query vector, labelled ``"photo <level> [x0, y0, x1, y1]"`` (only the global view
        in ``single`` mode). A photo's score is then the mean over the query vectors of
        their best similarity among its regions (MaxSim), the scorer every mode uses: the
        query photo itself scores 1.0. With text too, the text's sub-queries and the
        photo's regions are matched together and the score is
        ``(1 - image_weight) * text mean + image_weight * photo mean`` (query vectors are
        scaled by their share; reported region similarities are the plain cosines). In
        ``single`` mode text and photo become one vector, their weighted sum, which scores
        the same weighted mean against each global view.

        Parameters
        ----------
        query : str, optional
            The question or description; may be omitted when ``image`` is given.
        image : path-like, bytes or PIL.Image.Image, optional
            A query photo (a file, encoded bytes or a decoded image).
        k : int
            Hits to return (clamped to the collection size with a warning).
        mode : str, optional
            ``"himir"``, ``"himir-full"``, ``"mvr"`` or ``"single"``; default
            ``config.default_mode`` (``"himir"``, the scheduled pass).
        subqueries : list of str, optional
            Sub-queries to match; by default the decomposer splits ``query``. At most
            ``config.max_subqueries`` are used (the rest are dropped with a warning); one
            longer than ``config.max_subquery_chars`` raises.
        decomposer : QueryDecomposer, optional
            Defaults to the offline rule-based one.
        filters : mapping or callable, optional
            A filter of :mod:`himir_rag.filters`: ``{key: value}``, ``{key: [values]}``,
            operators (``{"year": {"$gte": 2021}}``, ``$and``/``$or``...) over the user
            metadata and the built-in fields ``file_name``, ``path``, ``width``, ``height``;
            or ``fn(view) -> bool``.
        image_weight : float
            Share of the score the photo carries when text is given too (0 < w < 1).

        Returns
        -------
        SearchResult
            ``subqueries`` lists the text sub-queries, then the photo's region labels.

        Raises
        ------
        ValueError
            Neither text nor image, a query longer than ``config.max_query_chars``, k <= 0,
            bad sub-queries, or ``image_weight`` outside (0, 1).
        ConfigError
            A malformed filter.
        ImageLoadError
            The query photo cannot be read or decoded (a ``ValueError``).
        EmptyIndexError
            The index holds no image.

        Example
        -------
        >>> index.search(image="horse.jpg", k=3).hits[0].path  # doctest: +SKIP
        >>> index.search("on a beach", image="horse.jpg", image_weight=0.7)  # doctest: +SKIP
        """
        started = time.perf_counter()
        mode = self.resolve_mode(mode)
        compile_filter(filters)  # a malformed filter fails before any encoding
        if image is None:
            k = self._check_query(query, k)
            stats = SearchStats(mode=mode.value)
            subs = self._subqueries(query, subqueries, decomposer, stats, mode=mode)
            return self._search_vectors(query, subs, self._embed_queries(query, subs, mode, stats), k=k, mode=mode,
                                        filters=filters, stats=stats, started=started)
        text = query if isinstance(query, str) and query.strip() else None
        if query is not None and not isinstance(query, str):
            raise ValueError(f"query must be a str, got {type(query).__name__}")
        if isinstance(image_weight, bool) or not isinstance(image_weight, (int, float)) or not 0 < image_weight < 1:
            raise ValueError(f"image_weight must be a number strictly between 0 and 1, got {image_weight!r}")
        k = self._check_query(text or "photo", k)
        stats = SearchStats(mode=mode.value)
        labels, vectors, scales = self._photo_and_text_queries(image, text, mode, stats, subqueries=subqueries,
                                                               decomposer=decomposer, image_weight=image_weight)
        result = self._search_vectors(text or "", labels, vectors * scales[:, None], k=k, mode=mode,
                                      filters=filters, stats=stats, started=started, labels=labels)
        name = str(image) if isinstance(image, (str, os.PathLike)) else "query image"
        return SearchResult(result.query, result.subqueries, _unscaled(result.hits, scales), result.stats, name)

    def _photo_and_text_queries(self, image: QueryImage, text: str | None, mode: RetrievalMode, stats: SearchStats,
                                *, subqueries: Sequence[str] | None, decomposer: Any,
                                image_weight: float) -> tuple[list[str], np.ndarray, np.ndarray]:
        """Labels, (s, dim) vectors and (s,) score weights: the text's sub-queries, then the photo's regions."""
        labels, photo = self._photo_queries(image, mode, stats)
        if text is None:
            return labels, photo, np.ones(len(photo), np.float32)
        subs = self._subqueries(text, subqueries, decomposer, stats, mode=mode)
        encode_ms = stats.latency_ms["encode"]
        words = self._embed_queries(text, subs, mode, stats)
        stats.latency_ms["encode"] += encode_ms
        if not MODES[mode].subqueries:  # one vector per image: the weighted sum scores the weighted mean
            combined = (1 - image_weight) * words[0] + image_weight * photo[0]
            return [f"{text} + {labels[0]}"], combined[None, :].astype(np.float32), np.ones(1, np.float32)
        n = len(words) + len(photo)
        scales = np.concatenate([np.full(len(words), (1 - image_weight) * n / len(words)),
                                 np.full(len(photo), image_weight * n / len(photo))]).astype(np.float32)
        return subs + labels, np.concatenate([words, photo]), scales

    def _photo_queries(self, image: QueryImage, mode: RetrievalMode, stats: SearchStats) -> tuple[list[str], np.ndarray]:
        """The query photo cut and encoded as an indexed photo is: a label and a vector per stored region."""
        self._load_models(stats)
        tick = time.perf_counter()
        photo = decode_image(image, max_pixels=self.config.max_image_pixels,
                             name=str(image) if isinstance(image, (str, os.PathLike)) else "query image")
        roi = self.config.region_encoding == "roi"
        tree, crops, work = cut(photo, self._decomposer, min_region_frac=self.config.min_region_frac, crops=not roi)
        if not MODES[mode].subqueries:  # whole photo against whole photos
            tree, crops = tree.select(tree.levels == Level.GLOBAL), crops[:1]
        with limit_threads(self.config.search_threads, torch=True):
            vectors = (encode_views([work], [tree], self.encoder) if roi
                       else encode_crops(crops, self.encoder, batch_size=self.config.batch_size))
        keep = granularity_keep(tree, vectors, self.config.prune_cosine)
        tree, vectors = tree.select(keep), vectors[keep]
        labels = [f"photo {Level(int(level)).name.lower()} {[int(v) for v in box]}"
                  for level, box in zip(tree.levels, tree.boxes)]
        stats.latency_ms["encode"] = (time.perf_counter() - tick) * 1000
        stats.extra["query_photo_regions"] = len(labels)
        return labels, vectors

    def search_vectors(self, vectors: np.ndarray, *, k: int = 10, mode: str | RetrievalMode | None = None,
                       labels: Sequence[str] | None = None, filters: Filters = None,
                       query: str = "") -> SearchResult:
        """Rank images for query vectors already embedded (sub-queries, or one vector for ``single``).

        Parameters
        ----------
        vectors : np.ndarray
            (s, dim) L2-normalised float32 sub-query vectors.
        labels : list of str, optional
            One name per vector, reported in each hit's regions (default ``"q0"``, ``"q1"``...).

        Returns
        -------
        SearchResult

        Example
        -------
        >>> index.search_vectors(index.encoder.embed_texts(["a cat", "a cup"]), k=5)  # doctest: +SKIP
        """
        started = time.perf_counter()
        mode = self.resolve_mode(mode)
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.snapshot.dim or len(vectors) == 0:
            raise ValueError(f"vectors must be (s, {self.snapshot.dim}) with s >= 1, got {vectors.shape}")
        _check_finite(vectors, "query vectors")
        k = self._check_query(query or "vectors", k)
        compile_filter(filters)
        labels = list(labels) if labels is not None else [f"q{i}" for i in range(len(vectors))]
        if len(labels) != len(vectors):
            raise ValueError(f"{len(labels)} labels for {len(vectors)} vectors")
        stats = SearchStats(mode=mode.value)
        return self._search_vectors(query, labels, vectors, k=k, mode=mode, filters=filters, stats=stats,
                                    started=started)

    def resolve_mode(self, mode: str | RetrievalMode | None) -> RetrievalMode:
        """``mode``, or the config's default mode when None (unknown names raise ConfigError)."""
        return parse_mode(self.config.default_mode if mode is None else mode)

    async def asearch(self, query: str | None = None, **kwargs: Any) -> SearchResult:
        """:meth:`search` (text, ``image=`` or both) in a worker thread, so the event loop is not blocked."""
        return await asyncio.to_thread(self.search, query, **kwargs)

    def _check_query(self, query: str, k: int) -> int:
        if not isinstance(query, str) or not query.strip():
            raise ValueError("query is empty; pass a non-empty description of the photo to find, "
                             "or a query photo as image=")
        if len(query) > self.config.max_query_chars:
            raise ValueError(f"query is {len(query)} characters long, more than max_query_chars="
                             f"{self.config.max_query_chars}; shorten it or raise HiMIRConfig.max_query_chars")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k <= 0:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        n = len(self)
        if n == 0:
            raise EmptyIndexError("the index holds no image; add photos first (himir index DIR --index INDEX)")
        if k > n:
            logger.warning("k=%d is larger than the collection (%d images); returning %d", k, n, n)
        return min(int(k), n)

    def _subqueries(self, query: str, given: Sequence[str] | None, decomposer: Any, stats: SearchStats, *,
                    mode: RetrievalMode) -> list[str]:
        tick = time.perf_counter()
        if given is not None:
            subs = self._check_subqueries(given)
        elif not MODES[mode].subqueries:  # the whole query is matched: nothing to split (no model call)
            subs = []
        else:
            if decomposer is None:
                from himir_rag.decompose import RuleDecomposer

                decomposer = RuleDecomposer()
            subs = self.limit_subqueries(decomposer.decompose(query))
        stats.latency_ms["decompose"] = (time.perf_counter() - tick) * 1000
        return self._cap_count(subs) or [query.strip()[: self.config.max_subquery_chars]]

    def limit_subqueries(self, found: Iterable[Any]) -> list[str]:
        """A decomposer's sub-queries within the config's caps: strings only, blank ones dropped,
        each cut at ``max_subquery_chars`` and at most ``max_subqueries`` of them (each cut logged).

        The adapters pass their decomposer's answer through this before :meth:`search`.

        Example
        -------
        >>> index.limit_subqueries(["a dog", "", "x" * 600])  # doctest: +SKIP
        ['a dog', 'xxx...']
        """
        return self._cap_count(self._cap_decomposed(found))

    def _check_subqueries(self, given: Any) -> list[str]:
        """Explicit sub-queries: a list of strings, none longer than the cap (blank ones are dropped)."""
        if isinstance(given, (str, bytes)) or not isinstance(given, Iterable):
            raise ValueError(f"subqueries must be a list of strings, got {type(given).__name__}")
        subs, limit = [], self.config.max_subquery_chars
        for item in given:
            if not isinstance(item, str):
                raise ValueError(f"subqueries must be strings, got {type(item).__name__} {str(item)[:40]!r}")
            if len(item) > limit:
                raise ValueError(f"a sub-query is {len(item)} characters long, more than max_subquery_chars="
                                 f"{limit}; shorten it or raise HiMIRConfig.max_subquery_chars")
            if item.strip():
                subs.append(item.strip())
        return subs

    def _cap_decomposed(self, found: Iterable[Any]) -> list[str]:
        """A decomposer's sub-queries: strings only, each cut at ``max_subquery_chars`` (with a warning)."""
        subs, limit = [], self.config.max_subquery_chars
        for item in found:
            if isinstance(item, str) and item.strip():
                if len(item.strip()) > limit:
                    logger.warning("a sub-query of %d characters is cut at max_subquery_chars=%d",
                                   len(item.strip()), limit)
                subs.append(item.strip()[:limit])
        return subs

    def _cap_count(self, subs: list[str]) -> list[str]:
        limit = self.config.max_subqueries
        if len(subs) > limit:
            logger.warning("%d sub-queries given, more than max_subqueries=%d; the first %d are used",
                           len(subs), limit, limit)
        return subs[:limit]

    def _load_models(self, stats: SearchStats | None = None, *, text_only: bool = False) -> None:
        """Build and load the encoder's models if this is their first use, timed as ``load_models``
        in ``stats`` (not as the first query's ``encode``); ``text_only``: only what embedding
        texts needs, where the encoder can load that alone (``load_text``)."""
        if self._encoder is not None and getattr(self._encoder, "text_loaded" if text_only else "loaded",
                                                 getattr(self._encoder, "loaded", True)):
            return
        tick = time.perf_counter()
        load = getattr(self.encoder, "load", None)  # the offline encoder loads lazily; CLIP when built
        load = getattr(self.encoder, "load_text", load) if text_only else load
        if callable(load):
            load()
        if stats is not None:
            stats.latency_ms["load_models"] = (time.perf_counter() - tick) * 1000

    def _embed_queries(self, query: str, subs: list[str], mode: RetrievalMode, stats: SearchStats) -> np.ndarray:
        self._load_models(stats, text_only=True)
        tick = time.perf_counter()
        with limit_threads(self.config.search_threads, torch=True):
            vectors = self.encoder.embed_texts(subs if MODES[mode].subqueries else [query])
        _check_finite(vectors, f"the encoder's vectors of {subs[:3]!r}")
        stats.latency_ms["encode"] = (time.perf_counter() - tick) * 1000
        return vectors

    def _search_vectors(self, query: str, subs: list[str], vectors: np.ndarray, *, k: int, mode: RetrievalMode,
                        filters: Filters, stats: SearchStats, started: float,
                        labels: list[str] | None = None) -> SearchResult:
        tick = time.perf_counter()
        if labels is None:  # one name per query vector, reported in each hit's regions
            labels = subs if MODES[mode].subqueries else [query]
        snapshot = self.snapshot
        allowed = _FILTER_CACHE.get(snapshot, filters)
        ranking = rank(self.image_store, vectors, mode=mode, k=k, params=self.config.scheduler_params, stats=stats,
                       allowed=allowed, filters=filters if isinstance(filters, Mapping) else None)
        # an external store may hold photos another process added since this catalog was read: not shown
        focus = _focus_boxes(self.image_store, snapshot, ranking, vectors, MODES[mode].levels, self.config, stats)
        hits = _finite_hits(_hits(snapshot, ranking, labels, focus))
        stats.latency_ms["search"] = (time.perf_counter() - tick) * 1000
        stats.latency_ms["total"] = (time.perf_counter() - started) * 1000
        return SearchResult(query, tuple(subs), hits, stats)

    # -- photos on disk: containment, thumbnails, relocation, framework retrievers -------------
    def image_file(self, image_id: int) -> tuple[Path, str] | None:
        """The file to show for an image and which it is: ``(path, "original" | "thumbnail")``.

        The original is used when it exists, its header is an image's, and its real path
        stays inside its base (the collection root, or its own folder for photos outside
        the root; not checked with ``config.follow_symlinks``); otherwise the saved
        thumbnail, when the index keeps them. None (logged) when neither can be shown.
        Whatever is shown is decoded and re-encoded before it reaches a model
        (:func:`himir_rag.images.encode_image_file`).

        Raises
        ------
        KeyError
            ``image_id`` is not in the index.
        """
        record = self.snapshot.images[image_id]
        problem = self._photo_problem(record)
        if problem is None:
            return Path(record.path), "original"
        thumbnail = self.thumbnail_path(image_id)
        if thumbnail is not None:
            logger.info("%s: %s; showing its thumbnail", record.path, problem)
            return thumbnail, "thumbnail"
        logger.warning("%s: %s; left out of the results", record.path, problem)
        return None

    def _photo_problem(self, record: ImageRecord) -> str | None:
        """Why the original of ``record`` cannot be shown (missing, outside its base, not an image); None if it can."""
        if not os.path.isabs(record.path):  # only a tampered catalog without a root holds such a row
            return "its stored path is relative but the index records no collection root"
        if not os.path.isfile(record.path):
            return ("indexed photo is missing on disk; re-run `himir index`, or `himir relocate` "
                    "if the collection folder moved")
        outside = None if self.config.follow_symlinks else outside_reason(
            record.path, photo_base(record.path, record.relpath, self.root))
        return outside or image_header_problem(record.path)

    def thumbnail_path(self, image_id: int) -> Path | None:
        """The saved JPEG thumbnail of an image (``thumbnails=True`` indexes, once saved), else None."""
        return self._thumbnails.path(image_id)

    def relocate(self, new_root: str | os.PathLike[str]) -> RelocateReport:
        """Point the index at its collection folder's new place (photos stored relative to the root follow).

        Photos stored by absolute path (outside the root) are left as they are. For an
        index saved before roots were recorded, the old root is the photos' common folder;
        their keys then change once (they become root-relative). Save the index afterwards.

        Returns
        -------
        RelocateReport
            Photos rebased, and how many of them are missing under ``new_root``.

        Raises
        ------
        FileNotFoundError
            ``new_root`` is not a directory.
        ConfigError
            The index keeps its catalog in Qdrant (its payloads hold absolute paths).

        Example
        -------
        >>> index.relocate("/mnt/new-disk/photos").missing  # doctest: +SKIP
        0
        """
        root = os.path.abspath(new_root)
        if not os.path.isdir(root):
            raise FileNotFoundError(f"{root}: no such directory; give the collection folder's new location")
        if self.store is not None:
            raise ConfigError("relocate is not supported for a Qdrant-backed index (its payloads hold absolute "
                              "paths); re-index the moved folder instead")
        with self._write_lock:
            snapshot = self.snapshot
            old_root = self.root or _common_folder([r.path for r in snapshot.images.values()])
            records = [_rebased(r, old_root, root) for r in snapshot.images.values()]
            self._snapshot = snapshot.with_records(records)
            self.root = root
        rebased = [r for r in records if r.relpath]
        missing = sum(not os.path.isfile(r.path) for r in rebased)
        if missing:
            logger.warning("%d of %d photos are missing under %s", missing, len(rebased), root)
        return RelocateReport(root, len(rebased), missing, len(records) - len(rebased))

    def as_llama_index_retriever(self, **kwargs: Any) -> Any:
        """A :class:`himir_rag.llama_index.HiMIRRetriever` over this index (needs the ``llama-index`` extra)."""
        from himir_rag.llama_index import HiMIRRetriever

        return HiMIRRetriever(self, **kwargs)

    def as_langchain_retriever(self, **kwargs: Any) -> Any:
        """A :class:`himir_rag.langchain.HiMIRRetriever` over this index (needs the ``langchain`` extra)."""
        from himir_rag.langchain import HiMIRRetriever

        return HiMIRRetriever(index=self, **kwargs)

    # -- persistence ---------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike[str], *, lock_timeout: float | None = DEFAULT_LOCK_TIMEOUT,
             overwrite: bool = False, checkpoint: bool = False) -> Path:
        """Write the index atomically into ``directory`` (see module docstring); returns the version dir.

        The directory's writer lock is held throughout. The new version is read back and
        checked (manifest schema, file sizes, counts) before ``CURRENT`` names it; only then
        are older versions removed. On any error the previous version stays live and intact.

        When ``directory`` holds the version this index was loaded from or last saved to,
        the save is append-only: it links that version's files and appends the new rows,
        new or changed records and deletions (see :mod:`himir_rag.appendlog`); otherwise,
        and once deleted rows pass a quarter of the rows, it writes everything (as
        :meth:`compact` does).

        Parameters
        ----------
        directory : path-like
            The index directory (created when missing).
        lock_timeout : float or None
            Seconds to wait for another writer of ``directory`` (0: fail at once; None: forever).
        overwrite : bool
            Publish even if another writer saved ``directory`` after this index was loaded
            from it (or last saved to it); that writer's changes are then lost.
        checkpoint : bool
            An intermediate save of a build (what ``add(checkpoint_dir=...)`` does): the
            candidate stores are not written (a load rebuilds them on the first search); the
            next save writes them even if nothing else changed.

        Returns
        -------
        Path
            The new version directory.

        Raises
        ------
        IndexConflictError
            ``directory`` holds a newer version than the one this index came from.
        IndexLockedError
            Another writer held the lock for longer than ``lock_timeout``.
        IndexWriteError
            Disk full, permission denied or a read-only file system.
        """
        return self._save(Path(directory), lock_timeout=lock_timeout, overwrite=overwrite, checkpoint=checkpoint,
                          full=False)

    def compact(self, directory: str | os.PathLike[str] | None = None, *,
                lock_timeout: float | None = DEFAULT_LOCK_TIMEOUT) -> CompactReport:
        """Rewrite ``directory`` as one fresh full version: rows of deleted images and replaced
        records are dropped, the append-only files start anew (see :mod:`himir_rag.appendlog`),
        and IVF candidate stores built otherwise than this version builds them (IVF-PQ codes,
        IVF-Flat list counts: an index saved by an older version) are retrained.

        Parameters
        ----------
        directory : path-like, optional
            The index directory; by default the one this index was loaded from or last saved to.
        lock_timeout : float or None
            As in :meth:`save`.

        Returns
        -------
        CompactReport
            The new version and the bytes of the live version before and after.

        Raises
        ------
        ConfigError
            No ``directory`` given and the index was never loaded or saved.
        IndexConflictError, IndexLockedError, IndexWriteError
            As :meth:`save`.

        Example
        -------
        >>> index = HiMIRIndex.load("photos.himir"); index.delete("photos/old.jpg")  # doctest: +SKIP
        >>> index.compact().bytes_after  # doctest: +SKIP
        """
        if directory is None:
            if self._disk_version is None:
                raise ConfigError("this index was never loaded or saved; name the directory to compact")
            directory = self._disk_version[0]
        directory = Path(directory)
        before = _live_bytes(directory)
        self.sync_candidate_stores(retrain_codes=True)
        version = self._save(directory, lock_timeout=lock_timeout, overwrite=False, checkpoint=False, full=True)
        return CompactReport(version, before, _tree_bytes(version))

    def _save(self, directory: Path, *, lock_timeout: float | None, overwrite: bool, checkpoint: bool,
              full: bool) -> Path:
        """:meth:`save` (``full``: write every file anew)."""
        with lock_index(directory, timeout=lock_timeout, create=True):
            self._check_not_stale(directory, overwrite=overwrite)
            with self._write_lock:
                snapshot, skipped, dirty = self.snapshot, list(self._skipped), self._dirty
                next_id = max(self._next_id, max(snapshot.images, default=0) + 1)  # what load requires
                self._dirty = False
            base = None if full else self._append_base(directory)
            try:
                version, log = self._publish(directory, snapshot, skipped, next_id, base=base,
                                             with_stores=not checkpoint)
            except BaseException:
                self._dirty = self._dirty or dirty
                raise
            self._disk_version, self._log = (os.path.realpath(directory), version.name), log
            self._stores_pending = checkpoint
            if not checkpoint and self._candidate_stores is not None:
                self._candidate_stores.mark_saved(version)
        return version

    def _append_base(self, directory: Path) -> Path | None:
        """The live version of ``directory`` when a save may append to its files: this index came from
        it (or last saved it) and its files are those this index knows."""
        live = _live_version_name(directory)
        if self._log is None or self._disk_version != (os.path.realpath(directory), live):
            return None
        try:
            manifest = manifest_schema.read_manifest(directory / live)  # type: ignore[operator]
        except (IndexFormatError, IncompatibleIndexError):
            return None
        if manifest.get("chain") != self._log.chain or manifest.get("appended") != self._log.sizes():
            return None
        return directory / live  # type: ignore[operator]

    def _publish(self, directory: Path, snapshot: Snapshot, skipped: list[tuple[str, str]], next_id: int, *,
                 base: Path | None, with_stores: bool) -> tuple[Path, LogState]:
        """Write, verify and publish a new version (the lock is held); then remove older versions."""
        needed = _version_bytes(snapshot) if base is None else _appended_bytes(snapshot, self._log)
        version = f"v{time.time_ns()}-{uuid.uuid4().hex[:8]}"
        staging = directory / f".{version}.tmp"
        try:
            _check_free_space(directory, needed)
            staging.mkdir()
            log = self._write_version(staging, snapshot, skipped, next_id, base=base, with_stores=with_stores)
            manifest_schema.read_manifest(staging)  # it reads back: the manifest parses, every listed file has its size
            _fsync_dir(staging)  # the files' directory entries are durable before the version is published
            os.rename(staging, directory / version)
            _fsync_dir(directory)
            _atomic_write_text(directory / "CURRENT", version + "\n")
        except (OSError, sqlite3.Error) as exc:
            _discard_unpublished(directory, staging, version, shared=self._shared_sizes(base))
            raise IndexWriteError.from_os_error(directory, _as_os_error(exc), needed_bytes=needed) from exc
        except BaseException:
            _discard_unpublished(directory, staging, version, shared=self._shared_sizes(base))
            raise
        _remove_old_versions(directory, keep=version)
        self._thumbnails.saved(directory / version, snapshot.images)
        return directory / version, log

    def _shared_sizes(self, base: Path | None) -> dict[Path, int]:
        """The append-only files of the live version ``base`` with the sizes it reads (none for a full write)."""
        if base is None or self._log is None:
            return {}
        return {base / name: size for name, size in self._log.sizes().items()}

    def _check_not_stale(self, directory: Path, *, overwrite: bool = False) -> None:
        """Refuse to replace a version of ``directory`` newer than the one this index came from."""
        if overwrite or self._disk_version is None or self._disk_version[0] != os.path.realpath(directory):
            return
        live = _live_version_name(directory)
        if live is not None and live != self._disk_version[1]:
            raise IndexConflictError(
                f"{directory} was saved by another writer (live version {live}) after this index was loaded "
                f"from version {self._disk_version[1]}; saving would lose those changes. Load it again and redo "
                "yours, or save(..., overwrite=True) to replace it")

    def _needs_save(self, directory: Path) -> bool:
        """False when ``directory`` already holds exactly this index (nothing changed since)."""
        return self._dirty or self._stores_pending or \
            self._disk_version != (os.path.realpath(directory), _live_version_name(directory))

    def _preflight(self, directory: Path, n_new: int) -> None:
        """Before encoding: ``directory`` is writable and has room for the index with ``n_new`` more images."""
        itemsize = np.dtype(VECTOR_DTYPES[self.config.precision]).itemsize
        per_image = self.config.parsed_layout.total * (self.encoder.dim * itemsize * 2 + 64) + 1024
        needed = _version_bytes(self.snapshot) + n_new * per_image
        probe = directory / f".probe.{uuid.uuid4().hex[:8]}.tmp"
        try:
            probe.write_bytes(b"")
            probe.unlink()
            _check_free_space(directory, needed)
        except OSError as exc:
            raise IndexWriteError.from_os_error(directory, exc, needed_bytes=needed) from exc

    def _write_version(self, target: Path, snapshot: Snapshot, skipped: list[tuple[str, str]], next_id: int, *,
                       base: Path | None, with_stores: bool) -> LogState:
        """Write a format-2 version into ``target``: appended to ``base``'s files, or in full when None."""
        log = None
        if base is not None:
            log = write_appended(target, base, self._log, snapshot, skipped=skipped, fsync=_fsync)  # type: ignore[arg-type]
        if log is None:
            log = write_full(target, snapshot, skipped=skipped, fsync=_fsync)
        if self.store is None and len(snapshot) and with_stores:  # loading them is all the first query costs
            self.candidate_stores.save(target, snapshot, previous=base)
        self._thumbnails.write(target, snapshot.images)
        files = {p.name: p.stat().st_size for p in sorted(target.iterdir())
                 if p.is_file() and p.name not in APPENDED_FILES}
        manifest = {
            "format": manifest_schema.FORMAT_NAME, "format_version": FORMAT_VERSION,
            "encoder": {"name": self._encoder_name or self.encoder.name, "dim": snapshot.dim,
                        "spec": self.encoder_spec},
            "config": self.config.to_dict(), "next_image_id": next_id,
            "vectors": {"dtype": str(snapshot.vectors.dtype), "shape": list(snapshot.vectors.shape)},
            "counts": {"images": len(snapshot), "regions": int(len(snapshot.levels)), **snapshot.level_counts()},
            "files": files, "appended": log.sizes(), "chain": log.chain,
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "store": {"kind": "faiss"} if self.store is None else self.store.describe(),
            "root": self.root,
        }
        if self.autoconfig is not None:
            manifest["autoconfig"] = self.autoconfig
        _atomic_write_text(target / "manifest.json", json.dumps(manifest, indent=2))
        return log

    @classmethod
    def load(cls, directory: str | os.PathLike[str], *, encoder: Encoder | str | None = None,
             device: str = "cpu", store_location: str | os.PathLike[str] | None = None) -> HiMIRIndex:
        """Open an index written by :meth:`save`.

        Loading takes no lock. When a writer publishes a new version while this load reads
        the old one (``CURRENT`` moved), the load reads the new one (up to 3 tries).

        Parameters
        ----------
        encoder : Encoder or str, optional
            Defaults to the encoder recorded in the manifest. Another encoder raises.
        store_location : str or path-like, optional
            Where the external (Qdrant) store lives: an ``http(s)://`` URL or a folder. The
            manifest's own location is used only when it is a folder inside ``directory``;
            anything else must be named here again (or in ``HIMIR_STORE_LOCATION``), so an
            index never makes this process write elsewhere or contact a host by itself.

        Raises
        ------
        IndexFormatError
            Missing or truncated files; a manifest or catalog against the schema
            (:mod:`himir_rag.manifest`).
        IncompatibleIndexError
            Another format version, encoder or dimension.
        UntrustedLocationError
            The manifest names a store outside ``directory`` and ``store_location`` is not given.
        """
        directory = Path(directory)
        for attempt in range(1, _LOAD_ATTEMPTS + 1):
            pointer = manifest_schema.read_pointer(directory) if directory.is_dir() else None
            try:
                version_dir = manifest_schema.current_version(directory)
                index = cls._load_version(version_dir, encoder=encoder, device=device, store_location=store_location)
            except (IndexFormatError, OSError):
                if attempt == _LOAD_ATTEMPTS or _pointer_or_none(directory) == pointer:
                    raise  # not a writer moving CURRENT under this load: the error is real
                logger.info("%s: a writer published a new version during the load; reading that one", directory)
                continue
            index._disk_version = (os.path.realpath(directory), version_dir.name)
            return index
        raise AssertionError("unreachable")

    @classmethod
    def _load_version(cls, version_dir: Path, *, encoder: Encoder | str | None, device: str,
                      store_location: str | os.PathLike[str] | None) -> HiMIRIndex:
        """Open one version directory (every field it reads validated first)."""
        manifest = manifest_schema.read_manifest(version_dir)
        where = str(version_dir / "manifest.json")
        dim = int(manifest["encoder"]["dim"])
        saved_spec = saved_encoder_spec(manifest["encoder"].get("spec", "offline"), manifest["encoder"].get("name"))
        index = cls(encoder if encoder is not None else saved_spec,
                    manifest_schema.parse_config(manifest, where=where), device=device)
        index._encoder_name, index._dim = manifest["encoder"]["name"], dim
        if index._encoder is not None:
            index._check_encoder(index._encoder)
        store_info = manifest.get("store", {"kind": "faiss"})
        if store_info["kind"] == "qdrant":
            index.store = _open_qdrant(store_info, dim, index_dir=version_dir.parent, given=store_location)
        dtype = manifest.get("vectors", {}).get("dtype", "float32")  # what save wrote; older indexes: float32
        if dtype not in VECTOR_DTYPES:
            raise IndexFormatError(f"{where}: vector type {dtype!r} is not one of {sorted(VECTOR_DTYPES)}; "
                                   "rebuild the index")
        index.root = manifest.get("root") if isinstance(manifest.get("root"), str) else None
        if manifest["format_version"] == 1:
            snapshot, skipped = _read_version_1(version_dir, dim, dtype, root=index.root,
                                                records_only=index.store is not None)
        else:
            try:
                snapshot, skipped, index._log = read_version(
                    version_dir, chain=manifest["chain"], sizes=manifest["appended"], dim=dim, dtype=dtype,
                    root=index.root, records_only=index.store is not None)
            except Exception as exc:  # ValueError, OSError, json errors...
                raise IndexFormatError(f"{version_dir}: unreadable catalog or region files ({exc}); rebuild the "
                                       "index") from exc
            if not _all_finite(snapshot.vectors):
                raise IndexFormatError(f"{version_dir / VECTORS}: holds NaN or infinite values; the index is "
                                       "damaged, rebuild it")
        if index.store is not None:  # the store's payloads are the catalog of record
            snapshot = Snapshot.empty(dim).with_records(sorted(
                (dataclasses.replace(r, relpath=relative_to_root(r.path, index.root)) for r in index.store.records()),
                key=lambda r: r.image_id))
        n_regions = None if index.store is not None else len(snapshot.levels)  # Qdrant holds the regions
        manifest_schema.check_catalog(manifest, snapshot.images, n_regions, where=where)
        if index.store is None:
            from himir_rag.store.candidates import CandidateStores

            index._candidate_stores = CandidateStores.load(version_dir, snapshot, threads=index.config.search_threads)
        index._snapshot, index._skipped = snapshot, skipped
        autoconfig = manifest.get("autoconfig")
        index.autoconfig = autoconfig if isinstance(autoconfig, dict) else None
        index._next_id = int(manifest.get("next_image_id", max(snapshot.images, default=0) + 1))
        index._thumbnails = ThumbnailStore.open(version_dir)
        return index

    @staticmethod
    def read_manifest(directory: str | os.PathLike[str]) -> dict[str, Any]:
        """The manifest of the live version of an index directory (validated)."""
        return manifest_schema.read_manifest(manifest_schema.current_version(Path(directory)))

    def set_config(self, config: HiMIRConfig) -> None:
        """Replace the search-time configuration (e.g. the tuner's choice); index-time fields must match."""
        fixed = ("layout", "decomposer", "region_encoding", "segment_work_size")
        if any(getattr(config, name) != getattr(self.config, name) for name in fixed):
            raise ConfigError("layout, decomposer, region_encoding and segment_work_size are fixed at index time; "
                              "rebuild the index to change them")
        self._dirty = self._dirty or config != self.config
        self.config = config


# -- helpers ---------------------------------------------------------------------------------------
def _open_qdrant(info: Mapping[str, Any], dim: int, *, index_dir: Path, given: str | os.PathLike[str] | None) -> Any:
    """Reopen the Qdrant collection a manifest names, at a location it may trust (see ``load``)."""
    from himir_rag.store.qdrant import QdrantImageStore

    url, path = manifest_schema.store_location(info, index_dir=index_dir, given=given)
    try:
        return QdrantImageStore.open(info["collection"], dim=dim, url=url, path=path)
    except (HiMIRError, ImportError):
        raise
    except Exception as exc:  # noqa: BLE001 - qdrant_client's errors (connection refused, bad folder...)
        raise IndexFormatError(f"{index_dir}: cannot open its Qdrant store at {url or path!r} "
                               f"({type(exc).__name__}: {exc})") from exc


def _live_version_name(directory: Path) -> str | None:
    """The name of the version ``directory/CURRENT`` names, or None when there is no readable one."""
    try:
        return manifest_schema.current_version(directory).name
    except IndexFormatError:
        return None


def _pointer_or_none(directory: Path) -> str | None:
    """What ``CURRENT`` says now, or None when it cannot be read."""
    try:
        return manifest_schema.read_pointer(directory)
    except IndexFormatError:
        return None


def _read_version_1(version_dir: Path, dim: int, dtype: str, *, root: str | None,
                    records_only: bool) -> tuple[Snapshot, list[tuple[str, str]]]:
    """The snapshot and skipped files of a format-1 version (``vectors.npy`` + ``catalog.sqlite``)."""
    vectors = _read_vectors(version_dir / "vectors.npy", dim, dtype=dtype)
    try:
        return Snapshot.read_catalog(version_dir / "catalog.sqlite", vectors, records_only=records_only, root=root)
    except Exception as exc:  # sqlite3.DatabaseError, ValueError, json errors...
        raise IndexFormatError(f"{version_dir / 'catalog.sqlite'}: unreadable catalog ({exc}); rebuild the index") from exc


def _appended_bytes(snapshot: Snapshot, log: LogState | None) -> int:
    """A conservative size of what an append-only save of ``snapshot`` onto ``log`` writes."""
    rows = max(len(snapshot.levels) - (0 if log is None else log.rows), 0)
    return rows * (snapshot.vectors.dtype.itemsize * snapshot.dim + 64) + 2 * int(snapshot.vectors.nbytes // 16) + \
        1024 * len(snapshot) // 8 + (256 << 10)


def _tree_bytes(path: Path) -> int:
    """Bytes of the files under ``path`` (apparent sizes, hard-linked ones counted in full)."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _live_bytes(directory: Path) -> int:
    """Bytes of the live version of ``directory`` (0 when it has none)."""
    name = _live_version_name(directory)
    return 0 if name is None else _tree_bytes(directory / name)


def _version_bytes(snapshot: Snapshot) -> int:
    """A conservative size of the version ``save`` writes for ``snapshot`` (vectors, candidate stores, catalog)."""
    return 2 * int(snapshot.vectors.nbytes) + 64 * len(snapshot.levels) + 1024 * len(snapshot) + (256 << 10)


def _as_os_error(exc: OSError | sqlite3.Error) -> OSError:
    """SQLite reports a full disk or a read-only folder in words only; give them their errno."""
    if isinstance(exc, OSError):
        return exc
    text = str(exc).lower()
    code = errno.ENOSPC if "full" in text else errno.EROFS if "readonly" in text else errno.EACCES if \
        "unable to open" in text else errno.EIO
    return OSError(code, str(exc))


def _check_free_space(directory: Path, needed: int) -> None:
    """Raise ENOSPC when ``directory``'s file system has less than ``needed`` bytes free."""
    free = shutil.disk_usage(directory).free
    if free < needed:
        raise OSError(errno.ENOSPC, f"{free} bytes free, about {needed} needed", str(directory))


def _chunks(items: list[Any], size: int, every: int | None = None) -> Iterator[list[Any]]:
    """``items`` in runs of at most ``size``, none crossing a multiple of ``every`` (checkpoints fall there)."""
    start = 0
    while start < len(items):
        stop = start + size if every is None else min(start + size, (start // every + 1) * every)
        yield items[start:stop]
        start = stop


def _prefetch(pool: ThreadPoolExecutor, chunks: Iterator[list[Any]], prepare: Callable[..., Any],
              *args: Any) -> Iterator[Any]:
    """Decode and crop the next chunk in a worker while the current one is encoded."""
    pending = None
    for chunk in chunks:
        future = pool.submit(prepare, chunk, *args)
        if pending is not None:
            yield pending.result()
        pending = future
    if pending is not None:
        yield pending.result()


def _common_folder(paths: list[str]) -> str | None:
    """The deepest folder holding all ``paths`` (None for none)."""
    return os.path.commonpath([os.path.dirname(p) for p in paths]) if paths else None


def _rebased(record: ImageRecord, old_root: str | None, new_root: str) -> ImageRecord:
    """``record`` moved from ``old_root`` to ``new_root``; unchanged when stored outside the root."""
    relpath = record.relpath or relative_to_root(record.path, old_root)
    if not relpath:
        return record
    return dataclasses.replace(record, path=resolve_stored(relpath, new_root)[0], relpath=relpath)


def _merge_skipped(old: list[tuple[str, str]], new: list[tuple[str, str]]) -> list[tuple[str, str]]:
    merged = {p: r for p, r in old}
    merged.update(new)
    return list(merged.items())


class _FilterCache:
    """What a dict filter selects of a snapshot (sorted image ids), computed once per (snapshot,
    filter): a repeated filter costs nothing per query.
    Snapshots are held weakly; the least recently used entries are dropped."""

    def __init__(self, size: int = 64) -> None:
        self.size = size
        self.entries: OrderedDict[tuple[int, str], tuple[Any, np.ndarray]] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, snapshot: Snapshot, filters: Filters) -> np.ndarray | None:
        """:func:`_allowed_ids` of ``snapshot``, cached when ``filters`` is JSON (None for no filter)."""
        if filters is None:
            return None
        try:  # callables, sets and other non-JSON filters are evaluated every time
            key = (id(snapshot), json.dumps(filters, sort_keys=True, allow_nan=False))
        except (TypeError, ValueError):
            return _allowed_ids(snapshot, filters)
        with self.lock:
            entry = self.entries.get(key)
            if entry is not None and entry[0]() is snapshot:
                self.entries.move_to_end(key)
                return entry[1]
        selected = _allowed_ids(snapshot, filters)
        selected.setflags(write=False)
        with self.lock:
            self.entries[key] = (weakref.ref(snapshot), selected)
            while len(self.entries) > self.size:
                self.entries.popitem(last=False)
        return selected


_FILTER_CACHE = _FilterCache()


def _allowed_ids(snapshot: Snapshot, filters: Filters) -> np.ndarray:
    """Sorted ids of the images whose filter view passes ``filters``."""
    return np.sort(np.asarray(matching_ids(snapshot.images.values(), filters), dtype=np.int64))


def _tuned_params_in_use(config: HiMIRConfig, params: Any) -> bool:
    """The config's scheduler parameters are a tuning record's ``params`` (False for an unreadable record)."""
    try:
        return config.scheduler == SchedulerParams.from_dict(params)
    except (ConfigError, TypeError):
        return False


def _check_finite(vectors: np.ndarray, what: str) -> None:
    if not np.isfinite(vectors).all() or not np.isfinite(np.einsum("ij,ij->i", vectors, vectors)).all():
        raise ValueError(f"{what} hold NaN or infinite values (or overflow when squared); pass finite, "
                         "L2-normalised vectors")


def _finite_hits(hits: Iterable[SearchHit]) -> tuple[SearchHit, ...]:
    """The hits whose scores are all finite; the others (damaged vectors) are left out with a warning."""
    kept = []
    for hit in hits:
        if math.isfinite(hit.score) and all(math.isfinite(r.score) for r in hit.regions):
            kept.append(hit)
        else:
            logger.warning("%s: its score is not a finite number (NaN or infinite vectors); left out of the "
                           "results, re-index the photo", hit.path)
    return tuple(kept)


def _unscaled(hits: tuple[SearchHit, ...], scales: np.ndarray) -> tuple[SearchHit, ...]:
    """``hits`` with each region's similarity divided by its query vector's weight (the plain cosine)."""
    if np.all(scales == 1.0):
        return hits
    return tuple(dataclasses.replace(hit, regions=tuple(
        dataclasses.replace(match, score=match.score / float(scale)) for match, scale in zip(hit.regions, scales)))
        for hit in hits)


def _focus_boxes(store: Any, snapshot: Snapshot, ranking: Ranking, vectors: np.ndarray, levels: tuple[Level, ...],
                 config: HiMIRConfig, stats: SearchStats) -> np.ndarray:
    """(s, n, 4) reported boxes of the ranked images: each image's focus box per query vector over its
    regions at ``levels`` (:func:`~himir_rag.hierarchy.focus_boxes` at the config's ``focus_temperature``
    and ``focus_spread``), read from ``snapshot`` when the
    image ``store`` is in memory, else fetched from it (Qdrant: one fetch of the ranked images); the
    best region's box where the temperature is 0 or the store no longer holds the image.
    Their dot products (rows x queries of the ranked images only) go to ``stats.extra["focus_dot_products"]``,
    not ``dot_products``: they locate the match after the ranking and cost the same in every mode."""
    focus = ranking.boxes.copy()
    if config.focus_temperature <= 0 or not len(ranking.image_ids):
        return focus
    if not store.in_memory:
        snapshot = store.vectors(ranking.image_ids).snapshot
    positions = snapshot.positions_of(ranking.image_ids)
    known = np.flatnonzero(positions >= 0)  # columns of the ranking the snapshot holds
    rows = snapshot.rows_of(positions[known])  # their rows, image after image in ranking order
    column = np.repeat(known, np.diff(snapshot.image_starts)[positions[known]])
    matched = np.zeros(len(Level), bool)
    matched[[int(level) for level in levels]] = True
    keep = matched[snapshot.levels[rows]]
    rows, column = rows[keep], column[keep]
    if not len(rows):
        return focus
    sims = snapshot.region_vectors(rows) @ np.asarray(vectors, np.float32).T  # (rows, s)
    starts = np.flatnonzero(np.r_[True, column[1:] != column[:-1]])
    focus[:, column[starts]] = grouped_focus_boxes(sims, snapshot.boxes[rows], starts, config.focus_temperature,
                                                   config.focus_spread).transpose(1, 0, 2)
    stats.extra["focus_dot_products"] = int(sims.size)
    return focus


def _hits(snapshot: Snapshot, ranking: Ranking, labels: list[str], focus: np.ndarray) -> list[SearchHit]:
    """The hits of ``ranking`` whose image ``snapshot`` holds, best first (arrays read as Python lists once);
    ``focus``: the (s, n, 4) boxes reported as each match's ``bbox`` (:func:`_focus_boxes`)."""
    levels = [[Level(v).name.lower() for v in row] for row in ranking.levels.T.tolist()]
    boxes, best, scores = ranking.boxes.transpose(1, 0, 2).tolist(), ranking.best.T.tolist(), ranking.scores.tolist()
    shown = focus.transpose(1, 0, 2).tolist()
    hits = []
    for pos, image_id in enumerate(ranking.image_ids.tolist()):
        record = snapshot.images.get(image_id)
        if record is None:
            continue
        regions = tuple(RegionMatch(label, level, tuple(box), score, tuple(own))  # type: ignore[arg-type]
                        for label, level, box, score, own in zip(labels, levels[pos], shown[pos], best[pos],
                                                                 boxes[pos]))
        hits.append(SearchHit(record.image_id, record.key, record.path, scores[pos], dict(record.metadata), regions,
                              record.width, record.height, record.relpath))
    return hits


def _fsync(fh: Any) -> None:
    fh.flush()
    os.fsync(fh.fileno())


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            _fsync(fh)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _discard_unpublished(directory: Path, staging: Path, version: str, *, shared: Mapping[Path, int]) -> None:
    """After a failed save: remove its staging folder, and its version unless ``CURRENT`` already names it;
    then cut the live version's ``shared`` append-only files back to their sizes (what the save appended)."""
    shutil.rmtree(staging, ignore_errors=True)
    if _pointer_or_none(directory) != version:
        shutil.rmtree(directory / version, ignore_errors=True)
        for path, size in shared.items():
            with contextlib.suppress(OSError):  # best effort: the next save cuts them back anyway
                if path.stat().st_size > size:
                    os.truncate(path, size)


def _remove_old_versions(directory: Path, *, keep: str) -> None:
    """Remove versions older than ``keep`` (the live one) and what killed saves left behind.

    Runs under the writer lock, so no staging directory can belong to a save in progress;
    a version newer than the live one (a save killed before swapping ``CURRENT``) is left
    to the next save, and anything not named like a version is never touched.
    """
    live = _version_stamp(keep)
    for entry in directory.iterdir():
        name = entry.name
        if entry.is_dir() and not entry.is_symlink():
            stamp = _version_stamp(name)
            if _STAGING_RE.match(name) or (stamp is not None and live is not None and stamp < live):
                shutil.rmtree(entry, ignore_errors=True)
        elif entry.is_file() and name.startswith((".CURRENT.", ".probe.")) and name.endswith(".tmp"):
            entry.unlink(missing_ok=True)


def _version_stamp(name: str) -> int | None:
    match = _VERSION_RE.match(name)
    return None if match is None else int(match.group(1))


def _read_vectors(path: Path, dim: int, *, dtype: str = "float32") -> np.ndarray:
    """The (n, dim) region vectors, memory-mapped read-only (pages are read as searches touch them)."""
    try:
        # allow_pickle=False: an object array (a pickle) is refused, never unpickled
        vectors = np.load(path, allow_pickle=False, mmap_mode="r")
    except ValueError as exc:
        if "Python objects" in str(exc):  # an object array: a pickle inside .npy
            exc = ValueError("it holds Python objects, which are never unpickled (allow_pickle=False)")
        raise IndexFormatError(f"{path}: unreadable vector file ({exc}); rebuild the index") from exc
    except (OSError, EOFError) as exc:
        raise IndexFormatError(f"{path}: unreadable vector file ({exc}); rebuild the index") from exc
    if not isinstance(vectors, np.ndarray):  # an .npz archive under the .npy name
        vectors.close()
        raise IndexFormatError(f"{path}: not a single .npy array; rebuild the index")
    if vectors.ndim != 2 or vectors.shape[1] != dim or vectors.dtype != np.dtype(dtype):
        raise IncompatibleIndexError(f"{path}: vectors {vectors.shape} {vectors.dtype}, manifest says (n, {dim}) {dtype}")
    if not _all_finite(vectors):
        raise IndexFormatError(f"{path}: holds NaN or infinite values; the index is damaged, rebuild it")
    return vectors


_FLOAT_BITS = {2: (np.uint16, 0x7FFF, 0x7C00), 4: (np.uint32, 0x7FFF_FFFF, 0x7F80_0000)}  # (as, |x| mask, inf)
_CHECK_BYTES = 32 << 20  # bytes of the bit-test temporary


def _all_finite(vectors: np.ndarray) -> bool:
    """Whether the (n, dim) ``vectors`` hold no NaN or infinity; checked in blocks of rows (no full-size temporary).

    Native float16 / float32 rows are tested on their bits: a value is NaN or infinite exactly when
    its magnitude bits reach those of infinity, and an integer AND + max runs at memory speed
    where ``np.isfinite`` on float16 is 7x slower (0.3 s instead of 2 s for 100k photos at 1+4+16).
    """
    n = len(vectors)
    bits = _FLOAT_BITS.get(vectors.dtype.itemsize) if vectors.dtype.kind == "f" and vectors.dtype.isnative else None
    if bits is None or n == 0 or vectors.ndim != 2:
        return all(np.isfinite(vectors[start : start + _CHECK_ROWS]).all() for start in range(0, n, _CHECK_ROWS))
    as_uint, magnitude, infinity = bits
    rows = max(1, min(_CHECK_ROWS, _CHECK_BYTES // max(vectors.dtype.itemsize * vectors.shape[1], 1)))
    scratch = np.empty((min(rows, n), vectors.shape[1]), as_uint)
    for start in range(0, n, rows):
        block = vectors[start : start + rows]
        if not block.flags.c_contiguous:
            if not np.isfinite(block).all():
                return False
            continue
        out = scratch[: len(block)]
        np.bitwise_and(block.view(as_uint), magnitude, out=out)
        if out.max() >= infinity:
            return False
    return True

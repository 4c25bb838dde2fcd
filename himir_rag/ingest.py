"""Preparing photos for an index: decode, cut into regions, attach metadata, encode the regions.

Regions are encoded as ``config.region_encoding`` says: ``"crops"`` cuts each region out and
embeds it on its own (:func:`encode_crops`); ``"roi"`` keeps the photo's working copy and asks
the encoder for all its regions in one pass (:func:`encode_views`, an encoder's optional
``embed_regions``).

One path for both builds: :meth:`HiMIRIndex.add <himir_rag.index.HiMIRIndex.add>` runs these
functions in-process and :mod:`himir_rag.distributed` runs them in Ray actors, so a photo is
cut, encoded and skipped (:func:`prepare_or_skip`, the one error policy) the same way in both.
Committing the results into a collection (ids, granularity pruning, the store) is the index's.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from himir_rag.catalog import ImageRecord
from himir_rag.config import HiMIRConfig
from himir_rag.encoders import Encoder, RegionEncoder
from himir_rag.encoders.base import cpu_threads
from himir_rag.errors import ConfigError, HiMIRError, ImageLoadError
from himir_rag.hierarchy import ImageDecomposer, Level, RegionTree, get_decomposer
from himir_rag.images import load_image
from himir_rag.threads import worker_count
from himir_rag.thumbnails import make_thumbnail

__all__ = ["PreparedPhoto", "MetadataSource", "MetadataLookup", "CROP_MAX_SIDE", "region_decomposer", "cut",
           "prepare_photo", "prepare_or_skip", "encode_crops", "encode_views", "encode_photos", "encode_workers",
           "view_boxes", "metadata_for", "checked_metadata", "crop_box", "area_keep", "granularity_keep"]

logger = logging.getLogger(__name__)

MetadataSource = Mapping[str, Mapping[str, Any]] | Callable[[Path], Mapping[str, Any]] | None
CROP_MAX_SIDE = 1024  # crops are cut from a copy at most this large: encoders see <= 260 px


@dataclass
class PreparedPhoto:
    """A photo decoded and decomposed, waiting for its regions to be encoded."""

    record: ImageRecord  # image_id 0 until the index commits it
    tree: RegionTree
    crops: list[Image.Image]  # one per region of ``tree`` ("crops"; empty for "roi" or once encoded elsewhere)
    replaces: int | None  # the id of the stored photo it updates, if any
    thumbnail: bytes | None = None  # JPEG, when the config keeps thumbnails
    view: Image.Image | None = None  # the working copy the regions are pooled from ("roi")


def region_decomposer(config: HiMIRConfig) -> ImageDecomposer:
    """The decomposer that cuts photos into ``config``'s layout of regions."""
    return get_decomposer(config.decomposer, config.layout, overlap=config.region_overlap,
                          work_size=config.segment_work_size)


def cut(image: Image.Image, decomposer: ImageDecomposer, *, min_region_frac: float,
        crops: bool = True) -> tuple[RegionTree, list[Image.Image], Image.Image]:
    """The photo's 1+M+N regions (tiny segments dropped), one crop per region (none with
    ``crops=False``) and the working copy (at most :data:`CROP_MAX_SIDE` a side) they were cut
    from; for indexing and photo queries."""
    tree = decomposer.decompose(image)
    tree = tree.select(area_keep(tree, min_region_frac))
    scale = min(1.0, CROP_MAX_SIDE / max(image.size))
    # max(1, ...): a 10000x3 strip must not shrink to a 0-px-high working copy
    work = image if scale == 1.0 else image.resize((max(1, round(image.width * scale)),
                                                    max(1, round(image.height * scale))))
    if not crops:
        return tree, [], work
    return tree, [work.crop(crop_box(box, image.size, work.size)) for box in tree.boxes], work


def prepare_photo(path: Path, replaces: int | None, metadata: MetadataSource, *, decomposer: ImageDecomposer,
                  config: HiMIRConfig) -> PreparedPhoto:
    """``path`` decoded, cut and described (size, mtime, metadata), with a thumbnail when configured.

    Raises
    ------
    ImageLoadError, OSError
        When the file cannot be decoded or read.
    ConfigError
        When its metadata is not a dict of JSON values.
    """
    image = load_image(path, max_pixels=config.max_image_pixels)
    stat = path.stat()
    user_meta = metadata_for(path, metadata)
    record = ImageRecord(0, str(path), image.width, image.height, stat.st_size, stat.st_mtime_ns, user_meta)
    roi = config.region_encoding == "roi"
    tree, crops, work = cut(image, decomposer, min_region_frac=config.min_region_frac, crops=not roi)
    thumbnail = make_thumbnail(work) if config.thumbnails else None
    return PreparedPhoto(record, tree, crops, replaces, thumbnail, view=work if roi else None)


def prepare_or_skip(path: Path, replaces: int | None, metadata: MetadataSource, *, decomposer: ImageDecomposer,
                    config: HiMIRConfig) -> PreparedPhoto | str:
    """:func:`prepare_photo`, or the reason to skip the file: the one error policy of every build.

    A file that cannot be decoded or read is skipped; any other :class:`HiMIRError` is the
    caller's mistake (e.g. metadata that is not JSON) and stops the run; an unexpected
    exception on one odd photo is logged with its traceback and the photo skipped, so a bug
    never loses the rest of the collection.
    """
    try:
        return prepare_photo(path, replaces, metadata, decomposer=decomposer, config=config)
    except ImageLoadError as exc:
        return str(exc).removeprefix(f"{path}: ")
    except OSError as exc:  # e.g. the file vanished between listing and reading
        return f"cannot read file ({exc.strerror or exc})"
    except HiMIRError:
        raise
    except Exception as exc:  # noqa: BLE001 - a bug on one odd image must not lose the collection
        logger.exception("unexpected error while preparing %s", path)
        return f"unexpected error ({type(exc).__name__}: {exc}); please report it"


def encode_workers(encoder: Encoder) -> int:
    """How many encoder calls an in-process build runs at once.

    An encoder whose ``concurrent_calls`` attribute is true (the offline encoder on CPU) runs
    one call per core that its torch threads leave free: with the default 1 thread a call,
    one per core (at most 8). Parallel calls on one thread each use the cores without the
    OpenMP pool's wake-ups and stalls: on 2 shared cores 6.4 photos/s against 3.4 for one
    call at a time (benchmarks/README.md, "Indexing throughput"). Else (GPU, CLIP, or
    ``OMP_NUM_THREADS`` set: torch's own pool then spreads each call) 1.
    """
    if not getattr(encoder, "concurrent_calls", False):
        return 1
    threads = cpu_threads(getattr(encoder, "threads", None))
    return 1 if threads is None else worker_count(threads)


def _in_order(work: Callable[[int], np.ndarray], starts: Sequence[int], workers: int) -> Iterator[np.ndarray]:
    """``work(start)`` for each of ``starts``, in order, ``workers`` calls at a time."""
    if workers <= 1 or len(starts) <= 1:
        yield from map(work, starts)
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="himir-encode") as pool:
        yield from pool.map(work, starts)


def encode_crops(crops: list[Image.Image], encoder: Encoder, *, batch_size: int,
                 on_batch: Callable[[int], None] | None = None, workers: int = 1) -> np.ndarray:
    """(len(crops), dim) vectors of the crops, in batches of ``batch_size``, ``workers`` batches
    at a time (:func:`encode_workers`); ``on_batch(n)`` after each batch, in order, with the
    number of crops encoded so far."""
    starts = range(0, len(crops), batch_size)
    parts = []
    for i, part in zip(starts, _in_order(lambda i: encoder.embed_images(crops[i : i + batch_size]), starts, workers)):
        parts.append(part)
        if on_batch is not None:
            on_batch(min(i + batch_size, len(crops)))
    return np.concatenate(parts)


def view_boxes(tree: RegionTree, view_size: tuple[int, int]) -> np.ndarray:
    """The tree's boxes on a working copy of ``view_size`` -> (n_regions, 4) int32, as the crops are cut."""
    size = (tree.width, tree.height)
    return np.array([crop_box(box, size, view_size) for box in tree.boxes], dtype=np.int32).reshape(-1, 4)


def encode_views(views: Sequence[Image.Image], trees: Sequence[RegionTree], encoder: Encoder) -> np.ndarray:
    """(sum of regions, dim) vectors of every tree's regions, pooled by the encoder from one pass
    over each working copy (``region_encoding="roi"``), photo by photo in order.

    Raises
    ------
    ConfigError
        When the encoder has no ``embed_regions`` (e.g. CLIP): it can only encode crops.
    """
    if not isinstance(encoder, RegionEncoder):
        raise ConfigError(f"encoder {getattr(encoder, 'name', encoder)!r} cannot encode all regions of a photo in "
                          "one pass (region_encoding 'roi' needs embed_regions); use --region-encoding crops")
    if not views:
        return np.zeros((0, encoder.dim), dtype=np.float32)
    return encoder.embed_regions(list(views), [view_boxes(tree, view.size) for view, tree in zip(views, trees)])


def encode_photos(photos: list[PreparedPhoto], encoder: Encoder, *, batch_size: int,
                  region_encoding: str = "crops", on_photos: Callable[[int], None] | None = None,
                  workers: int = 1) -> tuple[list[tuple[PreparedPhoto, np.ndarray]], list[tuple[str, str]]]:
    """The regions of ``photos`` encoded together: their crops in batches of ``batch_size``, or with
    ``region_encoding="roi"`` pooled from one pass over each photo's :attr:`PreparedPhoto.view`
    (``batch_size`` photos a call); ``workers`` calls at a time (:func:`encode_workers`).
    ``on_photos(n)`` says each time ``n`` more photos are encoded (a progress bar that moves
    photo by photo, not chunk by chunk).

    Returns
    -------
    encoded : list of (PreparedPhoto, (n_regions, dim) array)
        The photos whose vectors are all finite, in order.
    skipped : list of (path, reason)
        The others: NaN scores would follow them into every search.
    """
    if region_encoding == "roi":
        counts = [len(item.tree) for item in photos]
        parts, starts = [], range(0, len(photos), batch_size)

        def views_of(i: int) -> np.ndarray:
            group = photos[i : i + batch_size]
            return encode_views([item.view for item in group], [item.tree for item in group], encoder)

        for i, part in zip(starts, _in_order(views_of, starts, workers)):
            parts.append(part)
            if on_photos is not None:
                on_photos(min(batch_size, len(photos) - i))
        vectors = np.concatenate(parts) if parts else None
    else:
        crops = [crop for item in photos for crop in item.crops]
        counts = [len(item.crops) for item in photos]
        ends = np.cumsum(counts)
        done = [0]

        def photos_done(n_crops: int) -> None:
            finished = int(np.searchsorted(ends, n_crops, side="right"))
            if on_photos is not None and finished > done[0]:
                on_photos(finished - done[0])
                done[0] = finished

        vectors = (encode_crops(crops, encoder, batch_size=batch_size, on_batch=photos_done, workers=workers)
                   if crops else None)
    if not photos or vectors is None:
        return [], []
    bounds = np.cumsum([0] + counts)
    encoded, skipped = [], []
    for i, item in enumerate(photos):
        rows = vectors[bounds[i] : bounds[i + 1]]
        if np.isfinite(rows).all():
            encoded.append((item, rows))
        else:
            skipped.append((item.record.path, "the encoder returned NaN or infinite values"))
    return encoded, skipped


def metadata_for(path: Path, metadata: MetadataSource) -> dict[str, Any]:
    """The metadata ``metadata`` gives ``path``, checked (see :func:`checked_metadata`); {} for none."""
    if metadata is None:
        return {}
    found = metadata(path) if callable(metadata) else MetadataLookup(metadata, None, [(path, None)])(path)
    return checked_metadata(path, found)


def checked_metadata(path: Path, value: Any) -> dict[str, Any]:
    """``value`` as a dict of JSON data (None -> {}); anything else raises ConfigError."""
    if value is not None and not isinstance(value, Mapping):
        raise ConfigError(f"metadata of {path} is a {type(value).__name__}, not a dict of JSON values")
    value = dict(value or {})
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError, RecursionError) as exc:
        raise ConfigError(f"metadata of {path} is not JSON-serialisable ({exc}); use str/int/float/bool/list/dict "
                          "values (finite numbers)") from exc
    return value


def _normal(path: str | os.PathLike[str]) -> str:
    return os.path.normpath(os.path.abspath(path))


class MetadataLookup:
    """A ``{key: metadata}`` mapping as ``fn(path) -> metadata or None``, resolving key forms.

    A key may be an absolute path, a path relative to the working directory or to the
    indexed folder, or a bare file name that only one of the photos being indexed has.
    Keys used are remembered so :meth:`warn_unmatched` can list the others once.
    """

    def __init__(self, mapping: Mapping[str, Any], root: Path | None, paths: Sequence[tuple[Path, Any]]) -> None:
        self.mapping = mapping
        self.by_path: dict[str, str] = {}
        self.by_name: dict[str, str] = {}
        names: dict[str, int] = {}
        for path, _ in paths:
            names[path.name] = names.get(path.name, 0) + 1
        self.ambiguous: list[str] = []
        for key in mapping:
            text = os.fspath(key) if isinstance(key, (str, os.PathLike)) else None
            if text is None:
                continue
            self.by_path.setdefault(_normal(text), key)
            if root is not None and not os.path.isabs(text):
                self.by_path.setdefault(_normal(root / text), key)
            if os.sep not in text and "/" not in text:
                if names.get(text, 0) > 1:
                    self.ambiguous.append(text)
                else:
                    self.by_name[text] = key
        self.used: set[Any] = set()

    @classmethod
    def wrap(cls, metadata: MetadataSource, source: Any, paths: Sequence[tuple[Path, Any]]) -> MetadataSource:
        """Callables and None as they are; a mapping as a lookup relative to ``source``'s folder."""
        if metadata is None or callable(metadata):
            return metadata
        if isinstance(metadata, MetadataLookup):
            return metadata
        if not isinstance(metadata, Mapping):
            raise ConfigError(f"metadata must be a dict {{path: {{...}}}} or a callable path -> dict, got "
                              f"{type(metadata).__name__}")
        root = None
        if isinstance(source, (str, os.PathLike)):
            root = Path(source) if Path(source).is_dir() else Path(source).parent
        return cls(metadata, root, paths)

    def __call__(self, path: Path) -> Any:
        key = self.by_path.get(_normal(path))
        if key is None:
            key = self.by_name.get(Path(path).name)
        if key is None:
            return None
        self.used.add(key)
        return self.mapping[key]

    def warn_unmatched(self) -> None:
        """One warning listing the keys that matched no photo (ambiguous file names included)."""
        unmatched = [str(key) for key in self.mapping if key not in self.used]
        if unmatched:
            shown = ", ".join(repr(k) for k in unmatched[:10]) + (f" and {len(unmatched) - 10} more"
                                                                  if len(unmatched) > 10 else "")
            hint = f" ({len(self.ambiguous)} are file names shared by several photos)" if self.ambiguous else ""
            logger.warning("metadata for %d key(s) matched no indexed photo%s: %s; use absolute paths or paths "
                           "relative to the working directory or the indexed folder", len(unmatched), hint, shown)


def crop_box(box: Sequence[int], size: tuple[int, int], work_size: tuple[int, int]) -> tuple[int, int, int, int]:
    """``box`` (x0, y0, x1, y1) in original pixels -> the same box on the working copy, >= 1 px each side."""
    (width, height), (work_w, work_h) = size, work_size
    sx, sy = work_w / width, work_h / height
    x0 = min(int(math.floor(box[0] * sx)), work_w - 1)
    y0 = min(int(math.floor(box[1] * sy)), work_h - 1)
    x1 = min(max(int(math.ceil(box[2] * sx)), x0 + 1), work_w)
    y1 = min(max(int(math.ceil(box[3] * sy)), y0 + 1), work_h)
    return x0, y0, x1, y1


def area_keep(tree: RegionTree, min_frac: float) -> np.ndarray:
    """Keep every non-segment; keep segments whose area is at least ``min_frac`` of the image."""
    areas = (tree.boxes[:, 2] - tree.boxes[:, 0]) * (tree.boxes[:, 3] - tree.boxes[:, 1])
    return (tree.levels != Level.SEGMENT) | (areas >= min_frac * tree.width * tree.height)


def granularity_keep(tree: RegionTree, vectors: np.ndarray, prune_cosine: float) -> np.ndarray:
    """Offline granularity pruning: drop segments near-identical to their parent region."""
    keep = np.ones(len(tree), dtype=bool)
    if prune_cosine >= 1.0:
        return keep
    segments = np.flatnonzero(tree.levels == Level.SEGMENT)
    cosine = np.einsum("ij,ij->i", vectors[segments], vectors[tree.parents[segments]])
    keep[segments[cosine > prune_cosine]] = False
    return keep

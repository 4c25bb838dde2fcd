"""What the LlamaIndex and LangChain adapters share: one search call, one way to describe a hit.

Neither framework is imported here. Each adapter (:mod:`himir_rag.llama_index`,
:mod:`himir_rag.langchain`) validates its options once (:func:`search_options`), runs
:func:`timed_search` / :func:`atimed_search` over its own two steps -- :func:`subqueries`
(decomposition in the effective mode: none for a mode without sub-queries, the index's
``default_mode`` when none is given) and :func:`search` -- and turns every
:class:`~himir_rag.index.SearchHit` into its framework's type with :func:`photo_text`,
:func:`photo_id`, :func:`hit_metadata` and, for matched regions, :func:`region_crops`.

What identifies a photo's node / document (its id, text and hence LlamaIndex's ``hash``)
depends only on the photo, never on the query: fusing two retrievers
(``QueryFusionRetriever``, ``EnsembleRetriever``) then merges the same photo into one
entry. The per-query parts (score, sub-queries, matched regions, the query photo) are
metadata, rendered for the chat model by :func:`match_text`.

A query photo (``image=``) passes through :func:`decompose` (nothing to split when there
is no text) and :func:`search_kwargs` to ``index.search``. :func:`result_json` is the JSON
object of one search, printed by ``himir search --json`` and returned by ``himir serve``.

Metadata keys written by the adapters (they take precedence over user metadata with the
same name, which is logged once per key):

=================  ==========================================================================
``image_path``     the file to show: the photo, or its thumbnail when the photo is gone
                   (``image_source``); always decoded and re-encoded before it is sent
``image_source``   ``"original"`` or ``"thumbnail"``
``photo_path``     absolute path of the indexed photo
``image_key``      stable unique id of the photo (derived from its root-relative path)
``file_name``      base name of the photo
``mime_type``      of the image as sent: ``"image/jpeg"`` for JPEG files, else ``"image/png"``
``width``          width in pixels (displayed orientation)
``height``         height in pixels
``query``          the query that retrieved the photo (``""`` for a photo without text)
``query_image``    the query photo's name (its path, or ``"query image"`` for bytes / PIL
                   input); photo queries only
``score``          image score (mean over sub-queries of the best region similarity)
``subqueries``     the sub-queries matched
``regions``        one dict per sub-query: ``subquery``, ``level``, ``bbox`` ``[x0, y0, x1, y1]``,
                   ``similarity``
``search_stats``   ``mode``, ``dot_products``, ``images_scored``, ``latency_ms``, ``extra`` of the search
=================  ==========================================================================
"""

from __future__ import annotations

import base64
import logging
import mimetypes
import os
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from himir_rag.decompose import (
    DEFAULT_DECOMPOSE_PROMPT,
    LLMDecomposer,
    QueryDecomposer,
    RuleDecomposer,
    adecompose_query,
    decompose_query,
)
from himir_rag.filters import compile_filter
from himir_rag.images import encode_image, encode_image_file, encoded_mime_type, load_image
from himir_rag.index import HiMIRIndex, RegionMatch, SearchHit, SearchResult
from himir_rag.modes import RetrievalMode, mode_spec, parse_mode
from himir_rag.scheduler import SearchStats

__all__ = [
    "HIMIR_METADATA_KEYS",
    "IMAGE_MAX_SIDE",
    "resolve_index",
    "check_k",
    "check_mode",
    "SearchOptions",
    "search_options",
    "make_decomposer",
    "decompose",
    "adecompose",
    "subqueries",
    "asubqueries",
    "search",
    "asearch",
    "timed_search",
    "atimed_search",
    "record_decompose_latency",
    "search_kwargs",
    "RegionCrop",
    "region_crops",
    "ShownPhoto",
    "present_hits",
    "photo_id",
    "photo_text",
    "match_text",
    "hit_metadata",
    "region_dict",
    "stats_dict",
    "result_json",
    "image_mime_type",
    "image_to_base64",
    "file_to_base64",
]

logger = logging.getLogger(__name__)

HIMIR_METADATA_KEYS = ("image_path", "image_source", "photo_path", "image_key", "file_name", "mime_type", "width",
                       "height", "query", "query_image", "score", "subqueries", "regions", "search_stats")
IMAGE_MAX_SIDE = 1024  # longer side of photos sent to a chat model by default (downscaled, re-encoded)
DOC_ID_KEY = "doc_id"  # where HiMIRIndex.add keeps a framework document's id (himir_rag.documents)
_warned_collisions: set[str] = set()


def resolve_index(index: HiMIRIndex | str | os.PathLike[str], *, encoder: Any = None) -> HiMIRIndex:
    """An index object as given, or the index saved in a directory.

    Parameters
    ----------
    index : HiMIRIndex or path-like
        An index, or a directory written by :meth:`HiMIRIndex.save`.
    encoder : Encoder or str, optional
        Encoder for a directory (defaults to the one in its manifest); ignored for an object.

    Returns
    -------
    HiMIRIndex

    Raises
    ------
    TypeError
        If ``index`` is neither an index nor a path.
    IndexFormatError
        If the directory is not a readable index.
    """
    if isinstance(index, HiMIRIndex):
        return index
    if isinstance(index, (str, os.PathLike)):
        return HiMIRIndex.load(index, encoder=encoder)
    raise TypeError(f"index must be a HiMIRIndex or an index directory, got {type(index).__name__}; "
                    "build one with HiMIRIndex(...).add(...) or `himir index`")


def check_k(k: Any, *, name: str = "k") -> int:
    """``k`` as a positive int; bool, floats and values < 1 raise ValueError naming ``name``."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"{name} must be a positive integer, got {k!r}")
    return int(k)


def check_mode(mode: str | RetrievalMode | None) -> str | None:
    """The mode's value, or None (the index's default); unknown names raise ConfigError."""
    return None if mode is None else parse_mode(mode).value


@dataclass(frozen=True)
class SearchOptions:
    """What an adapter's search uses, validated once (:func:`search_options`).

    Attributes
    ----------
    k : int
        Photos returned.
    mode : str or None
        The mode's name; None keeps the index's ``default_mode``.
    filters : Any
        A :mod:`himir_rag.filters` filter (dict or callable) or None.
    """

    k: int
    mode: str | None = None
    filters: Any = None

    def override(self, *, k: Any = None, mode: Any = None, filters: Any = None) -> SearchOptions:
        """A copy with the options of one call (None keeps the adapter's own), validated."""
        return search_options(k=self.k if k is None else k, mode=self.mode if mode is None else mode,
                              filters=self.filters if filters is None else filters, name="k")


def search_options(*, k: Any, mode: Any = None, filters: Any = None, name: str = "k") -> SearchOptions:
    """:class:`SearchOptions` checked: ``k`` a positive int, a known mode, a well-formed filter.

    Raises
    ------
    ValueError
        If ``k`` is not a positive int (the message names ``name``).
    ConfigError
        If the mode is unknown or the filter malformed (before any model call).
    """
    compile_filter(filters)
    return SearchOptions(check_k(k, name=name), check_mode(mode), filters)


def effective_mode(index: HiMIRIndex, mode: str | None) -> str:
    """``mode``, or the index's ``config.default_mode`` when None (:meth:`HiMIRIndex.resolve_mode`)."""
    return index.resolve_mode(mode).value


def make_decomposer(llm: Any = None, decomposer: QueryDecomposer | None = None, *,
                    prompt: str | None = None) -> QueryDecomposer:
    """The decomposer an adapter uses: ``decomposer``, else an LLM one around ``llm``, else rules.

    Parameters
    ----------
    llm : Any, optional
        A LlamaIndex LLM, a LangChain chat model / Runnable, or a callable (see
        :class:`~himir_rag.decompose.LLMDecomposer`).
    decomposer : QueryDecomposer, optional
        Used as is; giving both ``llm`` and ``decomposer`` raises.
    prompt : str, optional
        Template for the LLM (``{query}``, ``{max_subqueries}``).

    Raises
    ------
    ValueError
        If both ``llm`` and ``decomposer`` are given.
    """
    if llm is not None and decomposer is not None:
        raise ValueError("pass either llm= (an LLM that splits the query) or decomposer=, not both")
    if decomposer is not None:
        return decomposer
    if llm is not None:
        return LLMDecomposer(llm, prompt=prompt or DEFAULT_DECOMPOSE_PROMPT)
    return RuleDecomposer()


def _check_query(query: Any, max_chars: int | None) -> str:
    if not isinstance(query, str) or not query.strip():
        raise ValueError("query is empty; pass a non-empty description of the photo to find")
    if max_chars is not None and len(query) > max_chars:
        raise ValueError(f"query is {len(query)} characters long, more than max_query_chars={max_chars}; "
                         "shorten it or raise HiMIRConfig.max_query_chars")
    return query


def _whole_query(mode: str | None) -> bool:
    """The mode matches the whole query as one vector: nothing to decompose (``single``)."""
    return mode is not None and not mode_spec(mode).subqueries


def _photo_only(query: Any, image: Any) -> bool:
    """A query photo and no text: there is nothing to decompose."""
    return image is not None and (query is None or (isinstance(query, str) and not query.strip()))


def decompose(decomposer: QueryDecomposer, query: str | None, *, mode: str | None = None,
              callbacks: Any = None, max_chars: int | None = None, image: Any = None) -> list[str]:
    """Sub-queries of ``query``; ``[query]`` without a model call for a mode without sub-queries (``single``).

    With a query photo (``image``) and no text, there is nothing to split: ``[]``.

    Raises
    ------
    ValueError
        If ``query`` is empty (and no ``image`` is given) or longer than ``max_chars``
        (checked before any model call).
    """
    if _photo_only(query, image):
        return []
    _check_query(query, max_chars)
    if _whole_query(mode):
        return [query]
    return decompose_query(decomposer, query, callbacks=callbacks)


async def adecompose(decomposer: QueryDecomposer, query: str | None, *, mode: str | None = None,
                     callbacks: Any = None, max_chars: int | None = None, image: Any = None) -> list[str]:
    """Async variant of :func:`decompose` (the decomposer's ``adecompose``)."""
    if _photo_only(query, image):
        return []
    _check_query(query, max_chars)
    if _whole_query(mode):
        return [query]
    return await adecompose_query(decomposer, query, callbacks=callbacks)


def subqueries(index: HiMIRIndex, decomposer: QueryDecomposer, query: str | None, *, mode: str | None,
               image: Any = None, callbacks: Any = None) -> list[str]:
    """What ``index.search`` matches for ``query``: :func:`decompose` in the effective mode (the
    index's default when ``mode`` is None), within the index's caps (``limit_subqueries``)."""
    return index.limit_subqueries(decompose(decomposer, query, mode=effective_mode(index, mode), callbacks=callbacks,
                                            max_chars=index.config.max_query_chars, image=image))


async def asubqueries(index: HiMIRIndex, decomposer: QueryDecomposer, query: str | None, *, mode: str | None,
                      image: Any = None, callbacks: Any = None) -> list[str]:
    """Async :func:`subqueries` (the decomposer's ``adecompose``)."""
    return index.limit_subqueries(await adecompose(decomposer, query, mode=effective_mode(index, mode),
                                                   callbacks=callbacks, max_chars=index.config.max_query_chars,
                                                   image=image))


def search(index: HiMIRIndex, query: str | None, subqueries: list[str], options: SearchOptions, *,
           image: Any = None, image_weight: float | None = None) -> SearchResult:
    """``index.search`` of already decomposed ``subqueries`` (and a query photo, if any) with ``options``."""
    return index.search(query, **search_kwargs(k=options.k, mode=options.mode, subqueries=subqueries,
                                               filters=options.filters, image=image, image_weight=image_weight))


async def asearch(index: HiMIRIndex, query: str | None, subqueries: list[str], options: SearchOptions, *,
                  image: Any = None, image_weight: float | None = None) -> SearchResult:
    """Async :func:`search` (in a worker thread: the event loop stays free)."""
    return await index.asearch(query, **search_kwargs(k=options.k, mode=options.mode, subqueries=subqueries,
                                                      filters=options.filters, image=image,
                                                      image_weight=image_weight))


def timed_search(decompose_step: Callable[[], list[str]],
                 search_step: Callable[[list[str]], SearchResult]) -> SearchResult:
    """Decompose, then search, with the decomposition's wall time in the result's stats.

    The adapters pass their own steps (their spans, callbacks and LLM runs wrap them).
    """
    started = time.perf_counter()
    found = decompose_step()
    decompose_ms = (time.perf_counter() - started) * 1000
    result = search_step(found)
    record_decompose_latency(result, decompose_ms)
    return result


async def atimed_search(decompose_step: Callable[[], Awaitable[list[str]]],
                        search_step: Callable[[list[str]], Awaitable[SearchResult]]) -> SearchResult:
    """Async :func:`timed_search`."""
    started = time.perf_counter()
    found = await decompose_step()
    decompose_ms = (time.perf_counter() - started) * 1000
    result = await search_step(found)
    record_decompose_latency(result, decompose_ms)
    return result


def record_decompose_latency(result: SearchResult, decompose_ms: float) -> None:
    """Put the adapter's decomposition time into the search's stats (``decompose``, ``total``).

    The adapters decompose before calling ``index.search`` with the sub-queries (so that
    decomposition gets its own span and its LLM its callbacks); the index then only sees
    the time of copying them.
    """
    latency = result.stats.latency_ms
    latency["total"] = latency.get("total", 0.0) - latency.get("decompose", 0.0) + decompose_ms
    latency["decompose"] = decompose_ms


def search_kwargs(*, k: int, mode: str | None, subqueries: list[str], filters: Any, image: Any = None,
                  image_weight: float | None = None) -> dict[str, Any]:
    """Keyword arguments of ``index.search``; ``mode=None`` keeps the index's default.

    ``image`` (a query photo: path, bytes or PIL image) and ``image_weight`` are passed
    only when given, so a text query calls ``search`` exactly as before.
    """
    kwargs: dict[str, Any] = {"k": k, "subqueries": subqueries, "filters": filters}
    if mode is not None:
        kwargs["mode"] = mode
    if image is not None:
        kwargs["image"] = image
        if image_weight is not None:
            kwargs["image_weight"] = image_weight
    return kwargs


@dataclass(frozen=True)
class ShownPhoto:
    """A hit that can be shown: the file to show (``image_path``) and whether it is the original or a thumbnail."""

    hit: SearchHit
    image_path: str
    image_source: str


def present_hits(index: HiMIRIndex, hits: Iterable[SearchHit]) -> list[ShownPhoto]:
    """The hits that can be shown, each with its file (see :meth:`HiMIRIndex.image_file`).

    A photo missing on disk, or whose real path has left the collection folder (a
    symlink, an edited catalog row), is replaced by its thumbnail when the index keeps
    them, else logged and left out.
    """
    shown = []
    for hit in hits:
        found = index.image_file(hit.image_id) if hit.image_id in index.snapshot.images else None
        if found is not None:
            shown.append(ShownPhoto(hit, str(found[0]), found[1]))
    return shown


@dataclass(frozen=True)
class RegionCrop:
    """A matched region of a photo, cut out: what an adapter wraps into a region node / document.

    Attributes
    ----------
    id : str
        ``"<photo id>#x0,y0,x1,y1"``.
    parent_id : str
        The photo's node / document id (:func:`photo_id`).
    text : str
        E.g. ``Region (0, 0, 320, 240) of photo "beach.jpg", matching "a dog" (0.910).``
    image_base64, mime_type : str
        The crop, PNG-encoded (downscaled), as base64.
    score : float
        Best similarity of the sub-queries that matched it.
    metadata : dict
        :func:`hit_metadata` of the photo with the crop's ``bbox``, size, score and regions.
    """

    id: str
    parent_id: str
    text: str
    image_base64: str
    mime_type: str
    score: float
    metadata: dict[str, Any]


def region_crops(index: HiMIRIndex, hit: SearchHit, result: SearchResult, *, max_side: int) -> list[RegionCrop]:
    """One :class:`RegionCrop` per box of ``hit``'s matched regions other than the whole photo.

    Sub-queries that matched the same box share one crop. Nothing is written to disk.

    Raises
    ------
    ImageLoadError
        If the photo can no longer be read.
    """
    by_box: dict[tuple[int, ...], list[RegionMatch]] = {}
    for region in hit.regions:
        if region.level != "global":
            by_box.setdefault(tuple(int(v) for v in region.bbox), []).append(region)
    if not by_box:
        return []
    photo = load_image(hit.path, max_pixels=index.config.max_image_pixels)
    return [_region_crop(hit, result, photo.crop(box), box, regions, max_side=max_side)
            for box, regions in by_box.items()]


def _region_crop(hit: SearchHit, result: SearchResult, crop: Image.Image, box: tuple[int, ...],
                 regions: list[RegionMatch], *, max_side: int) -> RegionCrop:
    data, mime = image_to_base64(crop, max_side=max_side)
    score = max(float(r.score) for r in regions)
    metadata = {**hit_metadata(hit, result), "mime_type": mime, "bbox": list(box), "width": crop.width,
                "height": crop.height, "score": score, "regions": [region_dict(r) for r in regions]}
    matched = ", ".join(f'"{r.subquery}" ({r.score:.3f})' for r in regions)
    text = f'{regions[0].level.capitalize()} {box} of photo "{metadata["file_name"]}", matching {matched}.'
    parent = photo_id(hit)
    return RegionCrop(f"{parent}#{','.join(str(v) for v in box)}", parent, text, data, mime, score, metadata)


def photo_id(hit: SearchHit) -> str:
    """The node / document id of a photo: the id of the document it was indexed from, else its key."""
    doc_id = hit.metadata.get(DOC_ID_KEY)
    return doc_id if isinstance(doc_id, str) and doc_id else hit.key


def photo_text(hit: SearchHit, *, with_metadata: bool = False) -> str:
    """A query-independent description of a photo: its path, size, and (``with_metadata``) its user metadata.

    The path is the root-relative one (the absolute one for photos outside the root), so
    two photos never share a text (LangChain's ``EnsembleRetriever`` merges by text) and
    the text does not change when the collection folder moves.

    Example
    -------
    ``Photo "trip/beach.jpg" (640x480).`` then, with metadata, one ``key: value`` line per entry.
    """
    lines = [f'Photo "{hit.relpath or hit.path}" ({hit.width}x{hit.height}).']
    if with_metadata:
        lines += [f"{key}: {value}" for key, value in hit.metadata.items() if key != DOC_ID_KEY]
    return "\n".join(lines)


def match_text(metadata: Mapping[str, Any]) -> str:
    """Why a photo matched, from its node's / document's metadata (``query``, ``query_image``, ``score``...).

    Example
    -------
    ``Matches "a dog on a beach" with score 0.812.`` (for a photo query:
    ``Matches the query photo "horse.jpg" with score 0.93.``)
    ``- "a dog": region (120, 40, 380, 300), similarity 0.910``
    """
    if "score" not in metadata:
        return ""
    words = _query_words(str(metadata.get("query", "")), metadata.get("query_image"))
    lines = [f"Matches {words} with score {float(metadata['score']):.3f}."]
    for region in metadata.get("regions") or []:
        match = RegionMatch(region["subquery"], region["level"], tuple(region["bbox"]), region["similarity"])
        lines.append(_region_line(match))
    return "\n".join(lines)


def _query_words(query: str, image: str | None) -> str:
    if image is None:
        return f'"{query}"'
    photo = f'the query photo "{Path(image).name}"'
    return f'"{query}" and {photo}' if query.strip() else photo


def _region_line(region: RegionMatch) -> str:
    where = "the whole photo" if region.level == "global" else f"{region.level} {tuple(region.bbox)}"
    return f'- "{region.subquery}": {where}, similarity {region.score:.3f}'


def region_dict(region: RegionMatch) -> dict[str, Any]:
    """A JSON-ready dict of one matched region."""
    out = {"subquery": region.subquery, "level": region.level, "bbox": [int(v) for v in region.bbox],
           "similarity": float(region.score)}
    if region.region_bbox is not None:
        out["region_bbox"] = [int(v) for v in region.region_bbox]
    return out


def stats_dict(stats: SearchStats) -> dict[str, Any]:
    """The JSON-ready cost of a search: mode, dot products, images scored, latencies (ms), extra counters."""
    return {"mode": stats.mode, "dot_products": int(stats.dot_products), "images_scored": int(stats.images_scored),
            "latency_ms": {name: round(float(ms), 3) for name, ms in stats.latency_ms.items()},
            "extra": _json_ready(stats.extra)}


def _json_ready(value: Any) -> Any:
    """``value`` with numpy scalars and tuples turned into plain JSON types (others as str)."""
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, (str, bool, int, float)) or value is None:
        return value
    if hasattr(value, "item"):  # numpy scalar
        return value.item()
    return str(value)


def _image_fields(index: HiMIRIndex | None, image_id: int) -> dict[str, Any]:
    """``image``: the file to show (the photo, or its thumbnail when it is gone or refused; null if neither),
    ``image_source`` and ``thumbnail`` (the saved thumbnail or null); nothing without an index."""
    if index is None or image_id not in index.snapshot.images:
        return {}
    shown = index.image_file(image_id)
    thumbnail = index.thumbnail_path(image_id)
    return {"image": None if shown is None else str(shown[0]), "image_source": None if shown is None else shown[1],
            "thumbnail": None if thumbnail is None else str(thumbnail)}


def result_json(result: SearchResult, query_id: Any = None, *, index: HiMIRIndex | None = None) -> dict[str, Any]:
    """The JSON object of one search, as ``himir search --json`` prints it and ``himir serve`` returns it.

    ``{"id"?, "query", "image"?, "subqueries", "results": [{"path", "image"?, "image_source"?,
    "thumbnail"?, "score", "image_id", "width", "height", "metadata", "regions": [{"subquery",
    "level", "bbox", "score"}]}], "stats": {"mode", "dot_products", "latency_ms",
    "latency_breakdown_ms", ...extra}}``; ``id`` only when ``query_id`` is given, the top-level
    ``image`` (the query photo) only for a photo query, and each result's ``image`` (the file
    to show: the photo, or its thumbnail when the photo is gone or refused; null if neither),
    ``image_source`` and ``thumbnail`` only when ``index`` is given.
    """
    payload: dict[str, Any] = {} if query_id is None else {"id": query_id}
    payload["query"] = result.query
    if result.image is not None:
        payload["image"] = result.image
    payload.update({
        "subqueries": list(result.subqueries),
        "results": [
            {"path": hit.path, **_image_fields(index, hit.image_id), "score": round(hit.score, 6),
             "image_id": hit.image_id, "width": int(hit.width), "height": int(hit.height), "metadata": hit.metadata,
             "regions": [{"subquery": m.subquery, "level": m.level, "bbox": list(m.bbox), "score": round(m.score, 6),
                          **({} if m.region_bbox is None else {"region_bbox": list(m.region_bbox)})}
                         for m in hit.regions]}
            for hit in result.hits
        ],
        "stats": {"mode": result.stats.mode, "dot_products": int(result.stats.dot_products),
                  "latency_ms": round(result.stats.latency_ms.get("total", 0.0), 3),
                  "latency_breakdown_ms": {k: round(v, 3) for k, v in result.stats.latency_ms.items()},
                  **_json_ready(result.stats.extra)},
    })
    return payload


def hit_metadata(hit: SearchHit, result: SearchResult, *, image_path: str | None = None,
                 image_source: str = "original") -> dict[str, Any]:
    """User metadata of ``hit`` plus the HiMIR keys (see module docstring); HiMIR keys win.

    ``image_path`` is the file to show (default: the photo itself); ``query_image`` is
    added only for a photo query.
    """
    shown = image_path or hit.path
    himir = {
        "image_path": shown, "image_source": image_source, "photo_path": hit.path, "image_key": hit.key,
        "file_name": Path(hit.path).name, "mime_type": encoded_mime_type(shown), "width": int(hit.width),
        "height": int(hit.height), "query": result.query, "score": float(hit.score),
        "subqueries": list(result.subqueries),
        "regions": [region_dict(r) for r in hit.regions], "search_stats": stats_dict(result.stats),
    }
    if result.image is not None:
        himir["query_image"] = result.image
    for key in himir.keys() & hit.metadata.keys():
        if key not in _warned_collisions:
            _warned_collisions.add(key)
            logger.warning("user metadata key %r is also a himir key; the himir value is returned", key)
    return {**hit.metadata, **himir}


def image_mime_type(path: str | os.PathLike[str]) -> str:
    """MIME type of an image file from its extension (``image/png`` when unknown)."""
    mime, _ = mimetypes.guess_type(str(path))
    return mime if mime and mime.startswith("image/") else "image/png"


def image_to_base64(image: Image.Image, *, max_side: int | None = None) -> tuple[str, str]:
    """PNG-encode ``image`` (downscaled so its longer side is at most ``max_side``).

    Returns
    -------
    tuple[str, str]
        ``(base64 text, "image/png")``.
    """
    data, mime = encode_image(image, max_side=max_side)
    return base64.b64encode(data).decode("ascii"), mime


def file_to_base64(path: str | os.PathLike[str], *, max_side: int | None = None,
                   max_pixels: int = 50_000_000) -> tuple[str, str]:
    """Base64 of a photo for a chat model: decoded, oriented, downscaled to ``max_side``, re-encoded.

    JPEG files are re-encoded as JPEG, everything else as PNG; the file's own bytes are
    never sent, so a path that does not hold an image raises instead of being shipped.

    Returns
    -------
    tuple[str, str]
        ``(base64 text, mime type)``.

    Raises
    ------
    ImageLoadError
        The file is missing, unreadable or not a decodable image.
    """
    data, mime = encode_image_file(path, max_side=max_side, max_pixels=max_pixels)
    return base64.b64encode(data).decode("ascii"), mime

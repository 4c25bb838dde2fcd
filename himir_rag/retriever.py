"""What the LlamaIndex and LangChain adapters share: one search call, one way to describe a hit.

Neither framework is imported here. Each adapter (:mod:`himir_rag.llama_index`,
:mod:`himir_rag.langchain`) calls :func:`decompose` / :func:`adecompose` and then
``index.search`` / ``index.asearch``, and turns every :class:`~himir_rag.index.SearchHit`
into its framework's type with :func:`hit_text` and :func:`hit_metadata`. A query photo
(``image=``) passes through :func:`decompose` (nothing to split when there is no text) and
:func:`search_kwargs` to ``index.search``. :func:`result_json` is the JSON object of one
search, printed by ``himir search --json`` and returned by ``himir serve``.

Metadata keys written by the adapters (they take precedence over user metadata with the
same name, which is logged once per key):

=================  ==========================================================================
``image_path``     absolute path of the photo
``image_key``      stable unique id of the photo (derived from its path)
``file_name``      base name of the photo
``mime_type``      e.g. ``"image/jpeg"``
``width``          width in pixels (displayed orientation)
``height``         height in pixels
``score``          image score (mean over sub-queries of the best region similarity)
``subqueries``     the sub-queries matched
``regions``        one dict per sub-query: ``subquery``, ``level``, ``bbox`` ``[x0, y0, x1, y1]``,
                   ``similarity``
``search_stats``   ``mode``, ``dot_products``, ``images_scored``, ``latency_ms``, ``extra`` of the search
=================  ==========================================================================
"""

from __future__ import annotations

import base64
import io
import logging
import mimetypes
import os
from collections.abc import Iterable
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
from himir_rag.index import HiMIRIndex, RegionMatch, SearchHit, SearchResult
from himir_rag.images import load_image
from himir_rag.scheduler import RetrievalMode, SearchStats, parse_mode

__all__ = [
    "HIMIR_METADATA_KEYS",
    "resolve_index",
    "check_k",
    "check_mode",
    "make_decomposer",
    "decompose",
    "adecompose",
    "record_decompose_latency",
    "search_kwargs",
    "present_hits",
    "hit_text",
    "hit_metadata",
    "region_dict",
    "stats_dict",
    "result_json",
    "image_mime_type",
    "image_to_base64",
    "file_to_base64",
]

logger = logging.getLogger(__name__)

HIMIR_METADATA_KEYS = ("image_path", "image_key", "file_name", "mime_type", "width", "height", "score",
                       "subqueries", "regions", "search_stats")
_WEB_MIME_TYPES = frozenset({"image/jpeg", "image/png", "image/webp", "image/gif"})
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


def _check_query(query: Any) -> str:
    if not isinstance(query, str) or not query.strip():
        raise ValueError("query is empty; pass a non-empty description of the photo to find")
    return query


def _is_single(mode: str | None) -> bool:
    return mode == RetrievalMode.SINGLE.value


def _photo_only(query: Any, image: Any) -> bool:
    """A query photo and no text: there is nothing to decompose."""
    return image is not None and (query is None or (isinstance(query, str) and not query.strip()))


def decompose(decomposer: QueryDecomposer, query: str | None, *, mode: str | None = None,
              callbacks: Any = None, image: Any = None) -> list[str]:
    """Sub-queries of ``query``; ``[query]`` without a model call in ``single`` mode.

    With a query photo (``image``) and no text, there is nothing to split: ``[]``.

    Raises
    ------
    ValueError
        If ``query`` is empty and no ``image`` is given.
    """
    if _photo_only(query, image):
        return []
    _check_query(query)
    if _is_single(mode):
        return [query]
    return decompose_query(decomposer, query, callbacks=callbacks)


async def adecompose(decomposer: QueryDecomposer, query: str | None, *, mode: str | None = None,
                     callbacks: Any = None, image: Any = None) -> list[str]:
    """Async variant of :func:`decompose` (the decomposer's ``adecompose``)."""
    if _photo_only(query, image):
        return []
    _check_query(query)
    if _is_single(mode):
        return [query]
    return await adecompose_query(decomposer, query, callbacks=callbacks)


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


def present_hits(hits: Iterable[SearchHit]) -> list[SearchHit]:
    """The hits whose photo still exists; the others are logged and left out.

    A photo moved or deleted after indexing cannot be shown to a generator (LlamaIndex's
    ``ImageBlock`` even refuses a missing path), so it is not returned.
    """
    kept = []
    for hit in hits:
        if os.path.isfile(hit.path):
            kept.append(hit)
        else:
            logger.warning("%s: indexed photo is missing on disk, left out of the results; "
                           "re-run `himir index` to update the index", hit.path)
    return kept


def hit_text(hit: SearchHit, query: str, *, image: str | None = None) -> str:
    """A short description of why ``hit`` matched ``query``: the photo, then one line per sub-query.

    ``image`` names the query photo of a photo query (``SearchResult.image``).

    Example
    -------
    ``Photo "beach.jpg" (640x480) matches "a dog on a beach" with score 0.812.``
    ``- "a dog": region (120, 40, 380, 300), similarity 0.910``
    """
    lines = [f'Photo "{Path(hit.path).name}" ({hit.width}x{hit.height}) matches {_query_words(query, image)} '
             f"with score {hit.score:.3f}."]
    lines += [_region_line(region) for region in hit.regions]
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
    return {"subquery": region.subquery, "level": region.level, "bbox": [int(v) for v in region.bbox],
            "similarity": float(region.score)}


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


def result_json(result: SearchResult, query_id: Any = None) -> dict[str, Any]:
    """The JSON object of one search, as ``himir search --json`` prints it and ``himir serve`` returns it.

    ``{"id"?, "query", "image"?, "subqueries", "results": [{"path", "score", "image_id",
    "width", "height", "metadata", "regions": [{"subquery", "level", "bbox", "score"}]}],
    "stats": {"mode", "dot_products", "latency_ms", "latency_breakdown_ms", ...extra}}``;
    ``id`` only when ``query_id`` is given, ``image`` only for a photo query.
    """
    payload: dict[str, Any] = {} if query_id is None else {"id": query_id}
    payload["query"] = result.query
    if result.image is not None:
        payload["image"] = result.image
    payload.update({
        "subqueries": list(result.subqueries),
        "results": [
            {"path": hit.path, "score": round(hit.score, 6), "image_id": hit.image_id, "width": int(hit.width),
             "height": int(hit.height), "metadata": hit.metadata,
             "regions": [{"subquery": m.subquery, "level": m.level, "bbox": list(m.bbox), "score": round(m.score, 6)}
                         for m in hit.regions]}
            for hit in result.hits
        ],
        "stats": {"mode": result.stats.mode, "dot_products": int(result.stats.dot_products),
                  "latency_ms": round(result.stats.latency_ms.get("total", 0.0), 3),
                  "latency_breakdown_ms": {k: round(v, 3) for k, v in result.stats.latency_ms.items()},
                  **_json_ready(result.stats.extra)},
    })
    return payload


def hit_metadata(hit: SearchHit, result: SearchResult) -> dict[str, Any]:
    """User metadata of ``hit`` plus the HiMIR keys (see module docstring); HiMIR keys win."""
    himir = {
        "image_path": hit.path, "image_key": hit.key, "file_name": Path(hit.path).name,
        "mime_type": image_mime_type(hit.path), "width": int(hit.width), "height": int(hit.height),
        "score": float(hit.score), "subqueries": list(result.subqueries),
        "regions": [region_dict(r) for r in hit.regions], "search_stats": stats_dict(result.stats),
    }
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
    if max_side is not None and max(image.size) > max_side:
        image = image.copy()
        image.thumbnail((max_side, max_side))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii"), "image/png"


def file_to_base64(path: str | os.PathLike[str], *, max_side: int | None = None,
                   max_pixels: int = 50_000_000) -> tuple[str, str]:
    """Base64 of a photo for a chat model: the file's bytes when they are web-ready, else a PNG.

    JPEG, PNG, WebP and GIF files no larger than ``max_side`` are sent as they are; other
    formats (TIFF, BMP...) and larger photos are decoded, oriented, downscaled and
    re-encoded as PNG.

    Returns
    -------
    tuple[str, str]
        ``(base64 text, mime type)``.

    Raises
    ------
    ImageLoadError
        If the photo must be re-encoded and cannot be read.
    """
    mime = image_mime_type(path)
    if mime in _WEB_MIME_TYPES and (max_side is None or _fits(path, max_side)):
        return base64.b64encode(Path(path).read_bytes()).decode("ascii"), mime
    return image_to_base64(load_image(path, max_pixels=max_pixels), max_side=max_side)


def _fits(path: str | os.PathLike[str], max_side: int) -> bool:
    try:
        with Image.open(path) as img:
            return max(img.size) <= max_side
    except (OSError, ValueError):
        return False

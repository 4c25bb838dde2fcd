"""LlamaIndex adapter: :class:`HiMIRRetriever`, a ``MultiModalRetriever`` returning image nodes.

Queries are text, a photo (``QueryBundle.image_path``, or ``image_to_image_retrieve(path)``)
or both; see ``HiMIRIndex.search`` for how a query photo is matched.

Each ranked photo becomes a ``NodeWithScore`` around an :class:`HiMIRImageNode` (an
``ImageNode``): ``image_path`` points at the photo (or its thumbnail), ``id_`` is the
photo's stable key (or the id of the document it was indexed from), ``text`` is a
query-independent description (file name, size), and ``metadata`` holds the user's
metadata plus the keys listed in :mod:`himir_rag.retriever` -- the per-query score,
sub-queries and matched regions among them. Id, text and ``hash`` depend only on the
photo, so ``QueryFusionRetriever`` merges one photo found by several retrievers.

How the photos reach the generator: with
``RetrieverQueryEngine.from_args(retriever, llm=chat_llm, multimodal=True)`` the response
synthesizer turns every node into a ``ChatMessage`` of
``node.get_content_blocks(MetadataMode.LLM)``. :class:`HiMIRImageNode` gives its metadata
text, its description, why it matched (from its metadata) and an ``ImageBlock`` holding the
photo decoded and re-encoded (never the file's raw bytes, never a path for the framework
to read), so the chat model receives, per photo, the user's metadata, why it matched, and
the image itself. Plain ``ImageNode`` drops the text, hence the subclass; it serialises as
an ``ImageNode``.

Install with ``pip install 'himir-rag[llama-index]'``.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from collections.abc import Callable, Mapping
from io import BytesIO
from typing import Any

try:
    import llama_index.core.instrumentation as instrument
    from llama_index.core.base.base_multi_modal_retriever import MultiModalRetriever
    from llama_index.core.base.llms.types import ImageBlock, TextBlock
    from llama_index.core.callbacks import CallbackManager
    from llama_index.core.image_retriever import BaseImageRetriever
    from llama_index.core.instrumentation.events import BaseEvent
    from llama_index.core.prompts import BasePromptTemplate, PromptTemplate
    from llama_index.core.prompts.mixin import PromptDictType
    from llama_index.core.schema import (
        ImageNode,
        MetadataMode,
        NodeRelationship,
        NodeWithScore,
        QueryBundle,
        RelatedNodeInfo,
    )
    from llama_index.core.vector_stores.types import FilterCondition, FilterOperator, MetadataFilter, MetadataFilters
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "himir_rag.llama_index needs llama-index-core; install it with: pip install 'himir-rag[llama-index]'"
    ) from exc

from himir_rag import retriever as shared
from himir_rag.decompose import DEFAULT_DECOMPOSE_PROMPT, LLMDecomposer, QueryDecomposer
from himir_rag.errors import ConfigError
from himir_rag.filters import compile_filter
from himir_rag.images import encode_image_file
from himir_rag.index import HiMIRIndex, SearchResult
from himir_rag.modes import RetrievalMode
from himir_rag.scheduler import SearchStats

__all__ = [
    "HiMIRRetriever",
    "HiMIRImageNode",
    "HiMIRStageEvent",
    "metadata_filters_to_callable",
    "metadata_filters_to_dict",
    "DEFAULT_SIMILARITY_TOP_K",
]

logger = logging.getLogger(__name__)
dispatcher = instrument.get_dispatcher(__name__)

DEFAULT_SIMILARITY_TOP_K = 4
PROMPT_KEY = "decompose_prompt"
# Kept out of the LLM's and the embedder's view: structured or local-only values. The LLM
# sees the user's metadata, the file name and the node text (the match description).
_HIDDEN_KEYS = [key for key in shared.HIMIR_METADATA_KEYS if key != "file_name"] + ["bbox", shared.DOC_ID_KEY]


class HiMIRImageNode(ImageNode):
    """An ``ImageNode`` whose content blocks include its text and why it matched, and a re-encoded image.

    ``ImageNode.get_content_blocks`` returns the metadata text and the image only (the
    file's raw bytes, read from ``image_path``); a multimodal synthesizer would then never
    see why the photo matched, and would ship whatever file the path names.
    """

    @property
    def hash(self) -> str:
        """Hash of the node's identity (id and text), the same for every query that finds the photo."""
        return hashlib.sha256(f"{self.id_}\n{self.text}".encode("utf-8", "surrogatepass")).hexdigest()

    def resolve_image(self) -> Any:
        """The image as PNG/JPEG bytes decoded and re-encoded from ``image_path`` (downscaled), or ``image``."""
        if self.image is None and self.image_path is not None:
            data, _ = encode_image_file(self.image_path, max_side=shared.IMAGE_MAX_SIDE)
            return BytesIO(data)
        return super().resolve_image()

    def get_content_blocks(self, metadata_mode: MetadataMode = MetadataMode.NONE) -> list[Any]:
        """Metadata text, the description, why it matched, then the re-encoded image.

        Raises
        ------
        ImageLoadError
            The file at ``image_path`` is no longer a decodable image.
        """
        blocks: list[Any] = list(self.get_metadata_content_blocks(metadata_mode))
        blocks += [TextBlock(text=text) for text in (self.text, shared.match_text(self.metadata)) if text]
        blocks.append(ImageBlock(image=self.resolve_image().read(), image_mimetype=self.image_mimetype))
        return blocks


class HiMIRStageEvent(BaseEvent):
    """One stage of a HiMIR search (``decompose``, ``encode``, ``search``...) and its wall time."""

    query: str
    stage: str
    latency_ms: float
    mode: str = ""
    dot_products: int = 0

    @classmethod
    def class_name(cls) -> str:
        """Class name."""
        return "HiMIRStageEvent"


_OPERATORS: dict[FilterOperator, str] = {
    FilterOperator.EQ: "$eq", FilterOperator.NE: "$ne", FilterOperator.GT: "$gt", FilterOperator.GTE: "$gte",
    FilterOperator.LT: "$lt", FilterOperator.LTE: "$lte", FilterOperator.IN: "$in", FilterOperator.NIN: "$nin",
    FilterOperator.CONTAINS: "$contains", FilterOperator.ANY: "$in", FilterOperator.ALL: "$all",
    FilterOperator.TEXT_MATCH: "$contains", FilterOperator.TEXT_MATCH_INSENSITIVE: "$icontains",
}


def metadata_filters_to_dict(filters: MetadataFilters) -> dict[str, Any]:
    """Translate LlamaIndex ``MetadataFilters`` into a :mod:`himir_rag.filters` dict.

    EQ, NE, GT, GTE, LT, LTE, IN, NIN, CONTAINS, ANY (any listed value: ``$in``), ALL,
    TEXT_MATCH (``$contains``), TEXT_MATCH_INSENSITIVE (``$icontains``) and IS_EMPTY
    (``$empty``); AND / OR / NOT conditions and nested ``MetadataFilters``. Keys may name
    the built-in fields ``file_name``, ``path``, ``width`` and ``height``.

    Raises
    ------
    ConfigError
        If an operator or condition is unknown.

    Example
    -------
    >>> from llama_index.core.vector_stores import MetadataFilter, MetadataFilters
    >>> metadata_filters_to_dict(MetadataFilters(filters=[MetadataFilter(key="year", value=2020, operator=">=")]))
    {'$and': [{'year': {'$gte': 2020}}]}
    """
    parts = [metadata_filters_to_dict(item) if isinstance(item, MetadataFilters) else _leaf(item)
             for item in filters.filters]
    condition = filters.condition or FilterCondition.AND
    if condition is FilterCondition.AND:
        return {"$and": parts}
    if condition is FilterCondition.OR:
        return {"$or": parts}
    if condition is FilterCondition.NOT:
        return {"$not": {"$or": parts}}
    raise ConfigError(f"filter condition {condition!r} is not supported; use and, or, not")


def _leaf(item: MetadataFilter) -> dict[str, Any]:
    if item.operator is FilterOperator.IS_EMPTY:
        return {item.key: {"$empty": True}}
    if item.operator not in _OPERATORS:
        raise ConfigError(f"filter operator {item.operator!r} on {item.key!r} is not supported; use one of "
                          f"{', '.join(op.value for op in _OPERATORS)}, is_empty")
    return {item.key: {_OPERATORS[item.operator]: item.value}}


def metadata_filters_to_callable(filters: MetadataFilters) -> Callable[[Mapping[str, Any]], bool]:
    """``MetadataFilters`` as a predicate over one photo's metadata (see :func:`metadata_filters_to_dict`).

    Raises
    ------
    ConfigError
        If an operator is unknown or a value does not suit its operator.

    Example
    -------
    >>> from llama_index.core.vector_stores import MetadataFilter, MetadataFilters
    >>> keep = metadata_filters_to_callable(MetadataFilters(filters=[
    ...     MetadataFilter(key="year", value=2020, operator=">=")]))
    >>> keep({"year": 2021}), keep({"year": 2019}), keep({})
    (True, False, False)
    """
    predicate = compile_filter(metadata_filters_to_dict(filters))
    return lambda metadata: bool(predicate(metadata))  # type: ignore[misc]


def _core_filters(filters: Any) -> Any:
    """What ``HiMIRIndex.search`` takes: MetadataFilters translated, dicts and callables as they are."""
    if isinstance(filters, MetadataFilters):
        filters = metadata_filters_to_dict(filters)
    elif not (filters is None or isinstance(filters, Mapping) or callable(filters)):
        raise TypeError(f"filters must be llama_index MetadataFilters, a dict or a callable, got "
                        f"{type(filters).__name__}")
    compile_filter(filters)  # a malformed filter fails when it is set, not at the first query
    return filters


def _template_text(prompt: str | BasePromptTemplate) -> str:
    """The template string of a prompt, checked for the decomposer's placeholders."""
    text = prompt.get_template() if isinstance(prompt, BasePromptTemplate) else prompt
    if not isinstance(text, str):
        raise TypeError(f"{PROMPT_KEY} must be a str or a PromptTemplate, got {type(prompt).__name__}")
    variables = set(PromptTemplate(text).template_vars)
    if "query" not in variables or not variables <= {"query", "max_subqueries"}:
        raise ConfigError(f"{PROMPT_KEY} must use {{query}} (and may use {{max_subqueries}}), found "
                          f"placeholders {sorted(variables)}; double literal braces as {{{{ }}}}")
    return text


class HiMIRRetriever(MultiModalRetriever):
    """LlamaIndex retriever over a :class:`~himir_rag.index.HiMIRIndex` of photos.

    ``retrieve`` takes text, or a ``QueryBundle`` whose ``image_path`` is a query photo
    (with or without ``query_str``: photo and text are then matched together). The
    ``MultiModalRetriever`` methods: ``text_to_image_retrieve`` (text only),
    ``image_to_image_retrieve`` (a photo path or bundle) and their async forms;
    ``text_retrieve`` returns ``[]``, as the index holds photos and no text nodes.

    Parameters
    ----------
    index : HiMIRIndex or path-like
        An index, or an index directory (loaded with :meth:`HiMIRIndex.load`).
    encoder : Encoder or str, optional
        Encoder used to load a directory (defaults to the one in its manifest).
    similarity_top_k : int, default 4
        Photos returned per query (clamped to the collection size).
    mode : str, optional
        ``"himir"``, ``"himir-full"``, ``"mvr"`` or ``"single"``; None keeps the index's
        default. ``single`` skips decomposition.
    filters : MetadataFilters, dict or callable, optional
        Only photos that pass are ranked: ``MetadataFilters`` (translated by
        :func:`metadata_filters_to_dict`), or a :mod:`himir_rag.filters` dict or callable;
        keys may be user metadata or the built-in ``file_name``, ``path``, ``width``, ``height``.
    llm : llama_index.core.llms.LLM, optional
        Splits queries into sub-queries (an :class:`~himir_rag.decompose.LLMDecomposer`,
        falling back to rules when the model fails). Without it, the offline rules split.
    decomposer : QueryDecomposer, optional
        Any decomposer instead of ``llm``.
    decompose_prompt : str or PromptTemplate, optional
        The LLM's prompt (``{query}``, ``{max_subqueries}``); also reachable as
        ``get_prompts()["decompose_prompt"]`` / ``update_prompts``.
    return_region_nodes : bool, default False
        Also return, after each photo, one node per matched region other than the whole
        photo: an :class:`HiMIRImageNode` holding the crop as a base64 PNG in ``image``
        (nothing is written to disk), ``id_`` ``"<photo key>#x0,y0,x1,y1"``, score the
        region's similarity and a ``PARENT`` relationship to the photo's node.
    region_max_side : int, default 512
        Longer side of region crops, in pixels (larger crops are downscaled).
    callback_manager : CallbackManager, optional
        LlamaIndex callbacks.

    Attributes
    ----------
    index : HiMIRIndex
    last_stats : SearchStats or None
        Cost of the latest search (decompose / encode / search latencies, dot products);
        with concurrent queries read ``node.metadata["search_stats"]`` instead.

    Raises
    ------
    ValueError
        If ``similarity_top_k`` is not a positive int, or both ``llm`` and ``decomposer``
        are given.
    ConfigError
        If ``mode``, a filter operator or the prompt is invalid.

    Example
    -------
    >>> retriever = HiMIRRetriever("my_index/", similarity_top_k=3)  # doctest: +SKIP
    >>> nodes = retriever.retrieve("a dog on a beach next to a red bicycle")  # doctest: +SKIP
    >>> nodes[0].node.image_path, nodes[0].score  # doctest: +SKIP
    """

    def __init__(self, index: HiMIRIndex | str | os.PathLike[str], *, encoder: Any = None,
                 similarity_top_k: int = DEFAULT_SIMILARITY_TOP_K, mode: str | RetrievalMode | None = None,
                 filters: MetadataFilters | Mapping[str, Any] | Callable[..., bool] | None = None,
                 llm: Any = None, decomposer: QueryDecomposer | None = None,
                 decompose_prompt: str | BasePromptTemplate | None = None, return_region_nodes: bool = False,
                 region_max_side: int = 512, callback_manager: CallbackManager | None = None,
                 verbose: bool = False) -> None:
        self.index = shared.resolve_index(index, encoder=encoder)
        options = shared.search_options(k=similarity_top_k, mode=mode, name="similarity_top_k")
        self.similarity_top_k, self.mode = options.k, options.mode
        self.filters = filters
        prompt = _template_text(decompose_prompt) if decompose_prompt is not None else None
        self._decomposer = shared.make_decomposer(llm, decomposer, prompt=prompt)
        self._decompose_prompt = prompt or DEFAULT_DECOMPOSE_PROMPT  # kept for a later llm-less round trip
        self.return_region_nodes = return_region_nodes
        self.region_max_side = shared.check_k(region_max_side, name="region_max_side")
        self.last_stats: SearchStats | None = None
        super().__init__(callback_manager=callback_manager, verbose=verbose)

    def __repr__(self) -> str:
        return (f"HiMIRRetriever(index={self.index!r}, similarity_top_k={self.similarity_top_k}, "
                f"mode={self.mode!r}, decomposer={self._decomposer!r})")

    @property
    def filters(self) -> Any:
        """The metadata filters as given (MetadataFilters, dict, callable or None); settable."""
        return self._filters

    @filters.setter
    def filters(self, filters: Any) -> None:
        self._core_filters = _core_filters(filters)
        self._filters = filters

    @property
    def _options(self) -> shared.SearchOptions:
        return shared.SearchOptions(self.similarity_top_k, self.mode, self._core_filters)

    @property
    def decomposer(self) -> QueryDecomposer:
        """The query decomposer in use."""
        return self._decomposer

    # -- prompt mixin -----------------------------------------------------------------------
    def _get_prompts(self) -> PromptDictType:
        """``{"decompose_prompt": PromptTemplate}``, the LLM's decomposition prompt."""
        prompt = getattr(self._decomposer, "prompt", None)  # LLMDecomposer.prompt is public and may change
        return {PROMPT_KEY: PromptTemplate(prompt if isinstance(prompt, str) else self._decompose_prompt)}

    def _update_prompts(self, prompts: PromptDictType) -> None:
        """Replace the decomposition prompt (a PromptTemplate or str); clears the LLM's cache."""
        if PROMPT_KEY not in prompts:
            return
        text = _template_text(prompts[PROMPT_KEY])
        self._decompose_prompt = text
        if isinstance(self._decomposer, LLMDecomposer):
            self._decomposer.prompt = text
            self._decomposer.cache_clear()  # answers cached under the old prompt must not be reused
        else:
            logger.info("decompose_prompt stored; it is used only with an LLM decomposer (llm=)")

    # -- retrieval --------------------------------------------------------------------------
    def _retrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        """Decompose, search (text, ``image_path`` or both), and build the nodes (blocking)."""
        query, image = query_bundle.query_str, query_bundle.image_path
        return self._finish(shared.timed_search(lambda: self._decompose(query, image),
                                                lambda subs: self._search(query, subs, image)))

    @dispatcher.span
    async def _aretrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        """Async retrieval: the LLM's async API, then the search and crops in worker threads."""
        query, image = query_bundle.query_str, query_bundle.image_path
        result = await shared.atimed_search(lambda: self._adecompose(query, image),
                                            lambda subs: self._asearch(query, subs, image))
        if self.return_region_nodes:
            return await asyncio.to_thread(self._finish, result)
        return self._finish(result)

    # -- MultiModalRetriever ----------------------------------------------------------------
    def text_retrieve(self, str_or_query_bundle: str | QueryBundle) -> list[NodeWithScore]:
        """Text nodes for a text query: none, the index holds photos only (``[]``)."""
        return []

    async def atext_retrieve(self, str_or_query_bundle: str | QueryBundle) -> list[NodeWithScore]:
        """Async :meth:`text_retrieve` (``[]``)."""
        return []

    def text_to_image_retrieve(self, str_or_query_bundle: str | QueryBundle) -> list[NodeWithScore]:
        """Photos for a text (a bundle's ``image_path``, if any, is not used)."""
        return BaseImageRetriever.text_to_image_retrieve(self, str_or_query_bundle)

    async def atext_to_image_retrieve(self, str_or_query_bundle: str | QueryBundle) -> list[NodeWithScore]:
        """Async :meth:`text_to_image_retrieve`."""
        return await BaseImageRetriever.atext_to_image_retrieve(self, str_or_query_bundle)

    def image_to_image_retrieve(self, str_or_query_bundle: str | QueryBundle) -> list[NodeWithScore]:
        """Photos like a query photo: its path, or a bundle's ``image_path`` (with its ``query_str`` when set)."""
        return BaseImageRetriever.image_to_image_retrieve(self, str_or_query_bundle)

    async def aimage_to_image_retrieve(self, str_or_query_bundle: str | QueryBundle) -> list[NodeWithScore]:
        """Async :meth:`image_to_image_retrieve`."""
        return await BaseImageRetriever.aimage_to_image_retrieve(self, str_or_query_bundle)

    def _text_to_image_retrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        return self.retrieve(QueryBundle(query_str=query_bundle.query_str))

    async def _atext_to_image_retrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        return await self.aretrieve(QueryBundle(query_str=query_bundle.query_str))

    def _image_to_image_retrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        return self.retrieve(_with_photo(query_bundle))

    async def _aimage_to_image_retrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        return await self.aretrieve(_with_photo(query_bundle))

    @dispatcher.span
    def _decompose(self, query: str, image: str | None = None) -> list[str]:
        """Sub-queries of ``query`` (span: decomposition, with the LLM call nested)."""
        return shared.subqueries(self.index, self._decomposer, query, mode=self.mode, image=image)

    @dispatcher.span
    async def _adecompose(self, query: str, image: str | None = None) -> list[str]:
        """Async variant of :meth:`_decompose` (``adecompose``: the LLM's ``acomplete``)."""
        return await shared.asubqueries(self.index, self._decomposer, query, mode=self.mode, image=image)

    @dispatcher.span
    def _search(self, query: str, subqueries: list[str], image: str | None = None) -> SearchResult:
        """Encode the sub-queries (and the query photo) and run the matching (span: encoding + scheduling)."""
        return shared.search(self.index, query, subqueries, self._options, image=image)

    @dispatcher.span
    async def _asearch(self, query: str, subqueries: list[str], image: str | None = None) -> SearchResult:
        """Async variant of :meth:`_search` (in a worker thread, the event loop stays free)."""
        return await shared.asearch(self.index, query, subqueries, self._options, image=image)

    def _finish(self, result: SearchResult) -> list[NodeWithScore]:
        self.last_stats = result.stats
        self._emit_stage_events(result)
        return self._build_nodes(result)

    def _emit_stage_events(self, result: SearchResult) -> None:
        stats = result.stats
        for stage, latency in stats.latency_ms.items():
            if stage != "total":
                dispatcher.event(HiMIRStageEvent(query=result.query, stage=stage, latency_ms=float(latency),
                                                 mode=stats.mode, dot_products=int(stats.dot_products)))

    @dispatcher.span
    def _build_nodes(self, result: SearchResult) -> list[NodeWithScore]:
        """One node per photo, each followed by its region nodes when asked (span: crops)."""
        nodes: list[NodeWithScore] = []
        for shown in shared.present_hits(self.index, result.hits):
            nodes.append(NodeWithScore(node=_photo_node(shown, result), score=float(shown.hit.score)))
            if self.return_region_nodes and shown.image_source == "original":
                nodes.extend(NodeWithScore(node=_region_node(crop), score=crop.score) for crop in
                             shared.region_crops(self.index, shown.hit, result, max_side=self.region_max_side))
        return nodes


def _with_photo(query_bundle: QueryBundle) -> QueryBundle:
    """``query_bundle`` checked to hold a query photo (``image_path``)."""
    if not query_bundle.image_path:
        raise ValueError("image_to_image_retrieve needs a query photo: pass its path, or a QueryBundle "
                         "with image_path set")
    return query_bundle


def _region_node(crop: shared.RegionCrop) -> HiMIRImageNode:
    """The node of one matched region: the crop in ``image``, a ``PARENT`` link to its photo's node."""
    return HiMIRImageNode(id_=crop.id, text=crop.text, image=crop.image_base64, image_mimetype=crop.mime_type,
                          metadata=crop.metadata, excluded_llm_metadata_keys=list(_HIDDEN_KEYS),
                          excluded_embed_metadata_keys=list(_HIDDEN_KEYS),
                          relationships={NodeRelationship.PARENT: RelatedNodeInfo(node_id=crop.parent_id)})


def _photo_node(shown: shared.ShownPhoto, result: SearchResult) -> HiMIRImageNode:
    """The node of one ranked photo (its original, or its thumbnail when the original is gone)."""
    hit = shown.hit
    metadata = shared.hit_metadata(hit, result, image_path=shown.image_path, image_source=shown.image_source)
    return HiMIRImageNode(id_=shared.photo_id(hit), text=shared.photo_text(hit), image_path=shown.image_path,
                          image_mimetype=metadata["mime_type"], metadata=metadata,
                          excluded_llm_metadata_keys=list(_HIDDEN_KEYS),
                          excluded_embed_metadata_keys=list(_HIDDEN_KEYS))

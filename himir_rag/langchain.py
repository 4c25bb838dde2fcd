"""LangChain adapter: :class:`HiMIRRetriever`, a ``BaseRetriever`` returning photo documents.

Each ranked photo becomes a ``Document``: ``page_content`` is a query-independent
description (file name, size, user metadata), ``metadata`` holds the user's metadata plus
the keys listed in :mod:`himir_rag.retriever` (``image_path``, ``mime_type``, and the
per-query ``score``, ``subqueries``, ``regions``...), and ``id`` is the photo's stable key
(or the id of the document it was indexed from). Id and content depend only on the photo,
so ``EnsembleRetriever`` merges one photo found by several retrievers without ``id_key``.

:func:`documents_to_content_blocks`, :func:`format_images` and :func:`image_prompt` turn
retrieved documents into a multimodal ``HumanMessage`` (langchain-core 1.x standard
content blocks) for a chat model::

    chain = {"context": retriever, "question": RunnablePassthrough()} | image_prompt() | chat_model

:class:`HiMIRImageRetriever` queries by photo: its input is the path of a query photo
(``HiMIRImageRetriever(index=..., text="on a beach")`` adds text to every photo).

Install with ``pip install 'himir-rag[langchain]'``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

try:
    from langchain_core.callbacks import AsyncCallbackManagerForRetrieverRun, CallbackManagerForRetrieverRun
    from langchain_core.documents import Document
    from langchain_core.messages import HumanMessage
    from langchain_core.retrievers import BaseRetriever
    from langchain_core.runnables import Runnable, RunnableLambda
    from pydantic import ConfigDict, PrivateAttr, model_validator
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "himir_rag.langchain needs langchain-core; install it with: pip install 'himir-rag[langchain]'"
    ) from exc

from himir_rag import retriever as shared
from himir_rag.decompose import QueryDecomposer
from himir_rag.index import SearchResult

__all__ = [
    "HiMIRRetriever",
    "HiMIRImageRetriever",
    "documents_to_content_blocks",
    "format_images",
    "image_prompt",
    "DEFAULT_IMAGE_INSTRUCTION",
]

logger = logging.getLogger(__name__)

ImageMode = Literal["base64", "path"]
DEFAULT_IMAGE_INSTRUCTION = (
    "Answer the question using the photos below; each photo follows the text that says why it "
    "was retrieved.\nQuestion: {question}"
)
_CALL_OPTIONS = ("k", "filter", "mode")
_IGNORED_OPTIONS = ("verbose",)  # read but not removed by BaseRetriever.invoke


class HiMIRRetriever(BaseRetriever):
    """LangChain retriever over a :class:`~himir_rag.index.HiMIRIndex` of photos.

    Parameters
    ----------
    index : HiMIRIndex or path-like
        An index, or an index directory (loaded with :meth:`HiMIRIndex.load`).
    encoder : Encoder or str, optional
        Encoder used to load a directory (defaults to the one in its manifest).
    k : int, default 4
        Photos returned per query (clamped to the collection size); ``invoke(q, k=2)``
        overrides it for one call.
    mode : str, optional
        ``"himir"``, ``"himir-full"``, ``"mvr"`` or ``"single"``; None keeps the index's
        default. ``invoke(q, mode=...)`` overrides it.
    filter : dict or callable, optional
        A :mod:`himir_rag.filters` filter: ``{key: value or [allowed values]}``, Chroma-style
        operators (``{"year": {"$gte": 2021}}``, ``$in``, ``$ne``, ``$and``, ``$or``...) or
        ``fn(view) -> bool``, over the user metadata and the built-in fields ``file_name``,
        ``path``, ``width``, ``height``; ``invoke(q, filter=...)`` replaces it for one call.
    llm : chat model, LLM or Runnable, optional
        Splits queries into sub-queries (an :class:`~himir_rag.decompose.LLMDecomposer`
        falling back to rules); it runs as a child of the retriever's run, so callbacks
        and traces nest. Without it, the offline rules split.
    decomposer : QueryDecomposer, optional
        Any decomposer instead of ``llm``.
    decompose_prompt : str, optional
        The LLM's prompt template (``{query}``, ``{max_subqueries}``).

    Raises
    ------
    ValueError
        If ``k`` is not a positive int, or both ``llm`` and ``decomposer`` are given
        (pydantic reports it as a ``ValidationError``, a ``ValueError``).

    Example
    -------
    >>> retriever = HiMIRRetriever(index="my_index/", k=3)  # doctest: +SKIP
    >>> docs = retriever.invoke("a dog on a beach next to a red bicycle", k=2)  # doctest: +SKIP
    >>> docs[0].metadata["image_path"], docs[0].id  # doctest: +SKIP
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    index: Any
    encoder: Any = None
    k: int = 4
    mode: str | None = None
    filter: Mapping[str, Any] | Callable[[Mapping[str, Any]], bool] | None = None
    llm: Any = None
    decomposer: Any = None
    decompose_prompt: str | None = None

    _decomposer: QueryDecomposer = PrivateAttr()

    @model_validator(mode="after")
    def _setup(self) -> HiMIRRetriever:
        self.index = shared.resolve_index(self.index, encoder=self.encoder)
        options = shared.search_options(k=self.k, mode=self.mode, filters=self.filter)
        self.k, self.mode = options.k, options.mode
        self._decomposer = shared.make_decomposer(self.llm, self.decomposer, prompt=self.decompose_prompt)
        return self

    def _options(self, kwargs: dict[str, Any]) -> shared.SearchOptions:
        """The options of one call: its keyword arguments over the fields (checked before the LLM runs)."""
        unknown = set(kwargs) - set(_CALL_OPTIONS) - set(_IGNORED_OPTIONS)
        if unknown:
            raise TypeError(f"unexpected argument(s) {sorted(unknown)}; HiMIRRetriever.invoke takes "
                            f"{', '.join(_CALL_OPTIONS)}")
        own = shared.SearchOptions(self.k, self.mode, self.filter)
        return own.override(k=kwargs.get("k"), mode=kwargs.get("mode"), filters=kwargs.get("filter"))

    def _query_parts(self, query: str) -> tuple[str | None, str | None, float | None]:
        """``(text, query photo, image_weight)`` of the retriever's input: here the input is the text."""
        return query, None, None

    def _get_relevant_documents(self, query: str, *, run_manager: CallbackManagerForRetrieverRun,
                                **kwargs: Any) -> list[Document]:
        """Decompose (the LLM as a child run), search, and wrap the hits (blocking)."""
        options = self._options(kwargs)
        text, image, weight = self._query_parts(query)
        result = shared.timed_search(
            lambda: shared.subqueries(self.index, self._decomposer, text, mode=options.mode, image=image,
                                      callbacks=run_manager.get_child()),
            lambda subs: shared.search(self.index, text, subs, options, image=image, image_weight=weight))
        return _documents(self.index, result)

    async def _aget_relevant_documents(self, query: str, *, run_manager: AsyncCallbackManagerForRetrieverRun,
                                       **kwargs: Any) -> list[Document]:
        """Async variant: the LLM's ``ainvoke``, then the search in a worker thread."""
        options = self._options(kwargs)
        text, image, weight = self._query_parts(query)
        result = await shared.atimed_search(
            lambda: shared.asubqueries(self.index, self._decomposer, text, mode=options.mode, image=image,
                                       callbacks=run_manager.get_child()),
            lambda subs: shared.asearch(self.index, text, subs, options, image=image, image_weight=weight))
        return _documents(self.index, result)


class HiMIRImageRetriever(HiMIRRetriever):
    """Query by photo: a :class:`HiMIRRetriever` whose input is the path of a query photo.

    The photo is cut and matched region to region (see ``HiMIRIndex.search``); the
    fields and call options (``k``, ``filter``, ``mode``) are those of
    :class:`HiMIRRetriever`.

    Parameters
    ----------
    text : str, optional
        Text matched together with every query photo (decomposed into sub-queries).
    image_weight : float, default 0.5
        Share of the score the photo carries when ``text`` is given.

    Raises
    ------
    ImageLoadError
        (at ``invoke``) If the photo cannot be read (a ``ValueError``).

    Example
    -------
    >>> by_photo = HiMIRImageRetriever(index="my_index/", k=3)  # doctest: +SKIP
    >>> by_photo.invoke("query.jpg")[0].metadata["image_path"]  # doctest: +SKIP
    >>> chain = by_photo | (lambda docs: [d.metadata["file_name"] for d in docs])  # doctest: +SKIP
    """

    text: str | None = None
    image_weight: float = 0.5

    def _query_parts(self, query: str) -> tuple[str | None, str | None, float | None]:
        """``(text, photo path, image_weight)``: the input is the photo's path."""
        if not isinstance(query, str) or not query.strip():
            raise ValueError("the input of HiMIRImageRetriever is the path of a query photo; got an empty string")
        return self.text, query, self.image_weight


def _documents(index: Any, result: SearchResult) -> list[Document]:
    return [Document(page_content=shared.photo_text(shown.hit, with_metadata=True), id=shared.photo_id(shown.hit),
                     metadata=shared.hit_metadata(shown.hit, result, image_path=shown.image_path,
                                                  image_source=shown.image_source))
            for shown in shared.present_hits(index, result.hits)]


def _image_block(document: Document, *, mode: ImageMode, max_side: int | None) -> dict[str, Any]:
    path = document.metadata.get("image_path")
    if not path:
        raise ValueError(f"document {document.id!r} has no 'image_path' metadata; pass documents "
                         "returned by himir_rag.langchain.HiMIRRetriever")
    if mode == "path":
        return {"type": "image", "url": Path(path).absolute().as_uri(),
                "mime_type": shared.image_mime_type(path)}
    if mode == "base64":
        data, mime = shared.file_to_base64(path, max_side=max_side)
        return {"type": "image", "base64": data, "mime_type": mime}
    raise ValueError(f"mode must be 'base64' or 'path', got {mode!r}")


def documents_to_content_blocks(documents: Sequence[Document], *, mode: ImageMode = "base64",
                                max_side: int | None = 1024, include_text: bool = True) -> list[dict[str, Any]]:
    """Standard (langchain-core 1.x) content blocks for retrieved photos: text, image, text, image...

    Parameters
    ----------
    documents : list of Document
        Documents from :class:`HiMIRRetriever` (they need ``image_path`` metadata).
    mode : {"base64", "path"}
        ``"base64"``: ``{"type": "image", "base64": ..., "mime_type": ...}`` with the
        photo decoded, downscaled to ``max_side`` and re-encoded (JPEG for JPEG files,
        else PNG; never the file's raw bytes); works with every multimodal chat model.
        ``"path"``: ``{"type": "image", "url": "file:///..."}``, no bytes read; only for
        models or tools that open local files.
    max_side : int or None, default 1024
        Longer side, in pixels, above which a photo is downscaled (base64 mode).
    include_text : bool, default True
        Put each document's ``page_content`` and why it matched (from its metadata:
        query, score, regions) before its image.

    Returns
    -------
    list of dict
        ``2 * len(documents)`` blocks (``len(documents)`` without text).

    Raises
    ------
    ValueError
        If a document has no ``image_path`` or ``mode`` is unknown.
    ImageLoadError
        If a photo cannot be decoded (base64 mode): missing, or not an image.

    Example
    -------
    >>> HumanMessage(content=documents_to_content_blocks(docs))  # doctest: +SKIP
    """
    blocks: list[dict[str, Any]] = []
    for document in documents:
        if include_text:
            text = "\n".join(part for part in (document.page_content, shared.match_text(document.metadata)) if part)
            blocks.append({"type": "text", "text": text})
        blocks.append(_image_block(document, mode=mode, max_side=max_side))
    return blocks


def format_images(documents: Sequence[Document], question: str | None = None, *, mode: ImageMode = "base64",
                  max_side: int | None = 1024, instruction: str = DEFAULT_IMAGE_INSTRUCTION) -> list[HumanMessage]:
    """One ``HumanMessage`` holding the question and the retrieved photos, ready for a chat model.

    Parameters
    ----------
    documents : list of Document
        Documents from :class:`HiMIRRetriever`.
    question : str, optional
        Put first, through ``instruction`` (``{question}`` placeholder); omitted when None.
    mode, max_side
        See :func:`documents_to_content_blocks`.
    instruction : str
        Template of the leading text block.

    Returns
    -------
    list of HumanMessage
        ``[HumanMessage(content=[text, (text, image) per photo])]``, a valid chat-model input.
    """
    blocks = documents_to_content_blocks(documents, mode=mode, max_side=max_side)
    if question is not None:
        blocks.insert(0, {"type": "text", "text": instruction.format(question=question)})
    return [HumanMessage(content=blocks)]


def image_prompt(*, mode: ImageMode = "base64", max_side: int | None = 1024,
                 instruction: str = DEFAULT_IMAGE_INSTRUCTION) -> Runnable[dict[str, Any], list[HumanMessage]]:
    """A runnable from ``{"context": documents, "question": str}`` to :func:`format_images`'s message.

    Example
    -------
    >>> inputs = {"context": retriever, "question": RunnablePassthrough()}  # doctest: +SKIP
    >>> chain = inputs | image_prompt() | chat_model  # doctest: +SKIP
    """

    def _format(inputs: dict[str, Any]) -> list[HumanMessage]:
        if "context" not in inputs:
            raise KeyError(f"image_prompt expects {{'context': documents, 'question': str}}, got keys {sorted(inputs)}")
        return format_images(inputs["context"], inputs.get("question"), mode=mode, max_side=max_side,
                             instruction=instruction)

    return RunnableLambda(_format, name="himir_image_prompt")


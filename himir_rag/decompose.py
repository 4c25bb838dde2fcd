"""Query decomposition: split a question into the visual sub-queries an image must match.

HiMIR scores an image by the best-matching region of *every* sub-query (late
interaction), so the split decides accuracy: "a dog on a beach next to a red bicycle"
should become ``["a dog", "a beach", "a red bicycle"]``.

Three decomposers share the :class:`QueryDecomposer` protocol:

- :class:`RuleDecomposer` — offline, no model: regular expressions split on
  conjunctions, punctuation and relations of place, and strip request filler.
- :class:`LLMDecomposer` — one prompt to a LlamaIndex ``LLM``, a LangChain chat model,
  LLM or any ``Runnable``; falls back to :class:`RuleDecomposer` when the model fails,
  times out or answers nothing usable.
- :class:`IdentityDecomposer` — ``[query]`` unchanged, the single-query baseline.

:class:`CachedDecomposer` wraps any of them in a thread-safe LRU cache, and
:func:`get_decomposer` builds one by name (for the CLI).

Plugging a model from Python
----------------------------
LlamaIndex (``pip install llama-index-llms-ollama`` or ``llama-index-llms-openai``)::

    from llama_index.llms.ollama import Ollama
    from himir_rag.decompose import LLMDecomposer

    decomposer = LLMDecomposer(Ollama(model="llama3.2", request_timeout=60.0))
    # or: from llama_index.llms.openai import OpenAI; LLMDecomposer(OpenAI(model="gpt-4o-mini"))

LangChain (``pip install langchain-ollama`` or ``langchain-openai``)::

    from langchain_ollama import ChatOllama
    from himir_rag.decompose import LLMDecomposer

    decomposer = LLMDecomposer(ChatOllama(model="llama3.2", temperature=0))
    # or: from langchain_openai import ChatOpenAI; LLMDecomposer(ChatOpenAI(model="gpt-4o-mini"))
    decomposer.decompose("a dog on a beach next to a red bicycle")

From the CLI, set ``HIMIR_LLM=ollama:llama3.2`` (or ``openai:gpt-4o-mini``) and pick the
``llm`` decomposer; :func:`get_decomposer` builds the LangChain chat model.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import json
import logging
import os
import re
import unicodedata
import threading
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeoutError
from typing import Any, Protocol, runtime_checkable

from himir_rag.errors import ConfigError

__all__ = [
    "DEFAULT_DECOMPOSE_PROMPT",
    "DECOMPOSER_NAMES",
    "QueryDecomposer",
    "RuleDecomposer",
    "LLMDecomposer",
    "IdentityDecomposer",
    "CachedDecomposer",
    "parse_subqueries",
    "MAX_SUBQUERY_CHARS",
    "MAX_ANSWER_CHARS",
    "MAX_JSON_DEPTH",
    "get_decomposer",
    "decompose_query",
    "adecompose_query",
]

logger = logging.getLogger(__name__)

DEFAULT_MAX_SUBQUERIES = 5
DECOMPOSER_NAMES = ("rule", "llm", "none")

DEFAULT_DECOMPOSE_PROMPT = """\
You prepare an image search. A photo matches the request below only if it shows every \
visual element the request names.

Request: {query}

List the visual elements a matching photo must show: objects, people, animals, places \
or backgrounds. Write each one as a short noun phrase (1 to 5 words) that keeps its own \
attributes (colour, size, material, count, pose or action), e.g. "a red bicycle", \
"two small dogs", "a man riding a horse". Give the place or background its own phrase \
("a sandy beach"). Leave out words about the search or the photo itself ("show me", \
"a picture of"), words for relations ("next to", "on top of") and anything that cannot \
be seen. Do not repeat an element. Give at most {max_subqueries} phrases, the most \
distinctive first.

Answer with a JSON list of strings and nothing else.
Example: for "a dog on a beach next to a red bicycle" answer \
["a dog", "a beach", "a red bicycle"]
"""


@runtime_checkable
class QueryDecomposer(Protocol):
    """Anything that splits a query into sub-queries, synchronously and asynchronously.

    Implementations may accept a keyword-only ``callbacks`` argument (LangChain
    callbacks); use :func:`decompose_query` to pass it only where it is accepted.
    """

    def decompose(self, query: str) -> list[str]:
        """Return the sub-queries of ``query`` (at least one)."""
        ...

    async def adecompose(self, query: str) -> list[str]:
        """Async variant of :meth:`decompose`."""
        ...


# --------------------------------------------------------------------------- helpers


def _validate_query(query: str) -> str:
    """Return ``query`` with whitespace collapsed, or raise if there is nothing left."""
    if not isinstance(query, str):
        raise TypeError(f"query must be a str, got {type(query).__name__}")
    text = " ".join(query.split())
    if not text:
        raise ValueError(
            "query is empty; pass a non-empty description of the image to find, "
            "e.g. 'a dog on a beach next to a red bicycle'"
        )
    return text


def _validate_max_subqueries(max_subqueries: int) -> int:
    """Check that ``max_subqueries`` is a positive int."""
    if isinstance(max_subqueries, bool) or not isinstance(max_subqueries, int):
        raise ConfigError(f"max_subqueries must be an int, got {max_subqueries!r}")
    if max_subqueries < 1:
        raise ConfigError(f"max_subqueries must be >= 1, got {max_subqueries}; use 1 or more")
    return max_subqueries


def _dedup_key(subquery: str) -> str:
    """Key under which two sub-queries count as the same ("A dog" == "the dog")."""
    words = subquery.casefold().split()
    if len(words) > 1 and words[0] in {"a", "an", "the"}:
        words = words[1:]
    return " ".join(words)


def _dedup(subqueries: list[str], *, max_subqueries: int) -> list[str]:
    """Drop empties and case-insensitive duplicates, keep order, cap the count."""
    seen: set[str] = set()
    kept: list[str] = []
    for subquery in subqueries:
        key = _dedup_key(subquery)
        if key and key not in seen:
            seen.add(key)
            kept.append(subquery)
    return kept[:max_subqueries]


def _with_full_query(subqueries: list[str], query: str, include: bool) -> list[str]:
    """Append ``query`` as a last sub-query when asked and not already present.

    The full query is appended after the cap, so the result may hold
    ``max_subqueries + 1`` items: the cap bounds the split, not the extra view.
    """
    if not include:
        return list(subqueries)
    if any(s.casefold() == query.casefold() for s in subqueries):
        return list(subqueries)
    return [*subqueries, query]


class _LRUCache:
    """A small thread-safe LRU map; ``maxsize=0`` stores nothing."""

    def __init__(self, maxsize: int) -> None:
        if isinstance(maxsize, bool) or not isinstance(maxsize, int) or maxsize < 0:
            raise ConfigError(f"cache size must be an int >= 0 (0 disables), got {maxsize!r}")
        self.maxsize = maxsize
        self._data: OrderedDict[Hashable, tuple[str, ...]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> list[str] | None:
        """Return a copy of the cached value, or None, and mark it recently used."""
        with self._lock:
            value = self._data.get(key)
            if value is None:
                return None
            self._data.move_to_end(key)
            return list(value)

    def put(self, key: Hashable, value: list[str]) -> None:
        """Store ``value`` (as an immutable tuple), evicting the least recently used."""
        if self.maxsize == 0:
            return
        with self._lock:
            self._data[key] = tuple(value)
            self._data.move_to_end(key)
            while len(self._data) > self.maxsize:
                self._data.popitem(last=False)

    def clear(self) -> None:
        """Forget every entry."""
        with self._lock:
            self._data.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._data)


def _cache_key(query: str, max_subqueries: int | None) -> tuple[str, int | None]:
    """Cache key: the query with whitespace collapsed and case folded, plus the cap."""
    return " ".join(query.split()).casefold(), max_subqueries


@functools.lru_cache(maxsize=256)
def _accepts_callbacks(method: Callable[..., Any]) -> bool:
    """Whether ``method`` takes a ``callbacks`` keyword (or ``**kwargs``)."""
    try:
        params = inspect.signature(method).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "callbacks" or p.kind is p.VAR_KEYWORD for p in params)


def _takes_callbacks(method: Callable[..., Any]) -> bool:
    """:func:`_accepts_callbacks`, cached on the function behind a bound method."""
    function = getattr(method, "__func__", method)
    try:
        return _accepts_callbacks(function)
    except TypeError:  # unhashable callable: inspect it uncached
        return _accepts_callbacks.__wrapped__(function)


def decompose_query(decomposer: QueryDecomposer, query: str, *, callbacks: Any = None) -> list[str]:
    """Call ``decomposer.decompose``, passing ``callbacks`` only where it is accepted.

    Parameters
    ----------
    decomposer : QueryDecomposer
        Any decomposer, including user-written ones without a ``callbacks`` argument.
    query : str
        The user's question.
    callbacks : Any, optional
        LangChain callbacks (a handler list or a callback manager) for nested traces.

    Returns
    -------
    list[str]
        The sub-queries.

    Example
    -------
    >>> decompose_query(RuleDecomposer(), "a cat and a dog")
    ['a cat', 'a dog']
    """
    method = decomposer.decompose
    if callbacks is not None and _takes_callbacks(method):
        return method(query, callbacks=callbacks)  # type: ignore[call-arg]
    return method(query)


async def adecompose_query(
    decomposer: QueryDecomposer, query: str, *, callbacks: Any = None
) -> list[str]:
    """Async variant of :func:`decompose_query` (calls ``adecompose``)."""
    method = decomposer.adecompose
    if callbacks is not None and _takes_callbacks(method):
        return await method(query, callbacks=callbacks)  # type: ignore[call-arg]
    return await method(query)


# ------------------------------------------------------------------ rule decomposer

_COLOURS = (
    "black|white|red|green|blue|yellow|orange|purple|pink|brown|grey|gray|golden|gold"
    "|silver|beige|tan|navy|teal|dark|light"
)
_COMPOUNDS = ("black and white", "salt and pepper", "fish and chips", "bread and butter",
              "rock and roll", "knife and fork", "cup and saucer")

_FILLERS = (
    r"(?:please\s+)?(?:can|could|would|will)\s+you\s+(?:please\s+)?"
    r"(?:find|show|get|give|fetch|retrieve|search\s+for|look\s+for)(?:\s+me)?",
    r"(?:i'?m|i\s+am|we'?re|we\s+are)\s+(?:looking|searching)\s+for",
    r"(?:looking|searching)\s+for",
    r"(?:i|we)\s+(?:want|need|would\s+like)(?:\s+to\s+(?:see|find))?",
    r"(?:i|we)'d\s+like(?:\s+to\s+(?:see|find))?",
    r"(?:do\s+you\s+have|is\s+there|are\s+there|got)(?:\s+any)?",
    r"(?:please\s+)?(?:find|show|get|give|fetch|retrieve|search\s+for|look\s+for)(?:\s+me)?",
    r"(?:which|what)\s+(?:photo|picture|image|pic|shot)s?\s+"
    r"(?:has|have|shows?|contains?|depicts?|includes?|features?)",
    r"(?:(?:a|an|the|any|some|all|one)\s+)?"
    r"(?:(?:black\s+and\s+white|colou?r|old|vintage|aerial|close-?up|recent)\s+)?"
    r"(?:photo(?:graph)?|picture|image|pic|shot|snapshot|scene|close-?up|view)s?\s+"
    r"(?:of|showing|with|where|in\s+which|containing|featuring|depicting"
    r"|including|(?:that|which)\s+(?:shows?|has|have|contains?|includes?))",
    r"there\s+(?:is|are)|there's",
    r"where|with",
)
_LEADING_FILLER = re.compile(r"^(?:(?:" + "|".join(_FILLERS) + r")\b\s*)+")

_SEPARATORS = (
    # conjunctions
    "and", "and also", "as well as", "along with", "together with", "alongside", "plus",
    "while", "whereas", "where",
    # relations of place
    "next to", "close to", "near to", "near", "nearby", "beside", "by", "with", "behind",
    "in front of", "on top of", "under", "underneath", "beneath", "above", "below", "over",
    "on", "onto", "in", "inside", "into", "within", "at", "outside", "between", "among",
    "amongst", "against", "across", "along", "around", "through", "full of",
    "to the left of", "to the right of", "on the left of", "on the right of",
    "in the middle of", "in the center of", "in the centre of", "in the corner of",
    "at the top of", "at the bottom of", "at the edge of", "on the edge of",
    # relations of action or possession
    "holding", "carrying", "wearing", "riding", "pulling", "pushing", "chasing", "eating",
    "drinking", "watching", "feeding", "using", "that has", "which has", "who has",
    "that have", "which have", "who have", "having", "has", "have",
)
_SEPARATOR_ALTERNATION = "|".join(
    re.escape(s).replace(r"\ ", r"\s+") for s in sorted(set(_SEPARATORS), key=len, reverse=True)
)
_SPLIT = re.compile(rf"\s*(?:[,;:!?&]+|\.(?!\d)|\b(?:{_SEPARATOR_ALTERNATION})\b)\s*")
_COMPOUND_ALTERNATION = "|".join(re.escape(c).replace(r"\ ", r"\s+") for c in _COMPOUNDS)
_PROTECTED = re.compile(
    rf"\b(?:{_COMPOUND_ALTERNATION}|(?:{_COLOURS})\s+and\s+(?:{_COLOURS}))\b"
)
_NOISE_CHARS = re.compile(r"[\"“”‘`()\[\]{}<>*#|~^_+=\\]")

_STOPWORDS = frozenset(
    "a an the some any is are was were be being been it its it's this that these those "
    "there here one ones each other another something thing things both also either "
    "of to and or me i we you they them their photo photos picture pictures image images "
    "pic pics shot scene where which who while with very too please find show also "
    "just only".split()
)
_EDGE_NOISE = frozenset(
    "is are was were be being been that which who where while it its there and also both "
    "either then together of to sitting standing lying laying parked placed perched "
    "resting hanging located positioned seen shown visible surrounded covered filled "
    "playing sleeping".split()
)
_ARTICLES = frozenset({"a", "an", "the", "some", "any"})
_LEADING_NOISE = _EDGE_NOISE - _ARTICLES


def _protect(text: str) -> str:
    """Join compounds like "red and white" with underscores so splitting keeps them."""
    return _PROTECTED.sub(lambda m: "_".join(m.group(0).split()), text)


def _normalise(query: str) -> str:
    """Lower-case, unify apostrophes, drop symbols that carry no meaning here."""
    text = query.casefold().replace("’", "'").replace("‘", "'")
    text = _NOISE_CHARS.sub(" ", text)
    return " ".join(text.split())


def _trim_edges(words: list[str]) -> list[str]:
    """Drop dangling auxiliaries, pronouns and pose verbs at both ends of a fragment."""
    start, end = 0, len(words)
    while start < end and words[start] in _LEADING_NOISE:
        start += 1
    while end > start and (words[end - 1] in _EDGE_NOISE or words[end - 1] in _ARTICLES):
        end -= 1
    return words[start:end]


def _clean_fragment(fragment: str) -> str:
    """Turn one split piece into a sub-query, or "" if it names nothing."""
    fragment = _LEADING_FILLER.sub("", fragment.replace("_", " ").strip(" '-/"))
    words = _trim_edges(fragment.split())
    if all(w.strip("'") in _STOPWORDS for w in words):
        return ""
    return " ".join(words)


class RuleDecomposer:
    """Offline, deterministic query decomposer built from regular expressions.

    Splits on conjunctions ("and", "as well as", "plus", "&"), punctuation and relations
    ("next to", "on top of", "holding", "wearing"...); strips request filler ("show me",
    "a photo of", "can you find"...); keeps adjective + noun groups ("a red bicycle") and
    colour pairs ("a red and white bus") together; lower-cases; drops fragments made of
    stop words only; removes duplicates; caps the count.

    Parameters
    ----------
    max_subqueries : int, default 5
        Largest number of sub-queries returned (the full query, if added, comes on top).
    include_full_query : bool, default False
        Append the whole query (whitespace-normalised, lower-cased) as a last sub-query
        when it is not already one. It is not counted against ``max_subqueries``.

    Raises
    ------
    ConfigError
        If ``max_subqueries`` is not a positive int.

    Example
    -------
    >>> RuleDecomposer().decompose("A photo of a dog on a beach next to a red bicycle")
    ['a dog', 'a beach', 'a red bicycle']
    """

    def __init__(
        self, *, max_subqueries: int = DEFAULT_MAX_SUBQUERIES, include_full_query: bool = False
    ) -> None:
        self.max_subqueries = _validate_max_subqueries(max_subqueries)
        self.include_full_query = include_full_query

    def __repr__(self) -> str:
        return (
            f"RuleDecomposer(max_subqueries={self.max_subqueries}, "
            f"include_full_query={self.include_full_query})"
        )

    def decompose(self, query: str, *, callbacks: Any = None) -> list[str]:
        """Split ``query`` into sub-queries.

        Parameters
        ----------
        query : str
            The user's description of the image(s) to find.
        callbacks : Any, optional
            Ignored (accepted so every decomposer can be called the same way).

        Returns
        -------
        list[str]
            One to ``max_subqueries`` lower-cased sub-queries (plus the full query when
            ``include_full_query``). A query that names a single object gives one.

        Raises
        ------
        ValueError
            If ``query`` is empty or whitespace.
        """
        raw = _validate_query(query)
        text = _normalise(raw) or raw
        stripped = _LEADING_FILLER.sub("", text)
        fragments = [_clean_fragment(f) for f in _SPLIT.split(_protect(stripped))]
        subqueries = _dedup(fragments, max_subqueries=self.max_subqueries)
        if not subqueries:
            # Only filler or symbols ("show me", "+"): matching the words beats failing.
            subqueries = [text.strip(" ?.!,;:") or text]
        return _with_full_query(subqueries, text, self.include_full_query)

    async def adecompose(self, query: str, *, callbacks: Any = None) -> list[str]:
        """Async variant of :meth:`decompose` (pure CPU work, microseconds)."""
        return self.decompose(query)


class IdentityDecomposer:
    """The baseline: the whole query is the only sub-query.

    Parameters
    ----------
    max_subqueries : int, default 5
        Accepted (and validated) so the three decomposers take the same options; the
        answer always holds exactly one sub-query.
    include_full_query : bool, default False
        Accepted for the same reason; the full query is already the only sub-query.

    Example
    -------
    >>> IdentityDecomposer().decompose("  a dog   on a beach ")
    ['a dog on a beach']
    """

    def __init__(
        self, *, max_subqueries: int = DEFAULT_MAX_SUBQUERIES, include_full_query: bool = False
    ) -> None:
        self.max_subqueries = _validate_max_subqueries(max_subqueries)
        self.include_full_query = include_full_query

    def __repr__(self) -> str:
        return "IdentityDecomposer()"

    def decompose(self, query: str, *, callbacks: Any = None) -> list[str]:
        """Return ``[query]`` with whitespace collapsed.

        Raises
        ------
        ValueError
            If ``query`` is empty or whitespace.
        """
        return [_validate_query(query)]

    async def adecompose(self, query: str, *, callbacks: Any = None) -> list[str]:
        """Async variant of :meth:`decompose`."""
        return self.decompose(query)


class CachedDecomposer:
    """Thread-safe LRU cache in front of any decomposer (sync and async paths).

    The key is the query with whitespace collapsed and case folded, plus the inner
    decomposer's ``max_subqueries`` when it has one. Two concurrent misses on the same
    query may both reach the inner decomposer; later calls hit the cache.

    Parameters
    ----------
    inner : QueryDecomposer
        The decomposer whose answers are cached.
    maxsize : int, default 1024
        Number of queries kept; 0 disables caching.

    Raises
    ------
    ConfigError
        If ``maxsize`` is negative or not an int.

    Example
    -------
    >>> cached = CachedDecomposer(RuleDecomposer(), maxsize=128)
    >>> cached.decompose("a cat and a dog") == cached.decompose("A cat and a  dog")
    True
    """

    def __init__(self, inner: QueryDecomposer, *, maxsize: int = 1024) -> None:
        self.inner = inner
        self._cache = _LRUCache(maxsize)

    def __repr__(self) -> str:
        return f"CachedDecomposer({self.inner!r}, maxsize={self._cache.maxsize})"

    def _key(self, query: str) -> tuple[str, int | None]:
        return _cache_key(_validate_query(query), getattr(self.inner, "max_subqueries", None))

    def decompose(self, query: str, *, callbacks: Any = None) -> list[str]:
        """Return the cached sub-queries of ``query``, computing them on a miss.

        Raises
        ------
        ValueError
            If ``query`` is empty or whitespace.
        """
        key = self._key(query)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        subqueries = decompose_query(self.inner, query, callbacks=callbacks)
        self._cache.put(key, subqueries)
        return list(subqueries)

    async def adecompose(self, query: str, *, callbacks: Any = None) -> list[str]:
        """Async variant of :meth:`decompose`; the lock is never held across an await."""
        key = self._key(query)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        subqueries = await adecompose_query(self.inner, query, callbacks=callbacks)
        self._cache.put(key, subqueries)
        return list(subqueries)

    def cache_clear(self) -> None:
        """Forget every cached decomposition."""
        self._cache.clear()


# ---------------------------------------------------------------- parsing LLM output

_FENCE = re.compile(r"```[a-zA-Z0-9_-]*\s*\n?(.*?)```", re.DOTALL)
_LIST_MARKER = re.compile(r"^\s*(?:[-*•·+>]|\(?\d{1,2}[.):]|\(?[a-z][.)])\s+")
_REFUSAL = re.compile(
    r"^\W*(?:i'?m\s+sorry|sorry|i\s+(?:can(?:no|')t|am\s+unable|won'?t)|as\s+an\s+ai)",
    re.IGNORECASE,
)
_PREAMBLE = re.compile(r"^(?:sure|okay|ok|here\s+(?:is|are)|certainly|the\s+sub-?queries)\b",
                       re.IGNORECASE)
_ITEM_EDGES = " \t\"'`“”‘’*_.,;:!?[](){}"
_LIST_KEYS = ("subqueries", "sub_queries", "queries", "entities", "phrases", "items")
_MAX_WORDS = 12
MAX_SUBQUERY_CHARS = 512  # a longer item of an LLM answer is no short noun phrase: dropped
MAX_ANSWER_CHARS = 65_536  # a longer LLM answer is unusable (fallback), never parsed
MAX_JSON_DEPTH = 32  # JSON nested deeper is not parsed (json.loads would recurse into it)


def _json_depth_ok(text: str, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether brackets in ``text`` nest at most ``limit`` deep (strings skipped); iterative, no recursion."""
    depth, in_string, escaped = 0, False, False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            if depth > limit:
                return False
        elif char in "]}":
            depth -= 1
    return True


def _loads(text: str) -> Any:
    """``json.loads`` of text nested at most :data:`MAX_JSON_DEPTH` deep; ValueError otherwise."""
    if not _json_depth_ok(text):
        raise ValueError(f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        return json.loads(text)
    except RecursionError as exc:  # belt and braces: the depth check above should make this unreachable
        raise ValueError("JSON nested too deeply") from exc


def _json_candidates(text: str) -> list[str]:
    """Pieces of ``text`` that may hold JSON: fenced blocks, the text, bracketed spans."""
    candidates = [m.group(1) for m in _FENCE.finditer(text)] + [text]
    for opener, closer in (("[", "]"), ("{", "}")):
        start, end = text.find(opener), text.rfind(closer)
        if 0 <= start < end:
            candidates.append(text[start : end + 1])
    return candidates


def _list_in(value: Any) -> list[Any] | None:
    """The list inside a JSON value: the value itself, or a list under a known key."""
    if isinstance(value, list):
        return value
    if isinstance(value, dict):
        for key in (*_LIST_KEYS, *value.keys()):
            found = value.get(key)
            if isinstance(found, list):
                return found
    return None


def _items_from_json(text: str) -> list[str] | None:
    """The string items of the first JSON list found in ``text``, or None."""
    for candidate in _json_candidates(text):
        try:
            found = _list_in(_loads(candidate))
        except (ValueError, TypeError):
            continue
        if found is not None:
            return [item for item in map(_item_text, found) if item]
    return None


def _is_json_without_list(text: str) -> bool:
    """True when the whole answer (fences aside) is valid JSON that holds no list."""
    body = _FENCE.sub(lambda m: m.group(1), text).strip()
    try:
        _loads(body)
    except (ValueError, TypeError):
        return False
    return True


def _item_text(item: Any) -> str:
    """Text of one JSON list item: a string, or an object's first string (numbers are no sub-query)."""
    if isinstance(item, str):
        return item
    if isinstance(item, dict):
        return next((v for v in item.values() if isinstance(v, str)), "")
    return ""


def _items_from_lines(text: str) -> list[str]:
    """Items of a bulleted, numbered or one-per-line answer (or one comma-separated line)."""
    text = _FENCE.sub(lambda m: m.group(1), text)
    lines = [line for line in text.splitlines() if line.strip()]
    marked = [line for line in lines if _LIST_MARKER.match(line)]
    if marked:
        lines = marked
    else:
        lines = [ln for ln in lines if not ln.rstrip().endswith(":") and not _PREAMBLE.match(ln)]
    if len(lines) == 1 and not marked:
        lines = re.split(r"[;,]", lines[0])
    return [_LIST_MARKER.sub("", line) for line in lines]


def _clean_item(item: str) -> str:
    """Strip quotes, markup and trailing punctuation; "" if no word is left or too long."""
    if any(unicodedata.category(ch) == "Cc" for ch in item if ch not in "\t\n\r"):
        return ""  # control characters: binary garbage, not a description
    if len(item) > 4 * MAX_SUBQUERY_CHARS:
        return ""  # no short phrase: do not even normalise it
    item = " ".join(item.split()).strip(_ITEM_EDGES)
    if len(item) > MAX_SUBQUERY_CHARS:
        return ""
    if not re.search(r"[^\W\d_]", item) or len(item.split()) > _MAX_WORDS:
        return ""  # needs a letter: "42" or "-" is no sub-query
    return item


def parse_subqueries(
    text: str | None, *, max_subqueries: int = DEFAULT_MAX_SUBQUERIES
) -> list[str]:
    """Parse an LLM answer into sub-queries; never raises on a bad answer.

    Understands a JSON list (bare, inside ```json fences or with text around it), a JSON
    object holding a list (``{"subqueries": [...]}``), numbered or bulleted lists, one
    item per line, or a single comma-separated line. Strips quotes, markup and trailing
    punctuation, drops empty, over-long (more than 12 words or :data:`MAX_SUBQUERY_CHARS`
    characters) and case-insensitively repeated items, and keeps the first
    ``max_subqueries``. An answer longer than :data:`MAX_ANSWER_CHARS` characters, or JSON
    nested deeper than :data:`MAX_JSON_DEPTH` levels, is not parsed (no recursion on the
    model's output): it gives no sub-query, so the caller falls back.

    Parameters
    ----------
    text : str or None
        The raw model output.
    max_subqueries : int, default 5
        Largest number of sub-queries returned.

    Returns
    -------
    list[str]
        The sub-queries; empty when nothing usable was found (including refusals).

    Example
    -------
    >>> parse_subqueries('Sure: ["a dog", "A dog", "a red bicycle."]')
    ['a dog', 'a red bicycle']
    """
    _validate_max_subqueries(max_subqueries)
    if not isinstance(text, str) or not text.strip() or len(text) > MAX_ANSWER_CHARS or _REFUSAL.match(text):
        return []
    items = _items_from_json(text)
    if items is None:
        if _is_json_without_list(text):
            return []  # e.g. {"subqueries": 5} or 42: structured, but no list of descriptions
        items = _items_from_lines(text)
    return _dedup([_clean_item(item) for item in items], max_subqueries=max_subqueries)


# ------------------------------------------------------------------- LLM decomposer

_LLAMA_INDEX, _LANGCHAIN, _CALLABLE = "llama_index", "langchain", "callable"


def _detect_backend(llm: Any) -> str:
    """Which calling convention ``llm`` follows, by duck typing (no framework import)."""
    if hasattr(llm, "complete") and hasattr(llm, "acomplete") and hasattr(llm, "metadata"):
        return _LLAMA_INDEX
    if hasattr(llm, "invoke") and hasattr(llm, "ainvoke"):
        return _LANGCHAIN
    if callable(llm):
        return _CALLABLE
    raise TypeError(
        f"llm must be a LlamaIndex LLM (complete/acomplete), a LangChain chat model, LLM or "
        f"Runnable (invoke/ainvoke), or a callable str -> str; got {type(llm).__name__}"
    )


def _content_text(content: Any) -> str:
    """Text of a LangChain message content: a str or a list of str / content blocks."""
    if isinstance(content, str):
        return content
    parts: list[str] = []
    for block in content or []:
        if isinstance(block, str):
            parts.append(block)
        elif isinstance(block, dict) and block.get("type", "text") == "text":
            parts.append(str(block.get("text", "")))
    return "".join(parts)


def _output_text(output: Any) -> str:
    """Text of whatever the model returned (message, completion, str, list or dict)."""
    if output is None:
        return ""
    if isinstance(output, str):
        return output
    if hasattr(output, "content"):  # LangChain BaseMessage
        return _content_text(output.content)
    if hasattr(output, "text") and isinstance(output.text, str):  # LlamaIndex CompletionResponse
        return output.text
    if isinstance(output, (list, dict)):  # a chain with a JSON / structured output parser
        try:
            return json.dumps(output, default=str)
        except (RecursionError, ValueError):  # nested too deeply (or circular): unusable, the fallback answers
            return ""
    return str(output)


def _run_with_timeout(func: Callable[[], Any], timeout: float | None) -> Any:
    """Run ``func`` in a worker thread and stop waiting after ``timeout`` seconds.

    A daemon thread (not a ThreadPoolExecutor, whose threads are joined at interpreter
    exit) so that a hung model call cannot block shutdown; the context is copied so
    LangChain run trees and LlamaIndex instrumentation spans nest under the caller.

    Raises
    ------
    TimeoutError
        If ``func`` has not returned after ``timeout`` seconds.
    """
    if timeout is None:
        return func()
    future: Future[Any] = Future()
    context = contextvars.copy_context()

    def work() -> None:
        try:
            future.set_result(context.run(func))
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting caller
            future.set_exception(exc)

    threading.Thread(target=work, name="himir-decompose", daemon=True).start()
    try:
        return future.result(timeout=timeout)
    except FutureTimeoutError as exc:
        raise TimeoutError(f"no answer after {timeout:g} s") from exc


async def _await_with_timeout(awaitable: Awaitable[Any], timeout: float | None) -> Any:
    """Await ``awaitable``, cancelling it after ``timeout`` seconds (None: no limit).

    Raises
    ------
    TimeoutError
        If it has not finished after ``timeout`` seconds.
    """
    if timeout is None:
        return await awaitable
    try:
        return await asyncio.wait_for(awaitable, timeout)
    except asyncio.TimeoutError as exc:  # not the builtin TimeoutError before 3.11
        raise TimeoutError(f"no answer after {timeout:g} s") from exc


def _unusable(output: Any) -> str:
    """Short cause for a log line: the start of an answer that held no sub-query."""
    return f"no usable sub-queries in the answer {_output_text(output)[:80]!r}"


def _describe(exc: BaseException) -> str:
    """Short cause for a log line: the exception type and message."""
    message = str(exc).strip()
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


class LLMDecomposer:
    """Query decomposition by one LLM prompt, with an offline fallback.

    Parameters
    ----------
    llm : Any
        A LlamaIndex ``LLM`` (``complete``/``acomplete``), a LangChain chat model, LLM or
        any ``Runnable`` taking a string (``invoke``/``ainvoke``; the output may be a
        message whose ``content`` is a str or content blocks, a str, or a list/dict), or a
        plain callable ``str -> str``. Detected by duck typing; neither framework is
        imported by this module.
    prompt : str, default DEFAULT_DECOMPOSE_PROMPT
        Template with a ``{query}`` and optionally a ``{max_subqueries}`` placeholder;
        literal braces must be doubled (``{{``). Public attribute, may be replaced.
    max_subqueries : int, default 5
        Largest number of sub-queries kept from the answer.
    timeout : float or None, default 30.0
        Seconds to wait for the model; None waits forever.
    fallback : QueryDecomposer, optional
        Used when the model raises, times out or answers nothing usable; defaults to
        ``RuleDecomposer(max_subqueries=max_subqueries)``.
    cache_size : int, default 1024
        LRU cache of successful LLM decompositions, keyed on the normalised query (case
        folded, whitespace collapsed) and ``max_subqueries``; 0 disables. Fallback
        answers are not cached, so a later call retries the model.
    include_full_query : bool, default False
        Append the whole query (whitespace-normalised) as a last sub-query when it is not
        already one; it is not counted against ``max_subqueries``.

    Raises
    ------
    TypeError
        If ``llm`` follows none of the supported calling conventions.
    ConfigError
        If ``prompt`` lacks ``{query}`` or another option is out of range.

    Example
    -------
    >>> decomposer = LLMDecomposer(lambda prompt: '["a dog", "a red bicycle"]')
    >>> decomposer.decompose("a dog next to a red bicycle")
    ['a dog', 'a red bicycle']
    """

    def __init__(
        self,
        llm: Any,
        *,
        prompt: str = DEFAULT_DECOMPOSE_PROMPT,
        max_subqueries: int = DEFAULT_MAX_SUBQUERIES,
        timeout: float | None = 30.0,
        fallback: QueryDecomposer | None = None,
        cache_size: int = 1024,
        include_full_query: bool = False,
    ) -> None:
        self.llm = llm
        self._backend = _detect_backend(llm)
        self.max_subqueries = _validate_max_subqueries(max_subqueries)
        self._cache = _LRUCache(cache_size)
        self.prompt = prompt
        if timeout is not None and not timeout > 0:
            raise ConfigError(f"timeout must be > 0 seconds or None, got {timeout!r}")
        self.timeout = timeout
        if fallback is None:
            fallback = RuleDecomposer(max_subqueries=max_subqueries)
        self.fallback = fallback
        self.include_full_query = include_full_query

    def __repr__(self) -> str:
        return (
            f"LLMDecomposer(llm={type(self.llm).__name__}, max_subqueries={self.max_subqueries}, "
            f"timeout={self.timeout}, fallback={self.fallback!r})"
        )

    @property
    def prompt(self) -> str:
        """The prompt template; setting it validates it and empties the cache."""
        return self._prompt

    @prompt.setter
    def prompt(self, template: str) -> None:
        previous, self._prompt = getattr(self, "_prompt", None), template
        try:
            self.format_prompt("check")
        except ConfigError:
            if previous is not None:  # a rejected template leaves the working one in place
                self._prompt = previous
            raise
        self._cache.clear()

    def format_prompt(self, query: str) -> str:
        """Fill :attr:`prompt` with ``query`` and ``max_subqueries``.

        Raises
        ------
        ConfigError
            If the template lacks ``{query}`` or has other, unknown placeholders.
        """
        if not isinstance(self.prompt, str) or "{query}" not in self.prompt:
            raise ConfigError("prompt must contain a {query} placeholder (and may use "
                              "{max_subqueries}); double literal braces as {{ }}")
        try:
            return self.prompt.format(query=query, max_subqueries=self.max_subqueries)
        except (KeyError, IndexError, ValueError) as exc:
            raise ConfigError(
                f"prompt has an unknown placeholder or stray brace ({_describe(exc)}); only "
                "{query} and {max_subqueries} are filled, double literal braces as {{ }}"
            ) from exc

    def cache_clear(self) -> None:
        """Forget every cached decomposition."""
        self._cache.clear()

    def _langchain_config(self, callbacks: Any) -> dict[str, Any]:
        """Run config so the model call shows up, named, under the caller's trace."""
        config: dict[str, Any] = {"run_name": "himir_decompose"}
        if callbacks is not None:
            config["callbacks"] = callbacks
        return config

    def _call_sync(self, prompt: str, callbacks: Any) -> Any:
        """One blocking model call, in the convention of the detected backend."""
        if self._backend == _LLAMA_INDEX:
            return self.llm.complete(prompt)
        if self._backend == _LANGCHAIN:
            return self.llm.invoke(prompt, config=self._langchain_config(callbacks))
        return self.llm(prompt)

    async def _call_async(self, prompt: str, callbacks: Any) -> Any:
        """One awaitable model call, in the convention of the detected backend."""
        if self._backend == _LLAMA_INDEX:
            return await self.llm.acomplete(prompt)
        if self._backend == _LANGCHAIN:
            return await self.llm.ainvoke(prompt, config=self._langchain_config(callbacks))
        return await asyncio.to_thread(self.llm, prompt)

    def _accept(self, text: str, output: Any) -> list[str]:
        """Parse the model output; cache and return it, or [] if unusable."""
        subqueries = parse_subqueries(_output_text(output), max_subqueries=self.max_subqueries)
        if subqueries:
            self._cache.put(_cache_key(text, self.max_subqueries), subqueries)
        return subqueries

    def _warn_fallback(self, cause: str) -> None:
        logger.warning(
            "LLM query decomposition failed (%s); using the fallback %r instead",
            cause, self.fallback,
        )

    def decompose(self, query: str, *, callbacks: Any = None) -> list[str]:
        """Split ``query`` with the LLM, or with the fallback if the LLM fails.

        Parameters
        ----------
        query : str
            The user's description of the image(s) to find.
        callbacks : Any, optional
            LangChain callbacks (handler list or callback manager), passed as
            ``config={"callbacks": callbacks}`` so the model run nests under the
            caller's run; ignored for LlamaIndex LLMs, whose instrumentation nests
            through the copied context.

        Returns
        -------
        list[str]
            One to ``max_subqueries`` sub-queries (plus the full query when
            ``include_full_query``).

        Raises
        ------
        ValueError
            If ``query`` is empty or whitespace (checked before any model call). Model
            errors, timeouts and unusable answers never raise; they are logged.
        """
        text = _validate_query(query)
        subqueries = self._cache.get(_cache_key(text, self.max_subqueries))
        if subqueries is None:
            subqueries = self._decompose_uncached(text, callbacks)
        return _with_full_query(subqueries, text, self.include_full_query)

    def _decompose_uncached(self, text: str, callbacks: Any) -> list[str]:
        prompt = self.format_prompt(text)
        try:
            output = _run_with_timeout(lambda: self._call_sync(prompt, callbacks), self.timeout)
        except Exception as exc:  # noqa: BLE001 - any model failure falls back
            self._warn_fallback(_describe(exc))
            return decompose_query(self.fallback, text, callbacks=callbacks)
        subqueries = self._accept(text, output)
        if not subqueries:
            self._warn_fallback(_unusable(output))
            return decompose_query(self.fallback, text, callbacks=callbacks)
        return subqueries

    async def adecompose(self, query: str, *, callbacks: Any = None) -> list[str]:
        """Async variant of :meth:`decompose` (``acomplete`` / ``ainvoke``).

        The timeout uses ``asyncio.wait_for``, which can only interrupt a model whose
        async method really awaits (LlamaIndex's ``CustomLLM.acomplete`` runs the
        blocking ``complete`` and cannot be interrupted).
        """
        text = _validate_query(query)
        subqueries = self._cache.get(_cache_key(text, self.max_subqueries))
        if subqueries is None:
            subqueries = await self._adecompose_uncached(text, callbacks)
        return _with_full_query(subqueries, text, self.include_full_query)

    async def _adecompose_uncached(self, text: str, callbacks: Any) -> list[str]:
        prompt = self.format_prompt(text)
        try:
            output = await _await_with_timeout(self._call_async(prompt, callbacks), self.timeout)
        except Exception as exc:  # noqa: BLE001 - any model failure falls back
            self._warn_fallback(_describe(exc))
            return await adecompose_query(self.fallback, text, callbacks=callbacks)
        subqueries = self._accept(text, output)
        if not subqueries:
            self._warn_fallback(_unusable(output))
            return await adecompose_query(self.fallback, text, callbacks=callbacks)
        return subqueries


# ------------------------------------------------------------------------- factory

_PROVIDERS = {
    "ollama": ("langchain_ollama", "ChatOllama", "langchain-ollama"),
    "openai": ("langchain_openai", "ChatOpenAI", "langchain-openai"),
}
_HOW_TO_CONFIGURE = (
    "set HIMIR_LLM to 'ollama:MODEL' (pip install langchain-ollama) or 'openai:MODEL' "
    "(pip install langchain-openai, and set OPENAI_API_KEY), or pass llm= from Python "
    "(a LlamaIndex LLM or a LangChain chat model)"
)


def _chat_model_from_env() -> Any:
    """Build a LangChain chat model from ``HIMIR_LLM=provider:model``.

    Raises
    ------
    ConfigError
        If ``HIMIR_LLM`` is unset or malformed, or names an unknown provider.
    ImportError
        If the provider's LangChain package is not installed.
    """
    spec = os.environ.get("HIMIR_LLM", "").strip()
    if not spec:
        raise ConfigError(f"the 'llm' decomposer needs a model but HIMIR_LLM is not set; "
                          f"{_HOW_TO_CONFIGURE}")
    provider, _, model = spec.partition(":")
    if provider.lower() not in _PROVIDERS or not model.strip():
        raise ConfigError(f"HIMIR_LLM={spec!r} is not 'provider:model' with provider in "
                          f"{sorted(_PROVIDERS)}; {_HOW_TO_CONFIGURE}")
    module_name, class_name, package = _PROVIDERS[provider.lower()]
    try:
        module = __import__(module_name, fromlist=[class_name])
    except ImportError as exc:
        raise ImportError(f"HIMIR_LLM={spec!r} needs the {package} package: pip install "
                          f"{package}; or {_HOW_TO_CONFIGURE}") from exc
    return getattr(module, class_name)(model=model.strip())


def get_decomposer(name: str, *, llm: Any = None, **kwargs: Any) -> QueryDecomposer:
    """Build a decomposer by name (used by the CLI).

    Parameters
    ----------
    name : {"rule", "llm", "none"}
        ``"rule"``: :class:`RuleDecomposer`; ``"llm"``: :class:`LLMDecomposer` around
        ``llm``, or around a LangChain chat model built from the ``HIMIR_LLM``
        environment variable (``ollama:MODEL`` or ``openai:MODEL``); ``"none"``:
        :class:`IdentityDecomposer`.
    llm : Any, optional
        The model for ``"llm"`` (see :class:`LLMDecomposer`).
    **kwargs
        Passed to the decomposer's constructor (none for ``"none"``).

    Returns
    -------
    QueryDecomposer
        The decomposer.

    Raises
    ------
    ConfigError
        If ``name`` is unknown, or ``"llm"`` has no model and ``HIMIR_LLM`` is unset.
    ImportError
        If ``HIMIR_LLM`` names a provider whose package is not installed.

    Example
    -------
    >>> get_decomposer("rule", max_subqueries=3).decompose("a cat, a dog and a bird")
    ['a cat', 'a dog', 'a bird']
    """
    key = name.strip().lower() if isinstance(name, str) else name
    if key == "rule":
        _warn_unused_llm(name, llm)
        return RuleDecomposer(**kwargs)
    if key == "none":
        _warn_unused_llm(name, llm)
        return IdentityDecomposer(**kwargs)
    if key == "llm":
        return LLMDecomposer(llm if llm is not None else _chat_model_from_env(), **kwargs)
    raise ConfigError(f"unknown decomposer {name!r}; valid names are {', '.join(DECOMPOSER_NAMES)}")


def _warn_unused_llm(name: str, llm: Any) -> None:
    if llm is not None:
        logger.warning("decomposer %r does not use an LLM; the llm argument is ignored", name)

"""What every query decomposer shares: the protocol, query checks, de-duplication, the cache.

:class:`QueryDecomposer` is the protocol; :func:`decompose_query` / :func:`adecompose_query`
call any decomposer, passing LangChain ``callbacks`` only where they are accepted. The
helpers (:func:`validate_query`, :func:`dedup`, :func:`with_full_query`, :class:`LRUCache`
...) are used by the rule-based and LLM-backed decomposers and the LLM-output parser.
:class:`IdentityDecomposer` (the single-query baseline) and :class:`CachedDecomposer` (an
LRU cache in front of any decomposer) need nothing more, so they live here too.
"""

from __future__ import annotations

import functools
import inspect
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any, Protocol, runtime_checkable

from himir_rag.errors import ConfigError

DEFAULT_MAX_SUBQUERIES = 5


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


def validate_query(query: str) -> str:
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


def validate_max_subqueries(max_subqueries: int) -> int:
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


def dedup(subqueries: list[str], *, max_subqueries: int) -> list[str]:
    """Drop empties and case-insensitive duplicates, keep order, cap the count."""
    seen: set[str] = set()
    kept: list[str] = []
    for subquery in subqueries:
        key = _dedup_key(subquery)
        if key and key not in seen:
            seen.add(key)
            kept.append(subquery)
    return kept[:max_subqueries]


def with_full_query(subqueries: list[str], query: str, include: bool) -> list[str]:
    """Append ``query`` as a last sub-query when asked and not already present.

    The full query is appended after the cap, so the result may hold
    ``max_subqueries + 1`` items: the cap bounds the split, not the extra view.
    """
    if not include:
        return list(subqueries)
    if any(s.casefold() == query.casefold() for s in subqueries):
        return list(subqueries)
    return [*subqueries, query]


class LRUCache:
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


def cache_key(query: str, max_subqueries: int | None) -> tuple[str, int | None]:
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


# ------------------------------------------------------- identity and cached decomposers


class DecomposerOptions:
    """The options every decomposer takes: ``max_subqueries`` (validated) and ``include_full_query``."""

    def __init__(
        self, *, max_subqueries: int = DEFAULT_MAX_SUBQUERIES, include_full_query: bool = False
    ) -> None:
        self.max_subqueries = validate_max_subqueries(max_subqueries)
        self.include_full_query = include_full_query


class IdentityDecomposer(DecomposerOptions):
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

    def __repr__(self) -> str:
        return "IdentityDecomposer()"

    def decompose(self, query: str, *, callbacks: Any = None) -> list[str]:
        """Return ``[query]`` with whitespace collapsed.

        Raises
        ------
        ValueError
            If ``query`` is empty or whitespace.
        """
        return [validate_query(query)]

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
        self._cache = LRUCache(maxsize)

    def __repr__(self) -> str:
        return f"CachedDecomposer({self.inner!r}, maxsize={self._cache.maxsize})"

    def _key(self, query: str) -> tuple[str, int | None]:
        return cache_key(validate_query(query), getattr(self.inner, "max_subqueries", None))

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


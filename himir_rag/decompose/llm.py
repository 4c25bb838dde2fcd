"""The LLM-backed query decomposer: one prompt to a LlamaIndex or LangChain model (or a callable).

The backend is detected by duck typing (neither framework is imported); the call runs
under a timeout, and a failed, late or unusable answer falls back to the rule decomposer.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeoutError
from typing import Any

from himir_rag.decompose.base import (
    DEFAULT_MAX_SUBQUERIES,
    DecomposerOptions,
    LRUCache,
    QueryDecomposer,
    adecompose_query,
    cache_key,
    decompose_query,
    validate_query,
    with_full_query,
)
from himir_rag.decompose.parse import parse_subqueries
from himir_rag.decompose.rules import RuleDecomposer
from himir_rag.errors import ConfigError

logger = logging.getLogger("himir_rag.decompose")  # one logger for the whole package

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


class LLMDecomposer(DecomposerOptions):
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
        super().__init__(max_subqueries=max_subqueries, include_full_query=include_full_query)
        self.llm = llm
        self._backend = _detect_backend(llm)
        self._cache = LRUCache(cache_size)
        self.prompt = prompt
        if timeout is not None and not timeout > 0:
            raise ConfigError(f"timeout must be > 0 seconds or None, got {timeout!r}")
        self.timeout = timeout
        if fallback is None:
            fallback = RuleDecomposer(max_subqueries=max_subqueries)
        self.fallback = fallback

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
            self._cache.put(cache_key(text, self.max_subqueries), subqueries)
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
        text = validate_query(query)
        subqueries = self._cache.get(cache_key(text, self.max_subqueries))
        if subqueries is None:
            subqueries = self._decompose_uncached(text, callbacks)
        return with_full_query(subqueries, text, self.include_full_query)

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
        text = validate_query(query)
        subqueries = self._cache.get(cache_key(text, self.max_subqueries))
        if subqueries is None:
            subqueries = await self._adecompose_uncached(text, callbacks)
        return with_full_query(subqueries, text, self.include_full_query)

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

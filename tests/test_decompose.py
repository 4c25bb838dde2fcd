"""Tests for himir_rag.decompose: rule splitting, LLM parsing, fallback, cache, factory."""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.language_models import FakeListChatModel, GenericFakeChatModel
from langchain_core.messages import AIMessage
from langchain_core.runnables import RunnableLambda
from llama_index.core.llms import CompletionResponse, CustomLLM, LLMMetadata
from llama_index.core.llms.callbacks import llm_completion_callback

from himir_rag.decompose import (
    DEFAULT_DECOMPOSE_PROMPT,
    CachedDecomposer,
    IdentityDecomposer,
    LLMDecomposer,
    QueryDecomposer,
    RuleDecomposer,
    adecompose_query,
    decompose_query,
    get_decomposer,
    parse_subqueries,
)
from himir_rag.errors import ConfigError

QUERY = "a dog on a beach next to a red bicycle"
RULE_ANSWER = ["a dog", "a beach", "a red bicycle"]
LOGGER = "himir_rag.decompose"


# ------------------------------------------------------------------------ fakes


class CannedLLM(CustomLLM):
    """LlamaIndex LLM that answers canned text, counts calls and can fail or stall."""

    answer: str = ""
    error: str | None = None
    delay: float = 0.0
    calls: int = 0
    prompts: list[str] = []  # noqa: RUF012 - a pydantic field, copied per instance

    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(model_name="canned")

    def _respond(self, prompt: str) -> CompletionResponse:
        self.calls += 1
        self.prompts.append(prompt)
        if self.error:
            raise RuntimeError(self.error)
        return CompletionResponse(text=self.answer)

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        if self.delay:
            _RELEASE.wait(self.delay)
        return self._respond(prompt)

    @llm_completion_callback()
    async def acomplete(
        self, prompt: str, formatted: bool = False, **kwargs: Any
    ) -> CompletionResponse:
        if self.delay:
            await asyncio.sleep(self.delay)
        return self._respond(prompt)

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> Any:
        yield self._respond(prompt)


_RELEASE = threading.Event()  # set at teardown so a stalled fake thread ends at once


@pytest.fixture(autouse=True)
def _release_stalled_fakes() -> Any:
    _RELEASE.clear()
    yield
    _RELEASE.set()


class RecordingHandler(BaseCallbackHandler):
    """LangChain callback handler that records model starts."""

    def __init__(self) -> None:
        self.starts: list[str] = []

    def on_chat_model_start(self, serialized: Any, messages: Any, **kwargs: Any) -> None:
        self.starts.append("chat_model")

    def on_llm_start(self, serialized: Any, prompts: Any, **kwargs: Any) -> None:
        self.starts.append("llm")


def llama(answer: str = "", **kwargs: Any) -> CannedLLM:
    return CannedLLM(answer=answer, prompts=[], **kwargs)


def chat(*answers: str, sleep: float | None = None) -> FakeListChatModel:
    return FakeListChatModel(responses=list(answers), sleep=sleep)


def count_chat_calls(model: Any, run: Any) -> int:
    handler = RecordingHandler()
    run(handler)
    return len(handler.starts)


# --------------------------------------------------------------- rule decomposer

RULE_CASES = [
    # several objects, plain
    ("a cat and a dog", ["a cat", "a dog"]),
    ("pizza & beer", ["pizza", "beer"]),
    ("a horse, a barn and a fence", ["a horse", "a barn", "a fence"]),
    ("a teapot as well as two cups plus a plate of cookies",
     ["a teapot", "two cups", "a plate of cookies"]),
    ("a lamp beside a bed; a book on the nightstand",
     ["a lamp", "a bed", "a book", "the nightstand"]),
    ("a boat on the water, a lighthouse and seagulls",
     ["a boat", "the water", "a lighthouse", "seagulls"]),
    # attributes stay with their noun
    ("a red bicycle", ["a red bicycle"]),
    ("a small brown dog and a big white cat", ["a small brown dog", "a big white cat"]),
    ("a red and white bus on a bridge", ["a red and white bus", "a bridge"]),
    ("a snowy mountain behind a lake", ["a snowy mountain", "a lake"]),
    ("a bowl of fruit on top of a wooden table", ["a bowl of fruit", "a wooden table"]),
    # relations of place and action
    (QUERY, RULE_ANSWER),
    ("a child riding a bike in front of a house", ["a child", "a bike", "a house"]),
    ("an airplane above the clouds", ["an airplane", "the clouds"]),
    ("a cat under a chair", ["a cat", "a chair"]),
    ("a bird perched on a branch near a feeder", ["a bird", "a branch", "a feeder"]),
    ("a girl with long hair holding a kitten", ["a girl", "long hair", "a kitten"]),
    ("a man in a red shirt by the sea", ["a man", "a red shirt", "the sea"]),
    ("a monkey eating a banana", ["a monkey", "a banana"]),
    ("a person carrying a surfboard along the beach", ["a person", "a surfboard", "the beach"]),
    ("a basket full of apples", ["a basket", "apples"]),
    ("a house that has a red door", ["a house", "a red door"]),
    ("two dogs playing with a ball in the park", ["two dogs", "a ball", "the park"]),
    ("a cat that is sleeping in a basket", ["a cat", "a basket"]),
    ("two dogs next to each other", ["two dogs"]),
    # request filler
    ("A photo of a cat and a dog", ["a cat", "a dog"]),
    ("Show me a red car parked next to a tree", ["a red car", "a tree"]),
    ("Can you find a picture showing a woman holding an umbrella?", ["a woman", "an umbrella"]),
    ("I'm looking for a man wearing a blue hat", ["a man", "a blue hat"]),
    ("I’m looking for a yellow kite", ["a yellow kite"]),
    ("Which photo has a horse, a barn and a fence?", ["a horse", "a barn", "a fence"]),
    ("find the photo where a dog is on a beach", ["a dog", "a beach"]),
    ("An image with a yellow taxi", ["a yellow taxi"]),
    ("There is a cat sitting on a sofa", ["a cat", "a sofa"]),
    ("Is there a photo with a cat?", ["a cat"]),
    ("pictures of a goldfish in a bowl", ["a goldfish", "a bowl"]),
    ("a close-up of a ladybug on a leaf", ["a ladybug", "a leaf"]),
    ("black and white photo of a cat", ["a cat"]),
    ("\u201cA photo of a zebra.\u201d", ["a zebra"]),
    # single objects, duplicates, whitespace, case
    ("photos of sunflowers", ["sunflowers"]),
    ("  a   Red   BICYCLE  ", ["a red bicycle"]),
    ("a dog and a dog", ["a dog"]),
    ("A Cat and THE cat", ["a cat"]),
    ("a cup of coffee", ["a cup of coffee"]),
    ("show me", ["show me"]),
    # the cap
    ("a car, a truck, a bus, a bicycle, a motorcycle, a tram",
     ["a car", "a truck", "a bus", "a bicycle", "a motorcycle"]),
]


@pytest.mark.parametrize(("query", "expected"), RULE_CASES)
def test_rule_decomposer_phrasings(query: str, expected: list[str]) -> None:
    assert RuleDecomposer().decompose(query) == expected


async def test_rule_decomposer_async_matches_sync() -> None:
    assert await RuleDecomposer().adecompose(QUERY) == RULE_ANSWER


def test_rule_decomposer_cap_is_configurable() -> None:
    assert RuleDecomposer(max_subqueries=2).decompose(QUERY) == ["a dog", "a beach"]


@pytest.mark.parametrize("query", ["", "   ", "\n\t "])
@pytest.mark.parametrize("decomposer", [RuleDecomposer(), IdentityDecomposer()])
def test_empty_query_raises(decomposer: QueryDecomposer, query: str) -> None:
    with pytest.raises(ValueError, match="query is empty; pass a non-empty description"):
        decomposer.decompose(query)


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_bad_max_subqueries_raises(bad: Any) -> None:
    with pytest.raises(ConfigError, match="max_subqueries must be"):
        RuleDecomposer(max_subqueries=bad)


def test_rule_include_full_query_appends_after_cap() -> None:
    decomposer = RuleDecomposer(max_subqueries=2, include_full_query=True)
    assert decomposer.decompose(QUERY) == ["a dog", "a beach", QUERY]


def test_include_full_query_not_duplicated_for_single_object() -> None:
    assert RuleDecomposer(include_full_query=True).decompose("a red bicycle") == ["a red bicycle"]


def test_identity_decomposer_returns_query() -> None:
    assert IdentityDecomposer().decompose(f"  {QUERY} ") == [QUERY]


@pytest.mark.parametrize(
    "decomposer",
    [RuleDecomposer(), IdentityDecomposer(), CachedDecomposer(RuleDecomposer()),
     LLMDecomposer(lambda prompt: "[]")],
)
def test_decomposers_satisfy_protocol(decomposer: Any) -> None:
    assert isinstance(decomposer, QueryDecomposer)


# --------------------------------------------------------------------- parsing

PARSE_CASES = [
    ('["a dog", "a beach", "a red bicycle"]', RULE_ANSWER),
    ('```json\n["a dog", "a beach"]\n```', ["a dog", "a beach"]),
    ('Sure! Here you go:\n```\n["a dog"]\n```\nHope this helps.', ["a dog"]),
    ('The sub-queries are ["a dog", "a beach"] as asked.', ["a dog", "a beach"]),
    ('{"subqueries": ["a dog", "a beach"]}', ["a dog", "a beach"]),
    ('{"result": ["a dog"]}', ["a dog"]),
    ("- a dog\n- a beach\n* a red bicycle", RULE_ANSWER),
    ("Here are the sub-queries:\n1. a dog\n2) a beach\n3. a red bicycle.", RULE_ANSWER),
    ("a dog\na beach\na red bicycle", RULE_ANSWER),
    ("a dog, a beach, a red bicycle", RULE_ANSWER),
    ('- "A dog."\n- "a dog"\n- \'a beach\'\n-   \n- **a red bicycle**', ["A dog", "a beach",
                                                                      "a red bicycle"]),
    ('["a", "b", "c", "d", "e", "f", "g"]', ["a", "b", "c", "d", "e"]),
    ('["a dog", "", "  ", 3, true, null, [], {"x": 1}]', ["a dog"]),
    ('[{"entity": "a dog"}, {"entity": "a beach"}]', ["a dog", "a beach"]),
    ('["a dog", "a beach"', ["a dog", "a beach"]),  # cut-off JSON
]


@pytest.mark.parametrize(("text", "expected"), PARSE_CASES)
def test_parse_subqueries(text: str, expected: list[str]) -> None:
    assert parse_subqueries(text, max_subqueries=5) == expected


@pytest.mark.parametrize(
    "text", ["", "   ", None, "[]", "```json\n```", "!!! ??? ...", "{}", "I'm sorry, I can't help."]
)
def test_parse_subqueries_nothing_usable(text: str | None) -> None:
    assert parse_subqueries(text, max_subqueries=5) == []


@settings(max_examples=200, deadline=None)
@given(st.text(min_size=1).filter(str.strip))
def test_rule_decomposer_never_fails_on_text(query: str) -> None:
    decomposer = RuleDecomposer(max_subqueries=3)
    subqueries = decomposer.decompose(query)
    assert 1 <= len(subqueries) <= 3
    assert all(s and s == s.strip() for s in subqueries)
    assert decomposer.decompose(query) == subqueries


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_parse_subqueries_never_fails_on_text(text: str) -> None:
    subqueries = parse_subqueries(text, max_subqueries=4)
    assert len(subqueries) <= 4
    assert len({s.casefold() for s in subqueries}) == len(subqueries)


def test_parse_subqueries_cap() -> None:
    assert parse_subqueries('["a", "b", "c"]', max_subqueries=2) == ["a", "b"]


# ----------------------------------------------------------------- LLM: LlamaIndex

LLM_ANSWERS = [
    ('["a dog", "a sandy beach", "a red bicycle"]', ["a dog", "a sandy beach", "a red bicycle"]),
    ('```json\n["a dog", "a sandy beach"]\n```', ["a dog", "a sandy beach"]),
    ("- a dog\n- a sandy beach", ["a dog", "a sandy beach"]),
    ("1. a dog\n2. a sandy beach", ["a dog", "a sandy beach"]),
]


@pytest.mark.parametrize(("answer", "expected"), LLM_ANSWERS)
def test_llama_index_llm_answers(answer: str, expected: list[str]) -> None:
    model = llama(answer)
    assert LLMDecomposer(model).decompose(QUERY) == expected
    assert model.calls == 1
    assert QUERY in model.prompts[0] and "at most 5" in model.prompts[0]


@pytest.mark.parametrize("answer", ["", "   ", "%%% ### !!!", "[]", "I'm sorry, I cannot do that."])
def test_llama_index_unusable_answer_falls_back(
    answer: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert LLMDecomposer(llama(answer)).decompose(QUERY) == RULE_ANSWER
    assert "no usable sub-queries" in caplog.text


def test_llama_index_exception_falls_back(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        result = LLMDecomposer(llama(error="server down")).decompose(QUERY)
    assert result == RULE_ANSWER
    assert "RuntimeError: server down" in caplog.text


def test_llama_index_timeout_falls_back(caplog: pytest.LogCaptureFixture) -> None:
    model = llama('["a dog"]', delay=5.0)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        result = LLMDecomposer(model, timeout=0.05).decompose(QUERY)
    assert result == RULE_ANSWER
    assert "TimeoutError" in caplog.text and "0.05 s" in caplog.text


async def test_llama_index_async_path() -> None:
    model = llama('["a dog", "a red bicycle"]')
    assert await LLMDecomposer(model).adecompose(QUERY) == ["a dog", "a red bicycle"]
    assert model.calls == 1


async def test_llama_index_async_timeout_falls_back(caplog: pytest.LogCaptureFixture) -> None:
    model = llama('["a dog"]', delay=5.0)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        result = await LLMDecomposer(model, timeout=0.05).adecompose(QUERY)
    assert result == RULE_ANSWER
    assert "TimeoutError" in caplog.text


async def test_llama_index_async_exception_falls_back(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        result = await LLMDecomposer(llama(error="boom")).adecompose(QUERY)
    assert result == RULE_ANSWER
    assert "RuntimeError: boom" in caplog.text


def test_llama_index_cache_calls_model_once() -> None:
    model = llama('["a dog", "a red bicycle"]')
    decomposer = LLMDecomposer(model)
    first = decomposer.decompose(QUERY)
    first.append("mutated by caller")
    assert decomposer.decompose(f"  {QUERY.upper()} ") == ["a dog", "a red bicycle"]
    assert model.calls == 1


async def test_cache_shared_by_sync_and_async_paths() -> None:
    model = llama('["a dog"]')
    decomposer = LLMDecomposer(model)
    decomposer.decompose(QUERY)
    assert await decomposer.adecompose(QUERY) == ["a dog"]
    assert model.calls == 1


def test_cache_size_zero_disables_cache() -> None:
    model = llama('["a dog"]')
    decomposer = LLMDecomposer(model, cache_size=0)
    decomposer.decompose(QUERY)
    decomposer.decompose(QUERY)
    assert model.calls == 2


def test_fallback_answers_are_not_cached() -> None:
    model = llama("garbage ###", error="down")
    decomposer = LLMDecomposer(model)
    decomposer.decompose(QUERY)
    decomposer.decompose(QUERY)
    assert model.calls == 2


def test_cache_key_includes_max_subqueries() -> None:
    model = llama('["a", "b", "c"]')
    LLMDecomposer(model, max_subqueries=2).decompose(QUERY)
    decomposer = LLMDecomposer(model, max_subqueries=3)
    assert decomposer.decompose(QUERY) == ["a", "b", "c"]


def test_llm_include_full_query() -> None:
    decomposer = LLMDecomposer(llama('["a dog", "a beach"]'), include_full_query=True)
    assert decomposer.decompose(f" {QUERY}") == ["a dog", "a beach", QUERY]


def test_empty_query_raises_before_llm_call() -> None:
    model = llama('["a dog"]')
    with pytest.raises(ValueError, match="query is empty"):
        LLMDecomposer(model).decompose("  ")
    assert model.calls == 0


async def test_empty_query_raises_before_llm_call_async() -> None:
    model = llama('["a dog"]')
    with pytest.raises(ValueError, match="query is empty"):
        await LLMDecomposer(model).adecompose("")
    assert model.calls == 0


def test_custom_prompt_is_used_and_public() -> None:
    model = llama('["x"]')
    decomposer = LLMDecomposer(model, prompt="Split {query} into {max_subqueries}: {{json}}")
    decomposer.decompose("cats")
    assert model.prompts == ["Split cats into 5: {json}"]
    assert decomposer.prompt.startswith("Split")


def test_setting_prompt_clears_cache() -> None:
    model = llama('["x"]')
    decomposer = LLMDecomposer(model)
    decomposer.decompose(QUERY)
    decomposer.prompt = "Objects in: {query}"
    decomposer.decompose(QUERY)
    assert model.calls == 2 and model.prompts[1] == f"Objects in: {QUERY}"
    with pytest.raises(ConfigError, match=r"must contain a \{query\}"):
        decomposer.prompt = "nothing"


@pytest.mark.parametrize(
    ("prompt", "match"),
    [("no placeholder", r"must contain a \{query\}"), ("{query} {other}", "unknown placeholder")],
)
def test_bad_prompt_raises(prompt: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        LLMDecomposer(llama(), prompt=prompt)


def test_default_prompt_has_placeholders() -> None:
    assert "{query}" in DEFAULT_DECOMPOSE_PROMPT and "{max_subqueries}" in DEFAULT_DECOMPOSE_PROMPT


def test_unsupported_llm_raises() -> None:
    with pytest.raises(TypeError, match="llm must be a LlamaIndex LLM"):
        LLMDecomposer(object())


def test_no_timeout_calls_inline() -> None:
    assert LLMDecomposer(llama('["a dog"]'), timeout=None).decompose(QUERY) == ["a dog"]


async def test_no_timeout_async() -> None:
    assert await LLMDecomposer(llama('["a dog"]'), timeout=None).adecompose(QUERY) == ["a dog"]


def test_bad_timeout_raises() -> None:
    with pytest.raises(ConfigError, match="timeout must be > 0"):
        LLMDecomposer(llama(), timeout=0)


def test_custom_fallback_is_used(caplog: pytest.LogCaptureFixture) -> None:
    decomposer = LLMDecomposer(llama(error="x"), fallback=IdentityDecomposer())
    assert decomposer.decompose(QUERY) == [QUERY]


# ------------------------------------------------------------------ LLM: LangChain

@pytest.mark.parametrize(("answer", "expected"), LLM_ANSWERS)
def test_langchain_chat_model_answers(answer: str, expected: list[str]) -> None:
    assert LLMDecomposer(chat(answer)).decompose(QUERY) == expected


def test_langchain_content_blocks() -> None:
    message = AIMessage(content=[{"type": "text", "text": '["a dog", '},
                                 {"type": "text", "text": '"a beach"]'}])
    model = GenericFakeChatModel(messages=iter([message]))
    assert LLMDecomposer(model).decompose(QUERY) == ["a dog", "a beach"]


@pytest.mark.parametrize("answer", ["", "!!!", "[]"])
def test_langchain_unusable_answer_falls_back(
    answer: str, caplog: pytest.LogCaptureFixture
) -> None:
    model = GenericFakeChatModel(messages=iter([AIMessage(content=answer)]))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert LLMDecomposer(model).decompose(QUERY) == RULE_ANSWER
    assert "no usable sub-queries" in caplog.text


def test_langchain_exception_falls_back(caplog: pytest.LogCaptureFixture) -> None:
    model = GenericFakeChatModel(messages=iter([]))  # exhausted: raises on invoke
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert LLMDecomposer(model).decompose(QUERY) == RULE_ANSWER
    assert "LLM query decomposition failed" in caplog.text


def test_langchain_runnable_exception_falls_back(caplog: pytest.LogCaptureFixture) -> None:
    def fail(prompt: str) -> str:
        raise ConnectionError("connection refused")

    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert LLMDecomposer(RunnableLambda(fail)).decompose(QUERY) == RULE_ANSWER
    assert "ConnectionError: connection refused" in caplog.text


def test_langchain_timeout_falls_back(caplog: pytest.LogCaptureFixture) -> None:
    model = chat('["a dog"]', sleep=0.5)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert LLMDecomposer(model, timeout=0.05).decompose(QUERY) == RULE_ANSWER
    assert "TimeoutError" in caplog.text


async def test_langchain_async_path() -> None:
    model = chat('["a dog", "a red bicycle"]')
    assert await LLMDecomposer(model).adecompose(QUERY) == ["a dog", "a red bicycle"]


async def test_langchain_async_timeout_falls_back(caplog: pytest.LogCaptureFixture) -> None:
    async def stall(prompt: str) -> str:
        await asyncio.sleep(5.0)
        return '["a dog"]'

    # FakeListChatModel's async path sleeps in an executor thread, which a timeout
    # cannot interrupt; a runnable that really awaits can be cancelled at once.
    model = RunnableLambda(lambda prompt: '["a dog"]', afunc=stall)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert await LLMDecomposer(model, timeout=0.05).adecompose(QUERY) == RULE_ANSWER
    assert "TimeoutError" in caplog.text


def test_langchain_cache_calls_model_once() -> None:
    model = chat('["a dog"]')
    decomposer = LLMDecomposer(model)
    handler = RecordingHandler()
    decomposer.decompose(QUERY, callbacks=[handler])
    decomposer.decompose(QUERY, callbacks=[handler])
    assert handler.starts == ["chat_model"]


def test_langchain_callbacks_passed_through() -> None:
    handler = RecordingHandler()
    LLMDecomposer(chat('["a dog"]')).decompose(QUERY, callbacks=[handler])
    assert handler.starts == ["chat_model"]


class ParentRecorder(BaseCallbackHandler):
    """Records (event, run_id, parent_run_id) to check that runs nest."""

    def __init__(self) -> None:
        self.events: list[tuple[str, Any, Any]] = []

    def on_retriever_start(self, *args: Any, run_id: Any, parent_run_id: Any = None,
                           **kwargs: Any) -> None:
        self.events.append(("retriever", run_id, parent_run_id))

    def on_chat_model_start(self, *args: Any, run_id: Any, parent_run_id: Any = None,
                            **kwargs: Any) -> None:
        self.events.append(("chat_model", run_id, parent_run_id))


def test_langchain_model_run_nests_under_retriever_run() -> None:
    from langchain_core.documents import Document
    from langchain_core.retrievers import BaseRetriever

    decomposer = LLMDecomposer(chat('["a dog"]'))

    class SubqueryRetriever(BaseRetriever):
        def _get_relevant_documents(self, query: str, *, run_manager: Any) -> list[Document]:
            subqueries = decomposer.decompose(query, callbacks=run_manager.get_child())
            return [Document(page_content=s) for s in subqueries]

    recorder = ParentRecorder()
    docs = SubqueryRetriever().invoke(QUERY, config={"callbacks": [recorder]})
    assert [d.page_content for d in docs] == ["a dog"]
    (_, retriever_run, _), (kind, _, parent) = recorder.events
    assert kind == "chat_model" and parent == retriever_run


async def test_langchain_callbacks_passed_through_async() -> None:
    handler = RecordingHandler()
    await LLMDecomposer(chat('["a dog"]')).adecompose(QUERY, callbacks=[handler])
    assert handler.starts == ["chat_model"]


def test_langchain_runnable_outputs() -> None:
    as_list = RunnableLambda(lambda prompt: ["a dog", "a beach"])
    as_dict = RunnableLambda(lambda prompt: {"subqueries": ["a cat"]})
    assert LLMDecomposer(as_list).decompose(QUERY) == ["a dog", "a beach"]
    assert LLMDecomposer(as_dict).decompose(QUERY) == ["a cat"]


def test_plain_callable_llm() -> None:
    assert LLMDecomposer(lambda prompt: "- a dog\n- a cat").decompose(QUERY) == ["a dog", "a cat"]


async def test_plain_callable_llm_async() -> None:
    assert await LLMDecomposer(lambda prompt: '["a dog"]').adecompose(QUERY) == ["a dog"]


# ------------------------------------------------------------ cache wrapper, helpers


class CountingDecomposer:
    """A user-written decomposer without a callbacks argument."""

    max_subqueries = 5

    def __init__(self) -> None:
        self.calls = 0

    def decompose(self, query: str) -> list[str]:
        self.calls += 1
        return [query.lower()]

    async def adecompose(self, query: str) -> list[str]:
        return self.decompose(query)


def test_cached_decomposer_calls_inner_once() -> None:
    inner = CountingDecomposer()
    cached = CachedDecomposer(inner, maxsize=2)
    assert cached.decompose("A cat") == ["a cat"]
    assert cached.decompose("  a  CAT ") == ["a cat"]
    assert inner.calls == 1


async def test_cached_decomposer_async() -> None:
    inner = CountingDecomposer()
    cached = CachedDecomposer(inner)
    await cached.adecompose("a cat")
    assert await cached.adecompose("a cat") == ["a cat"]
    cached.decompose("a cat")
    assert inner.calls == 1


def test_cached_decomposer_evicts_least_recent() -> None:
    inner = CountingDecomposer()
    cached = CachedDecomposer(inner, maxsize=2)
    for query in ["a", "b", "a", "c", "a", "b"]:
        cached.decompose(query)
    assert inner.calls == 4  # a, b, c, then b again (evicted by c)


def test_cached_decomposer_thread_safe() -> None:
    inner = CountingDecomposer()
    cached = CachedDecomposer(inner, maxsize=8)
    queries = [f"object {i % 20}" for i in range(400)]
    threads = [threading.Thread(target=lambda q=q: cached.decompose(q)) for q in queries]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(cached._cache) == 8
    assert cached.decompose("object 3") == ["object 3"]


def test_cached_decomposer_empty_query_raises() -> None:
    with pytest.raises(ValueError, match="query is empty"):
        CachedDecomposer(CountingDecomposer()).decompose(" ")


def test_cached_decomposer_bad_size() -> None:
    with pytest.raises(ConfigError, match="cache size must be an int >= 0"):
        CachedDecomposer(RuleDecomposer(), maxsize=-1)


async def test_helpers_pass_callbacks_only_where_accepted() -> None:
    handler = RecordingHandler()
    assert decompose_query(CountingDecomposer(), "A cat", callbacks=[handler]) == ["a cat"]
    assert await adecompose_query(CountingDecomposer(), "A cat", callbacks=[handler]) == ["a cat"]
    cached = CachedDecomposer(LLMDecomposer(chat('["a dog"]')))
    assert decompose_query(cached, QUERY, callbacks=[handler]) == ["a dog"]
    assert handler.starts == ["chat_model"]


# ------------------------------------------------------------------------ factory


def test_get_decomposer_rule_and_none() -> None:
    assert isinstance(get_decomposer("rule", max_subqueries=3), RuleDecomposer)
    assert isinstance(get_decomposer(" None "), IdentityDecomposer)


def test_get_decomposer_llm_with_model() -> None:
    decomposer = get_decomposer("llm", llm=chat('["a dog"]'), timeout=5)
    assert isinstance(decomposer, LLMDecomposer)
    assert decomposer.decompose(QUERY) == ["a dog"]


def test_get_decomposer_unknown_name() -> None:
    with pytest.raises(ValueError, match="unknown decomposer 'gpt'; valid names are rule, llm"):
        get_decomposer("gpt")


def test_get_decomposer_llm_without_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HIMIR_LLM", raising=False)
    with pytest.raises(ValueError, match=r"HIMIR_LLM is not set.*pass llm= from Python"):
        get_decomposer("llm")


def test_get_decomposer_llm_bad_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HIMIR_LLM", "acme:big-model")
    with pytest.raises(ValueError, match="is not 'provider:model'"):
        get_decomposer("llm")


@pytest.mark.parametrize(("spec", "package"), [("ollama:llama3.2", "langchain-ollama"),
                                                ("openai:gpt-4o-mini", "langchain-openai")])
def test_get_decomposer_llm_missing_package(
    monkeypatch: pytest.MonkeyPatch, spec: str, package: str
) -> None:
    monkeypatch.setenv("HIMIR_LLM", spec)
    module = package.replace("-", "_")
    monkeypatch.setitem(__import__("sys").modules, module, None)  # import fails
    with pytest.raises(ImportError, match=f"pip install {package}"):
        get_decomposer("llm")


def test_get_decomposer_llm_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys
    import types

    fake = types.ModuleType("langchain_ollama")
    fake.ChatOllama = lambda model: chat(f'["{model}"]')  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "langchain_ollama", fake)
    monkeypatch.setenv("HIMIR_LLM", "ollama:llama3.2")
    assert get_decomposer("llm").decompose(QUERY) == ["llama3.2"]


def test_rejected_prompt_keeps_previous_template() -> None:
    from himir_rag.decompose import LLMDecomposer
    from himir_rag.errors import ConfigError

    decomposer = LLMDecomposer(lambda prompt: '["a cat"]')
    good = decomposer.prompt
    with pytest.raises(ConfigError, match="query"):
        decomposer.prompt = "no placeholder here"
    assert decomposer.prompt == good

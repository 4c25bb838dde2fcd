"""Tests for himir_rag.llama_index: nodes, k, filters, async, prompts, spans, query engine."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from llama_index.core import instrumentation
from llama_index.core.instrumentation.event_handlers import BaseEventHandler
from llama_index.core.instrumentation.span_handlers import SimpleSpanHandler
from llama_index.core.llms import CompletionResponse, CustomLLM, LLMMetadata
from llama_index.core.llms.callbacks import llm_completion_callback
from llama_index.core.llms.mock import MockLLMWithChatMemoryOfLastCall
from llama_index.core.prompts import PromptTemplate
from llama_index.core.query_engine import RetrieverQueryEngine
from llama_index.core.schema import ImageNode, MetadataMode, NodeRelationship, QueryBundle
from llama_index.core.vector_stores import FilterCondition, FilterOperator, MetadataFilter, MetadataFilters
from PIL import Image

from himir_rag.decompose import DEFAULT_DECOMPOSE_PROMPT, LLMDecomposer, RuleDecomposer
from himir_rag.errors import ConfigError
from himir_rag.index import HiMIRIndex
from himir_rag.llama_index import HiMIRImageNode, HiMIRRetriever, HiMIRStageEvent, metadata_filters_to_callable
from tests.conftest import make_store, ColorEncoder

# asyncio's event loop opens a socketpair: keep these tests runnable under pytest-socket's
# --disable-socket (pytest-socket comes with langchain-tests). Nothing here uses the network.
pytestmark = pytest.mark.enable_socket

QUERY = "a red square and a blue square"
META = {
    "red_blue": {"kind": "scene", "year": 2019, "tags": ["red", "blue"], "album": "Summer trip"},
    "red_green": {"kind": "scene", "year": 2021, "tags": ["red", "green"], "album": "summer"},
    "all_red": {"kind": "solid", "year": 2020, "tags": ["red"], "album": ""},
    "all_blue": {"kind": "solid", "year": 2022, "tags": ["blue"]},
    "yellow_purple": {"kind": "scene", "year": 2018, "tags": ["yellow", "purple"], "album": "winter"},
    "orange": {"kind": "solid", "year": 2023, "tags": ["orange"], "album": "winter"},
}


# ---------------------------------------------------------------------------- fixtures and fakes


def _metadata(path: Path) -> dict[str, Any]:
    return {"name": path.stem, **META[path.stem]}


@pytest.fixture
def photo_index(color_encoder: ColorEncoder, scene_dir: Path, store_kind: str, tmp_path: Path) -> HiMIRIndex:
    index = HiMIRIndex(color_encoder, store=make_store(store_kind, color_encoder.dim, tmp_path))
    index.add(scene_dir, metadata=_metadata, progress=False)
    return index


@pytest.fixture
def index_dir(photo_index: HiMIRIndex, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    photo_index.save(tmp_path / "index")
    if photo_index.store is not None:  # a Qdrant folder outside the index is opened only when named again
        monkeypatch.setenv("HIMIR_STORE_LOCATION", photo_index.store.path)
    return tmp_path / "index"


def names(nodes: list[Any]) -> list[str]:
    return [n.node.metadata["name"] for n in nodes]


class JsonListLLM(CustomLLM):
    """LlamaIndex LLM answering a JSON list of sub-queries; records prompts and which API ran."""

    answer: str = '["red", "blue"]'
    prompts: list[str] = []  # noqa: RUF012 - pydantic copies it per instance
    sync_calls: int = 0
    async_calls: int = 0

    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(model_name="json-list")

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        self.sync_calls += 1
        self.prompts.append(prompt)
        return CompletionResponse(text=self.answer)

    @llm_completion_callback()
    async def acomplete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        self.async_calls += 1
        self.prompts.append(prompt)
        await asyncio.sleep(0)
        return CompletionResponse(text=self.answer)

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> Any:
        yield self.complete(prompt)


class SpyDecomposer:
    """Rule decomposer that counts its calls."""

    def __init__(self) -> None:
        self.calls = 0
        self._rules = RuleDecomposer()

    def decompose(self, query: str) -> list[str]:
        self.calls += 1
        return self._rules.decompose(query)

    async def adecompose(self, query: str) -> list[str]:
        return self.decompose(query)


class AllChatsLLM(MockLLMWithChatMemoryOfLastCall):
    """The mock chat LLM, also keeping every chat call (refine steps make several)."""

    all_chats: list[list[Any]] = []  # noqa: RUF012

    def chat(self, messages: Any, **kwargs: Any) -> Any:
        self.all_chats.append(list(messages))
        return super().chat(messages, **kwargs)

    async def achat(self, messages: Any, **kwargs: Any) -> Any:
        self.all_chats.append(list(messages))
        return await super().achat(messages, **kwargs)


class EventRecorder(BaseEventHandler):
    events: list[Any] = []  # noqa: RUF012

    @classmethod
    def class_name(cls) -> str:
        return "EventRecorder"

    def handle(self, event: Any, **kwargs: Any) -> None:
        self.events.append(event)


@pytest.fixture
def instrumented() -> Any:
    """A span handler and an event recorder on the root dispatcher, removed afterwards."""
    root = instrumentation.get_dispatcher()
    spans, events = SimpleSpanHandler(), EventRecorder(events=[])
    root.add_span_handler(spans)
    root.add_event_handler(events)
    yield spans, events
    root.span_handlers.remove(spans)
    root.event_handlers.remove(events)


def image_blocks(messages: list[Any]) -> list[Any]:
    return [b for m in messages for b in m.blocks if b.block_type == "image"]


def text_of(messages: list[Any]) -> str:
    return "\n".join(b.text for m in messages for b in m.blocks if b.block_type == "text")


# ------------------------------------------------------------------------------------- nodes


def test_default_mode_is_the_scheduled_pass(photo_index: HiMIRIndex) -> None:
    nodes = HiMIRRetriever(photo_index, similarity_top_k=2).retrieve(QUERY)
    assert nodes[0].node.metadata["search_stats"]["mode"] == "himir"
    assert names(nodes)[0] == "red_blue"


def test_retrieve_returns_image_nodes_best_first(photo_index: HiMIRIndex, scene_dir: Path) -> None:
    nodes = HiMIRRetriever(photo_index, similarity_top_k=3).retrieve(QUERY)

    assert len(nodes) == 3
    assert names(nodes)[0] == "red_blue"
    scores = [n.score for n in nodes]
    assert scores == sorted(scores, reverse=True)
    node = nodes[0].node
    assert isinstance(node, ImageNode)
    assert node.image_path == str((scene_dir / "red_blue.png").absolute())
    assert node.image_mimetype == "image/png"
    assert node.id_ == photo_index.search(QUERY, k=1).hits[0].key


def test_node_metadata_and_text_describe_the_match(photo_index: HiMIRIndex) -> None:
    node = HiMIRRetriever(photo_index, similarity_top_k=1).retrieve(QUERY)[0].node

    meta = node.metadata
    assert meta["kind"] == "scene" and meta["year"] == 2019 and meta["tags"] == ["red", "blue"]
    assert meta["subqueries"] == ["a red square", "a blue square"]
    assert meta["score"] == pytest.approx(HiMIRRetriever(photo_index, similarity_top_k=1).retrieve(QUERY)[0].score)
    by_subquery = {r["subquery"]: r for r in meta["regions"]}
    assert set(by_subquery) == {"a red square", "a blue square"}
    red = by_subquery["a red square"]
    assert red["level"] in {"global", "region", "segment"}
    x0, y0, x1, y1 = red["bbox"]
    assert x1 <= 80 and y1 <= 60  # the red square is in the top-left corner
    assert 0.5 < red["similarity"] <= 1.0
    assert meta["query"] == QUERY and meta["image_source"] == "original"
    assert node.text == 'Photo "red_blue.png" (160x120).'  # query-independent: the match is in metadata
    assert json.dumps(meta)  # JSON-ready


def test_llm_sees_user_metadata_and_description_not_internals(photo_index: HiMIRIndex) -> None:
    node = HiMIRRetriever(photo_index, similarity_top_k=1).retrieve(QUERY)[0].node

    blocks = node.get_content_blocks(MetadataMode.LLM)
    assert [b.block_type for b in blocks] == ["text", "text", "text", "image"]
    assert "kind: scene" in blocks[0].text and "file_name: red_blue.png" in blocks[0].text
    assert "search_stats" not in blocks[0].text and "regions" not in blocks[0].text
    assert blocks[1].text == node.text
    assert blocks[2].text.startswith(f'Matches "{QUERY}" with score') and '"a red square": ' in blocks[2].text
    # the image is decoded and re-encoded, never the file's bytes, and no path is left for the framework to read
    assert blocks[3].path is None and blocks[3].image_mimetype == "image/png"
    shipped = Image.open(io.BytesIO(blocks[3].resolve_image().read()))
    assert shipped.format == "PNG" and list(shipped.convert("RGB").getdata()) == list(
        Image.open(node.image_path).convert("RGB").getdata())


def test_ids_are_stable_and_unique(photo_index: HiMIRIndex, index_dir: Path) -> None:
    first = HiMIRRetriever(photo_index, similarity_top_k=6).retrieve(QUERY)
    again = HiMIRRetriever(photo_index, similarity_top_k=6).retrieve("red")
    reloaded = HiMIRRetriever(index_dir, encoder=ColorEncoder(), similarity_top_k=6).retrieve("blue")

    ids = {n.node.metadata["name"]: n.node.id_ for n in first}
    assert len(set(ids.values())) == 6
    for nodes in (again, reloaded):
        assert {n.node.metadata["name"]: n.node.id_ for n in nodes} == ids


def test_constructor_from_directory_matches_object(photo_index: HiMIRIndex, index_dir: Path) -> None:
    from_object = HiMIRRetriever(photo_index, similarity_top_k=4).retrieve(QUERY)
    from_dir = HiMIRRetriever(str(index_dir), encoder=ColorEncoder(), similarity_top_k=4)

    assert isinstance(from_dir.index, HiMIRIndex) and len(from_dir.index) == 6
    nodes = from_dir.retrieve(QUERY)
    assert [n.node.id_ for n in nodes] == [n.node.id_ for n in from_object]
    assert [n.score for n in nodes] == pytest.approx([n.score for n in from_object])


def test_constructor_rejects_other_objects() -> None:
    with pytest.raises(TypeError, match="HiMIRIndex or an index directory"):
        HiMIRRetriever(42)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------ k


@pytest.mark.parametrize("k", [1, 2, 5])
def test_similarity_top_k(photo_index: HiMIRIndex, k: int) -> None:
    assert len(HiMIRRetriever(photo_index, similarity_top_k=k).retrieve(QUERY)) == k


def test_similarity_top_k_clamped_to_collection(photo_index: HiMIRIndex, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        nodes = HiMIRRetriever(photo_index, similarity_top_k=50).retrieve(QUERY)
    assert len(nodes) == 6
    assert "larger than the collection" in caplog.text


@pytest.mark.parametrize("k", [0, -1, True, 2.5, "3"])
def test_similarity_top_k_invalid(photo_index: HiMIRIndex, k: Any) -> None:
    with pytest.raises(ValueError, match="similarity_top_k must be a positive integer"):
        HiMIRRetriever(photo_index, similarity_top_k=k)


def test_empty_query_raises(photo_index: HiMIRIndex) -> None:
    with pytest.raises(ValueError, match="query is empty"):
        HiMIRRetriever(photo_index).retrieve("   ")


def test_unknown_mode_raises(photo_index: HiMIRIndex) -> None:
    with pytest.raises(ConfigError, match="mode 'fast' is unknown"):
        HiMIRRetriever(photo_index, mode="fast")


@pytest.mark.parametrize("mode", ["single", "mvr", "himir-full", "himir"])
def test_modes(photo_index: HiMIRIndex, mode: str) -> None:
    retriever = HiMIRRetriever(photo_index, mode=mode, similarity_top_k=2)
    nodes = retriever.retrieve("red")
    assert names(nodes)[0] in {"all_red", "red_blue", "red_green"}
    assert retriever.last_stats is not None and retriever.last_stats.mode == mode
    assert nodes[0].node.metadata["search_stats"]["mode"] == mode


def test_single_mode_does_not_decompose(photo_index: HiMIRIndex) -> None:
    spy = SpyDecomposer()
    nodes = HiMIRRetriever(photo_index, mode="single", decomposer=spy).retrieve(QUERY)
    assert spy.calls == 0
    assert nodes[0].node.metadata["subqueries"] == [QUERY]
    HiMIRRetriever(photo_index, decomposer=spy).retrieve(QUERY)
    assert spy.calls == 1


def test_missing_photo_left_out(photo_index: HiMIRIndex, scene_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    (scene_dir / "red_blue.png").unlink()
    with caplog.at_level(logging.WARNING):
        nodes = HiMIRRetriever(photo_index, similarity_top_k=2).retrieve(QUERY)
    assert "red_blue" not in names(nodes) and len(nodes) == 1
    assert "missing on disk" in caplog.text


# ------------------------------------------------------------------------------------ filters


def mf(key: str, value: Any, op: str = "==") -> MetadataFilter:
    return MetadataFilter(key=key, value=value, operator=FilterOperator(op))


FILTER_CASES = [
    (MetadataFilters(filters=[mf("kind", "solid")]), {"all_red", "all_blue", "orange"}),
    (MetadataFilters(filters=[mf("kind", "solid", "!=")]), {"red_blue", "red_green", "yellow_purple"}),
    (MetadataFilters(filters=[mf("year", 2020, ">")]), {"red_green", "all_blue", "orange"}),
    (MetadataFilters(filters=[mf("year", 2020, ">=")]), {"red_green", "all_blue", "orange", "all_red"}),
    (MetadataFilters(filters=[mf("year", 2019, "<")]), {"yellow_purple"}),
    (MetadataFilters(filters=[mf("year", 2019, "<=")]), {"yellow_purple", "red_blue"}),
    (MetadataFilters(filters=[mf("name", ["orange", "all_red"], "in")]), {"orange", "all_red"}),
    (MetadataFilters(filters=[mf("kind", ["scene"], "nin")]), {"all_red", "all_blue", "orange"}),
    (MetadataFilters(filters=[mf("tags", "red", "contains")]), {"red_blue", "red_green", "all_red"}),
    (MetadataFilters(filters=[mf("tags", ["green", "purple"], "any")]), {"red_green", "yellow_purple"}),
    (MetadataFilters(filters=[mf("tags", ["red", "blue"], "all")]), {"red_blue"}),
    (MetadataFilters(filters=[mf("album", "summer", "text_match")]), {"red_green"}),
    (MetadataFilters(filters=[mf("album", "summer", "text_match_insensitive")]), {"red_blue", "red_green"}),
    (MetadataFilters(filters=[mf("album", None, "is_empty")]), {"all_red", "all_blue"}),
    (MetadataFilters(filters=[mf("album", "winter", "!=")]), {"red_blue", "red_green", "all_red", "all_blue"}),
    (MetadataFilters(filters=[mf("kind", "scene"), mf("year", 2020, ">")]), {"red_green"}),
    (MetadataFilters(filters=[mf("name", "orange"), mf("year", 2019, "<")], condition=FilterCondition.OR),
     {"orange", "yellow_purple"}),
    (MetadataFilters(filters=[mf("kind", "scene")], condition=FilterCondition.NOT), {"all_red", "all_blue", "orange"}),
    (MetadataFilters(filters=[mf("kind", "solid"), MetadataFilters(
        filters=[mf("year", 2020), mf("year", 2023)], condition=FilterCondition.OR)]), {"all_red", "orange"}),
    (MetadataFilters(filters=[]), set(META)),
]


@pytest.mark.parametrize(("filters", "expected"), FILTER_CASES)
def test_metadata_filters_to_callable(filters: MetadataFilters, expected: set[str]) -> None:
    keep = metadata_filters_to_callable(filters)
    assert {name for name, meta in META.items() if keep({"name": name, **meta})} == expected


def test_incomparable_values_do_not_match() -> None:
    keep = metadata_filters_to_callable(MetadataFilters(filters=[mf("year", 2020, ">")]))
    assert keep({"year": "2021"}) is False
    assert keep({}) is False


@pytest.mark.parametrize(("filters", "expected"), FILTER_CASES[:3] + FILTER_CASES[15:18])
def test_retrieval_with_metadata_filters(photo_index: HiMIRIndex, filters: MetadataFilters,
                                         expected: set[str]) -> None:
    nodes = HiMIRRetriever(photo_index, similarity_top_k=6, filters=filters).retrieve("red")
    assert set(names(nodes)) == expected


def test_filters_as_dict_and_callable(photo_index: HiMIRIndex) -> None:
    as_dict = HiMIRRetriever(photo_index, similarity_top_k=6, filters={"kind": "solid", "year": [2020, 2022]})
    as_callable = HiMIRRetriever(photo_index, similarity_top_k=6, filters=lambda m: m["year"] > 2021)
    assert set(names(as_dict.retrieve("red"))) == {"all_red", "all_blue"}
    assert set(names(as_callable.retrieve("red"))) == {"all_blue", "orange"}


def test_filters_of_another_type_raise(photo_index: HiMIRIndex) -> None:
    with pytest.raises(TypeError, match="filters must be llama_index MetadataFilters"):
        HiMIRRetriever(photo_index, filters=["kind"])  # type: ignore[arg-type]


# -------------------------------------------------------------------------------------- async


async def test_aretrieve_matches_retrieve(photo_index: HiMIRIndex) -> None:
    retriever = HiMIRRetriever(photo_index, similarity_top_k=3)
    sync_nodes = retriever.retrieve(QUERY)
    async_nodes = await retriever.aretrieve(QUERY)
    assert [n.node.id_ for n in async_nodes] == [n.node.id_ for n in sync_nodes]
    assert [n.score for n in async_nodes] == pytest.approx([n.score for n in sync_nodes])


async def test_gather_several_queries(photo_index: HiMIRIndex) -> None:
    retriever = HiMIRRetriever(photo_index, similarity_top_k=1)
    queries = ["red", "blue", "orange", "a yellow square and a purple square", QUERY]
    results = await asyncio.gather(*(retriever.aretrieve(q) for q in queries))
    assert [names(nodes)[0] for nodes in results] == ["all_red", "all_blue", "orange", "yellow_purple", "red_blue"]
    assert [nodes[0].node.metadata["subqueries"] for nodes in results][0] == ["red"]


async def test_aretrieve_does_not_block_the_event_loop(photo_index: HiMIRIndex) -> None:
    """The search runs in a worker thread: the loop keeps running while texts are encoded."""
    entered, release, released_in_time = threading.Event(), threading.Event(), []
    encoder = photo_index.encoder
    embed_texts = encoder.embed_texts

    def blocking_embed_texts(texts: list[str]) -> np.ndarray:
        entered.set()
        released_in_time.append(release.wait(5))
        return embed_texts(texts)

    encoder.embed_texts = blocking_embed_texts  # type: ignore[method-assign]
    task = asyncio.create_task(HiMIRRetriever(photo_index).aretrieve(QUERY))
    assert await asyncio.to_thread(entered.wait, 5)
    release.set()  # only possible because the loop is free while the search waits
    nodes = await task
    assert released_in_time == [True]
    assert names(nodes)[0] == "red_blue"


async def test_aretrieve_uses_the_llm_async_api(photo_index: HiMIRIndex) -> None:
    llm = JsonListLLM(prompts=[])
    nodes = await HiMIRRetriever(photo_index, llm=llm, similarity_top_k=1).aretrieve("red things near blue things")
    assert (llm.async_calls, llm.sync_calls) == (1, 0)
    assert nodes[0].node.metadata["subqueries"] == ["red", "blue"]
    assert names(nodes) == ["red_blue"]


# ------------------------------------------------------------------------- LLM decomposition


def test_llm_decomposition(photo_index: HiMIRIndex) -> None:
    llm = JsonListLLM(prompts=[])
    retriever = HiMIRRetriever(photo_index, llm=llm, similarity_top_k=2)
    nodes = retriever.retrieve("something crimson beside something navy")

    assert isinstance(retriever.decomposer, LLMDecomposer)
    assert llm.sync_calls == 1
    assert "something crimson beside something navy" in llm.prompts[0]
    assert nodes[0].node.metadata["subqueries"] == ["red", "blue"]
    assert names(nodes)[0] == "red_blue"


def test_llm_and_decomposer_together_raise(photo_index: HiMIRIndex) -> None:
    with pytest.raises(ValueError, match="either llm="):
        HiMIRRetriever(photo_index, llm=JsonListLLM(prompts=[]), decomposer=RuleDecomposer())


# ------------------------------------------------------------------------------- prompt mixin


def test_get_prompts_default(photo_index: HiMIRIndex) -> None:
    prompts = HiMIRRetriever(photo_index).get_prompts()
    assert list(prompts) == ["decompose_prompt"]
    assert isinstance(prompts["decompose_prompt"], PromptTemplate)
    assert prompts["decompose_prompt"].get_template() == DEFAULT_DECOMPOSE_PROMPT


def test_update_prompts_round_trip_reaches_the_llm(photo_index: HiMIRIndex) -> None:
    llm = JsonListLLM(prompts=[])
    retriever = HiMIRRetriever(photo_index, llm=llm)
    retriever.retrieve(QUERY)
    template = PromptTemplate("Split into at most {max_subqueries} JSON phrases: {query}")

    retriever.update_prompts({"decompose_prompt": template})

    assert retriever.get_prompts()["decompose_prompt"].get_template() == template.get_template()
    retriever.retrieve(QUERY)  # same query: the LLM is asked again with the new prompt
    assert llm.prompts[-1] == f"Split into at most 5 JSON phrases: {QUERY}"
    assert llm.sync_calls == 2


def test_prompt_through_constructor(photo_index: HiMIRIndex) -> None:
    llm = JsonListLLM(prompts=[])
    retriever = HiMIRRetriever(photo_index, llm=llm, decompose_prompt=PromptTemplate("Phrases of: {query}"))
    assert retriever.get_prompts()["decompose_prompt"].get_template() == "Phrases of: {query}"
    retriever.retrieve("red")
    assert llm.prompts == ["Phrases of: red"]


@pytest.mark.parametrize("bad", ["no placeholder", "{query} and {other}"])
def test_update_prompts_rejects_bad_templates(photo_index: HiMIRIndex, bad: str) -> None:
    retriever = HiMIRRetriever(photo_index, llm=JsonListLLM(prompts=[]))
    with pytest.raises(ConfigError, match="must use {query}"):
        retriever.update_prompts({"decompose_prompt": PromptTemplate(bad)})
    assert retriever.get_prompts()["decompose_prompt"].get_template() == DEFAULT_DECOMPOSE_PROMPT


# ---------------------------------------------------------------------------- instrumentation


def _span_names(spans: SimpleSpanHandler) -> dict[str, str | None]:
    return {s.id_: s.parent_id for s in spans.completed_spans}


def _find(spans: dict[str, str | None], prefix: str) -> str:
    matches = [span for span in spans if span.startswith(prefix)]
    assert len(matches) == 1, (prefix, list(spans))
    return matches[0]


def test_spans_nest_decomposition_llm_and_search(photo_index: HiMIRIndex, instrumented: Any) -> None:
    spans, events = instrumented
    HiMIRRetriever(photo_index, llm=JsonListLLM(prompts=[])).retrieve(QUERY)

    tree = _span_names(spans)
    retrieve = _find(tree, "HiMIRRetriever.retrieve-")
    inner = _find(tree, "HiMIRRetriever._retrieve-")
    decompose = _find(tree, "HiMIRRetriever._decompose-")
    llm_call = _find(tree, "JsonListLLM.complete-")
    assert tree[inner] == retrieve
    assert tree[decompose] == inner
    assert tree[llm_call] == decompose
    assert tree[_find(tree, "HiMIRRetriever._search-")] == inner
    assert tree[_find(tree, "HiMIRRetriever._build_nodes-")] == inner

    stages = {e.stage: e for e in events.events if isinstance(e, HiMIRStageEvent)}
    assert {"decompose", "encode", "search"} <= set(stages)
    assert stages["search"].span_id == inner and stages["search"].mode == "himir"
    assert stages["search"].dot_products > 0


async def test_async_spans(photo_index: HiMIRIndex, instrumented: Any) -> None:
    spans, _ = instrumented
    await HiMIRRetriever(photo_index, llm=JsonListLLM(prompts=[])).aretrieve(QUERY)
    tree = _span_names(spans)
    decompose = _find(tree, "HiMIRRetriever._adecompose-")
    assert tree[_find(tree, "JsonListLLM.acomplete-")] == decompose
    assert tree[_find(tree, "HiMIRRetriever._asearch-")] == tree[decompose]


def test_last_stats_and_node_stats(photo_index: HiMIRIndex) -> None:
    retriever = HiMIRRetriever(photo_index, llm=JsonListLLM(prompts=[]))
    assert retriever.last_stats is None
    nodes = retriever.retrieve(QUERY)
    stats = retriever.last_stats
    assert stats is not None and stats.dot_products > 0 and stats.images_scored == 6
    assert {"decompose", "encode", "search", "total"} <= set(stats.latency_ms)
    assert stats.latency_ms["total"] >= stats.latency_ms["decompose"]
    assert nodes[0].node.metadata["search_stats"]["dot_products"] == stats.dot_products


# ------------------------------------------------------------------------------- region nodes


def test_region_nodes(photo_index: HiMIRIndex) -> None:
    nodes = HiMIRRetriever(photo_index, similarity_top_k=1, return_region_nodes=True).retrieve(QUERY)

    photo, regions = nodes[0], nodes[1:]
    assert len(regions) == 2
    colours = {}
    for region in regions:
        node = region.node
        assert isinstance(node, HiMIRImageNode) and node.image and node.image_path is None
        assert node.id_.startswith(photo.node.id_ + "#")
        assert node.relationships[NodeRelationship.PARENT].node_id == photo.node.id_
        assert node.metadata["name"] == "red_blue" and node.metadata["image_key"] == photo.node.id_
        crop = Image.open(io.BytesIO(base64.b64decode(node.image)))
        x0, y0, x1, y1 = node.metadata["bbox"]
        assert crop.size == (x1 - x0, y1 - y0)
        assert region.score == pytest.approx(node.metadata["regions"][0]["similarity"])
        colours[node.metadata["regions"][0]["subquery"]] = np.asarray(crop.convert("RGB")).reshape(-1, 3).mean(0)
    assert colours["a red square"][0] > colours["a red square"][2]  # the red crop is red
    assert colours["a blue square"][2] > colours["a blue square"][0]


async def test_region_nodes_async(photo_index: HiMIRIndex) -> None:
    retriever = HiMIRRetriever(photo_index, similarity_top_k=2, return_region_nodes=True, region_max_side=8)
    nodes = await retriever.aretrieve(QUERY)
    crops = [Image.open(io.BytesIO(base64.b64decode(n.node.image))) for n in nodes if n.node.image]
    assert crops and all(max(c.size) <= 8 for c in crops)


# ------------------------------------------------------------------------------ query engine


def test_query_engine_sends_the_photo_to_the_chat_llm(photo_index: HiMIRIndex, scene_dir: Path) -> None:
    llm = MockLLMWithChatMemoryOfLastCall(is_chat_model=True)
    retriever = HiMIRRetriever(photo_index, similarity_top_k=1)
    engine = RetrieverQueryEngine.from_args(retriever, llm=llm, multimodal=True)

    response = engine.query(QUERY)

    assert [n.node.metadata["name"] for n in response.source_nodes] == ["red_blue"]
    images = image_blocks(llm.last_chat_messages)
    assert len(images) == 1
    sent = images[0].resolve_image().read()
    assert sent == (scene_dir / "red_blue.png").read_bytes()
    assert images[0].image_mimetype == "image/png"
    text = text_of(llm.last_chat_messages)
    assert '"a red square"' in text and "kind: scene" in text and QUERY in text


async def test_query_engine_every_retrieved_photo_reaches_the_llm(photo_index: HiMIRIndex, scene_dir: Path) -> None:
    llm = AllChatsLLM(is_chat_model=True)
    engine = RetrieverQueryEngine.from_args(HiMIRRetriever(photo_index, similarity_top_k=3), llm=llm, multimodal=True)

    response = await engine.aquery(QUERY)

    retrieved = {n.node.metadata["name"] for n in response.source_nodes}
    sent = {block.resolve_image().read() for chat in llm.all_chats for block in image_blocks(chat)}
    files = {name: (p.read_bytes()) for p in scene_dir.rglob("*.png") for name in [p.stem]}
    assert sent == {files[name] for name in retrieved}


def test_query_engine_with_region_crops(photo_index: HiMIRIndex) -> None:
    llm = AllChatsLLM(is_chat_model=True)
    retriever = HiMIRRetriever(photo_index, similarity_top_k=1, return_region_nodes=True)
    engine = RetrieverQueryEngine.from_args(retriever, llm=llm, multimodal=True)
    response = engine.query(QUERY)
    assert len(response.source_nodes) == 3
    sent = [Image.open(block.resolve_image()).size for chat in llm.all_chats for block in image_blocks(chat)]
    assert (160, 120) in sent and len(sent) == 3


# --------------------------------------------------------------------------- optional imports


def test_core_does_not_import_the_frameworks() -> None:
    code = (
        "import sys, himir_rag, himir_rag.index, himir_rag.retriever, himir_rag.decompose\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('llama_index', 'langchain_core', 'langchain'))\n"
        "print(','.join(loaded))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_query_bundle_input(photo_index: HiMIRIndex) -> None:
    nodes = HiMIRRetriever(photo_index, similarity_top_k=1).retrieve(QueryBundle(query_str=QUERY))
    assert names(nodes) == ["red_blue"]


# ---------------------------------------------------------------------------------- example


def _load_example() -> Any:
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "examples" / "llamaindex_qa.py"
    spec = importlib.util.spec_from_file_location("himir_example_llamaindex_qa", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_example_query_engine_offline(photo_index: HiMIRIndex, index_dir: Path, capsys: pytest.CaptureFixture[str],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    example = _load_example()
    engine = example.build_query_engine(HiMIRRetriever(photo_index, similarity_top_k=3), example.ShownImagesLLM())
    assert "shown 3 photo(s)" in str(engine.query(QUERY)) and "red_blue.png" in str(engine.query(QUERY))

    monkeypatch.delenv("HIMIR_LLM", raising=False)
    monkeypatch.setattr(example, "ENCODER", ColorEncoder())
    assert example.main(["--index", str(index_dir), "-k", "1", "--regions", QUERY]) == 0
    out = capsys.readouterr().out
    assert "red_blue.png" in out and "shown 3 photo(s) or crop(s)" in out  # the photo and its two region crops


def test_example_llm_hook_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HIMIR_LLM", "ollama")
    with pytest.raises(ConfigError, match="HIMIR_LLM"):
        _load_example().llm_from_env()


def test_prompts_follow_a_given_llm_decomposer(photo_index: HiMIRIndex) -> None:
    decomposer = LLMDecomposer(JsonListLLM(prompts=[]), prompt="First: {query}")
    retriever = HiMIRRetriever(photo_index, decomposer=decomposer)
    assert retriever.get_prompts()["decompose_prompt"].get_template() == "First: {query}"
    retriever.update_prompts({"decompose_prompt": "Second: {query}"})
    assert decomposer.prompt == "Second: {query}"


def test_filters_can_be_replaced(photo_index: HiMIRIndex) -> None:
    retriever = HiMIRRetriever(photo_index, similarity_top_k=6)
    retriever.filters = MetadataFilters(filters=[mf("name", "orange")])
    assert names(retriever.retrieve("red")) == ["orange"]
    retriever.filters = None
    assert len(retriever.retrieve("red")) == 6

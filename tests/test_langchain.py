"""Tests for himir_rag.langchain: documents, k, filters, async, callbacks, content blocks, example chain."""

from __future__ import annotations

import asyncio
import base64
import importlib.util
import io
import logging
import sys
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.documents import Document
from langchain_core.language_models import FakeListChatModel, GenericFakeChatModel
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage
from langchain_core.runnables import RunnablePassthrough
from PIL import Image
from pydantic import ValidationError

from himir_rag.decompose import LLMDecomposer, RuleDecomposer
from himir_rag.errors import ConfigError
from himir_rag.index import HiMIRIndex
from himir_rag.langchain import HiMIRRetriever, documents_to_content_blocks, format_images, image_prompt
from tests.conftest import make_store, ColorEncoder, make_scene

# asyncio's event loop opens a socketpair: keep these tests runnable under pytest-socket's
# --disable-socket (pytest-socket comes with langchain-tests). Nothing here uses the network.
pytestmark = pytest.mark.enable_socket

QUERY = "a red square and a blue square"
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "langchain_chain.py"
META = {
    "red_blue": {"kind": "scene", "year": 2019},
    "red_green": {"kind": "scene", "year": 2021},
    "all_red": {"kind": "solid", "year": 2020},
    "all_blue": {"kind": "solid", "year": 2022},
    "yellow_purple": {"kind": "scene", "year": 2018},
    "orange": {"kind": "solid", "year": 2023},
}


@pytest.fixture
def photo_index(color_encoder: ColorEncoder, scene_dir: Path, store_kind: str, tmp_path: Path) -> HiMIRIndex:
    index = HiMIRIndex(color_encoder, store=make_store(store_kind, color_encoder.dim, tmp_path))
    index.add(scene_dir, metadata=lambda path: {"name": path.stem, **META[path.stem]}, progress=False)
    return index


@pytest.fixture
def index_dir(photo_index: HiMIRIndex, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    photo_index.save(tmp_path / "index")
    if photo_index.store is not None:  # a Qdrant folder outside the index is opened only when named again
        monkeypatch.setenv("HIMIR_STORE_LOCATION", photo_index.store.path)
    return tmp_path / "index"


def names(documents: list[Document]) -> list[str]:
    return [d.metadata["name"] for d in documents]


class RecordingChatModel(GenericFakeChatModel):
    """Fake chat model that keeps the messages it was given (as the provider would get them)."""

    seen: list[list[BaseMessage]] = []  # noqa: RUF012 - pydantic copies it per instance

    def _generate(self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None,
                  **kwargs: Any) -> Any:
        self.seen.append(list(messages))
        return super()._generate(messages, stop, run_manager, **kwargs)


class RunRecorder(BaseCallbackHandler):
    """Records retriever runs and the chat-model runs with their parents."""

    def __init__(self) -> None:
        self.retriever_runs: list[UUID] = []
        self.chat_parents: list[UUID | None] = []
        self.chat_messages: list[list[Any]] = []

    def on_retriever_start(self, serialized: Any, query: str, *, run_id: UUID, **kwargs: Any) -> None:
        self.retriever_runs.append(run_id)

    def on_chat_model_start(self, serialized: Any, messages: Any, *, run_id: UUID,
                            parent_run_id: UUID | None = None, **kwargs: Any) -> None:
        self.chat_parents.append(parent_run_id)
        self.chat_messages.append(messages[0])


# ---------------------------------------------------------------------------------- documents


def test_default_mode_is_the_scheduled_pass(photo_index: HiMIRIndex) -> None:
    documents = HiMIRRetriever(index=photo_index, k=2).invoke(QUERY)
    assert documents[0].metadata["search_stats"]["mode"] == "himir"
    assert names(documents)[0] == "red_blue"


def test_invoke_returns_documents_best_first(photo_index: HiMIRIndex, scene_dir: Path) -> None:
    documents = HiMIRRetriever(index=photo_index, k=3).invoke(QUERY)

    assert len(documents) == 3 and all(isinstance(d, Document) for d in documents)
    assert names(documents)[0] == "red_blue"
    best = documents[0]
    assert best.id == photo_index.search(QUERY, k=1).hits[0].key
    assert best.metadata["image_path"] == str((scene_dir / "red_blue.png").absolute())
    assert best.metadata["mime_type"] == "image/png"
    assert best.metadata["kind"] == "scene" and best.metadata["year"] == 2019
    assert best.metadata["score"] >= documents[1].metadata["score"] >= documents[2].metadata["score"]
    regions = {r["subquery"]: r for r in best.metadata["regions"]}
    assert set(regions) == {"a red square", "a blue square"}
    assert set(regions["a blue square"]) == {"subquery", "level", "bbox", "region_bbox", "similarity"}
    assert best.page_content.splitlines()[0] == 'Photo "red_blue.png" (160x120).'  # query-independent
    assert "kind: scene" in best.page_content and "a red square" not in best.page_content
    assert best.metadata["query"] == QUERY


def test_ids_stable_across_calls_and_reload(photo_index: HiMIRIndex, index_dir: Path) -> None:
    ids = {d.metadata["name"]: d.id for d in HiMIRRetriever(index=photo_index, k=6).invoke(QUERY)}
    reloaded = HiMIRRetriever(index=index_dir, encoder=ColorEncoder(), k=6).invoke("red")
    assert len(set(ids.values())) == 6
    assert {d.metadata["name"]: d.id for d in reloaded} == ids


def test_constructor_from_directory(photo_index: HiMIRIndex, index_dir: Path) -> None:
    from_dir = HiMIRRetriever(index=str(index_dir), encoder=ColorEncoder(), k=2)
    assert isinstance(from_dir.index, HiMIRIndex) and len(from_dir.index) == 6
    expected = HiMIRRetriever(index=photo_index, k=2).invoke(QUERY)
    assert [d.id for d in from_dir.invoke(QUERY)] == [d.id for d in expected]


def test_constructor_validation(photo_index: HiMIRIndex) -> None:
    with pytest.raises(ValidationError, match="k must be a positive integer"):
        HiMIRRetriever(index=photo_index, k=0)
    with pytest.raises(ValidationError, match="mode 'fast' is unknown"):
        HiMIRRetriever(index=photo_index, mode="fast")
    with pytest.raises(ValidationError, match="either llm="):
        HiMIRRetriever(index=photo_index, llm=FakeListChatModel(responses=["[]"]), decomposer=RuleDecomposer())
    with pytest.raises(TypeError, match="HiMIRIndex or an index directory"):
        HiMIRRetriever(index=3)


# ------------------------------------------------------------------------------------------ k


def test_k_in_constructor_and_invoke(photo_index: HiMIRIndex) -> None:
    retriever = HiMIRRetriever(index=photo_index, k=2)
    assert len(retriever.invoke(QUERY)) == 2
    assert len(retriever.invoke(QUERY, k=1)) == 1
    assert len(retriever.invoke(QUERY, k=5)) == 5
    assert len(retriever.invoke(QUERY)) == 2  # the field is unchanged


def test_k_clamped_to_collection(photo_index: HiMIRIndex, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        assert len(HiMIRRetriever(index=photo_index, k=40).invoke(QUERY)) == 6
    assert "larger than the collection" in caplog.text


@pytest.mark.parametrize("k", [0, -2, 1.5, True])
def test_invalid_k_in_invoke(photo_index: HiMIRIndex, k: Any) -> None:
    with pytest.raises(ValueError, match="k must be a positive integer"):
        HiMIRRetriever(index=photo_index).invoke(QUERY, k=k)


def test_unknown_invoke_argument(photo_index: HiMIRIndex) -> None:
    with pytest.raises(TypeError, match=r"unexpected argument\(s\) \['top_k'\]"):
        HiMIRRetriever(index=photo_index).invoke(QUERY, top_k=2)


def test_mode_in_invoke(photo_index: HiMIRIndex) -> None:
    documents = HiMIRRetriever(index=photo_index).invoke(QUERY, mode="single", k=1)
    assert documents[0].metadata["search_stats"]["mode"] == "single"
    assert documents[0].metadata["subqueries"] == [QUERY]


def test_empty_query(photo_index: HiMIRIndex) -> None:
    with pytest.raises(ValueError, match="query is empty"):
        HiMIRRetriever(index=photo_index).invoke("")


# ------------------------------------------------------------------------------------ filters


def test_filter_field_and_kwarg(photo_index: HiMIRIndex) -> None:
    solid = HiMIRRetriever(index=photo_index, k=6, filter={"kind": "solid"})
    assert set(names(solid.invoke("red"))) == {"all_red", "all_blue", "orange"}
    assert set(names(solid.invoke("red", filter={"year": [2019, 2021]}))) == {"red_blue", "red_green"}
    assert set(names(solid.invoke("red", filter=lambda m: m["year"] >= 2022))) == {"all_blue", "orange"}


async def test_filter_async(photo_index: HiMIRIndex) -> None:
    documents = await HiMIRRetriever(index=photo_index, k=6).ainvoke("red", filter={"name": ["orange"]})
    assert names(documents) == ["orange"]


# -------------------------------------------------------------------------------------- async


async def test_ainvoke_matches_invoke(photo_index: HiMIRIndex) -> None:
    retriever = HiMIRRetriever(index=photo_index, k=3)
    assert [d.id for d in await retriever.ainvoke(QUERY)] == [d.id for d in retriever.invoke(QUERY)]
    assert len(await retriever.ainvoke(QUERY, k=1)) == 1


async def test_gather_and_abatch(photo_index: HiMIRIndex) -> None:
    retriever = HiMIRRetriever(index=photo_index, k=1)
    queries = ["red", "blue", "orange", QUERY]
    gathered = await asyncio.gather(*(retriever.ainvoke(q) for q in queries))
    batched = await retriever.abatch(queries)
    expected = [["all_red"], ["all_blue"], ["orange"], ["red_blue"]]
    assert [names(d) for d in gathered] == expected
    assert [names(d) for d in batched] == expected


# -------------------------------------------------------------------- LLM decomposition, callbacks


def test_llm_decomposition_runs_as_child(photo_index: HiMIRIndex) -> None:
    model = FakeListChatModel(responses=['["red", "blue"]'])
    retriever = HiMIRRetriever(index=photo_index, llm=model, k=1)
    recorder = RunRecorder()

    documents = retriever.invoke("something crimson beside something navy", config={"callbacks": [recorder]})

    assert isinstance(retriever._decomposer, LLMDecomposer)
    assert documents[0].metadata["subqueries"] == ["red", "blue"]
    assert names(documents) == ["red_blue"]
    assert len(recorder.retriever_runs) == 1
    assert recorder.chat_parents == recorder.retriever_runs


async def test_llm_decomposition_async_runs_as_child(photo_index: HiMIRIndex) -> None:
    model = FakeListChatModel(responses=['["red", "blue"]'])
    recorder = RunRecorder()
    documents = await HiMIRRetriever(index=photo_index, llm=model, k=1).ainvoke(
        "crimson and navy", config={"callbacks": [recorder]})
    assert documents[0].metadata["subqueries"] == ["red", "blue"]
    assert recorder.chat_parents == recorder.retriever_runs and len(recorder.retriever_runs) == 1


def test_decompose_prompt(photo_index: HiMIRIndex) -> None:
    model = FakeListChatModel(responses=['["red"]'])
    recorder = RunRecorder()
    HiMIRRetriever(index=photo_index, llm=model, decompose_prompt="Phrases: {query}").invoke(
        "crimson", config={"callbacks": [recorder]})
    assert recorder.chat_messages[0][0].content == "Phrases: crimson"


# ----------------------------------------------------------------------------- content blocks


def test_content_blocks_base64(photo_index: HiMIRIndex, scene_dir: Path) -> None:
    documents = HiMIRRetriever(index=photo_index, k=2).invoke(QUERY)
    blocks = documents_to_content_blocks(documents)

    assert [b["type"] for b in blocks] == ["text", "image", "text", "image"]
    assert blocks[0]["text"].startswith(documents[0].page_content + f'\nMatches "{QUERY}" with score')
    assert blocks[1]["mime_type"] == "image/png"
    shipped = Image.open(io.BytesIO(base64.b64decode(blocks[1]["base64"])))  # re-encoded, same pixels
    assert shipped.format == "PNG" and list(shipped.convert("RGB").getdata()) == list(
        Image.open(scene_dir / "red_blue.png").convert("RGB").getdata())
    assert len(documents_to_content_blocks(documents, include_text=False)) == 2


def test_content_blocks_path(photo_index: HiMIRIndex, scene_dir: Path) -> None:
    documents = HiMIRRetriever(index=photo_index, k=1).invoke(QUERY)
    (text, image) = documents_to_content_blocks(documents, mode="path")
    assert image == {"type": "image", "url": (scene_dir / "red_blue.png").absolute().as_uri(), "mime_type": "image/png"}


def test_content_blocks_downscale_and_reencode(tmp_path: Path, color_encoder: ColorEncoder) -> None:
    big = make_scene(tmp_path / "photos" / "big_red.png", [("red", (0, 0, 100, 100))], size=(400, 300))
    bmp = tmp_path / "photos" / "blue.bmp"
    Image.new("RGB", (40, 30), (30, 60, 220)).save(bmp)
    index = HiMIRIndex(color_encoder)
    index.add([big, bmp], progress=False)
    documents = HiMIRRetriever(index=index, k=2).invoke("red")

    blocks = documents_to_content_blocks(documents, max_side=100, include_text=False)
    images = {d.metadata["file_name"]: Image.open(io.BytesIO(base64.b64decode(b["base64"])))
              for d, b in zip(documents, blocks)}
    assert images["big_red.png"].size == (100, 75)
    assert images["blue.bmp"].format == "PNG" and images["blue.bmp"].size == (40, 30)
    assert all(b["mime_type"] == "image/png" for b in blocks)


def test_content_blocks_errors() -> None:
    with pytest.raises(ValueError, match="has no 'image_path' metadata"):
        documents_to_content_blocks([Document(page_content="x", id="d1")])
    with pytest.raises(ValueError, match="mode must be 'base64' or 'path'"):
        documents_to_content_blocks([Document(page_content="x", metadata={"image_path": "/a.png"})],
                                    mode="url")  # type: ignore[arg-type]


def test_format_images_message(photo_index: HiMIRIndex) -> None:
    documents = HiMIRRetriever(index=photo_index, k=2).invoke(QUERY)
    (message,) = format_images(documents, "Which photo has both squares?")
    assert isinstance(message, HumanMessage)
    assert "Which photo has both squares?" in message.content[0]["text"]
    assert [b["type"] for b in message.content_blocks] == ["text", "text", "image", "text", "image"]
    assert message.content_blocks[2]["mime_type"] == "image/png"


def test_chain_sends_images_to_the_chat_model(photo_index: HiMIRIndex, scene_dir: Path) -> None:
    model = RecordingChatModel(messages=iter([AIMessage("The first photo.")]), seen=[])
    inputs = {"context": HiMIRRetriever(index=photo_index, k=2), "question": RunnablePassthrough()}
    chain = inputs | image_prompt() | model

    answer = chain.invoke(QUERY)

    assert answer.content == "The first photo."
    (message,) = model.seen[0]
    assert QUERY in message.content[0]["text"]
    images = [b for b in message.content_blocks if b["type"] == "image"]
    assert len(images) == 2
    assert base64.b64decode(images[0]["base64"]) == (scene_dir / "red_blue.png").read_bytes()


def test_image_prompt_needs_context() -> None:
    with pytest.raises(KeyError, match="expects"):
        image_prompt().invoke({"question": "q"})


# ------------------------------------------------------------------------------ example chain


def _load_example() -> Any:
    spec = importlib.util.spec_from_file_location("himir_example_langchain_chain", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_example_chain_with_fake_chat_model(photo_index: HiMIRIndex) -> None:
    example = _load_example()
    model = RecordingChatModel(messages=iter([AIMessage("Both squares are in red_blue.png.")]), seen=[])
    chain = example.build_chain(HiMIRRetriever(index=photo_index, k=2), model)

    assert chain.invoke(QUERY) == "Both squares are in red_blue.png."
    (message,) = model.seen[0]
    assert sum(1 for b in message.content_blocks if b["type"] == "image") == 2


def test_example_default_chat_model_is_offline(photo_index: HiMIRIndex, monkeypatch: pytest.MonkeyPatch) -> None:
    example = _load_example()
    monkeypatch.delenv("HIMIR_LLM", raising=False)
    chain = example.build_chain(HiMIRRetriever(index=photo_index, k=3), example.default_chat_model())
    answer = chain.invoke(QUERY)
    assert "shown 3 photo(s)" in answer and "red_blue.png" in answer


def test_example_main_offline(photo_index: HiMIRIndex, index_dir: Path, capsys: pytest.CaptureFixture[str],
                              monkeypatch: pytest.MonkeyPatch) -> None:
    example = _load_example()
    monkeypatch.delenv("HIMIR_LLM", raising=False)
    monkeypatch.setattr(example, "ENCODER", ColorEncoder())
    assert example.main(["--index", str(index_dir), "-k", "1", QUERY]) == 0
    out = capsys.readouterr().out
    assert "red_blue.png" in out


def test_example_llm_hook_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    example = _load_example()
    monkeypatch.setenv("HIMIR_LLM", "nonsense")
    with pytest.raises(ConfigError, match="HIMIR_LLM"):
        example.chat_model_from_env()


def test_search_stats_metadata_is_json_ready(photo_index: HiMIRIndex) -> None:
    import json

    documents = HiMIRRetriever(index=photo_index, k=2, mode="himir").invoke(QUERY)
    stats = documents[0].metadata["search_stats"]
    assert stats["mode"] == "himir" and stats["dot_products"] > 0 and isinstance(stats["extra"], dict)
    assert {"decompose", "encode", "search", "total"} <= set(stats["latency_ms"])
    json.dumps(documents[0].metadata)

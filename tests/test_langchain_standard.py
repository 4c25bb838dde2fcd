"""LangChain's standard retriever suite (langchain-tests) run against himir_rag.langchain.HiMIRRetriever.

No standard test is overridden; the collection is six synthetic photos indexed once per
module with the fast colour encoder, so the suite runs offline in well under a second.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from langchain_tests.integration_tests import RetrieversIntegrationTests

from himir_rag.index import HiMIRIndex
from himir_rag.langchain import HiMIRRetriever
from tests.conftest import ColorEncoder, make_scene, make_store

# Nothing here opens a network connection; say so in case pytest-socket (installed with
# langchain-tests) is run with --disable-socket.
pytestmark = pytest.mark.enable_socket

_COLLECTION: dict[str, HiMIRIndex] = {}


@pytest.fixture(scope="module", autouse=True)
def _photo_index(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HiMIRIndex]:
    root = tmp_path_factory.mktemp("standard") / "photos"
    make_scene(root / "red_blue.png", [("red", (5, 5, 50, 45)), ("blue", (100, 70, 150, 115))])
    make_scene(root / "red_green.png", [("red", (100, 5, 150, 45)), ("green", (5, 70, 55, 115))])
    make_scene(root / "all_red.png", [("red", (0, 0, 160, 120))])
    make_scene(root / "all_blue.png", [("blue", (0, 0, 160, 120))])
    make_scene(root / "orange.png", [("orange", (40, 30, 120, 90))])
    index = HiMIRIndex(ColorEncoder())
    index.add(root, metadata=lambda path: {"name": path.stem}, progress=False)
    _COLLECTION["index"] = index
    on_qdrant = HiMIRIndex(ColorEncoder(), store=make_store("qdrant", ColorEncoder.dim, root.parent))
    on_qdrant.add(root, metadata=lambda path: {"name": path.stem}, progress=False)
    _COLLECTION["qdrant"] = on_qdrant
    yield index
    _COLLECTION.clear()


class TestHiMIRRetrieverStandard(RetrieversIntegrationTests):
    @property
    def retriever_constructor(self) -> type[HiMIRRetriever]:
        return HiMIRRetriever

    @property
    def retriever_constructor_params(self) -> dict[str, Any]:
        return {"index": _COLLECTION["index"], "k": 2}

    @property
    def retriever_query_example(self) -> str:
        return "a red square and a blue square"


class TestHiMIRRetrieverStandardOnQdrant(RetrieversIntegrationTests):
    """The same suite with the region vectors in Qdrant (embedded local mode)."""

    @property
    def retriever_constructor(self) -> type[HiMIRRetriever]:
        return HiMIRRetriever

    @property
    def retriever_constructor_params(self) -> dict[str, Any]:
        return {"index": _COLLECTION["qdrant"], "k": 2}

    @property
    def retriever_query_example(self) -> str:
        return "a red square and a blue square"


def test_standard_collection_is_used(tmp_path: Path) -> None:
    """The suite's retriever really ranks: the photo with both squares comes first."""
    retriever = HiMIRRetriever(**TestHiMIRRetrieverStandard().retriever_constructor_params)
    assert retriever.invoke("a red square and a blue square")[0].metadata["name"] == "red_blue"

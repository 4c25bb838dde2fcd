"""Framework interplay: fusing retrievers over one index, building from framework documents, faiss / model installs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from langchain_core.documents import Document
from llama_index.core import SimpleDirectoryReader
from llama_index.core.llms.mock import MockLLM
from llama_index.core.retrievers import QueryFusionRetriever
from llama_index.core.schema import ImageDocument

from himir_rag.errors import ConfigError, EncoderUnavailableError, MissingDependencyError
from himir_rag.index import HiMIRIndex
from himir_rag.langchain import HiMIRRetriever as LangChainRetriever
from himir_rag.llama_index import HiMIRRetriever
from tests.conftest import ColorEncoder, make_scene


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    root = tmp_path / "photos"
    make_scene(root / "red.png", [("red", (0, 0, 160, 120))])
    make_scene(root / "red_blue.png", [("red", (0, 0, 80, 120)), ("blue", (80, 0, 160, 120))])
    make_scene(root / "green.png", [("green", (0, 0, 160, 120))])
    make_scene(root / "trip" / "red.png", [("red", (0, 0, 60, 120)), ("yellow", (60, 0, 160, 120))])
    return root


@pytest.fixture
def index(photos: Path) -> HiMIRIndex:
    return HiMIRIndex.build(photos, encoder=ColorEncoder(), progress=False)


# -- one entry per photo when retrievers are fused ----------------------------------------------------
def _fused(index: HiMIRIndex, mode: str) -> QueryFusionRetriever:
    return QueryFusionRetriever([HiMIRRetriever(index, similarity_top_k=4),
                                 HiMIRRetriever(index, similarity_top_k=4, mode="single")],
                                llm=MockLLM(), mode=mode, num_queries=1, use_async=False, similarity_top_k=10)


def test_node_identity_does_not_depend_on_the_query_or_mode(index: HiMIRIndex) -> None:
    himir = {n.node.node_id: n.node for n in HiMIRRetriever(index, similarity_top_k=4).retrieve("red")}
    single = {n.node.node_id: n.node for n in HiMIRRetriever(index, similarity_top_k=4, mode="single")
              .retrieve("a green thing")}
    assert set(himir) == set(single)
    for node_id, node in himir.items():
        assert (node.text, node.hash) == (single[node_id].text, single[node_id].hash)
        assert node.metadata["score"] != single[node_id].metadata["score"]  # the per-query part is metadata


def test_reciprocal_rerank_counts_a_photo_found_by_both_once_with_both_votes(index: HiMIRIndex) -> None:
    himir = HiMIRRetriever(index, similarity_top_k=4).retrieve("red")
    single = HiMIRRetriever(index, similarity_top_k=4, mode="single").retrieve("red")
    fused = _fused(index, "reciprocal_rerank").retrieve("red")

    ids = [n.node.node_id for n in fused]
    assert len(ids) == len(set(ids)) == 4  # one entry per photo
    assert himir[0].node.node_id == single[0].node.node_id == ids[0]
    assert fused[0].score == pytest.approx(2 / 60)  # 1/(rank + 60) from each retriever, rank 0
    assert fused[0].score > max(1 / 60, fused[1].score)


def test_relative_score_fusion_adds_the_two_scores(index: HiMIRIndex) -> None:
    fused = _fused(index, "relative_score").retrieve("red")
    ids = [n.node.node_id for n in fused]
    assert len(ids) == len(set(ids)) == 4
    assert fused[0].score == pytest.approx(1.0)  # best in both: 0.5 * 1 + 0.5 * 1


def test_ensemble_retriever_merges_photos_without_id_key(index: HiMIRIndex) -> None:
    from langchain_classic.retrievers import EnsembleRetriever

    ensemble = EnsembleRetriever(retrievers=[LangChainRetriever(index=index, k=4),
                                             LangChainRetriever(index=index, k=4, mode="single")], weights=[0.5, 0.5])
    documents = ensemble.invoke("red")
    assert len(documents) == 4 and len({d.id for d in documents}) == 4
    assert len({d.page_content for d in documents}) == 4  # two "red.png" in different folders stay apart
    assert {d.metadata["file_name"] for d in documents} == {"red.png", "red_blue.png", "green.png"}
    by_key = EnsembleRetriever(retrievers=ensemble.retrievers, weights=[0.5, 0.5], id_key="image_key").invoke("red")
    assert [d.id for d in by_key] == [d.id for d in documents]


# -- building from framework documents -------------------------------------------------------------------
def test_build_from_simple_directory_reader_keeps_ids_and_metadata(photos: Path) -> None:
    documents = SimpleDirectoryReader(str(photos), recursive=True).load_data()
    built = HiMIRIndex.build(documents, encoder=ColorEncoder(), progress=False)

    assert len(built) == 4 and built.root == str(photos)
    nodes = built.as_llama_index_retriever(similarity_top_k=4).retrieve("red")
    by_path = {d.metadata["file_path"]: d for d in documents}
    for node in nodes:
        document = by_path[node.node.metadata["photo_path"]]
        assert node.node.node_id == document.doc_id  # the reader's id comes back as the node id
        assert node.node.metadata["doc_id"] == document.doc_id
        assert node.node.metadata["file_type"] == document.metadata["file_type"]
        assert "file_path" not in node.node.metadata  # the index stores the path itself, root-relative


def test_add_image_documents_and_langchain_documents(photos: Path, tmp_path: Path) -> None:
    built = HiMIRIndex(ColorEncoder())
    report = built.add([ImageDocument(image_path=str(photos / "red.png"), id_="photo-1", metadata={"album": "a"}),
                        Document(page_content="", id="photo-2", metadata={"source": str(photos / "green.png"),
                                                                         "album": "b"}),
                        photos / "red_blue.png"], progress=False)
    assert report.added == 3
    documents = built.as_langchain_retriever(k=3).invoke("red")
    by_id = {d.id: d for d in documents}
    assert by_id["photo-1"].metadata["album"] == "a" and by_id["photo-2"].metadata["album"] == "b"
    assert len(by_id) == 3  # the plain path gets the photo's key
    built.save(tmp_path / "index")
    reloaded = HiMIRIndex.load(tmp_path / "index", encoder=ColorEncoder())
    assert {d.id for d in reloaded.as_langchain_retriever(k=3).invoke("red")} == set(by_id)


def test_documents_with_a_metadata_mapping_resolve_keys_as_add_does(photos: Path, monkeypatch) -> None:
    monkeypatch.chdir(photos.parent)
    built = HiMIRIndex(ColorEncoder())
    built.add([ImageDocument(image_path=str(photos / "red.png"), metadata={"album": "a"}),
               ImageDocument(image_path=str(photos / "green.png"))],
              metadata={f"{photos.name}/red.png": {"year": 2021}, "green.png": {"year": 2020}}, progress=False)
    by_name = {Path(r.path).name: r.metadata for r in built.images}
    assert by_name["red.png"]["year"] == 2021 and by_name["red.png"]["album"] == "a"  # relative key, both kept
    assert by_name["green.png"]["year"] == 2020  # a unique bare name


def test_document_without_a_path_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="document 'x' names no image file"):
        HiMIRIndex(ColorEncoder()).add([Document(page_content="a caption", id="x")], progress=False)


# -- install: faiss extras, model downloads ---------------------------------------------------------------
def test_missing_faiss_names_the_extras(monkeypatch: pytest.MonkeyPatch) -> None:
    from himir_rag.store.faiss import import_faiss

    monkeypatch.setitem(sys.modules, "faiss", None)  # as if not installed
    with pytest.raises(MissingDependencyError, match=r"himir-rag\[cpu\]' \(faiss-cpu\) or 'himir-rag\[gpu\]'"):
        import_faiss()


def test_clip_models_download_unless_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers

    from himir_rag.encoders.clip import ClipEncoder, downloads_allowed

    calls: list[bool] = []

    def refuse(model: str, **kwargs: object) -> None:  # records the policy, never downloads
        calls.append(bool(kwargs["local_files_only"]))
        raise OSError("no network in tests")

    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", refuse)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    assert downloads_allowed()
    with pytest.raises(EncoderUnavailableError, match="check the model id or directory and the network"):
        ClipEncoder("some-org/some-clip")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(EncoderUnavailableError, match=r"downloads are off \(HF_HUB_OFFLINE=1"):
        ClipEncoder("some-org/some-clip")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    with pytest.raises(EncoderUnavailableError, match="downloads are off"):
        ClipEncoder("some-org/some-clip", allow_download=False)
    assert calls == [False, True, True]

"""Query by photo: ``HiMIRIndex.search(image=...)``, both adapters and ``himir search --image``.

The fast tests use the colour encoder on synthetic scenes (both stores); the acceptance
tests at the end build the demo index with the real offline encoder.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from PIL import Image

from himir_rag.errors import ImageLoadError
from himir_rag.index import HiMIRIndex
from tests.conftest import ColorEncoder, make_store

PHOTO = "red_blue.png"


@pytest.fixture
def photo_index(color_encoder: ColorEncoder, scene_dir: Path, store_kind: str, tmp_path: Path) -> HiMIRIndex:
    index = HiMIRIndex(color_encoder, store=make_store(store_kind, color_encoder.dim, tmp_path))
    index.add(scene_dir, progress=False)
    return index


def names(result) -> list[str]:
    return [Path(hit.path).name for hit in result.hits]


# ------------------------------------------------------------------------------------- core


@pytest.mark.parametrize("mode", ["himir", "himir-full", "mvr", "single"])
def test_query_photo_finds_itself_first(photo_index: HiMIRIndex, scene_dir: Path, mode: str) -> None:
    result = photo_index.search(image=scene_dir / PHOTO, k=3, mode=mode)
    assert names(result)[0] == PHOTO
    if mode == "mvr":  # mvr stores no region level: the photo's object-region sub-queries match segments
        assert 0.98 <= result.hits[0].score < 1.0 + 2e-3
    else:
        assert result.hits[0].score == pytest.approx(1.0, abs=2e-3)
    assert result.query == "" and result.image == str(scene_dir / PHOTO)
    n_regions = 1 if mode == "single" else 21  # 1+4+16, nothing pruned on these scenes (as indexed)
    assert len(result.subqueries) == n_regions == result.stats.extra["query_photo_regions"]
    assert result.subqueries[0] == "photo global [0, 0, 160, 120]"
    assert len(result.hits[0].regions) == n_regions


def test_photo_regions_match_region_to_region(photo_index: HiMIRIndex, scene_dir: Path) -> None:
    """Each query-photo region finds the same box of the same photo (its own MaxSim = 1)."""
    hit = photo_index.search(image=scene_dir / PHOTO, k=1, mode="himir-full").hits[0]
    for match in hit.regions:
        level, box = match.subquery.removeprefix("photo ").split(" ", 1)
        assert match.score == pytest.approx(1.0, abs=2e-3)
        if len({tuple(m.region_bbox) for m in hit.regions}) == len(hit.regions):  # no two regions look the same
            assert (match.level, list(match.region_bbox)) == (level, json.loads(box))


def test_scheduled_pass_ranks_photo_queries_as_the_exact_mode(photo_index: HiMIRIndex, scene_dir: Path,
                                                               store_kind: str) -> None:
    for photo in sorted(scene_dir.rglob("*.png")):
        fast = photo_index.search(image=photo, k=4, mode="himir")
        exact = photo_index.search(image=photo, k=4, mode="himir-full")
        assert [h.score for h in fast.hits] == pytest.approx([h.score for h in exact.hits], abs=1e-5)
        assert fast.stats.dot_products < exact.stats.dot_products  # the bounds skip segments, on every store


def test_path_bytes_and_pil_image_give_the_same_ranking(photo_index: HiMIRIndex, scene_dir: Path) -> None:
    path = scene_dir / PHOTO
    by_path = photo_index.search(image=path, k=4)
    with Image.open(path) as img:
        by_pil = photo_index.search(image=img, k=4)
    by_bytes = photo_index.search(image=path.read_bytes(), k=4)
    assert names(by_path) == names(by_pil) == names(by_bytes)
    assert [h.score for h in by_path.hits] == pytest.approx([h.score for h in by_bytes.hits])
    assert by_bytes.image == "query image"


def test_text_and_photo_scores_are_the_weighted_mean(color_encoder: ColorEncoder, scene_dir: Path) -> None:
    index = HiMIRIndex(color_encoder)
    index.add(scene_dir, progress=False)
    n = len(index)
    text = index.search("green", k=n, mode="himir-full")
    photo = index.search(image=scene_dir / PHOTO, k=n, mode="himir-full")
    text_score = {h.path: h.score for h in text.hits}
    photo_score = {h.path: h.score for h in photo.hits}
    for weight in (0.5, 0.8):
        both = index.search("green", image=scene_dir / PHOTO, k=n, mode="himir-full", image_weight=weight)
        assert both.subqueries[0] == "green" and both.subqueries[1:] == photo.subqueries
        for hit in both.hits:
            expected = (1 - weight) * text_score[hit.path] + weight * photo_score[hit.path]
            assert hit.score == pytest.approx(expected, abs=1e-4)
            # reported similarities are plain cosines, not the weighted ones
            plain = {m.subquery: m.score for h in photo.hits + text.hits if h.path == hit.path for m in h.regions}
            for match in hit.regions:
                assert match.score == pytest.approx(plain[match.subquery], abs=1e-4)
    mixed = index.search("green", image=scene_dir / PHOTO, k=2)
    assert names(mixed) == ["red_green.png", PHOTO]  # the photo's look and the text's colour


def test_text_and_photo_in_single_mode_on_both_stores(photo_index: HiMIRIndex, scene_dir: Path) -> None:
    """One vector per image in ``single``: the weighted sum of text and photo scores the weighted mean."""
    n = len(photo_index)
    text = {h.path: h.score for h in photo_index.search("green", k=n, mode="single").hits}
    photo = {h.path: h.score for h in photo_index.search(image=scene_dir / PHOTO, k=n, mode="single").hits}
    both = photo_index.search("green", image=scene_dir / PHOTO, k=n, mode="single", image_weight=0.25)
    assert both.subqueries == ("green + photo global [0, 0, 160, 120]",)
    for hit in both.hits:
        assert hit.score == pytest.approx(0.75 * text[hit.path] + 0.25 * photo[hit.path], abs=1e-4)
        assert len(hit.regions) == 1 and hit.regions[0].level == "global"


def test_photo_query_errors_are_one_line(photo_index: HiMIRIndex, scene_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "garbage.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    with pytest.raises(ImageLoadError, match=r"garbage.jpg: cannot decode image|garbage.jpg: not an image"):
        photo_index.search(image=tmp_path / "garbage.jpg")
    with pytest.raises(ImageLoadError, match="nope.png: cannot read file"):
        photo_index.search(image=tmp_path / "nope.png")
    with pytest.raises(ImageLoadError, match="query image: not an image file Pillow can decode"):
        photo_index.search(image=b"garbage")
    with pytest.raises(ImageLoadError, match="query image: empty"):
        photo_index.search(image=b"")
    with pytest.raises(TypeError, match="path, bytes or a PIL image"):
        photo_index.search(image=42)
    for weight in (0, 1, 1.5, True):
        with pytest.raises(ValueError, match="image_weight must be"):
            photo_index.search("red", image=scene_dir / PHOTO, image_weight=weight)
    with pytest.raises(ValueError, match="query is empty"):
        photo_index.search()
    with pytest.raises(ValueError, match="k must be a positive integer"):
        photo_index.search(image=scene_dir / PHOTO, k=0)


def test_query_photo_over_the_pixel_limit_is_refused(color_encoder: ColorEncoder, scene_dir: Path) -> None:
    index = HiMIRIndex(color_encoder)
    index.add(scene_dir, progress=False)
    index.config = index.config.replace(max_image_pixels=100)
    with pytest.raises(ImageLoadError, match="exceeds max_image_pixels=100"):
        index.search(image=(scene_dir / PHOTO).read_bytes())


def test_text_search_is_unchanged_by_the_image_parameter(photo_index: HiMIRIndex) -> None:
    positional = photo_index.search("a red square and a blue square", k=3)
    keyword = photo_index.search(query="a red square and a blue square", k=3, image=None)
    assert names(positional) == names(keyword) and positional.image is None
    assert list(positional.subqueries) == ["a red square", "a blue square"]


async def test_asearch_takes_a_photo(photo_index: HiMIRIndex, scene_dir: Path) -> None:
    results = await asyncio.gather(photo_index.asearch(image=scene_dir / PHOTO, k=2),
                                   photo_index.asearch("green", image=scene_dir / PHOTO, k=2))
    assert names(results[0])[0] == PHOTO and names(results[1])[0] == "red_green.png"


# --------------------------------------------------------------------------------- LlamaIndex


def test_llama_index_retriever_is_a_multimodal_retriever(photo_index: HiMIRIndex, scene_dir: Path) -> None:
    from llama_index.core.base.base_multi_modal_retriever import MultiModalRetriever
    from llama_index.core.schema import MetadataMode, QueryBundle

    from himir_rag.llama_index import HiMIRRetriever
    from himir_rag.retriever import match_text

    retriever = HiMIRRetriever(photo_index, similarity_top_k=2)
    assert isinstance(retriever, MultiModalRetriever)
    photo = str(scene_dir / PHOTO)
    for nodes in (retriever.retrieve(QueryBundle(query_str="", image_path=photo)),
                  retriever.image_to_image_retrieve(photo),
                  retriever.image_to_image_retrieve(QueryBundle(query_str="", image_path=photo))):
        assert Path(nodes[0].node.image_path).name == PHOTO
        assert nodes[0].score == pytest.approx(1.0, abs=2e-3)
        node = nodes[0].node
        # the query photo is per-query data: metadata and the rendered match, never the node's text or id
        assert node.metadata["query_image"] == photo
        assert f'the query photo "{PHOTO}"' in match_text(node.metadata)
        assert any(f'the query photo "{PHOTO}"' in getattr(block, "text", "")
                   for block in node.get_content_blocks(MetadataMode.LLM))
        assert node.text == f'Photo "{PHOTO}" (160x120).' and "query photo" not in node.text
    by_text = {n.node.image_path: n.node for n in HiMIRRetriever(photo_index, similarity_top_k=6).retrieve("blue")}
    assert by_text[node.image_path].id_ == node.id_ and by_text[node.image_path].hash == node.hash
    both = retriever.retrieve(QueryBundle(query_str="green", image_path=photo))
    assert Path(both[0].node.image_path).name == "red_green.png"
    assert both[0].node.metadata["subqueries"][0] == "green"
    text = retriever.text_to_image_retrieve("a red square and a blue square")
    assert [n.node.id_ for n in text] == [n.node.id_ for n in retriever.retrieve("a red square and a blue square")]
    # text_to_image ignores a bundle's photo; text_retrieve: the index holds no text nodes
    ignored = retriever.text_to_image_retrieve(QueryBundle(query_str="green", image_path=photo))
    assert Path(ignored[0].node.image_path).name == "red_green.png" and "query_image" not in ignored[0].node.metadata
    assert retriever.text_retrieve("green") == []
    with pytest.raises(ValueError, match="needs a query photo"):
        retriever.image_to_image_retrieve(QueryBundle(query_str="green"))


async def test_llama_index_async_photo_queries(photo_index: HiMIRIndex, scene_dir: Path) -> None:
    from llama_index.core.schema import QueryBundle

    from himir_rag.llama_index import HiMIRRetriever

    retriever = HiMIRRetriever(photo_index, similarity_top_k=2)
    photo = str(scene_dir / PHOTO)
    by_photo = await retriever.aimage_to_image_retrieve(photo)
    by_bundle = await retriever.aretrieve(QueryBundle(query_str="", image_path=photo))
    by_text = await retriever.atext_to_image_retrieve("green")
    assert Path(by_photo[0].node.image_path).name == Path(by_bundle[0].node.image_path).name == PHOTO
    assert Path(by_text[0].node.image_path).name in {"red_green.png"}
    assert await retriever.atext_retrieve("green") == []


# ---------------------------------------------------------------------------------- LangChain


def test_langchain_image_retriever_in_a_chain(photo_index: HiMIRIndex, scene_dir: Path) -> None:
    from langchain_core.runnables import RunnableLambda

    from himir_rag.langchain import HiMIRImageRetriever

    retriever = HiMIRImageRetriever(index=photo_index, k=2)
    docs = retriever.invoke(str(scene_dir / PHOTO))
    assert Path(docs[0].metadata["image_path"]).name == PHOTO
    assert docs[0].metadata["score"] == pytest.approx(1.0, abs=2e-3)
    assert docs[0].metadata["query_image"] == str(scene_dir / PHOTO) and "query photo" not in docs[0].page_content
    chain = retriever | RunnableLambda(lambda found: [d.metadata["file_name"] for d in found])
    assert chain.invoke(str(scene_dir / PHOTO))[0] == PHOTO
    assert retriever.invoke(str(scene_dir / PHOTO), k=1, mode="single")[0].metadata["file_name"] == PHOTO
    with_text = HiMIRImageRetriever(index=photo_index, k=2, text="green")
    assert with_text.invoke(str(scene_dir / PHOTO))[0].metadata["file_name"] == "red_green.png"
    with pytest.raises(ValueError, match="path of a query photo"):
        retriever.invoke("  ")
    with pytest.raises(ImageLoadError, match="cannot read file"):
        retriever.invoke(str(scene_dir / "missing.png"))


async def test_langchain_image_retriever_async(photo_index: HiMIRIndex, scene_dir: Path) -> None:
    from himir_rag.langchain import HiMIRImageRetriever

    docs = await HiMIRImageRetriever(index=photo_index, k=2).ainvoke(str(scene_dir / PHOTO))
    assert docs[0].metadata["file_name"] == PHOTO


# ------------------------------------------------------- acceptance: real photos, the real CLI


def _cli_top(index_dir: Path, *args: str) -> list[str]:
    from typer.testing import CliRunner

    from himir_rag.cli import app

    result = CliRunner().invoke(app, ["search", str(index_dir), *args, "-k", "3", "--json"])
    assert result.exit_code == 0, result.output
    return [Path(hit["path"]).stem for hit in json.loads(result.stdout)["results"]]


@pytest.mark.slow
def test_cli_image_query_ranks_the_photo_its_copies_and_crops_first(demo_index, tmp_path: Path) -> None:
    index_dir, photos = demo_index
    original = photos["motorcycle"]
    with Image.open(original) as img:
        width, height = img.size
        img.resize((width // 2, height // 2)).save(tmp_path / "half.jpg", quality=85)
        img.crop((width // 10, height // 10, width - width // 10, height - height // 10)).save(tmp_path / "crop.png")
    assert _cli_top(index_dir, "--image", str(original))[0] == "motorcycle"
    assert "motorcycle" in _cli_top(index_dir, "--image", str(tmp_path / "half.jpg"))
    assert "motorcycle" in _cli_top(index_dir, "--image", str(tmp_path / "crop.png"))


@pytest.mark.slow
def test_demo_photos_find_themselves_and_their_variants(demo_index, tmp_path: Path) -> None:
    index_dir, photos = demo_index
    index = HiMIRIndex.load(index_dir)
    for name in ("cat", "coffee", "astronaut", "scene_cat_and_coffee"):  # ~1 s a photo query on one core
        path = photos[name]
        with Image.open(path) as img:
            width, height = img.size
            half = img.resize((width // 2, height // 2))
            crop = img.crop((width // 10, height // 10, width - width // 10, height - height // 10))
        crop.save(tmp_path / f"{name}_crop.png")
        itself = index.search(image=path, k=3)
        assert Path(itself.hits[0].path).stem == name and itself.hits[0].score > 0.99
        for variant in (half, tmp_path / f"{name}_crop.png"):
            assert name in [Path(h.path).stem for h in index.search(image=variant, k=3).hits], (name, variant)


@pytest.mark.slow
def test_cli_text_and_photo_together_and_errors(demo_index, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from himir_rag.cli import app

    index_dir, photos = demo_index
    assert _cli_top(index_dir, "a cup of coffee", "--image", str(photos["cat"]))[0] == "scene_cat_and_coffee"
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff broken")
    result = CliRunner().invoke(app, ["search", str(index_dir), "--image", str(tmp_path / "broken.jpg")])
    assert result.exit_code == 1 and "broken.jpg" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.output
    result = CliRunner().invoke(app, ["search", str(index_dir), "--image", str(photos["cat"]),
                                      "--queries", str(tmp_path / "q.jsonl")])
    assert result.exit_code == 1 and "not both" in result.stderr
    result = CliRunner().invoke(app, ["search", str(index_dir), "--image", str(photos["cat"]), "-k", "1"])
    assert result.exit_code == 0 and result.stdout.startswith(f"query photo: {photos['cat']}")


def test_model_loading_is_reported_apart_from_the_first_query_encoding(demo_index):
    index_dir, _ = demo_index
    index = HiMIRIndex.load(index_dir)  # the encoder is built and loaded on first use
    first = index.search("a cat", k=3)
    second = index.search("a dog", k=3)
    assert "load_models" in first.stats.latency_ms and "load_models" not in second.stats.latency_ms
    assert first.stats.latency_ms["load_models"] >= 0 and first.stats.latency_ms["encode"] >= 0

"""The one filter evaluator (himir_rag.filters) and its use by the index, both adapters and the Qdrant store."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from himir_rag.config import HiMIRConfig
from himir_rag.errors import ConfigError
from himir_rag.filters import FIELD_OPERATORS, compile_filter
from himir_rag.hierarchy import Level
from himir_rag.index import HiMIRIndex
from himir_rag.store.base import KEY_SHIFT
from tests.conftest import ColorEncoder, make_store

META = {
    "red_blue.png": {"album": "summer 2020", "year": 2020, "tags": ["red", "blue"], "n": 1, "flag": True},
    "red_green.png": {"album": "Summer", "year": 2021, "tags": ["red", "green"], "n": True},
    "all_red.png": {"year": 2022, "tags": ["red"], "n": 1.0, "flag": False},
    "all_blue.png": {"year": "2023", "tags": [], "album": ""},
    "sub/yellow_purple.png": {"year": 2019, "tags": ["yellow", "purple"], "rating": [3, 5]},
    "sub/orange.png": {"year": 2024, "kind": {"nested": 1}},
}
VIEWS = {Path(key).name: {**value, "file_name": Path(key).name, "path": f"/x/photos/{key}", "width": 160,
                           "height": 120}
         for key, value in META.items()}


def kept(filters) -> set[str]:
    keep = compile_filter(filters)
    return {name for name, view in VIEWS.items() if keep(view)}


EVALUATOR_CASES = [
    ({"year": 2020}, {"red_blue.png"}),
    ({"year": [2020, 2021]}, {"red_blue.png", "red_green.png"}),
    ({"year": {"$gte": 2021}}, {"red_green.png", "all_red.png", "orange.png"}),  # "2023" is a string
    ({"year": {"$gt": 2019, "$lt": 2022}}, {"red_blue.png", "red_green.png"}),
    ({"year": {"$lte": "2023"}}, {"all_blue.png"}),  # strings compare with strings only
    ({"year": {"$ne": 2020}}, set(VIEWS) - {"red_blue.png"}),
    ({"year": {"$nin": [2020, 2021]}}, set(VIEWS) - {"red_blue.png", "red_green.png"}),
    ({"tags": "red"}, {"red_blue.png", "red_green.png", "all_red.png"}),  # list field: any element
    ({"tags": ["green", "purple"]}, {"red_green.png", "yellow_purple.png"}),
    ({"tags": {"$ne": "red"}}, {"all_blue.png", "yellow_purple.png", "orange.png"}),
    ({"tags": {"$all": ["red", "blue"]}}, {"red_blue.png"}),
    ({"tags": {"$contains": "red"}}, {"red_blue.png", "red_green.png", "all_red.png"}),
    ({"album": {"$contains": "summer"}}, {"red_blue.png"}),
    ({"album": {"$icontains": "summer"}}, {"red_blue.png", "red_green.png"}),
    ({"rating": {"$gt": 4}}, {"yellow_purple.png"}),
    ({"n": True}, {"red_green.png"}),  # True is not 1 ...
    ({"n": 1}, {"red_blue.png", "all_red.png"}),  # ... and 1 is not True (1.0 is 1)
    ({"n": [True]}, {"red_green.png"}),
    ({"flag": False}, {"all_red.png"}),
    ({"kind": {"$eq": {"nested": 1}}}, {"orange.png"}),
    ({"album": {"$exists": True}}, {"red_blue.png", "red_green.png", "all_blue.png"}),
    ({"album": {"$empty": True}}, {"all_blue.png", "all_red.png", "yellow_purple.png", "orange.png"}),
    ({"no_such_key": 1}, set()),
    ({"no_such_key": {"$ne": 1}}, set(VIEWS)),
    ({"$or": [{"year": 2019}, {"tags": "green"}]}, {"yellow_purple.png", "red_green.png"}),
    ({"$and": [{"tags": "red"}, {"year": {"$gte": 2021}}]}, {"red_green.png", "all_red.png"}),
    ({"$not": {"tags": "red"}}, {"all_blue.png", "yellow_purple.png", "orange.png"}),
    ({"$or": []}, set()),
    ({"$and": []}, set(VIEWS)),
    ({}, set(VIEWS)),
    ({"file_name": "orange.png"}, {"orange.png"}),
    ({"file_name": {"$contains": "red_"}}, {"red_blue.png", "red_green.png"}),
    ({"width": {"$gte": 160}, "height": 120}, set(VIEWS)),
]


@pytest.mark.parametrize(("filters", "expected"), EVALUATOR_CASES)
def test_evaluator(filters, expected):
    assert kept(filters) == expected


@pytest.mark.parametrize(("filters", "message"), [
    ("album", "type str is not accepted"),
    (["album"], "type list is not accepted"),
    (3, "type int is not accepted"),
    ({"year": {"$regex": "20.*"}}, r"operator '\$regex' is not supported; use one of \$eq"),
    ({"$nor": []}, r"'\$nor' is not supported at the top level"),
    ({"year": {"gte": 2020}}, "is not an operator"),
    ({"year": {}}, "empty dict"),
    ({"year": {"$in": 2020}}, r"\$in takes a list"),
    ({"year": {"$gt": [2020]}}, "compares with a number or a string"),
    ({"year": {"$gt": True}}, "compares with a number or a string"),
    ({"year": {"$gt": float("nan")}}, "compares with a number or a string"),
    ({"year": float("inf")}, "not a finite number"),
    ({"year": object()}, "not JSON data"),
    ({"$or": {"year": 1}}, "takes a list of filters"),
    ({"$not": [1]}, "takes filters"),
    ({"year": {"$exists": 1}}, "takes true or false"),
    ({1: 2}, "is not a string"),
])
def test_malformed_filters_raise_one_clear_error(filters, message):
    with pytest.raises(ConfigError, match=message):
        compile_filter(filters)


def test_deep_filters_are_refused_not_recursed():
    deep: dict = {"year": 1}
    for _ in range(5000):
        deep = {"$not": deep}
    with pytest.raises(ConfigError, match="deeper than 32"):
        compile_filter(deep)


_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 3) | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=3),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
    max_leaves=8,
)
_KEYS = st.sampled_from(["year", "tags", "n", "album", "file_name", "width", "$and", "$or", "$not", "$x",
                         *FIELD_OPERATORS])
_FILTERS = st.recursive(
    _VALUES, lambda inner: st.dictionaries(_KEYS, inner, max_size=3) | st.lists(inner, max_size=3), max_leaves=10)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_FILTERS, st.dictionaries(st.sampled_from(["year", "tags", "n", "album"]), _VALUES, max_size=4))
def test_any_filter_shape_gives_a_predicate_or_a_config_error(filters, metadata):
    try:
        keep = compile_filter(filters)
    except ConfigError:
        return
    view = {**metadata, "file_name": "a.png", "path": "/a.png", "width": 1, "height": 1}
    assert keep is None or isinstance(keep(view), bool)


# -- the three APIs ------------------------------------------------------------------------------------
@pytest.fixture
def photo_index(scene_dir) -> HiMIRIndex:
    return HiMIRIndex.build(scene_dir, encoder=ColorEncoder(), metadata=META, progress=False)


def names(hits) -> set[str]:
    return {Path(h.path).name for h in hits}


@pytest.mark.parametrize(("filters", "expected"), EVALUATOR_CASES[:20:3] + EVALUATOR_CASES[-4:])
@pytest.mark.parametrize("mode", ["himir", "himir-full", "single"])
def test_index_search_uses_the_evaluator(photo_index, filters, expected, mode):
    assert names(photo_index.search("red", k=6, mode=mode, filters=filters).hits) == expected


def test_index_search_filter_errors(photo_index):
    for bad in ("album", ["album"], 3):
        with pytest.raises(ConfigError, match="is not accepted; a filter is a dict"):
            photo_index.search("red", k=2, filters=bad)
    with pytest.raises(ConfigError, match="not supported"):
        photo_index.search_vectors(photo_index.encoder.embed_texts(["red"]), k=2, filters={"y": {"$like": 1}})


def test_callable_filters_see_the_builtin_fields(photo_index):
    found = photo_index.search("red", k=6, filters=lambda view: view["file_name"].startswith("all_"))
    assert names(found.hits) == {"all_red.png", "all_blue.png"}


def test_langchain_operators_and_builtin_fields(photo_index):
    from himir_rag.langchain import HiMIRRetriever

    retriever = HiMIRRetriever(index=photo_index, k=6)
    docs = retriever.invoke("red", filter={"year": {"$gte": 2021}})
    assert {d.metadata["file_name"] for d in docs} == {"red_green.png", "all_red.png", "orange.png"}
    docs = retriever.invoke("red", filter={"$or": [{"file_name": "orange.png"}, {"tags": "blue"}]})
    assert {d.metadata["file_name"] for d in docs} == {"orange.png", "red_blue.png"}
    with_field = HiMIRRetriever(index=photo_index, k=6, filter={"width": {"$gt": 100}, "n": True})
    assert [d.metadata["file_name"] for d in with_field.invoke("red")] == ["red_green.png"]
    with pytest.raises(ConfigError, match="not supported"):
        retriever.invoke("red", filter={"year": {"$between": [1, 2]}})
    with pytest.raises(ValueError):  # pydantic's ValidationError: a filter is a dict or a callable
        HiMIRRetriever(index=photo_index, filter="year")


def test_llama_index_filters_are_translated_to_the_core(photo_index):
    from llama_index.core.vector_stores import FilterCondition, MetadataFilter, MetadataFilters

    from himir_rag.llama_index import HiMIRRetriever, metadata_filters_to_dict

    filters = MetadataFilters(filters=[MetadataFilter(key="width", value=160, operator=">="),
                                       MetadataFilter(key="file_name", value="red_", operator="text_match")])
    assert metadata_filters_to_dict(filters) == {"$and": [{"width": {"$gte": 160}}, {"file_name": {"$contains": "red_"}}]}
    nodes = HiMIRRetriever(photo_index, similarity_top_k=6, filters=filters).retrieve("red")
    assert {n.node.metadata["file_name"] for n in nodes} == {"red_blue.png", "red_green.png"}
    either = MetadataFilters(filters=[MetadataFilter(key="tags", value="purple"), MetadataFilter(key="n", value=1)],
                             condition=FilterCondition.OR)
    nodes = HiMIRRetriever(photo_index, similarity_top_k=6, filters=either).retrieve("red")
    assert {n.node.metadata["file_name"] for n in nodes} == {"yellow_purple.png", "red_blue.png", "all_red.png"}


# -- Qdrant: the same answers, pushed down or not --------------------------------------------------------
PARITY_FILTERS = [
    {"album": "Summer"}, {"tags": "red"}, {"tags": ["green", "purple"]}, {"tags": {"$ne": "red"}},
    {"tags": {"$nin": ["red", "yellow"]}}, {"$or": [{"tags": "blue"}, {"album": "Summer"}]},
    {"$not": {"tags": "red"}}, {"n": True}, {"n": 1}, {"year": {"$gte": 2021}}, {"file_name": "orange.png"},
    {"album": {"$contains": "summer"}}, {"width": 160, "tags": "red"}, {"path": {"$contains": "/sub/"}},
]


def test_qdrant_pushes_down_only_exact_string_filters():
    from himir_rag.store.qdrant import qdrant_filter

    assert qdrant_filter({"album": "a", "tags": {"$nin": ["x", "y"]}}) is not None
    assert qdrant_filter({"$or": [{"album": "a"}, {"$not": {"path": "p"}}]}) is not None
    for evaluated_in_core in ({"n": 1}, {"n": True}, {"year": {"$gte": 1}}, {"file_name": "a"}, {"a.b": "x"},
                              {"$or": []}, {"album": []}):
        assert qdrant_filter(evaluated_in_core) is None


def test_qdrant_store_answers_as_the_core(scene_dir, tmp_path):
    pytest.importorskip("qdrant_client")
    encoder = ColorEncoder()
    config = HiMIRConfig(precision="float32")
    qdrant = HiMIRIndex(encoder, config, store=make_store("qdrant", encoder.dim, tmp_path))
    qdrant.add(scene_dir, metadata=META, progress=False)
    core = HiMIRIndex.build(scene_dir, encoder=encoder, config=config, metadata=META, progress=False)
    for filters in PARITY_FILTERS:
        for mode in ("himir-full", "single"):
            want = names(core.search("red", k=6, mode=mode, filters=filters).hits)
            assert names(qdrant.search("red", k=6, mode=mode, filters=filters).hits) == want, filters
        assert names(qdrant.search("red", k=6, filters=filters).hits) == kept(filters), filters


def test_filter_positions_are_cached_per_snapshot(photo_index, monkeypatch):
    import himir_rag.index

    calls = []
    real = himir_rag.index.matching_ids
    monkeypatch.setattr(himir_rag.index, "matching_ids", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    for _ in range(3):
        assert names(photo_index.search("red", k=6, filters={"album": "new"}).hits) == set()
    assert len(calls) == 1  # evaluated once for this snapshot
    assert photo_index.update_metadata({"orange.png": {"album": "new"}}) == 1  # a new snapshot
    assert names(photo_index.search("red", k=6, filters={"album": "new"}).hits) == {"orange.png"}
    assert len(calls) == 2
    photo_index.search("red", k=6, filters=lambda view: True)
    photo_index.search("red", k=6, filters=lambda view: True)
    assert len(calls) == 4  # callables are evaluated every time


def test_qdrant_index_evaluates_unpushable_filters_on_its_catalog(scene_dir, tmp_path, monkeypatch):
    pytest.importorskip("qdrant_client")
    encoder = ColorEncoder()
    index = HiMIRIndex(encoder, HiMIRConfig(precision="float32"), store=make_store("qdrant", encoder.dim, tmp_path))
    index.add(scene_dir, metadata=META, progress=False)
    monkeypatch.setattr(type(index.store), "records", lambda self: pytest.fail("scrolled the collection"))
    assert names(index.search("red", k=6, filters={"year": {"$gte": 2021}}).hits) == {
        "red_green.png", "all_red.png", "orange.png"}
    assert names(index.search("red", k=6, filters={"album": "Summer"}).hits) == {"red_green.png"}


def test_qdrant_store_keeps_a_pushed_filter_whole_next_to_image_ids(scene_dir, tmp_path):
    pytest.importorskip("qdrant_client")
    encoder = ColorEncoder()
    index = HiMIRIndex(encoder, HiMIRConfig(precision="float32"), store=make_store("qdrant", encoder.dim, tmp_path))
    index.add(scene_dir, metadata=META, progress=False)
    every_id = np.array(sorted(index.snapshot.images))
    queries = encoder.embed_texts(["red"])
    params = index.config.scheduler_params
    for filters in ({"tags": {"$ne": "red"}}, {"$not": {"tags": "red"}}, {"tags": {"$nin": ["red", "yellow"]}}):
        assert index.store.pushes_down(filters), filters
        for level in Level:  # the candidate search of every level applies the pushed filter
            hits = index.store.candidates(queries, level, 200, params=params, allowed=every_id, filters=filters)
            found = {Path(index.snapshot.images[int(key) >> KEY_SHIFT].path).name for key in hits.keys[hits.keys >= 0]}
            if level is Level.GLOBAL:  # every image has a global view (plain-colour photos keep no other region)
                assert found == kept(filters), filters
            assert found and found <= kept(filters), (filters, level)


def test_qdrant_index_caches_unpushable_filters_per_snapshot(scene_dir, tmp_path, monkeypatch):
    pytest.importorskip("qdrant_client")
    import himir_rag.index

    encoder = ColorEncoder()
    index = HiMIRIndex(encoder, HiMIRConfig(precision="float32"), store=make_store("qdrant", encoder.dim, tmp_path))
    index.add(scene_dir, metadata=META, progress=False)
    calls = []
    real = himir_rag.index.matching_ids
    monkeypatch.setattr(himir_rag.index, "matching_ids", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    for _ in range(3):
        assert names(index.search("red", k=6, filters={"year": {"$gte": 2021}}).hits) == {
            "red_green.png", "all_red.png", "orange.png"}
    assert len(calls) == 1  # evaluated once for this snapshot
    index.search("red", k=6, filters=lambda view: True)
    index.search("red", k=6, filters=lambda view: True)
    assert len(calls) == 3  # callables are evaluated every time

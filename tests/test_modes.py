"""The mode table (himir_rag.modes) and what reads it; typed scheduler parameters in the config;
HiMIRIndex.from_vectors; the adapters' shared search options."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from PIL import Image

from himir_rag import retriever as shared
from himir_rag.catalog import ImageRecord, Snapshot
from himir_rag.config import HiMIRConfig
from himir_rag.decompose import RuleDecomposer
from himir_rag.errors import ConfigError
from himir_rag.hierarchy import GridDecomposer, Level
from himir_rag.index import HiMIRIndex
from himir_rag.modes import MODES, ModeSpec, RetrievalMode, Scorer, mode_names, mode_spec, parse_mode, reference_mode
from himir_rag.scheduler import SchedulerParams, SearchStats, score_exhaustive, score_mode
from tests.conftest import ColorEncoder, unit

DIM = 16


# -- the table ---------------------------------------------------------------------------------
def test_every_mode_has_one_row_and_one_reference() -> None:
    assert list(MODES) == list(RetrievalMode) and all(MODES[m].mode is m for m in MODES)
    assert mode_names() == ("single", "mvr", "himir-full", "himir")
    reference = MODES[reference_mode()]
    assert reference.mode is RetrievalMode.HIMIR_FULL and reference.scorer is Scorer.EXHAUSTIVE
    scheduled = [spec for spec in MODES.values() if spec.scorer is Scorer.SCHEDULED]
    assert [s.mode for s in scheduled] == [RetrievalMode.HIMIR] and scheduled[0].levels == reference.levels
    assert [m.name for m in MODES.values() if not m.subqueries] == ["single"]
    assert mode_spec("mvr").levels == (Level.GLOBAL, Level.SEGMENT)


def test_unknown_mode_lists_the_valid_ones() -> None:
    with pytest.raises(ConfigError, match=r"mode 'colbert' is unknown; valid modes: single, mvr, himir-full, himir"):
        parse_mode("colbert")


@pytest.fixture(scope="module")
def collection() -> tuple[np.ndarray, object, np.ndarray]:
    rng = np.random.default_rng(3)
    tree = GridDecomposer("1+4+16").decompose(Image.new("RGB", (64, 48)))
    vectors = unit(rng.normal(size=(30 * len(tree), DIM))).astype(np.float32)
    queries = unit(rng.normal(size=(2, DIM))).astype(np.float32)
    return vectors, tree, queries


class _VectorsOnly:
    name, dim = "test:vectors", DIM

    def embed_images(self, images):  # pragma: no cover - built from arrays
        raise NotImplementedError

    def embed_texts(self, texts):  # pragma: no cover
        raise NotImplementedError


def test_score_mode_runs_each_rows_scorer(collection) -> None:
    vectors, tree, queries = collection
    snapshot = HiMIRIndex.from_vectors(vectors, tree, encoder=_VectorsOnly(),
                                       config=HiMIRConfig(precision="float32")).snapshot
    for spec in MODES.values():
        stats = SearchStats(mode=spec.name)
        scored = score_mode(spec, snapshot, queries, k=5, params=SchedulerParams.exact(), stats=stats)
        full = score_exhaustive(snapshot, queries, levels=spec.levels)
        order = np.argsort(-scored.scores, kind="stable")[:5]
        expected = np.argsort(-full.scores, kind="stable")[:5]
        assert scored.image_ids[order].tolist() == full.image_ids[expected].tolist(), spec.name
        if spec.scorer is Scorer.EXHAUSTIVE:
            assert stats.dot_products == full.dot_products and stats.images_scored == len(snapshot)


def test_index_search_reads_the_table_not_the_names(tmp_path, monkeypatch) -> None:
    """A row saying "no sub-queries" makes any mode embed the whole query as one vector."""
    from tests.conftest import make_scene

    make_scene(tmp_path / "p" / "rb.png", [("red", (0, 0, 40, 30)), ("blue", (80, 60, 150, 110))])
    make_scene(tmp_path / "p" / "g.png", [("green", (0, 0, 160, 120))])
    index = HiMIRIndex(ColorEncoder(), HiMIRConfig(layout="1+4+16"))
    index.add(tmp_path / "p", progress=False)
    query = "a red square and a blue square"
    assert len(index.search(query, mode="mvr").hits[0].regions) == 2  # two sub-queries
    monkeypatch.setitem(MODES, RetrievalMode.MVR, dataclasses.replace(MODES[RetrievalMode.MVR], subqueries=False))
    hit = index.search(query, mode="mvr").hits[0]
    assert [r.subquery for r in hit.regions] == [query]


def test_a_default_mode_without_subqueries_skips_the_adapters_decomposition(tmp_path) -> None:
    class Counting(RuleDecomposer):
        calls = 0

        def decompose(self, query):
            Counting.calls += 1
            return super().decompose(query)

    index = HiMIRIndex(ColorEncoder(), HiMIRConfig(default_mode="single"))
    query = "a red square and a blue square"
    assert shared.subqueries(index, Counting(), query, mode=None) == [query] and Counting.calls == 0
    assert len(shared.subqueries(index, Counting(), query, mode="mvr")) == 2 and Counting.calls == 1


# -- typed scheduler parameters ----------------------------------------------------------------
def test_scheduler_parameters_are_typed_and_validated_once() -> None:
    config = HiMIRConfig(scheduler={"candidate_k": 8, "candidate_levels": ["segment"]})
    assert isinstance(config.scheduler, SchedulerParams) and config.scheduler_params is config.scheduler
    assert config.scheduler.candidate_levels == ("segment",) and config.scheduler.candidate_k == 8
    assert HiMIRConfig().scheduler == SchedulerParams() and HiMIRConfig(scheduler=None).scheduler == SchedulerParams()
    assert HiMIRConfig(scheduler=SchedulerParams(probe_share=0.2)).scheduler.probe_share == 0.2
    with pytest.raises(ConfigError, match="unknown scheduler parameters"):
        HiMIRConfig(scheduler={"candidate_kk": 1})
    with pytest.raises(ConfigError, match="probe_share must be in"):
        HiMIRConfig().replace(scheduler={"probe_share": 0})
    with pytest.raises(ConfigError, match="scheduler must be a JSON object"):
        HiMIRConfig(scheduler=[("candidate_k", 1)])


def test_config_json_round_trip_keeps_only_overrides() -> None:
    config = HiMIRConfig(scheduler={"candidate_k": 8, "candidate_levels": ("segment",), "sparsity_margin": 0.1},
                         default_mode="mvr")
    saved = json.loads(json.dumps(config.to_dict(), allow_nan=False))
    assert saved["scheduler"] == {"candidate_k": 8, "candidate_levels": ["segment"], "sparsity_margin": 0.1}
    assert HiMIRConfig.from_dict(saved) == config
    assert HiMIRConfig().to_dict()["scheduler"] == {}


def test_manifests_of_older_versions_keep_loading(tmp_path) -> None:
    """Older versions wrote config.scheduler as a dict, possibly every parameter (a tuning record's)."""
    from tests.conftest import make_scene

    make_scene(tmp_path / "p" / "r.png", [("red", (0, 0, 40, 30))])
    index = HiMIRIndex(ColorEncoder(), HiMIRConfig(layout="1+2+4"))
    index.add(tmp_path / "p", progress=False)
    version = index.save(tmp_path / "idx")
    manifest = json.loads((version / "manifest.json").read_text())
    written = {**{k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(SchedulerParams()).items()},
               "sparsity_margin": 1e9, "candidate_k": 12}  # as autoconfig's _jsonable wrote them
    manifest["config"]["scheduler"] = written
    (version / "manifest.json").write_text(json.dumps(manifest))
    loaded = HiMIRIndex.load(tmp_path / "idx", encoder=ColorEncoder())
    assert loaded.config.scheduler.candidate_k == 12 and loaded.config.scheduler.sparsity_margin == 1e9
    assert loaded.config.scheduler.overrides() == {"candidate_k": 12, "sparsity_margin": 1e9}
    assert loaded.search("red", k=1).hits[0].path.endswith("r.png")


def test_default_mode_is_validated_and_used() -> None:
    with pytest.raises(ConfigError, match="mode 'fast' is unknown"):
        HiMIRConfig(default_mode="fast")
    assert HiMIRConfig(default_mode=RetrievalMode.MVR).default_mode == "mvr"  # stored as the plain name


# -- from_vectors ------------------------------------------------------------------------------
def test_from_vectors_matches_a_snapshot_built_image_by_image(collection) -> None:
    vectors, tree, _ = collection
    per_image = len(tree)
    n = len(vectors) // per_image
    paths = [f"/v/{i}.jpg" for i in range(1, n + 1)]
    index = HiMIRIndex.from_vectors(vectors, tree, encoder=_VectorsOnly(), config=HiMIRConfig(precision="float32"),
                                    paths=paths)
    records = [ImageRecord(i, paths[i - 1], tree.width, tree.height) for i in range(1, n + 1)]
    expected = Snapshot.empty(DIM).with_images(records, [tree] * n,
                                               [vectors[i * per_image:(i + 1) * per_image] for i in range(n)])
    got = index.snapshot
    for name in ("region_image", "levels", "parents", "boxes", "vectors"):
        assert np.array_equal(getattr(got, name), getattr(expected, name)), name
    assert got.images == expected.images
    target = 7 * per_image + 12  # a segment of image 8: the query finds it, with its box
    hit = index.search_vectors(vectors[target : target + 1], k=1, mode="himir-full").hits[0]
    assert hit.image_id == 8 and list(hit.regions[0].region_bbox) == tree.boxes[12].tolist()


def test_from_vectors_rejects_mismatched_shapes(collection) -> None:
    vectors, tree, _ = collection
    with pytest.raises(ValueError, match=r"vectors must be \(n_images \* 21, dim\)"):
        HiMIRIndex.from_vectors(vectors[:-1], tree, encoder=_VectorsOnly())
    with pytest.raises(ValueError, match="2 paths for 30 images"):
        HiMIRIndex.from_vectors(vectors, tree, encoder=_VectorsOnly(), paths=["a", "b"])
    half = HiMIRIndex.from_vectors(vectors, tree, encoder=_VectorsOnly())  # float16 by default: converted
    assert half.snapshot.vectors.dtype == np.float16


# -- the adapters' shared options --------------------------------------------------------------
def test_search_options_are_checked_and_overridden_per_call() -> None:
    options = shared.search_options(k=4, mode="mvr", filters={"year": {"$gte": 2020}})
    assert options == shared.SearchOptions(4, "mvr", {"year": {"$gte": 2020}})
    assert options.override(k=2) == shared.SearchOptions(2, "mvr", {"year": {"$gte": 2020}})
    assert options.override(mode=RetrievalMode.SINGLE, filters={"a": 1}) == shared.SearchOptions(4, "single", {"a": 1})
    with pytest.raises(ValueError, match="similarity_top_k must be a positive integer"):
        shared.search_options(k=0, name="similarity_top_k")
    with pytest.raises(ConfigError, match="unknown"):
        options.override(mode="fast")
    with pytest.raises(ConfigError):
        options.override(filters={"year": {"$near": 1}})


def test_mode_spec_rows_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        MODES[RetrievalMode.HIMIR].subqueries = False  # type: ignore[misc]
    assert isinstance(MODES[RetrievalMode.HIMIR], ModeSpec)


def test_the_configs_default_mode_is_the_tables() -> None:
    from himir_rag.modes import DEFAULT_MODE

    assert HiMIRConfig().default_mode == DEFAULT_MODE.value


def test_a_mode_without_subqueries_never_calls_the_decomposer(tmp_path) -> None:
    from tests.conftest import make_scene

    class Refusing:
        def decompose(self, query):
            raise AssertionError("decomposed in a mode that matches the whole query")

    make_scene(tmp_path / "p" / "r.png", [("red", (0, 0, 40, 30))])
    index = HiMIRIndex(ColorEncoder())
    index.add(tmp_path / "p", progress=False)
    query = "a red square and a blue square"
    result = index.search(query, mode="single", decomposer=Refusing())
    assert result.subqueries == (query,) and [r.subquery for r in result.hits[0].regions] == [query]
    with pytest.raises(AssertionError, match="decomposed"):
        index.search(query, mode="mvr", decomposer=Refusing())

"""One contract over every image store (himir_rag.store.base.ImageStore), run for each backend.

The scheduler is the only scorer: a store finds candidates and hands over region vectors,
so every mode must give the same top-k *and the same compute counters* on every store.
Adding a backend = one file in himir_rag/store/ + its name in STORES and in ``image_store``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from himir_rag.catalog import ImageRecord, Snapshot
from himir_rag.config import HiMIRConfig
from himir_rag.hierarchy import GridDecomposer, Level
from himir_rag.index import HiMIRIndex
from himir_rag.scheduler import MODE_LEVELS, RetrievalMode, SchedulerParams, SearchStats, rank, score_exhaustive, \
    top_k
from himir_rag.store.base import KEY_SHIFT, ImageStore
from himir_rag.store.memory import MemoryStore
from tests.conftest import ColorEncoder, make_scene, make_store, unit

STORES = ["faiss", "qdrant"]
MODES = ["single", "mvr", "himir-full", "himir"]
COUNTERS = ("dot_products", "images_scored", "candidates", "candidate_dot_products", "coarse_dot_products",
            "segments_visited", "images_descended", "images_pruned", "levels_skipped")
DIM = 16
TREE = GridDecomposer("1+4+16").decompose(Image.new("RGB", (64, 64)))


def image_store(kind: str, dim: int, tmp_path: Path) -> ImageStore:
    """An empty store of backend ``kind``."""
    if kind == "faiss":
        return MemoryStore(Snapshot.empty(dim))
    pytest.importorskip("qdrant_client")
    from himir_rag.store.qdrant import QdrantImageStore

    return QdrantImageStore(f"contract-{tmp_path.name}", dim=dim, path=":memory:")


def synthetic(n_images: int, *, seed: int = 0, first_id: int = 1):
    """Records, 1+4+16 trees and clustered unit vectors (parents near their children; no ties)."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(8, DIM))
    records, vectors = [], []
    for i in range(n_images):
        vecs = unit(centers[rng.integers(8)] + rng.normal(size=(len(TREE), DIM)))
        for region in range(1, 5):
            vecs[region] = unit(vecs[TREE.parents == region].mean(axis=0) + rng.normal(size=DIM) * 0.1)
        vecs[0] = unit(vecs[5:].mean(axis=0))
        vectors.append(vecs)
        image_id = first_id + i
        records.append(ImageRecord(image_id, f"/photos/{image_id}.jpg", 64, 64,
                                   metadata={"album": "even" if image_id % 2 == 0 else "odd"}))
    return records, [TREE] * n_images, vectors


def filled(kind: str, tmp_path: Path, n_images: int = 40, seed: int = 0) -> ImageStore:
    store = image_store(kind, DIM, tmp_path)
    store.add_images(*synthetic(n_images, seed=seed))
    return store


def queries(seed: int, n_subs: int = 3) -> np.ndarray:
    return unit(np.random.default_rng(100 + seed).normal(size=(n_subs, DIM)))


def counters(stats: SearchStats) -> dict[str, int]:
    return {name: stats.to_dict().get(name) for name in COUNTERS}


def brute_force(records, vectors, q: np.ndarray, mode: str, k: int, allowed=None) -> list[int]:
    """Top-k ids of the exact MaxSim, straight from the vectors (ties by id)."""
    wanted = np.isin(TREE.levels, [int(lv) for lv in MODE_LEVELS[RetrievalMode(mode)]])
    scores = {r.image_id: float((q @ v[wanted].T).max(axis=1).mean()) for r, v in zip(records, vectors)
              if allowed is None or r.image_id in allowed}
    return sorted(scores, key=lambda i: (-scores[i], i))[:k]


SETTINGS = {
    "exact": SchedulerParams.exact(),
    # candidate search on exact (flat) stores at both levels, segment hits capping the bounds
    "candidates": SchedulerParams(candidate_k=6, index_kind="flat", candidate_levels=("region", "segment")),
}


@pytest.fixture(params=STORES)
def kind(request) -> str:
    return request.param


# -- ranking and counters ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("mode", MODES)
def test_same_top_k_and_counters_as_the_memory_store(kind, mode, setting, tmp_path):
    store, reference = filled(kind, tmp_path / "a"), filled("faiss", tmp_path / "b")
    records, _, vectors = synthetic(40)
    for seed in range(4):
        q = queries(seed)[:1] if mode == "single" else queries(seed)
        got_stats, want_stats = SearchStats(mode), SearchStats(mode)
        got = rank(store, q, mode=mode, k=5, params=SETTINGS[setting], stats=got_stats)
        want = rank(reference, q, mode=mode, k=5, params=SETTINGS[setting], stats=want_stats)
        assert got.image_ids.tolist() == want.image_ids.tolist(), seed
        np.testing.assert_allclose(got.scores, want.scores, rtol=0, atol=1e-6)
        np.testing.assert_array_equal(got.levels, want.levels)
        np.testing.assert_array_equal(got.boxes, want.boxes)
        assert counters(got_stats) == counters(want_stats), seed
        if mode != "himir" or setting == "exact":  # the exhaustive modes and the exact pass are exact
            assert got.image_ids.tolist() == brute_force(records, vectors, q, mode, 5)
        assert got_stats.dot_products > 0


def test_the_candidate_setting_searches_candidates_and_prunes(kind, tmp_path):
    """The "candidates" setting above really exercises candidate search and the bounds (else the parity is moot)."""
    stats = SearchStats("himir")
    rank(filled(kind, tmp_path), queries(0), mode="himir", k=5, params=SETTINGS["candidates"], stats=stats)
    assert 0 < stats.extra["candidates"] < 40 and stats.extra["candidate_dot_products"] == 3 * (4 + 16) * 40
    assert stats.extra["segments_visited"] < stats.extra["segments_total"]


# -- add / delete / records / vectors -------------------------------------------------------------------------
def test_add_delete_keep_counts_records_and_vectors(kind, tmp_path):
    store = image_store(kind, DIM, tmp_path)
    assert len(store) == 0 and store.level_counts() == {"global": 0, "region": 0, "segment": 0}
    records, trees, vectors = synthetic(10)
    store.add_images(records, trees, vectors)
    assert len(store) == 10 and store.level_counts() == {"global": 10, "region": 40, "segment": 160}
    assert [r.image_id for r in store.records()] == list(range(1, 11))
    assert list(store.records())[2] == records[2]
    assert store.delete_images([3, 4, 999]) == 2
    assert len(store) == 8 and store.level_counts() == {"global": 8, "region": 32, "segment": 128}
    small = TREE.select(np.r_[True, True, np.zeros(19, bool)])  # global view + one region
    store.add_images([ImageRecord(5, "/photos/5b.jpg", 64, 64)], [small], [vectors[0][:2]])  # id 5 is replaced
    assert len(store) == 8 and store.level_counts() == {"global": 8, "region": 29, "segment": 112}
    view = store.vectors(np.array([6, 2, 4, 5]))  # 4 was deleted
    snapshot = view.snapshot
    positions = np.arange(len(snapshot)) if view.positions is None else view.positions
    assert sorted(snapshot.image_ids[positions].tolist()) == [2, 5, 6]  # in the store's order
    for image_id, source in ((2, vectors[1]), (6, vectors[5]), (5, vectors[0][:2])):
        rows = snapshot.image_rows(image_id)
        np.testing.assert_allclose(snapshot.region_vectors(rows), source, atol=1e-7)
    rows = snapshot.image_rows(6)
    np.testing.assert_array_equal(snapshot.levels[rows], TREE.levels)
    np.testing.assert_array_equal(snapshot.parents[rows[1:]] - rows[0], TREE.parents[1:])
    np.testing.assert_array_equal(snapshot.boxes[rows], TREE.boxes)
    store.set_metadata([ImageRecord(6, records[5].path, 64, 64, records[5].size, records[5].mtime_ns, {"album": "x"})])
    assert next(r for r in store.records() if r.image_id == 6).metadata == {"album": "x"}


def test_candidates_are_region_keys_of_the_asked_level(kind, tmp_path):
    store = filled(kind, tmp_path, n_images=20)
    records, _, vectors = synthetic(20)
    q = queries(0)
    for level in Level:
        hits = store.candidates(q, level, 4, params=SETTINGS["candidates"])
        assert hits.keys.shape == (3, 4) and hits.exact
        local = hits.keys & ((1 << KEY_SHIFT) - 1)
        assert (TREE.levels[local] == level).all()
        exact = np.array([[vectors[(key >> KEY_SHIFT) - 1][key & ((1 << KEY_SHIFT) - 1)] @ q[s]
                           for key in hits.keys[s]] for s in range(3)])
        np.testing.assert_allclose(hits.scores, exact, atol=1e-5)
        wanted = np.concatenate([v[TREE.levels == level] for v in vectors]) @ q.T
        np.testing.assert_allclose(hits.scores, -np.sort(-wanted, axis=0)[:4].T, atol=1e-5)  # the best 4


# -- filters -----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_filtered_search_returns_only_allowed_images_exactly(kind, mode, tmp_path):
    store = filled(kind, tmp_path)
    records, _, vectors = synthetic(40)
    allowed = np.array([r.image_id for r in records if r.metadata["album"] == "even"])
    for seed in range(3):
        q = queries(seed)[:1] if mode == "single" else queries(seed)
        for filters in ({"album": "even"}, None):  # pushed down where the store can, or sent as ids
            got = rank(store, q, mode=mode, k=5, params=SchedulerParams.exact(), stats=SearchStats(mode),
                       allowed=allowed, filters=filters)
            assert got.image_ids.tolist() == brute_force(records, vectors, q, mode, 5, set(allowed.tolist()))
        default = rank(store, q, mode=mode, k=5, stats=SearchStats(mode), allowed=allowed, filters={"album": "even"})
        assert set(default.image_ids.tolist()) <= set(allowed.tolist()) and len(default.image_ids) == 5
    empty = rank(store, queries(0), mode=mode, k=5, stats=SearchStats(mode), allowed=np.zeros(0, np.int64))
    assert len(empty.image_ids) == 0


# -- the 12-photo collection through HiMIRIndex: default settings, every mode ------------------------------------
SCENES = {
    "red_blue": [("red", (5, 5, 50, 45)), ("blue", (100, 70, 150, 115))],
    "red_green": [("red", (100, 5, 150, 45)), ("green", (5, 70, 55, 115))],
    "all_red": [("red", (0, 0, 160, 120))],
    "all_blue": [("blue", (0, 0, 160, 120))],
    "yellow_purple": [("yellow", (10, 10, 60, 60)), ("purple", (90, 60, 150, 110))],
    "orange": [("orange", (40, 30, 120, 90))],
    "green_orange": [("green", (0, 0, 80, 60)), ("orange", (80, 60, 160, 120))],
    "blue_yellow": [("blue", (20, 20, 70, 70)), ("yellow", (110, 10, 150, 50))],
    "purple_red_green": [("purple", (0, 0, 50, 50)), ("red", (60, 60, 100, 100)), ("green", (110, 0, 160, 40))],
    "black_white": [("black", (0, 0, 80, 120))],
    "red_black": [("red", (10, 70, 60, 115)), ("black", (100, 10, 150, 60))],
    "blue_orange_yellow": [("blue", (0, 80, 40, 120)), ("orange", (60, 0, 100, 40)), ("yellow", (120, 80, 160, 120))],
}
QUERIES = ["a red square and a blue square", "green", "yellow next to purple", "orange and blue", "black and red",
           "a purple square, a red square and a green square"]


@pytest.fixture
def twelve_photos(tmp_path) -> Path:
    for name, squares in SCENES.items():
        make_scene(tmp_path / "photos" / f"{name}.png", squares)
    return tmp_path / "photos"


def names(result) -> list[str]:
    return [Path(h.path).name for h in result.hits]


@pytest.mark.parametrize("precision", ["float16", "float32"])
def test_qdrant_and_faiss_agree_on_twelve_photos_at_default_settings(twelve_photos, tmp_path, precision):
    pytest.importorskip("qdrant_client")
    encoder = ColorEncoder()
    config = HiMIRConfig(precision=precision)  # otherwise the defaults
    faiss = HiMIRIndex(encoder, config)
    qdrant = HiMIRIndex(encoder, config, store=make_store("qdrant", encoder.dim, tmp_path))
    for index in (faiss, qdrant):
        index.add(twelve_photos, progress=False)
    assert len(faiss) == len(qdrant) == 12
    for mode in MODES:
        for query in QUERIES:
            got, want = qdrant.search(query, k=4, mode=mode), faiss.search(query, k=4, mode=mode)
            assert names(got) == names(want), (mode, query)
            assert [h.score for h in got.hits] == pytest.approx([h.score for h in want.hits], abs=1e-6)
            assert [h.regions for h in got.hits] == [h.regions for h in want.hits]
            for name in ("dot_products", "segments_visited", "images_scored", "images_pruned"):
                assert got.stats.to_dict().get(name) == want.stats.to_dict().get(name), (mode, query, name)
    assert qdrant.search(QUERIES[0], k=4).stats.extra["segments_visited"] > 0  # the real pass ran


# -- no work proportional to the collection outside the candidate search -------------------------------------------
class CountingClient:
    """A QdrantClient proxy counting each method's calls and the points it returned or was asked for."""

    def __init__(self, client) -> None:
        self.client, self.calls, self.points = client, {}, {}

    def __getattr__(self, name):
        method = getattr(self.client, name)

        def counted(*args, **kwargs):
            self.calls[name] = self.calls.get(name, 0) + 1
            out = method(*args, **kwargs)
            returned = len(out) if isinstance(out, list) and name == "retrieve" else 0
            self.points[name] = self.points.get(name, 0) + returned
            return out
        return counted

    def reset(self) -> None:
        self.calls, self.points = {}, {}


@pytest.mark.parametrize("n_images", [60, 240])
def test_a_qdrant_search_touches_only_its_candidates(n_images, tmp_path):
    pytest.importorskip("qdrant_client")
    from qdrant_client import QdrantClient

    from himir_rag.store.qdrant import QdrantImageStore

    client = CountingClient(QdrantClient(location=":memory:"))
    store = QdrantImageStore("counted", dim=DIM, client=client)
    store.add_images(*synthetic(n_images))
    client.reset()
    stats = SearchStats("himir")
    found = rank(store, queries(0), mode="himir", k=5, stats=stats)  # default settings
    assert len(found.image_ids) == 5
    candidates = stats.extra["candidates"]
    assert candidates < n_images
    # one batched query per candidate level, then two retrieves by id: no scroll, no count
    assert client.calls == {"query_batch_points": 2, "retrieve": 2}, client.calls
    assert client.points["retrieve"] == candidates * (1 + len(TREE))
    # at most 16 hits per sub-query and level, and 16 from the upper-bound pick: the same ceiling at any size
    assert candidates <= 3 * 2 * 16 + 16


def test_qdrant_counts_are_kept_without_recounting(tmp_path):
    pytest.importorskip("qdrant_client")
    from qdrant_client import QdrantClient

    from himir_rag.store.qdrant import QdrantImageStore

    client = CountingClient(QdrantClient(location=":memory:"))
    store = QdrantImageStore("kept", dim=DIM, client=client)
    assert client.calls.get("count") == 3  # once per level, when the store opens
    store.add_images(*synthetic(30))
    for mode in MODES:
        rank(store, queries(0), mode=mode, k=5, stats=SearchStats(mode))
    store.delete_images([1, 2])
    assert client.calls.get("count") == 3 and store.level_counts() == {"global": 28, "region": 112, "segment": 448}
    reopened = QdrantImageStore("kept", dim=DIM, client=client.client)  # counted again from the collection
    assert reopened.level_counts() == store.level_counts() and len(reopened) == 28


# -- persistence -------------------------------------------------------------------------------------------------------
def test_save_load_round_trip_keeps_rankings_and_counters(twelve_photos, kind, tmp_path):
    encoder = ColorEncoder()
    index = HiMIRIndex(encoder, HiMIRConfig(precision="float32"),
                       store=make_store(kind, encoder.dim, tmp_path) if kind == "qdrant" else None)
    index.add(twelve_photos, progress=False)
    index.delete(twelve_photos / "orange.png")
    before = {(q, m): index.search(q, k=4, mode=m) for q in QUERIES for m in MODES}
    index.save(tmp_path / "idx")
    location = None if index.store is None else index.store.path
    loaded = HiMIRIndex.load(tmp_path / "idx", encoder=encoder, store_location=location)
    assert len(loaded) == 11 and loaded.image_store.level_counts() == index.image_store.level_counts()
    for (query, mode), want in before.items():
        got = loaded.search(query, k=4, mode=mode)
        assert names(got) == names(want) and got.stats.dot_products == want.stats.dot_products, (query, mode)
    assert "orange.png" not in {Path(r.path).name for r in loaded.image_store.records()}


def test_tuner_reads_the_store_it_tunes(twelve_photos, kind, tmp_path):
    """``himir tune`` / auto_tune score through the store contract: same trials on every backend."""
    from himir_rag.autoconfig import auto_tune, tune

    encoder = ColorEncoder()
    store = make_store(kind, encoder.dim, tmp_path) if kind == "qdrant" else None
    index = HiMIRIndex(encoder, HiMIRConfig(precision="float32"), store=store)
    index.add(twelve_photos, progress=False)
    reference = HiMIRIndex(encoder, HiMIRConfig(precision="float32"))
    reference.add(twelve_photos, progress=False)
    got, want = tune(index, QUERIES, k=3, passes=1), tune(reference, QUERIES, k=3, passes=1)
    same = lambda trial: {**trial.to_dict(), "latency_ms": 0}  # noqa: E731
    assert {m: same(t) for m, t in got.baselines.items()} == {m: same(t) for m, t in want.baselines.items()}
    assert got.baselines["himir-full"].accuracy == 1.0 and got.baselines["mvr"].dot_products > 0
    # the current setting scores every image (12 <= 16 candidates) on both: the very same trial
    assert same(got.trials[0]) == same(want.trials[0])
    assert all(t.accuracy > 0 and t.dot_products > 0 for t in got.trials)
    record, reference_record = auto_tune(index, probes=10, k=3, passes=1), auto_tune(reference, probes=10, k=3, passes=1)
    assert record["himir_full"] == {**reference_record["himir_full"], "latency_ms": record["himir_full"]["latency_ms"]}
    assert record["before"]["recall"] == reference_record["before"]["recall"]


def test_memory_store_scores_as_score_exhaustive(tmp_path):
    """The in-memory store's exhaustive ranking is score_exhaustive's, row for row."""
    store = filled("faiss", tmp_path)
    q = queries(0)
    scored = score_exhaustive(store.snapshot, q, levels=MODE_LEVELS[RetrievalMode.HIMIR_FULL])
    got = rank(store, q, mode="himir-full", k=5, stats=SearchStats("himir-full"))
    assert got.image_ids.tolist() == scored.image_ids[top_k(scored.scores, 5)].tolist()


def test_qdrant_collection_of_the_old_layout_is_refused():
    pytest.importorskip("qdrant_client")
    from qdrant_client import QdrantClient, models

    from himir_rag.errors import IncompatibleIndexError
    from himir_rag.store.qdrant import QdrantImageStore

    client = QdrantClient(location=":memory:")
    client.create_collection("old", vectors_config={"full": models.VectorParams(
        size=DIM, distance=models.Distance.DOT, multivector_config=models.MultiVectorConfig(
            comparator=models.MultiVectorComparator.MAX_SIM))})
    with pytest.raises(IncompatibleIndexError, match="older himir-rag.*rebuild the index"):
        QdrantImageStore("old", dim=DIM, client=client)


def test_himir_tune_on_a_qdrant_index_scores_its_regions(tmp_path):
    """``himir tune`` on a Qdrant index: the baselines and trials score the collection's regions (before the
    store contract it tuned against a snapshot of records only: every count was 0)."""
    pytest.importorskip("qdrant_client")
    import json

    from typer.testing import CliRunner

    from himir_rag.cli import app
    from himir_rag.demo import write_demo_photos

    photos = tmp_path / "photos"
    photos.mkdir()
    for path in write_demo_photos(tmp_path / "all"):
        if path.stem in ("cat", "coffee", "motorcycle"):
            (photos / path.name).write_bytes(path.read_bytes())
    index_dir = tmp_path / "idx"
    runner = CliRunner()
    result = runner.invoke(app, ["index", str(photos), "--index", str(index_dir), "--store", "qdrant",
                                 "--qdrant-path", str(index_dir / "qdrant"), "--no-progress"])
    assert result.exit_code == 0, result.output
    (tmp_path / "q.jsonl").write_text('{"id": 1, "query": "a cat"}\n{"id": 2, "query": "a cup of coffee"}\n')
    result = runner.invoke(app, ["tune", str(index_dir), "--queries", str(tmp_path / "q.jsonl"), "-k", "1",
                                 "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["baselines"]["himir-full"]["accuracy"] == 1.0
    assert report["baselines"]["mvr"]["dot_products"] > report["chosen"]["dot_products"] > 0
    assert HiMIRIndex.read_manifest(index_dir)["autoconfig"]["source"] == "tune"


def test_qdrant_exhaustive_modes_fetch_only_the_levels_they_score(tmp_path):
    pytest.importorskip("qdrant_client")
    from qdrant_client import QdrantClient

    from himir_rag.store.qdrant import QdrantImageStore

    client = CountingClient(QdrantClient(location=":memory:"))
    store = QdrantImageStore("levels", dim=DIM, client=client)
    store.add_images(*synthetic(30))
    for mode, rows_per_image in (("single", 1), ("mvr", 1 + 16), ("himir-full", 21)):
        client.reset()
        rank(store, queries(0)[:1] if mode == "single" else queries(0), mode=mode, k=5, stats=SearchStats(mode))
        assert client.points["retrieve"] == 30 * (1 + rows_per_image), mode  # the trees, then the scored vectors

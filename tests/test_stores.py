"""One retrieval contract over every store backend (FAISS in memory, Qdrant local mode), and Ray indexing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from himir_rag.config import HiMIRConfig
from himir_rag.errors import ConfigError, UntrustedLocationError
from himir_rag.index import HiMIRIndex
from himir_rag.store import FaissStore
from tests.conftest import COLORS, ColorEncoder, make_store

MODES = ["single", "mvr", "himir-full", "himir"]
QUERIES = ["a red square and a blue square", "green", "yellow next to purple", "orange"]


def ranking(result):
    """(name, score) best first; equal scores (ties) in name order, so backends compare exactly."""
    return sorted(((Path(h.path).name, round(h.score, 5)) for h in result.hits), key=lambda x: (-x[1], x[0]))


@pytest.fixture
def built(scene_dir, store_kind, tmp_path):
    encoder = ColorEncoder()
    index = HiMIRIndex(encoder, HiMIRConfig(precision="float32"), store=make_store(store_kind, encoder.dim, tmp_path))
    meta = {"red_blue.png": {"album": "a"}, "red_green.png": {"album": "b"}}
    index.add(scene_dir, metadata=meta, progress=False)
    return index


@pytest.fixture
def reference(scene_dir):
    index = HiMIRIndex(ColorEncoder(), HiMIRConfig(precision="float32"))  # Qdrant keeps float32 vectors
    index.add(scene_dir, metadata={"red_blue.png": {"album": "a"}, "red_green.png": {"album": "b"}}, progress=False)
    return index


@pytest.mark.parametrize("mode", MODES)
def test_same_ranking_as_faiss_reference(built, reference, mode):
    for query in QUERIES:
        got, want = built.search(query, k=6, mode=mode), reference.search(query, k=6, mode=mode)
        assert ranking(got) == ranking(want)  # one scorer (the scheduler) over every store
        assert [m.subquery for m in got.hits[0].regions] == [m.subquery for m in want.hits[0].regions]
        assert got.stats.dot_products > 0


def test_filters_dict_callable_and_unknown_key(built):
    assert [Path(h.path).name for h in built.search("red", k=6, filters={"album": "b"}).hits] == ["red_green.png"]
    found = built.search("red", k=6, filters={"album": ["a", "b"]}).hits
    assert {Path(h.path).name for h in found} == {"red_blue.png", "red_green.png"}
    picked = built.search("red", k=6, filters=lambda m: m.get("album") == "a").hits
    assert [Path(h.path).name for h in picked] == ["red_blue.png"]
    assert built.search("red", k=6, filters={"nope": 1}).hits == ()
    assert built.search("red", k=1).hits[0].metadata in ({}, {"album": "a"}, {"album": "b"})


def test_delete_and_reindex(built, scene_dir):
    assert built.delete(scene_dir / "all_red.png") == 1
    assert "all_red.png" not in [Path(h.path).name for h in built.search("red", k=6).hits]
    if built.store is not None:
        assert len(built.store) == 5
    report = built.add(scene_dir, progress=False)
    assert (report.added, report.unchanged) == (1, 5)
    assert len(built) == 6


def test_save_load_roundtrip(built, tmp_path):
    before = {q: ranking(built.search(q, k=6)) for q in QUERIES}
    built.save(tmp_path / "idx")
    location = None
    if built.store is not None:  # the store's folder is outside the index: the manifest alone is not trusted
        with pytest.raises(UntrustedLocationError, match="outside the index directory"):
            HiMIRIndex.load(tmp_path / "idx", encoder=built.encoder)
        location = built.store.path
    loaded = HiMIRIndex.load(tmp_path / "idx", encoder=built.encoder, store_location=location)
    assert type(loaded.store) is type(built.store) and len(loaded) == 6
    assert {q: ranking(loaded.search(q, k=6)) for q in QUERIES} == before
    assert HiMIRIndex.read_manifest(tmp_path / "idx")["store"]["kind"] in ("faiss", "qdrant")


def test_qdrant_store_needs_one_location():
    from himir_rag.store.qdrant import QdrantImageStore, qdrant_filter

    with pytest.raises(ConfigError, match="exactly one of url= .* or path="):
        QdrantImageStore("x", dim=4)
    with pytest.raises(ConfigError, match="callable filter"):
        qdrant_filter(lambda m: True)


def test_faiss_store_contract():
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(2000, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)  # unit vectors: each is its own best match
    ids = np.arange(2000) // 4 + 100  # ids repeat: one id per image, four regions each
    for kind in ("flat", "ivf", "ivfpq"):
        store = FaissStore(16, kind=kind, nprobe=1000)  # every list probed: each vector finds itself
        store.add(ids, vectors)
        _, found = store.search(vectors[:3], 1)
        assert found[:, 0].tolist() == [100, 100, 100], kind
        assert store.distance_computations > 0
        assert store.remove(np.array([100, 99999])) == 4 and len(store) == 1996
        assert 100 not in store.search(vectors[:3], 10)[1]
        if kind == "flat":
            np.testing.assert_allclose(store.get(np.array([101])), vectors[7:8])
        else:
            with pytest.raises(NotImplementedError, match="does not return vectors"):
                store.get(np.array([101]))
    ivf = FaissStore(16, kind="ivf", nprobe=2)
    ivf.add(ids, vectors)
    before = ivf.distance_computations
    assert ivf.search(vectors[:2], 5)[1].shape == (2, 5)
    assert ivf.distance_computations - before < 2 * 2000  # a few lists, not the whole store
    with pytest.raises(ConfigError, match="unknown"):
        FaissStore(16, kind="hnsw")


@pytest.mark.parametrize("kind", ["ivf", "ivfpq"])
def test_a_large_ivf_scan_split_over_threads_gives_the_same_hits_and_count(kind, monkeypatch):
    import himir_rag.store.faiss as faiss_store

    rng = np.random.default_rng(1)
    vectors = rng.normal(size=(6000, 32)).astype(np.float32)
    queries = rng.normal(size=(3, 32)).astype(np.float32)
    whole = FaissStore(32, kind=kind, nlist=40, nprobe=11)
    whole.add(np.arange(6000), vectors)
    split = whole.empty_copy()
    split.add(np.arange(6000), vectors)  # same training, same lists
    split.scan_workers = 3
    expected_scores, expected_ids = whole.search(queries, 25)
    whole._index.nprobe = 11
    own_scores, own_ids = whole._index.search(queries, 25)  # FAISS's own search of the same lists
    np.testing.assert_array_equal(expected_ids, own_ids)
    np.testing.assert_allclose(expected_scores, own_scores, rtol=1e-6)
    scans = []
    real_scan = faiss_store._scan_lists
    monkeypatch.setattr(faiss_store, "_scan_lists", lambda *args: scans.append(args[3].shape) or real_scan(*args))
    monkeypatch.setattr(faiss_store, "SPLIT_MIN_SCAN", 0)  # split even this small scan
    scores, ids = split.search(queries, 25)
    assert sorted(scans) == [(3, 3), (3, 4), (3, 4)]  # 11 probed lists a query, in three shares
    np.testing.assert_array_equal(np.sort(ids, axis=1), np.sort(expected_ids, axis=1))
    np.testing.assert_allclose(np.sort(scores, axis=1), np.sort(expected_scores, axis=1), rtol=1e-6)
    assert split.distance_computations == whole.distance_computations  # the same vectors scanned
    padded = [store.search(queries[:1], 2000)[1] for store in (whole, split)]  # more than the probed lists hold
    assert (padded[0] == -1).sum() == (padded[1] == -1).sum() > 0
    np.testing.assert_array_equal(np.sort(padded[0]), np.sort(padded[1]))
    whole.distance_computations = split.distance_computations = 0
    whole.search(queries, 25)
    split.search(queries, 25)
    index = faiss_store.import_faiss()
    index.cvar.indexIVF_stats.reset()
    whole._index.nprobe = 11
    whole._index.search(queries, 25)
    scanned = int(index.cvar.indexIVF_stats.ndis)  # FAISS's own count of the vectors its scan visited
    assert whole._cost(3, scanned) == whole.distance_computations
    split.add(np.arange(6000, 9000), vectors[:3000])  # a change refreshes the list sizes the count uses
    before = split.distance_computations
    split.search(queries, 25)
    index.cvar.indexIVF_stats.reset()
    split._index.nprobe = 11
    split._index.search(queries, 25)
    grown = int(index.cvar.indexIVF_stats.ndis)
    assert grown > scanned and split.distance_computations - before == split._cost(3, grown)


def test_ray_build_equals_single_process(scene_dir):
    pytest.importorskip("ray")
    (scene_dir / "broken.png").write_text("not an image")
    local, distributed = HiMIRIndex(ColorEncoder()), HiMIRIndex(ColorEncoder())
    local_report = local.add(scene_dir, progress=False)
    ray_report = distributed.add(scene_dir, progress=False, ray_address="local", chunk_images=2)
    assert (ray_report.added, len(ray_report.skipped)) == (local_report.added, len(local_report.skipped)) == (6, 1)
    assert ray_report.skipped == local_report.skipped  # one skip policy (himir_rag.ingest.prepare_or_skip)
    a, b = local.snapshot, distributed.snapshot
    assert [r.path for r in a.images.values()] == [r.path for r in b.images.values()]
    for attr in ("vectors", "levels", "parents", "boxes"):
        np.testing.assert_array_equal(getattr(a, attr), getattr(b, attr))
    assert ranking(local.search("green", k=3)) == ranking(distributed.search("green", k=3))


class _NaNOnOrange(ColorEncoder):
    """Returns NaN for mostly-orange crops: an encoder fault on one photo."""

    def embed_images(self, images):
        out = super().embed_images(images)
        out[out[:, list(COLORS).index("orange")] > 0.3] = np.nan
        return out


def test_ray_actor_skips_as_a_local_build_and_keeps_payloads_aligned(scene_dir, monkeypatch):
    """The encoder actor's batch call, run in-process (no Ray needed): the same skip reasons as a
    local build, and a photo dropped after encoding does not shift the other photos' vectors."""
    from himir_rag import ingest
    from himir_rag.distributed import _EncodeActor, _unpack

    (scene_dir / "broken.png").write_text("not an image")
    real = ingest.load_image

    def flaky(path, **kwargs):
        if Path(path).name == "all_blue.png":
            raise RuntimeError("decoder bug")
        return real(path, **kwargs)

    monkeypatch.setattr(ingest, "load_image", flaky)
    names = ["red_blue.png", "broken.png", "all_blue.png", "sub/orange.png", "all_red.png"]
    paths = [str(scene_dir / name) for name in names]
    actor = _EncodeActor(_NaNOnOrange(), HiMIRConfig().to_dict(), "cpu")
    out = actor({"path": np.array(paths, dtype=object)})
    local = HiMIRIndex(_NaNOnOrange())
    report = local.add([Path(p) for p in paths], progress=False)
    assert sorted(report.skipped) == sorted((p, e) for p, e in zip(out["path"], out["error"]) if e)
    assert [bool(e) for e in out["error"]] == [False, True, True, True, False]
    assert out["error"][2] == "unexpected error (RuntimeError: decoder bug); please report it"
    assert out["error"][3] == "the encoder returned NaN or infinite values"
    for i in (0, 4):
        prepared, vectors = _unpack(paths[i], out["payload"][i], None, None)
        photo = real(Path(paths[i]))
        tree, crops, _ = ingest.cut(photo, actor.decomposer, min_region_frac=actor.config.min_region_frac)
        np.testing.assert_array_equal(prepared.tree.boxes, tree.boxes)
        np.testing.assert_array_equal(vectors, ColorEncoder().embed_images(crops))


def test_ray_actor_count_honours_actors_and_small_clusters():
    from himir_rag.distributed import actor_count

    # the old expression ignored `actors` on CPU clusters and gave 0 actors on a 1-CPU cluster
    assert actor_count({"CPU": 8.0}, actors=3, gpus_per_actor=0.0) == 3
    assert actor_count({"CPU": 1.0}, actors=None, gpus_per_actor=0.0) == 1
    assert actor_count({"CPU": 8.0}, actors=None, gpus_per_actor=0.0) == 4
    assert actor_count({"CPU": 8.0, "GPU": 2.0}, actors=None, gpus_per_actor=1.0) == 2
    assert actor_count({"CPU": 8.0, "GPU": 2.0}, actors=None, gpus_per_actor=0.5) == 4
    assert actor_count({"CPU": 8.0, "GPU": 2.0}, actors=5, gpus_per_actor=1.0) == 5
    with pytest.raises(ValueError, match="actors"):
        actor_count({"CPU": 8.0}, actors=0, gpus_per_actor=0.0)


def test_cli_index_into_qdrant(tmp_path):
    from himir_rag.cli import app
    from himir_rag.demo import write_demo_photos

    photos = tmp_path / "photos"
    photos.mkdir()
    for path in write_demo_photos(tmp_path / "all"):
        if path.stem in ("cat", "coffee", "motorcycle"):
            (photos / path.name).write_bytes(path.read_bytes())
    runner = CliRunner()
    result = runner.invoke(app, ["index", str(photos), "--index", str(tmp_path / "idx"), "--store", "qdrant",
                                 "--qdrant-path", str(tmp_path / "qdrant"), "--no-progress"])
    assert result.exit_code == 0, result.output
    search = ["search", str(tmp_path / "idx"), "a cat", "-k", "1", "--mode", "himir"]
    result = runner.invoke(app, search)  # the Qdrant folder is outside the index: named again or refused
    assert result.exit_code == 1 and "outside the index directory" in result.stderr, result.output
    result = runner.invoke(app, search, env={"HIMIR_STORE_LOCATION": str(tmp_path / "qdrant")})
    assert result.exit_code == 0, result.output
    assert "cat.jpg" in result.stdout.splitlines()[2]
    result = runner.invoke(app, ["index", str(photos), "--index", str(tmp_path / "idx2"), "--store", "qdrant"])
    assert result.exit_code == 1 and "exactly one of --qdrant-url" in result.stderr


def test_scan_workers_setting_is_validated_and_reaches_the_candidate_stores(scene_dir, monkeypatch):
    import himir_rag.store.faiss as faiss_store

    for bad in (-1, True, 1.5):
        with pytest.raises(ConfigError, match="scan_workers"):
            HiMIRConfig(scan_workers=bad)
    monkeypatch.setattr(faiss_store.os, "sched_getaffinity", lambda pid: set(range(32)), raising=False)
    assert faiss_store.scan_workers_for(0) == 8 and faiss_store.scan_workers_for(3) == 3
    index = HiMIRIndex(ColorEncoder(), HiMIRConfig(layout="1+4+16"))
    index.add(scene_dir, progress=False)
    assert index.candidate_stores.scan_workers == 8  # 0: one per core, at most 8
    index.set_config(index.config.replace(scan_workers=1))
    assert index.candidate_stores.scan_workers == 1


def test_ivf_flat_levels_get_finer_lists_than_ivf_pq_levels():
    from himir_rag.store.faiss import ivf_nlist

    assert (ivf_nlist(1600, "ivf"), ivf_nlist(6400, "ivf")) == (120, 240)  # ~3 sqrt(n)
    assert (ivf_nlist(1600, "ivfpq"), ivf_nlist(400_000, "ivfpq")) == (41, 1264)  # ~2 sqrt(n), 39 points a list
    assert ivf_nlist(300, "ivf") == 30 and ivf_nlist(5, "ivf") == 1  # at least 10 training points a list
    assert ivf_nlist(10**9, "ivf") == ivf_nlist(10**9, "ivfpq") == 4096


def test_an_ivf_flat_store_trains_its_lists_without_a_faiss_warning(capfd):
    vectors = np.random.default_rng(2).normal(size=(1600, 32)).astype(np.float32)
    store = FaissStore(32, kind="ivf")
    store.add(np.arange(1600), vectors)
    assert store.lists == 120  # 13 points a list: under FAISS's own minimum of 39, which would warn
    assert "WARNING" not in capfd.readouterr().err
    scores, ids = store.search(vectors[:2], 1)
    np.testing.assert_array_equal(ids[:, 0], [0, 1])  # a stored vector finds itself in its own list


def _near_subspace(n: int, dim: int, rank: int, seed: int) -> np.ndarray:
    """Unit vectors lying close to a ``rank``-dimensional subspace of ``dim`` dimensions (as encoder embeddings do)."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.normal(size=(dim, rank)))[0].T
    vectors = rng.normal(size=(n, rank)) @ basis + 0.02 * rng.normal(size=(n, dim))
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def test_ivf_lists_are_ranked_through_a_projection_where_the_centroids_allow_it():
    from himir_rag.store.faiss import ListRanking, search_cost

    vectors, queries = _near_subspace(4000, 128, 24, seed=3), _near_subspace(40, 128, 24, seed=3)[::-1].copy()
    projected = FaissStore(128, kind="ivf", nprobe=10)
    projected.add(np.arange(4000), vectors)
    exact = projected.empty_copy()
    exact.list_ranking = "exact"
    exact.add(np.arange(4000), vectors)  # the same lists
    ranking = projected._list_ranking()
    assert isinstance(ranking, ListRanking) and ranking.dims == 32 and exact._list_ranking() is None
    scores, lists = ranking.probed(queries, 10)
    spent = ranking.cost(10)
    want_scores, want_lists = projected._index.quantizer.search(queries, 10)
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(lists, want_lists)]) >= 0.95
    np.testing.assert_array_equal(np.diff(scores, axis=1) <= 1e-6, True)  # best first, exact scores
    assert spent == 32 + projected.lists * 32 / 128 + 20  # the projection, every centroid in 32 dims, 2 x 10 re-ranked
    found, expected = projected.search(queries, 5)[1], exact.search(queries, 5)[1]
    assert (found == expected).all(axis=1).mean() >= 0.9
    scanned = int(projected._sizes()[lists].sum())
    assert projected.distance_computations == int(np.ceil(search_cost(
        "ivf", 4000, dim=128, nlist=projected.lists, nprobe=10, n_queries=40, scanned=scanned, centroid_dots=spent)))
    assert exact.distance_computations - projected.distance_computations >= 0.9 * 40 * (projected.lists - spent)
    for nprobe in (projected.lists, int(0.5 * projected.lists)):  # all or most lists: ranking them saves nothing
        assert nprobe == projected.lists or ranking.cost(nprobe) >= projected.lists
        projected.nprobe, exact.nprobe = nprobe, nprobe
        before, exact_before = projected.distance_computations, exact.distance_computations
        np.testing.assert_array_equal(projected.search(queries[:2], 5)[1], exact.search(queries[:2], 5)[1])
        assert projected.distance_computations - before == exact.distance_computations - exact_before
    projected.train(vectors)  # new centroids: the ranking is built again from them
    assert projected._ranking is False


def test_isotropic_centroids_keep_every_centroid_scored():
    vectors = np.random.default_rng(4).normal(size=(4000, 128)).astype(np.float32)
    store = FaissStore(128, kind="ivf", nprobe=10)
    store.add(np.arange(4000), vectors)
    assert store._list_ranking() is None  # no 32 or 64 dimensions hold 97% of their energy
    store.search(vectors[:3], 5)
    assert store.distance_computations >= 3 * store.lists
    with pytest.raises(ConfigError, match="list_ranking"):
        FaissStore(128, kind="ivf", list_ranking="approx")
    from himir_rag.scheduler import SchedulerParams

    with pytest.raises(ConfigError, match="list_ranking"):
        SchedulerParams.from_dict({"list_ranking": "approx"})
    assert SchedulerParams.from_dict({"list_ranking": "exact"}).overrides() == {"list_ranking": "exact"}

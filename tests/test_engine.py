"""The engine at exact settings: every candidate store kind against brute force, candidate
stores across save / load / add / delete, float16 storage, per-snapshot caches."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from himir_rag.catalog import ImageRecord, Snapshot
from himir_rag.config import HiMIRConfig
from himir_rag.errors import ConfigError, IncompatibleIndexError
from himir_rag.hierarchy import GridDecomposer, Level
from himir_rag.index import HiMIRIndex
from himir_rag.scheduler import MODE_LEVELS, RetrievalMode, SchedulerParams, SearchStats, scheduled_search, \
    score_exhaustive, top_k
from himir_rag.store.candidates import KEY_SHIFT, CandidateStores
from tests.conftest import plant_queries, unit

DIM = 32
N_IMAGES = 1500
F32 = HiMIRConfig(precision="float32")  # the planted snapshots are float32 (the default storage is float16)


class _NoEncoder:
    name, dim = "test:none", DIM

    def embed_images(self, images):  # pragma: no cover - the index is built from arrays
        raise NotImplementedError

    def embed_texts(self, texts):
        raise NotImplementedError


def planted_snapshot(n_images: int = N_IMAGES, *, seed: int = 0, n_queries: int = 8, first_id: int = 1,
                     dtype=np.float32):
    """Random region vectors; each query's 2 sub-queries planted in a segment of 2 target images."""
    rng = np.random.default_rng(seed)
    tree = GridDecomposer("1+4+16").decompose(Image.new("RGB", (64, 64)))
    vectors = [unit(rng.normal(size=(len(tree), DIM))) for _ in range(n_images)]
    queries, targets = plant_queries(vectors, rng, n_queries=n_queries, n_subs=2, noise=0.05, first_id=first_id)
    records = [ImageRecord(first_id + i, f"/photos/{first_id + i}.jpg", 64, 64) for i in range(n_images)]
    snapshot = Snapshot.empty(DIM, dtype=dtype).with_images(records, [tree] * n_images, vectors)
    return snapshot, queries, targets, (records, tree, vectors)


@pytest.fixture(scope="module")
def planted():
    return planted_snapshot()


def ranked(scored, k):
    return scored.image_ids[top_k(scored.scores, k)].tolist()


@pytest.mark.parametrize("kind", ["flat", "ivf", "ivfpq"])
def test_scheduled_pass_equals_brute_force_for_every_store_kind(planted, kind):
    snapshot, queries, targets, _ = planted
    params = SchedulerParams(index_kind=kind, probe_share=1.0)  # every list probed, exact bounds (defaults)
    stores = CandidateStores(DIM)
    for q, target in zip(queries, targets):
        full = score_exhaustive(snapshot, q, levels=MODE_LEVELS[RetrievalMode.HIMIR_FULL])
        stats = SearchStats(mode="himir")
        scored = scheduled_search(snapshot, q, k=2, params=params, stats=stats, stores=stores)
        assert stats.extra["candidate_dot_products"] > 0 and stats.extra["candidates"] < len(snapshot)
        assert ranked(scored, 2) == ranked(full, 2)
        assert set(ranked(scored, 2)) == target
        # candidates are re-ranked exactly: the returned top-k carry the brute-force scores
        top = top_k(scored.scores, 2)
        pos = snapshot.positions_of(scored.image_ids[top])
        np.testing.assert_allclose(scored.scores[top], full.scores[pos], rtol=1e-5)
        # every score is a lower bound of the exact one (pruned images keep their coarse score)
        all_pos = snapshot.positions_of(scored.image_ids)
        assert (scored.scores <= full.scores[all_pos] + 1e-5).all()
    assert stores.store(Level.SEGMENT).kind == kind


def test_exact_stores_follow_add_and_delete_like_rebuilt_ones(planted):
    snapshot, queries, _, _ = planted
    params = dict(index_kind="ivf", flat_max=256, pq_min=50_000)
    kept = CandidateStores(DIM)
    kept.sync(snapshot, [Level.REGION, Level.SEGMENT], **params)
    extra, extra_queries, _, (records, tree, vectors) = planted_snapshot(200, seed=1, first_id=N_IMAGES + 1)
    removed = set(range(1, 301))
    changed = snapshot.without_images(removed).with_images(records, [tree] * len(records), vectors)
    kept.sync(changed, [Level.REGION, Level.SEGMENT], **params)  # incremental: no retraining
    rebuilt = CandidateStores(DIM)
    rebuilt.sync(changed, [Level.REGION, Level.SEGMENT], **params)
    assert len(kept.store(Level.SEGMENT)) == len(rebuilt.store(Level.SEGMENT)) == changed.level_counts()["segment"]
    for q in [*queries, *extra_queries]:
        for level in (Level.REGION, Level.SEGMENT):
            nprobe = 10_000  # all lists: both stores answer exactly
            _, a, _, exact = kept.search(level, q, 20, nprobe=nprobe)
            _, b, _, _ = rebuilt.search(level, q, 20, nprobe=nprobe)
            assert exact  # IVF-Flat scores are exact inner products
            assert sorted(a[0].tolist()) == sorted(b[0].tolist())
            assert not set((a.ravel() >> KEY_SHIFT).tolist()) & removed
            # region keys locate the hit's own row in the changed snapshot (rows were renumbered)
            positions, rows = kept.locate(changed, a)
            assert (rows >= 0).all() and (changed.levels[rows] == level).all()
            np.testing.assert_array_equal(changed.region_image[rows], a >> KEY_SHIFT)
            np.testing.assert_array_equal(changed.image_ids[positions], a >> KEY_SHIFT)
            scores, _, _, _ = kept.search(level, q, 20, nprobe=nprobe)
            for sub in range(len(q)):
                np.testing.assert_allclose(scores[sub], changed.region_vectors(rows[sub]) @ q[sub], rtol=1e-5,
                                           atol=1e-6)
    # keys of images the snapshot does not hold, and padding, locate nowhere
    gone = np.array([[1 << KEY_SHIFT, -1]])
    assert (kept.locate(changed, gone)[1] == -1).all()


def test_stores_follow_a_change_of_kind_in_the_settings(planted):
    snapshot, queries, _, _ = planted
    index = HiMIRIndex.from_snapshot(snapshot, encoder=_NoEncoder(), config=F32.replace(scheduler={"index_kind": "ivf"}))
    index.search_vectors(queries[0], k=5)
    assert index.candidate_stores.store(Level.SEGMENT).kind == "ivf"
    index.set_config(F32.replace(scheduler={"index_kind": "ivfpq"}))
    result = index.search_vectors(queries[0], k=5)
    assert index.candidate_stores.store(Level.SEGMENT).kind == "ivfpq"
    assert result.stats.extra["candidates"] < len(snapshot)


def test_candidate_stores_survive_save_and_load(planted, tmp_path):
    snapshot, queries, _, _ = planted
    index = HiMIRIndex.from_snapshot(snapshot, encoder=_NoEncoder(), config=F32.replace(scheduler={"index_kind": "ivf"}))
    index.sync_candidate_stores()
    before = [index.search_vectors(q, k=5) for q in queries]
    index.save(tmp_path / "idx")
    loaded = HiMIRIndex.load(tmp_path / "idx", encoder=_NoEncoder())
    store = loaded.candidate_stores.store(Level.SEGMENT)
    assert store is not None and store.kind == "ivf" and len(store) == snapshot.level_counts()["segment"]
    after = [loaded.search_vectors(q, k=5) for q in queries]
    for a, b in zip(before, after):
        assert [h.image_id for h in a.hits] == [h.image_id for h in b.hits]
        assert a.stats.dot_products == b.stats.dot_products
    assert isinstance(loaded.snapshot.vectors, np.memmap)  # memory-mapped, not read into RAM


def test_compact_retrains_ivf_flat_stores_saved_with_other_list_counts(planted, tmp_path, monkeypatch):
    """An IVF-Flat store saved with another list count (an older version's rule) is kept on load and
    retrained by compact to today's count; the compacted index then ranks as a freshly built one."""
    import himir_rag.store.candidates as candidate_module
    import himir_rag.store.faiss as faiss_store

    snapshot, queries, _, _ = planted
    config = F32.replace(scheduler={"index_kind": "ivf"})
    n_segments = snapshot.level_counts()["segment"]
    with monkeypatch.context() as patch:  # the "older version": a quarter of today's lists
        today = faiss_store.ivf_nlist
        old_rule = lambda n, kind: max(1, today(n, kind) // 4)  # noqa: E731
        for module in (faiss_store, candidate_module):
            patch.setattr(module, "ivf_nlist", old_rule)
        old = HiMIRIndex.from_snapshot(snapshot, encoder=_NoEncoder(), config=config)
        old.sync_candidate_stores()
        old.save(tmp_path / "idx")
    loaded = HiMIRIndex.load(tmp_path / "idx", encoder=_NoEncoder())
    stale = loaded.candidate_stores.store(Level.SEGMENT)
    assert stale.lists == max(1, faiss_store.ivf_nlist(n_segments, "ivf") // 4) < faiss_store.ivf_nlist(n_segments, "ivf")
    assert not stale.is_current(n_segments)
    loaded.search_vectors(queries[0], k=5)
    assert loaded.candidate_stores.store(Level.SEGMENT) is stale  # a search never retrains

    loaded.compact()
    compacted = HiMIRIndex.load(tmp_path / "idx", encoder=_NoEncoder())
    for level in (Level.REGION, Level.SEGMENT):
        store = compacted.candidate_stores.store(level)
        n_level = snapshot.level_counts()[level.name.lower()]
        assert store.lists == faiss_store.ivf_nlist(n_level, "ivf") and store.is_current(n_level)
    fresh = HiMIRIndex.from_snapshot(snapshot, encoder=_NoEncoder(), config=config)
    for q in queries:
        a, b = compacted.search_vectors(q, k=5), fresh.search_vectors(q, k=5)
        assert [h.image_id for h in a.hits] == [h.image_id for h in b.hits]
        assert a.stats.dot_products == b.stats.dot_products


def test_compact_retrains_pq_stores_saved_with_other_codes(planted, tmp_path, monkeypatch):
    """An index saved by a version that built other PQ codes keeps its stores on load (no retraining
    at query time); compact retrains them, and they then rank as freshly built ones."""
    import himir_rag.store.candidates as candidate_module
    import himir_rag.store.faiss as faiss_store

    snapshot, queries, _, _ = planted
    config = F32.replace(scheduler={"index_kind": "ivfpq"})
    current = faiss_store.pq_subquantizers(DIM, snapshot.level_counts()["segment"])
    with monkeypatch.context() as patch:  # the "older version": half as many sub-quantizers
        for module in (faiss_store, candidate_module):
            patch.setattr(module, "pq_subquantizers", lambda dim, n_vectors=0: dim // 8)
        old = HiMIRIndex.from_snapshot(snapshot, encoder=_NoEncoder(), config=config)
        old.sync_candidate_stores()
        old.save(tmp_path / "idx")
    loaded = HiMIRIndex.load(tmp_path / "idx", encoder=_NoEncoder())
    stale = loaded.candidate_stores.store(Level.SEGMENT)
    assert stale._index.M == DIM // 8 != current and not stale.is_current(len(stale))
    loaded.search_vectors(queries[0], k=5)  # searches keep the stores they were given
    assert loaded.candidate_stores.store(Level.SEGMENT) is stale

    loaded.compact()
    compacted = HiMIRIndex.load(tmp_path / "idx", encoder=_NoEncoder())
    for level in (Level.REGION, Level.SEGMENT):
        store = compacted.candidate_stores.store(level)
        assert store._index.M == current and store.is_current(len(store))
        assert len(store) == snapshot.level_counts()[level.name.lower()]
    fresh = HiMIRIndex.from_snapshot(snapshot, encoder=_NoEncoder(), config=config)
    for q in queries:
        a, b = compacted.search_vectors(q, k=5), fresh.search_vectors(q, k=5)
        assert [h.image_id for h in a.hits] == [h.image_id for h in b.hits]
        assert a.stats.dot_products == b.stats.dot_products


def test_float16_storage_halves_memory_and_keeps_the_ranking(planted, tmp_path):
    snapshot, queries, targets, (records, tree, vectors) = planted
    half = Snapshot.empty(DIM, dtype=np.float16).with_images(records, [tree] * len(records), vectors)
    assert half.vectors.dtype == np.float16 and half.vectors.nbytes * 2 == snapshot.vectors.nbytes
    index = HiMIRIndex.from_snapshot(half, encoder=_NoEncoder(), config=HiMIRConfig(precision="float16"))
    for q, target in zip(queries, targets):
        for mode in ("himir", "himir-full"):
            assert {h.image_id for h in index.search_vectors(q, k=2, mode=mode).hits} == target
    index.save(tmp_path / "idx")
    loaded = HiMIRIndex.load(tmp_path / "idx", encoder=_NoEncoder())
    assert loaded.snapshot.vectors.dtype == np.float16 and loaded.config.precision == "float16"
    with pytest.raises(IncompatibleIndexError, match="precision is float32"):
        HiMIRIndex.from_snapshot(half, encoder=_NoEncoder(), config=F32)
    assert HiMIRConfig().precision == "float16"  # the default: accuracy held on the composite benchmark
    with pytest.raises(ConfigError, match="precision"):
        HiMIRConfig(precision="int8")


def test_snapshot_caches_and_growth(planted):
    snapshot, _, _, (records, tree, vectors) = planted
    assert snapshot.image_starts[-1] == len(snapshot.region_image) and len(snapshot.image_ids) == len(snapshot)
    positions = np.array([0, 7, len(snapshot) - 1])
    rows = snapshot.rows_of(positions)
    np.testing.assert_array_equal(rows, np.flatnonzero(np.isin(snapshot.region_image, snapshot.image_ids[positions])))
    assert snapshot.positions_of(np.array([1, 10**9])).tolist() == [0, -1]
    # appending chunk by chunk shares buffers (no re-concatenation) and equals one append
    grown = Snapshot.empty(DIM)
    for start in range(0, 64, 16):
        grown = grown.with_images(records[start : start + 16], [tree] * 16, vectors[start : start + 16])
    once = Snapshot.empty(DIM).with_images(records[:64], [tree] * 64, vectors[:64])
    np.testing.assert_array_equal(grown.vectors, once.vectors)
    np.testing.assert_array_equal(grown.parents, once.parents)
    older = Snapshot.empty(DIM).with_images(records[:16], [tree] * 16, vectors[:16])
    newer = older.with_images(records[16:32], [tree] * 16, vectors[16:32])
    other = older.with_images(records[32:48], [tree] * 16, vectors[32:48])  # a second branch copies
    np.testing.assert_array_equal(newer.vectors[len(older.vectors):], np.concatenate(vectors[16:32]))
    np.testing.assert_array_equal(other.vectors[len(older.vectors):], np.concatenate(vectors[32:48]))
    assert len(older.vectors) == 16 * len(tree)


def test_search_vectors_validates_its_input(planted):
    snapshot, queries, _, _ = planted
    index = HiMIRIndex.from_snapshot(snapshot, encoder=_NoEncoder(), config=F32)
    with pytest.raises(ValueError, match=r"vectors must be \(s, 32\)"):
        index.search_vectors(np.zeros((2, 7), np.float32))
    with pytest.raises(ValueError, match="2 labels for 1 vectors"):
        index.search_vectors(queries[0][:1], labels=["a", "b"])
    assert index.search_vectors(queries[0], k=3).stats.mode == "himir"


def test_segment_bound_is_never_below_the_true_similarity(planted):
    from himir_rag.scheduler import _segment_bound, segment_geometry

    snapshot, _, _, _ = planted
    rng = np.random.default_rng(3)
    rows = np.flatnonzero(snapshot.levels == Level.SEGMENT)[:3000]
    parents = snapshot.parents[rows]
    for scale in (1.0, 0.3):  # unit and non-unit query vectors
        queries = unit(rng.normal(size=(4, DIM))) * scale
        parent_sim = queries @ snapshot.region_vectors(parents).T
        bound = _segment_bound(queries, segment_geometry(snapshot.region_vectors(rows), snapshot.region_vectors(parents)),
                               parent_sim)
        true = queries @ snapshot.region_vectors(rows).T
        assert (bound >= true).all()
        distance = np.linalg.norm(snapshot.region_vectors(rows) - snapshot.region_vectors(parents), axis=1)
        radius = parent_sim + np.linalg.norm(queries, axis=1)[:, None] * distance[None, :]
        assert (bound <= radius + 1e-3).all() and (bound < radius - 1e-3).mean() > 0.5  # tighter than C-S


def test_segment_bound_holds_for_segments_next_to_their_parent():
    """A segment equal or almost equal to its parent (where float32 rounding of the geometry
    matters most) keeps a bound at or above its true similarity, for unit and scaled vectors."""
    from himir_rag.scheduler import _segment_bound, segment_geometry

    rng = np.random.default_rng(5)
    parents = unit(rng.normal(size=(600, DIM))).astype(np.float32)
    nudge = np.repeat([0.0, 1e-6, 1e-4, 1e-2], 150)[:, None] * rng.normal(size=(600, DIM))
    for scale in (1.0, 7.0, 0.05):
        segments = (scale * (parents + nudge)).astype(np.float32)
        queries = np.concatenate([parents[:3], unit(rng.normal(size=(3, DIM)))]).astype(np.float32) * scale
        parent_sim = queries @ (scale * parents).T
        bound = _segment_bound(queries, segment_geometry(segments, scale * parents), parent_sim)
        assert (bound >= queries @ segments.T).all()


def test_segment_geometry_is_computed_once_a_snapshot_and_matches_the_direct_computation(planted):
    from himir_rag.scheduler import cached_geometry, segment_geometry, similarities

    snapshot, queries, _, _ = planted
    fresh = Snapshot(dict(snapshot.images), snapshot.vectors, snapshot.region_image, snapshot.levels,
                     snapshot.parents, snapshot.boxes)  # its own (empty) caches
    rows = np.flatnonzero(fresh.levels == Level.SEGMENT)[:500]
    parent_rows, parent_of = np.unique(fresh.parents[rows], return_inverse=True)
    parents = fresh.region_vectors(parent_rows)
    direct = segment_geometry(fresh.region_vectors(rows), parents, parent_of)
    geometry, computed = cached_geometry(fresh, rows, parents, parent_of)
    np.testing.assert_array_equal(geometry, direct)
    assert computed == 500
    again, computed = cached_geometry(fresh, rows[::-1], parents, parent_of[::-1])
    np.testing.assert_array_equal(again, direct[::-1])
    assert computed == 0
    fresh.cached("segment_geometry", None)[rows[7], 2] = np.nan  # a row not yet whole is computed again
    again, computed = cached_geometry(fresh, rows, parents, parent_of)
    np.testing.assert_array_equal(again, direct)
    assert computed == 1
    # the scheduled pass pays the geometry on the first query only, with the same hits
    stats = [SearchStats(mode="himir") for _ in range(2)]
    first, second = (scheduled_search(fresh, queries[0], k=5, stats=s) for s in stats)
    assert stats[0].extra["geometry_dot_products"] > 0 and stats[1].extra["geometry_dot_products"] == 0
    np.testing.assert_array_equal(first.scores, second.scores)
    vectors = fresh.region_vectors(rows)
    np.testing.assert_allclose(similarities(queries[0], vectors), queries[0] @ vectors.T, rtol=1e-5, atol=1e-6)
    assert similarities(queries[0], vectors).flags.c_contiguous


def test_with_precision_converts_and_keeps_the_catalog(planted, tmp_path):
    snapshot, queries, targets, _ = planted
    index = HiMIRIndex.from_snapshot(snapshot, encoder=_NoEncoder(), config=F32)
    half = index.with_precision("float16")
    assert half.snapshot.vectors.dtype == np.float16 and half.config.precision == "float16"
    assert len(half) == len(index) and half.images[0] == index.images[0]
    assert {h.image_id for h in half.search_vectors(queries[0], k=2).hits} == targets[0]
    half.save(tmp_path / "idx")
    assert HiMIRIndex.load(tmp_path / "idx", encoder=_NoEncoder()).config.precision == "float16"


def test_segment_caps_without_hits_cap_nothing(planted):
    from himir_rag.scheduler import _segment_caps

    positions = np.arange(5)
    no_hits = np.full((2, 4), -1, np.int64)
    cap, best, rows, known = _segment_caps(positions, np.full((2, 4), -np.inf, np.float32), no_hits, no_hits,
                                           np.full(2, np.inf, np.float32))
    assert np.isinf(cap).all() and (cap > 0).all() and not known.any() and (rows == -1).all()
    assert np.isneginf(best).all()


def test_segment_caps_keep_each_candidate_best_hit_and_its_row():
    from himir_rag.scheduler import _segment_caps

    positions = np.array([2, 5, 9])
    scores = np.array([[0.9, 0.7, 0.8, 0.5]], np.float32)  # hits of one sub-query, not sorted (PQ order)
    hit_positions = np.array([[5, 2, 5, 7]])  # position 7 is not a candidate
    hit_rows = np.array([[51, 20, 52, 70]])
    cap, best, rows, known = _segment_caps(positions, scores, hit_positions, hit_rows, np.array([0.75], np.float32))
    assert rows.tolist() == [[20, 51, -1]]
    np.testing.assert_allclose(best, [[0.7, 0.9, -np.inf]])
    # a segment the search did not return scores <= 0.75: position 2's best hit (0.7) may be beaten
    assert known.tolist() == [[False, True, False]]
    np.testing.assert_allclose(cap, [[0.75, 0.9, 0.75]])

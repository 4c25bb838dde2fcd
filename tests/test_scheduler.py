"""The scheduled pruning pass against brute force, its meter, offline pruning and the tuner."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from himir_rag.autoconfig import SEARCH_SPACE, apply, tune
from himir_rag.catalog import ImageRecord, Snapshot
from himir_rag.config import HiMIRConfig
from himir_rag.errors import ConfigError
from himir_rag.hierarchy import GridDecomposer, Level
from himir_rag.index import HiMIRIndex
from himir_rag.scheduler import (
    MODE_LEVELS,
    RetrievalMode,
    SchedulerParams,
    SearchStats,
    scheduled_search,
    score_exhaustive,
    top_k,
)
from tests.conftest import plant_queries, unit

DIM = 32


def synthetic_snapshot(n_images: int = 300, *, seed: int = 0, n_queries: int = 12):
    """Clustered segment vectors, parents built from their children (as in real photos),
    and queries whose 3 sub-queries are planted in segments of 2 target images each."""
    rng = np.random.default_rng(seed)
    tree = GridDecomposer("1+4+16").decompose(Image.new("RGB", (64, 64)))
    centers = rng.normal(size=(20, DIM))
    vectors = [unit(centers[rng.integers(20)] + rng.normal(size=(len(tree), DIM))) for _ in range(n_images)]
    queries, targets = plant_queries(vectors, rng, n_queries=n_queries, n_subs=3, noise=0.1)
    for vecs in vectors:
        for region in range(1, 5):
            vecs[region] = unit(vecs[tree.parents == region].mean(axis=0) + rng.normal(size=DIM) * 0.05)
        vecs[0] = unit(vecs[5:].mean(axis=0))
    records = [ImageRecord(i + 1, f"/photos/{i}.jpg", 64, 64) for i in range(n_images)]
    return Snapshot.empty(DIM).with_images(records, [tree] * n_images, vectors), queries, targets


@pytest.fixture(scope="module")
def collection():
    return synthetic_snapshot()


def run_himir(snapshot, queries, params, k=10):
    stats = SearchStats(mode="himir")
    scored = scheduled_search(snapshot, queries, k=k, params=params, stats=stats)
    return scored, stats


def ranked(scored, k=10):
    return scored.image_ids[top_k(scored.scores, k)].tolist()


def test_never_prune_settings_equal_himir_full(collection):
    snapshot, queries, _ = collection
    for q in queries:
        full = score_exhaustive(snapshot, q, levels=MODE_LEVELS[RetrievalMode.HIMIR_FULL])
        scored, stats = run_himir(snapshot, q, SchedulerParams.exact())
        assert ranked(scored) == ranked(full)
        np.testing.assert_allclose(np.sort(scored.scores)[::-1][:10], np.sort(full.scores)[::-1][:10], rtol=1e-6)
        assert stats.dot_products == full.dot_products
        assert stats.extra["images_pruned"] == 0 and stats.extra["levels_skipped"] == 0


def test_exact_bound_keeps_top_k_and_saves_work(collection):
    snapshot, queries, _ = collection
    params = SchedulerParams(candidate_k=-1, consistency_overlap=2.0, bound_scale=1.0, sparsity_margin=float("inf"))
    for q in queries:
        full = score_exhaustive(snapshot, q, levels=MODE_LEVELS[RetrievalMode.HIMIR_FULL])
        scored, stats = run_himir(snapshot, q, params)
        assert ranked(scored) == ranked(full)  # the Cauchy-Schwarz bound is exact
        assert stats.dot_products <= full.dot_products


def test_default_schedule_prunes_finds_targets_and_reports(collection):
    snapshot, queries, targets = collection
    mvr_costs, himir_costs, recalls = [], [], []
    for q, target in zip(queries, targets):
        scored, stats = run_himir(snapshot, q, None)
        recalls.append(len(set(ranked(scored)) & target) / len(target))
        himir_costs.append(stats.dot_products)
        mvr_costs.append(score_exhaustive(snapshot, q, levels=MODE_LEVELS[RetrievalMode.MVR]).dot_products)
        for key in ("candidates", "candidate_dot_products", "coarse_dot_products", "images_descended",
                    "images_pruned", "segments_visited", "levels_skipped"):
            assert key in stats.extra
        assert stats.extra["candidates"] < len(snapshot)
        assert stats.dot_products == (stats.extra["candidate_dot_products"] + stats.extra["coarse_dot_products"]
                                      + stats.extra["segments_visited"])
    assert np.mean(recalls) == 1.0
    assert np.median(himir_costs) < np.median(mvr_costs)


def test_depth_skipping_when_levels_agree(collection):
    snapshot, queries, _ = collection
    params = SchedulerParams(candidate_k=-1, consistency_overlap=0.0, consistency_margin=-1.0)
    scored, stats = run_himir(snapshot, queries[0], params)
    assert stats.extra["levels_skipped"] == 1 and stats.extra["segments_visited"] == 0
    assert (snapshot.levels[scored.best_rows] != Level.SEGMENT).all()


def test_meter_closed_form_counts(collection):
    snapshot, queries, _ = collection
    q = queries[0]
    n_images = len(snapshot)
    assert score_exhaustive(snapshot, q, levels=MODE_LEVELS[RetrievalMode.MVR]).dot_products == 3 * n_images * 17
    assert score_exhaustive(snapshot, q, levels=MODE_LEVELS[RetrievalMode.HIMIR_FULL]).dot_products == 3 * n_images * 21
    assert score_exhaustive(snapshot, q[:1], levels=MODE_LEVELS[RetrievalMode.SINGLE]).dot_products == n_images


def test_filtered_scheduled_search_only_returns_allowed(collection):
    snapshot, queries, targets = collection
    allowed = np.array(sorted(targets[0]) + list(range(200, 260)))
    positions = np.sort(snapshot.positions_of(allowed))
    stats = SearchStats(mode="himir")
    scored = scheduled_search(snapshot, queries[0], k=5, allowed=positions, params=None, stats=stats)
    assert set(scored.image_ids.tolist()) <= set(allowed.tolist())
    assert set(ranked(scored, 2)) == targets[0]


def test_bad_scheduler_params():
    with pytest.raises(ConfigError, match="unknown scheduler parameters"):
        SchedulerParams.from_dict({"candidate_kk": 3})
    with pytest.raises(ConfigError, match="index_kind"):
        SchedulerParams.from_dict({"index_kind": "hnsw"})
    with pytest.raises(ConfigError, match="probe_share"):
        SchedulerParams.from_dict({"probe_share": 0})
    with pytest.raises(ConfigError, match="candidate_levels"):
        SchedulerParams.from_dict({"candidate_levels": ["patch"]})
    with pytest.raises(ConfigError, match="candidate_pool"):
        SchedulerParams.from_dict({"candidate_pool": 0})
    with pytest.raises(ConfigError, match="candidate_pool must be an int"):
        SchedulerParams.from_dict({"candidate_pool": 1.5})
    assert set(SEARCH_SPACE) <= set(SchedulerParams.__dataclass_fields__)


class _VectorEncoder:
    """Maps text "q<i>" to a fixed query vector: lets the tuner run on synthetic vectors."""

    name, dim = "test:vectors", DIM

    def __init__(self, table):
        self.table = table

    def embed_texts(self, texts):
        return np.stack([self.table[t] for t in texts])

    def embed_images(self, images):  # pragma: no cover - the index is built from arrays
        raise NotImplementedError


def _synthetic_index(collection):
    snapshot, queries, targets = collection
    table = {f"q{i}-{s}": q[s] for i, q in enumerate(queries) for s in range(3)}
    index = HiMIRIndex(_VectorEncoder(table), HiMIRConfig())
    index._snapshot = snapshot

    class Split:
        def decompose(self, query):
            return [f"{query}-{s}" for s in range(3)]

    return index, Split(), [f"q{i}" for i in range(len(queries))], targets


def test_tune_respects_budget_and_writes_config(collection, tmp_path):
    index, split, texts, targets = _synthetic_index(collection)
    relevant = [{f"/photos/{i - 1}.jpg" for i in t} for t in targets]
    report = tune(index, texts, relevant=relevant, k=10, budget_dot_products=3000, decomposer=split, passes=1)
    assert report.chosen.dot_products <= 3000
    assert report.target == "recall"
    assert all(t.dot_products <= 3000 for t in report.trials if t is report.chosen)
    assert report.chosen.accuracy >= 0.9
    assert report.baselines["mvr"].dot_products == 3 * len(index) * 17
    apply(index, report)
    assert SchedulerParams.from_dict(index.config.scheduler).candidate_k == report.chosen.params["candidate_k"]
    index.save(tmp_path / "idx")
    loaded = HiMIRIndex.load(tmp_path / "idx", encoder=index.encoder)
    assert loaded.config.scheduler == index.config.scheduler


def test_tune_without_labels_targets_himir_full(collection):
    index, split, texts, _ = _synthetic_index(collection)
    report = tune(index, texts[:6], k=5, decomposer=split, passes=1)
    assert report.target == "agreement-with-himir-full"
    assert report.baselines["himir-full"].accuracy == 1.0
    assert report.chosen.accuracy >= report.baselines["mvr"].accuracy - 1e-9
    # without a budget: the cheapest trial within one point of the best
    best = max(t.accuracy for t in report.trials)
    assert report.chosen.accuracy >= best - 0.01
    assert report.chosen.dot_products == min(t.dot_products for t in report.trials if t.accuracy >= best - 0.01)


def test_index_search_mode_himir(scene_dir, color_encoder):
    index = HiMIRIndex.build(scene_dir, encoder=color_encoder, progress=False)
    result = index.search("a red square and a blue square", k=2, mode="himir")
    assert result.stats.mode == "himir"
    assert [h.path.rsplit("/", 1)[-1] for h in result.hits][0] == "red_blue.png"
    assert result.stats.dot_products > 0 and "candidates" in result.stats.extra


def test_offline_granularity_pruning_drops_duplicates_not_distinct(scene_dir, color_encoder):
    index = HiMIRIndex(color_encoder, HiMIRConfig(prune_cosine=0.999))
    index.add(scene_dir, progress=False)
    snap = index.snapshot
    by_name = {r.path.rsplit("/", 1)[-1]: r.image_id for r in snap.images.values()}

    def segments(name):
        return int(((snap.region_image == by_name[name]) & (snap.levels == Level.SEGMENT)).sum())

    assert segments("all_red.png") == 0  # every segment repeats its (all red) parent
    assert segments("red_blue.png") > 0  # segments holding the squares differ from their regions


def test_code_size_probe_share_and_ann_caps_follow_the_level_size():
    """The defaults that depend on a level's size (store/faiss.LARGE_LEVEL); explicit values win."""
    from himir_rag.store.faiss import LARGE_LEVEL, PQ_MIN, pq_subquantizers

    assert pq_subquantizers(384, LARGE_LEVEL - 1) == 96 and pq_subquantizers(384, LARGE_LEVEL) == 48
    assert pq_subquantizers(128, 10**7) == 32  # 8 dimensions a code would leave fewer than 32 codes
    assert pq_subquantizers(16) == 4 and pq_subquantizers(18) == 0
    params = SchedulerParams()
    assert params.probe_share is None and params.ann_bound is None
    assert params.probe_share_for(LARGE_LEVEL) == 0.15 and params.probe_share_for(LARGE_LEVEL, "ivf") == 0.15
    # below LARGE_LEVEL by the store: IVF-Flat (auto below pq_min) 6%, IVF-PQ 10%
    assert params.probe_share_for(PQ_MIN - 1) == 0.05 and params.probe_share_for(PQ_MIN) == 0.1
    assert params.probe_share_for(100, "ivfpq") == 0.1 and params.probe_share_for(LARGE_LEVEL - 1, "ivf") == 0.05
    assert params.ann_bound_for(LARGE_LEVEL - 1) and not params.ann_bound_for(LARGE_LEVEL)
    chosen = SchedulerParams.from_dict({"probe_share": 0.3, "ann_bound": True})
    assert chosen.probe_share_for(10) == 0.3 and chosen.ann_bound_for(10**7)
    assert chosen.overrides() == {"probe_share": 0.3, "ann_bound": True}
    assert SchedulerParams.from_dict(params.overrides()) == params


def test_upper_bound_pick_prefers_photos_matching_every_sub_query():
    from himir_rag.scheduler import _upper_bound_pick
    from himir_rag.store.base import KEY_SHIFT, Candidates

    def keys(*images):
        return [(image << KEY_SHIFT) | 1 for image in images]

    # sub-query 0: image 1 best, image 3 fair; sub-query 1: image 2 best, image 3 fair; image 4 only once
    hits = Candidates(np.array([[0.9, 0.6, 0.5, 0.2], [0.9, 0.6, 0.2, -np.inf]], np.float32),
                      np.array([keys(1, 3, 4, 5), keys(2, 3, 5) + [-1]], np.int64), 0)
    # bounds: 3 -> (0.6 + 0.6) / 2; 1 -> (0.9 + 0.2) / 2, since the lowest pooled score of sub-query 1 is 0.2
    assert _upper_bound_pick([hits], 1).tolist() == [3]
    assert _upper_bound_pick([hits], 3).tolist() == [3, 1, 2]
    empty = Candidates(np.full((2, 3), -np.inf, np.float32), np.full((2, 3), -1, np.int64), 0)
    assert _upper_bound_pick([empty], 5).size == 0
    # an empty level (no hits at all) leaves the other level's bounds as they were
    assert _upper_bound_pick([hits, empty], 3).tolist() == [3, 1, 2]
    assert _upper_bound_pick([empty, hits], 3).tolist() == [3, 1, 2]
    # a sub-query without any hit ranks no image: the others decide
    one_sided = Candidates(hits.scores.copy(), hits.keys.copy(), 0)
    one_sided.keys[1], one_sided.scores[1] = -1, -np.inf
    assert _upper_bound_pick([one_sided], 2).tolist() == [1, 3]


def test_upper_bound_pick_only_adds_candidates(collection):
    snapshot, queries, _ = collection
    for q in queries[:5]:
        with_pick = run_himir(snapshot, q, SchedulerParams())[1].extra["candidates"]
        without = run_himir(snapshot, q, SchedulerParams(candidate_pool=1))[1].extra["candidates"]
        assert with_pick >= without

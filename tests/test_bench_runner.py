"""Benchmark runner and scale benchmark: report fields and files, metric aggregation, planted targets.

Everything runs on a tiny synthetic benchmark (coloured squares, the colour-histogram test
encoder) or a tiny synthetic-vector collection; no model is loaded, nothing is timed.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from himir_rag.bench.runner import (
    OracleDecomposer,
    aggregate_mode,
    compare_modes,
    match_objects,
    parse_modes,
    ranking_metrics,
    run_benchmark,
    run_modes,
    summarize_grounding,
    target_checks,
)
from himir_rag.bench.scale import build_synthetic_collection, run_scale_benchmark
from himir_rag.errors import ConfigError
from himir_rag.index import HiMIRIndex
from himir_rag.scheduler import RetrievalMode
from tests.conftest import ColorEncoder, RegionColorEncoder, make_scene

SIZE = (160, 120)
_SQUARE_COLOURS = ["red", "green", "blue", "yellow", "purple", "orange"]
_BOXES = [(4, 4, 60, 50), (90, 8, 150, 56), (10, 66, 70, 114), (96, 70, 156, 116), (50, 30, 110, 90)]


def write_tiny_benchmark(root: Path, *, scenes: int = 10, queries: int = 5, seed: int = 0) -> Path:
    """A benchmark directory in the ``himir bench build`` format: coloured squares on white.

    Objects are named ``"a <colour> square"``; each query names 2 objects of one scene and
    its qrels list every scene holding both.
    """
    rng = np.random.default_rng(seed)
    scene_rows = []
    for i in range(scenes):
        n = 1 + i % 3
        colours = rng.choice(_SQUARE_COLOURS, size=n, replace=False)
        boxes = [_BOXES[j] for j in rng.choice(len(_BOXES), size=n, replace=False)]
        path = make_scene(root / "images" / f"scene_{i:05d}.png", list(zip(colours, boxes)), size=SIZE)
        scene_rows.append({
            "scene_id": f"scene_{i:05d}", "path": str(path.relative_to(root)), "width": SIZE[0], "height": SIZE[1],
            "objects": [{"name": f"a {c} square", "bbox": list(b),
                         "area_frac": (b[2] - b[0]) * (b[3] - b[1]) / (SIZE[0] * SIZE[1])} for c, b in zip(colours, boxes)],
        })
    query_rows, qrel_rows = [], []
    sources = [s for s in scene_rows if len(s["objects"]) >= 2][:queries]
    for q, scene in enumerate(sources):
        names = [o["name"] for o in scene["objects"][:2]]
        relevant = sorted(s["scene_id"] for s in scene_rows if set(names) <= {o["name"] for o in s["objects"]})
        query_rows.append({"id": f"q{q:05d}", "query": f"a photo with {names[0]} and {names[1]}", "objects": names,
                           "scene_id": scene["scene_id"]})
        qrel_rows.append({"query_id": f"q{q:05d}", "scene_ids": relevant,
                          "paths": [f"images/{sid}.png" for sid in relevant]})
    for name, rows in (("scenes", scene_rows), ("queries", query_rows), ("qrels", qrel_rows)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return root


@pytest.fixture
def tiny_bench(tmp_path: Path) -> Path:
    return write_tiny_benchmark(tmp_path / "bench")


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory) -> tuple[Path, dict]:
    """One full run (all modes, plots) shared by the read-only tests below."""
    bench = write_tiny_benchmark(tmp_path_factory.mktemp("tiny") / "bench")
    report = run_benchmark(bench, modes="single,mvr,himir-full,himir", encoder=ColorEncoder(),
                           decomposer="oracle", throughput_images=3, progress=False)
    return bench, report


def _quick_run(bench: Path, **kwargs) -> dict:
    options = {"modes": "mvr", "encoder": ColorEncoder(), "throughput_images": 0, "plots": False,
               "progress": False, **kwargs}
    return run_benchmark(bench, **options)


# -- the composite runner ----------------------------------------------------------------------
def test_report_fields(tiny_report):
    bench, report = tiny_report
    saved = json.loads((bench / "report.json").read_text())
    assert saved["kind"] == "composite" and saved["benchmark"]["queries"] == 5
    ran = set(saved["modes"])
    assert {"single", "mvr", "himir-full"} <= ran
    assert ran | set(saved["skipped_modes"]) == {"single", "mvr", "himir-full", "himir"}
    for summary in saved["modes"].values():
        for name in ("recall@1", "recall@5", "recall@10", "ndcg@10", "mrr"):
            assert 0.0 <= summary[name] <= 1.0
        assert summary["dot_products"]["median"] > 0 and summary["n_queries"] == 5
        for stage in ("decompose", "encode", "search", "total"):
            assert summary["latency_ms"][stage]["p95"] >= summary["latency_ms"][stage]["p50"] >= 0
    assert saved["comparison"]["dot_products_ratio"]["mvr/himir-full"]["mean"] == pytest.approx(17 / 21)
    assert {t["target"] for t in saved["targets"]} >= {"dot products mvr/himir >= 3.5"}
    assert len(saved["per_query"]) == 5 * len(ran)


def test_indexing_throughput_size_and_memory(tiny_report):
    bench, report = tiny_report
    indexing, alone = report["indexing"], report["encoder_throughput"]
    assert indexing["measured"] and not indexing["reused"] and indexing["images"] == 10
    assert indexing["crops_encoded"] == 10 * 21 and indexing["crops_per_s"] > 0
    assert alone["images"] == 3 and alone["crops"] == 3 * 21 and alone["crops_per_s"] > 0
    assert report["index"]["bytes_on_disk"] > report["index"]["vector_bytes"] > 0
    assert report["memory"]["search"]["peak_rss_mb"] > 0 and report["memory"]["process_peak_rss_mb"] > 0
    assert (bench / "index" / "CURRENT").is_file() and (bench / "index_build.json").is_file()


def test_markdown_and_plots(tiny_report):
    bench, report = tiny_report
    text = (bench / "report.md").read_text()
    for heading in ("Recall@10", "Dot products per query", "Latency per query", "## Indexing",
                    "Region grounding", "Targets"):
        assert heading in text
    for name in ("quality", "compute", "latency", "tradeoff", "grounding"):
        path = bench / f"{name}.png"
        assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert report["plots"][name] == path.name


def test_report_says_how_the_scheduler_parameters_were_chosen(tiny_report):
    from himir_rag.bench.report import render_markdown

    bench, report = tiny_report  # 10 photos: below auto_tune_min_images, the defaults
    assert report["autoconfig"] is None
    assert "- scheduler parameters: none (defaults, or set by hand)" in (bench / "report.md").read_text()
    record = {"source": "auto", "tuned_at": "2026-12-03T00:00:00Z", "images": 400, "probes": 200, "probe_kind": "text",
              "seed": 0, "k": 10, "tolerance": 0.005, "params": {"candidate_k": 16}, "recall": 0.765,
              "dot_products": 3606.0, "before": {"recall": 0.765, "dot_products": 3826.0},
              "himir_full": {"recall": 0.78, "dot_products": 16800.0}}
    text = render_markdown({**report, "autoconfig": record})
    line = next(row for row in text.splitlines() if row.startswith("- scheduler parameters: "))
    assert "auto-tuned" in line and '{"candidate_k": 16}' in line and "3606 dot products" in line
    assert "before: 0.765 at 3826" in line and "scheduler parameters" not in render_markdown(
        {k: v for k, v in report.items() if k != "autoconfig"})  # reports of older versions: no line


def test_oracle_grounding_covers_every_named_object(tiny_report):
    _, report = tiny_report
    grounding = report["grounding"]
    assert grounding["n_subqueries"] == 10  # 5 queries x 2 exact object names
    assert set(grounding["hit_rate"]) == {"global", "region", "segment", "mvr", "himir-full", "himir-full region"}
    assert all(0.0 <= v <= 1.0 for v in grounding["hit_rate"].values())
    rows = report["grounding_rows"]
    assert {r["object"] for r in rows} <= {f"a {c} square" for c in _SQUARE_COLOURS}
    # the global view's IoU with an object is the object's area fraction
    assert all(r["iou"]["global"] == pytest.approx(r["area_frac"]) for r in rows)
    # a stored region's IoU is bounded by the best any stored region reaches; the modes' reported
    # focus boxes are not stored regions (they may overlap the object better than any of them)
    regions = ("global", "region", "segment", "himir-full region")
    assert all(r["iou_ceiling"][n] >= r["iou"][n] for r in rows for n in regions)
    assert all(grounding["reachable_rate"][n] >= grounding["hit_rate"][n] for n in regions)


def test_rerun_reuses_saved_index(tiny_bench):
    _quick_run(tiny_bench)
    version = (tiny_bench / "index" / "CURRENT").read_text()
    encoder = ColorEncoder()
    second = _quick_run(tiny_bench, encoder=encoder, decomposer="rule")
    assert (tiny_bench / "index" / "CURRENT").read_text() == version
    assert encoder.image_calls == 0
    assert second["indexing"]["reused"] and second["indexing"]["images"] == 10
    assert list(second["modes"]) == ["mvr"]


def test_layout_change_rebuilds_index(tiny_bench):
    _quick_run(tiny_bench)
    report = _quick_run(tiny_bench, layout="1+4+4")
    assert not report["indexing"]["reused"] and report["config"]["layout"] == "1+4+4"
    assert report["index"]["segment"] == 10 * 4


def test_unavailable_mode_is_skipped_not_faked(tiny_bench, monkeypatch, caplog):
    import himir_rag.scheduler

    def missing(*args, **kwargs):  # the pass mode himir runs, as a core without it answers
        raise NotImplementedError("scheduled_pass is not available")

    monkeypatch.setattr(himir_rag.scheduler, "scheduled_pass", missing)
    report = _quick_run(tiny_bench, modes="mvr,himir", decomposer="oracle")
    assert list(report["modes"]) == ["mvr"] and "himir" in report["skipped_modes"]
    assert "not available" in caplog.text
    assert "Skipped modes" in (tiny_bench / "report.md").read_text()
    assert [t["met"] for t in report["targets"] if "himir " in t["target"] or "mvr/himir" in t["target"]] == [None] * 3


def test_index_dir_without_the_scenes_is_rejected(tiny_bench, tmp_path, scene_dir, color_encoder):
    from himir_rag.index import HiMIRIndex

    other = HiMIRIndex.build(scene_dir, encoder=color_encoder, progress=False)
    other.save(tmp_path / "other")
    with pytest.raises(ConfigError, match="lacks 5 source scenes"):
        _quick_run(tiny_bench, encoder=color_encoder, index_dir=tmp_path / "other")


def test_region_encodings_side_by_side_one_index_each(tiny_bench):
    encoder = RegionColorEncoder()
    report = _quick_run(tiny_bench, encoder=encoder, modes="mvr,himir-full", region_encodings="crops,roi",
                        decomposer="oracle", throughput_images=2)
    assert encoder.region_calls > 0
    side = report["region_encodings"]
    assert list(side) == ["crops", "roi"]
    assert side["roi"]["index_dir"] == str(tiny_bench / "index-roi") and side["crops"]["index_dir"] == str(
        tiny_bench / "index")
    for run in side.values():
        assert run["indexing"]["measured"] and run["indexing"]["images_per_s"] > 0
        assert set(run["modes"]) == {"mvr", "himir-full"} and 0 <= run["modes"]["mvr"]["recall@10"] <= 1
        assert run["grounding"]["n_subqueries"] == 10
    # this encoder's regions are crops either way: both columns agree
    assert side["roi"]["modes"] == side["crops"]["modes"]
    assert report["config"]["region_encoding"] == "crops" and report["encoder_throughput"]["crops"] == 2 * 21
    assert (tiny_bench / "index_build-index-roi.json").is_file() and (tiny_bench / "index_build.json").is_file()
    text = (tiny_bench / "report.md").read_text()
    assert "Region encodings side by side" in text and "| roi |" in text and "| crops |" in text
    again = _quick_run(tiny_bench, encoder=encoder, region_encodings="roi", throughput_images=2)
    assert again["indexing"]["reused"] and again["region_encodings"]["roi"]["indexing"]["images_per_s"] > 0
    assert again["encoder_throughput"]["region_encoding"] == "roi"


def test_the_image_decomposer_of_a_new_index_is_chosen_and_checked_on_reuse(tiny_bench, tmp_path):
    target = tmp_path / "objects-index"
    built = _quick_run(tiny_bench, index_dir=target, image_decomposer="objects")
    assert built["config"]["image_decomposer"] == "objects"
    assert HiMIRIndex.read_manifest(target)["config"]["decomposer"] == "objects"
    with pytest.raises(ConfigError, match="built with image decomposer 'objects', asked for 'grid'"):
        _quick_run(tiny_bench, index_dir=target, image_decomposer="grid")
    assert _quick_run(tiny_bench, index_dir=target)["config"]["image_decomposer"] == "objects"  # the default
    assert built["config"]["segment_work_size"] == 128
    with pytest.raises(ConfigError, match="segments photos at 128 pixels, asked for 64"):
        _quick_run(tiny_bench, index_dir=target, image_decomposer="objects", segment_work_size=64)
    finer = _quick_run(tiny_bench, index_dir=tmp_path / "objects-64", image_decomposer="objects", segment_work_size=64)
    assert finer["config"]["segment_work_size"] == 64


def test_index_dir_per_encoding_is_built_when_absent_and_checked_when_present(tiny_bench, tmp_path):
    encoder = RegionColorEncoder()
    target = tmp_path / "roi-index"
    built = _quick_run(tiny_bench, encoder=encoder, region_encodings="roi", index_dir=target)
    assert built["indexing"]["measured"] and not built["indexing"]["reused"] and (target / "CURRENT").is_file()
    reused = _quick_run(tiny_bench, encoder=encoder, region_encodings="roi", index_dir=target)
    assert reused["indexing"]["reused"] and reused["indexing"]["images_per_s"] == built["indexing"]["images_per_s"]
    with pytest.raises(ConfigError, match="built with region encoding 'roi', asked for 'crops'"):
        _quick_run(tiny_bench, encoder=encoder, region_encodings="crops", index_dir=target)
    with pytest.raises(ConfigError, match="1 --index-dir for 2 region encodings"):
        _quick_run(tiny_bench, encoder=encoder, region_encodings="crops,roi", index_dir=target)
    with pytest.raises(ConfigError, match="distinct crops / roi"):
        _quick_run(tiny_bench, encoder=encoder, region_encodings="roi,roi")
    with pytest.raises(ConfigError, match="use --region-encoding crops"):
        _quick_run(tiny_bench, region_encodings="roi", index_dir=tmp_path / "plain")


def test_missing_benchmark_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="himir bench build"):
        run_benchmark(tmp_path, encoder=ColorEncoder(), progress=False)


def test_limit_queries(tiny_bench):
    report = _quick_run(tiny_bench, modes="single", limit_queries=2)
    assert report["modes"]["single"]["n_queries"] == 2


def test_stage_table_switches_each_stage_and_restores_the_settings(tiny_bench):
    report = _quick_run(tiny_bench, modes="himir-full,himir", decomposer="oracle", stages=True)
    rows = {row["stage"]: row for row in report["stages"]}
    from himir_rag.bench.stages import STAGES

    assert list(rows) == list(STAGES)
    base, exhaustive = rows["index settings"], rows["no candidate generation (every image scored)"]
    assert "dots_saved" not in base and base["agreement"] is not None
    # scoring every image costs at least as much as the pass, and the differences are from the stage's side
    assert exhaustive["dot_products"] >= base["dot_products"]
    assert exhaustive["dots_saved"] == exhaustive["dot_products"] - base["dot_products"]
    on = rows["hierarchy sparsity on (margin 0.1)"]
    assert on["dots_saved"] == base["dot_products"] - on["dot_products"]
    assert rows["consistency depth skipping on (overlap 0.8)"]["fired_by"] == "levels_skipped"
    for row in rows.values():
        assert 0.0 <= row["recall@k"] <= 1.0 and row["dot_products"] > 0
    markdown = (tiny_bench / "report.md").read_text()
    assert "## Pruning stages of himir" in markdown and "ANN caps of segment bounds on" in markdown
    # the saved index keeps its own settings
    from himir_rag import HiMIRIndex

    assert HiMIRIndex.load(tiny_bench / "index").config.scheduler.overrides() == {}


# -- pieces ------------------------------------------------------------------------------------
def test_parse_modes():
    assert parse_modes("single, mvr,mvr,himir") == [RetrievalMode.SINGLE, RetrievalMode.MVR, RetrievalMode.HIMIR]
    with pytest.raises(ConfigError, match="unknown"):
        parse_modes("single,colbert")
    with pytest.raises(ConfigError, match="no mode"):
        parse_modes(" , ")


def test_oracle_decomposer():
    oracle = OracleDecomposer({"a cat and a dog": ["a cat", "a dog"]})
    assert oracle.decompose("a cat and a dog") == ["a cat", "a dog"]
    with pytest.raises(KeyError, match="not in the benchmark"):
        oracle.decompose("a bird")


def test_match_objects_by_containment():
    objects = ["a spiny lobster", "a red apple", "an apple pie"]
    assert match_objects(["spiny lobster", "a red apple", "a cat"], objects) == [
        ("spiny lobster", "a spiny lobster"), ("a red apple", "a red apple")]
    # the longest contained name wins, each object is used once
    assert match_objects(["an apple pie with a red apple"], objects) == [("an apple pie with a red apple", "an apple pie")]


def test_ranking_metrics():
    row = ranking_metrics(["x", "a", "y", "b"], {"a", "b"})
    assert row["recall@1"] == 0.0 and row["recall@5"] == 1.0 and row["mrr"] == 0.5
    assert row["ndcg@10"] == pytest.approx((1 / np.log2(3) + 1 / np.log2(5)) / (1 + 1 / np.log2(3)))


def _row(query_id, mode, recall, dots, search_ms):
    return {"query_id": query_id, "mode": mode, "recall@1": recall, "recall@5": recall, "recall@10": recall,
            "ndcg@10": recall, "mrr": recall, "dot_products": dots, "images_scored": 3,
            "latency_ms": {"encode": 1.0, "search": search_ms, "total": 1.0 + search_ms}}


def test_aggregate_and_compare_modes():
    rows = [_row("q1", "mvr", 0.5, 400, 2.0), _row("q2", "mvr", 1.0, 600, 4.0),
            _row("q1", "himir", 1.0, 100, 1.0), _row("q2", "himir", 1.0, 100, 3.0),
            _row("q1", "single", 0.0, 10, 0.5), _row("q2", "single", 0.5, 10, 0.5)]
    modes = {m: aggregate_mode([r for r in rows if r["mode"] == m]) for m in ("single", "mvr", "himir")}
    assert modes["mvr"]["recall@10"] == 0.75
    assert modes["mvr"]["dot_products"] == {"median": 500.0, "mean": 500.0, "min": 400.0, "max": 600.0}
    assert modes["mvr"]["latency_ms"]["search"]["p50"] == 3.0
    assert modes["mvr"]["latency_ms"]["search"]["p95"] == pytest.approx(3.9)
    comparison = compare_modes(modes, rows)
    assert comparison["dot_products_ratio"]["mvr/himir"] == {"mean": 5.0, "median": 5.0, "per_query_median": 5.0}
    assert comparison["recall@10_points"]["himir - mvr"] == pytest.approx(25.0)
    assert comparison["recall@10_points"]["himir - single"] == pytest.approx(75.0)
    met = {t["target"]: t["met"] for t in target_checks(comparison, modes)}
    assert met["Recall@10 himir >= mvr + 5 points"] and met["dot products mvr/himir >= 3.5"]
    assert met["Recall@10 himir-full >= mvr + 5 points"] is None
    with pytest.raises(ValueError, match="no per-query rows"):
        aggregate_mode([])


def test_summarize_grounding():
    rows = [{"iou": {"global": 0.1, "segment": 0.5}, "iou_ceiling": {"global": 0.1, "segment": 0.6},
             "area_frac": 0.03, "himir_full_level": "segment"},
            {"iou": {"global": 0.4, "segment": 0.2}, "iou_ceiling": {"global": 0.4, "segment": 0.35},
             "area_frac": 0.4, "himir_full_level": "global"}]
    summary = summarize_grounding(rows, threshold=0.3)
    assert summary["hit_rate"] == {"global": 0.5, "segment": 0.5}
    assert summary["reachable_rate"] == {"global": 0.5, "segment": 1.0}
    assert summary["by_size"]["small (<5%)"] == {"n": 1, "global": 0.0, "segment": 1.0}
    assert summary["himir_full_level_share"]["segment"] == 0.5
    assert summarize_grounding([])["n_subqueries"] == 0


# -- scale -------------------------------------------------------------------------------------
def test_run_modes_orders_by_query_or_by_mode_with_the_same_rows():
    from types import SimpleNamespace

    from himir_rag.index import SearchResult
    from himir_rag.scheduler import SearchStats

    queries = [SimpleNamespace(query_id=f"q{i}", relevant=frozenset({i})) for i in range(3)]
    modes = [RetrievalMode.MVR, RetrievalMode.HIMIR]
    calls, decomposed = [], []

    def search(mode, query, subs):
        calls.append((mode.value, query.query_id))
        stats = SearchStats(mode.value, dot_products=len(subs), latency_ms={"search": 1.0})
        return SearchResult(query.query_id, tuple(subs), (), stats)

    def decompose(query):
        decomposed.append(query.query_id)
        return [query.query_id, "b"]

    runs = {}
    for mode_major in (False, True):
        calls.clear()
        runs[mode_major] = run_modes(queries, modes, search, decompose=decompose, rank_ids=lambda r: [], time_decompose=False,
                                     mode_major=mode_major)
        timed = calls[len(modes):]  # after one warm-up search a mode
        expected = [(m.value, q.query_id) for m in modes for q in queries] if mode_major else \
            [(m.value, q.query_id) for q in queries for m in modes]
        assert timed == expected
    key = lambda row: (row["mode"], row["query_id"])  # noqa: E731
    assert sorted(runs[True].per_query, key=key) == sorted(runs[False].per_query, key=key)
    assert decomposed.count("q1") == 2  # once per run: every mode gets the same sub-queries


def test_synthetic_collection_plants_targets():
    # signal/distractors of the planted model set explicitly: the defaults are sized for dim 384
    collection = build_synthetic_collection(images=500, dim=32, queries=10, seed=1, signal=3.0, distractors=10,
                                            progress=False)
    snapshot = collection.index.snapshot
    assert len(snapshot) == 500 and snapshot.vectors.shape == (500 * 21, 32)
    assert np.allclose(np.linalg.norm(snapshot.vectors, axis=1), 1.0, atol=1e-5)
    for query in collection.queries:
        assert 2 <= len(query.subquery_vectors) <= 3 and 1 <= len(query.relevant) <= 3
        assert not set(query.relevant) & set(query.distractors)
        for image_id in query.relevant:  # every sub-query is planted somewhere in each target
            rows = snapshot.image_rows(image_id)
            assert (query.subquery_vectors @ snapshot.vectors[rows].T).max(axis=1).min() > 0.4


def test_scale_benchmark_finds_planted_targets(tmp_path):
    report = run_scale_benchmark(tmp_path / "scale", images=500, dim=32, queries=10, seed=0, signal=3.0,
                                 distractors=10, modes="single,mvr,himir-full,himir", plots=False, progress=False)
    assert report["kind"] == "scale"
    assert report["modes"]["himir-full"]["recall@10"] >= 0.9
    per_query = {}
    for row in report["per_query"]:
        per_query.setdefault(row["query_id"], {})[row["mode"]] = row["dot_products"]
    for dots in per_query.values():
        assert dots["single"] == 500
        n_subs = dots["mvr"] // (500 * 17)
        assert dots["mvr"] == n_subs * 500 * 17 and dots["himir-full"] == n_subs * 500 * 21
        assert dots["single"] < dots["mvr"] < dots["himir-full"]
    for name in ("report.json", "report.md"):
        assert (tmp_path / "scale" / name).is_file()
    assert "encode" not in report["modes"]["mvr"]["latency_ms"]


def test_scale_warm_pass_runs_every_query_once_more_untimed(tmp_path, monkeypatch):
    import himir_rag.bench.scale as scale

    calls = []
    search = scale._search
    monkeypatch.setattr(scale, "_search", lambda index, mode, query, k: calls.append(mode) or search(index, mode,
                                                                                                     query, k))
    options = {"images": 400, "dim": 16, "queries": 6, "modes": "mvr,himir", "plots": False, "progress": False}
    cold = run_scale_benchmark(tmp_path / "scale", **options)
    cold_calls, calls[:] = len(calls), []
    warm = run_scale_benchmark(tmp_path / "scale", reuse=True, warm_pass=True, **options)
    assert len(calls) - cold_calls == 2 * 6  # two modes x six queries, before the timed pass
    assert (cold["config"]["warm_pass"], warm["config"]["warm_pass"]) == (False, True)
    # the timed pass is the same work: the same rankings and dot products
    assert [r["dot_products"] for r in warm["per_query"]] == [r["dot_products"] for r in cold["per_query"]]
    assert "after an untimed warm pass" in (tmp_path / "scale" / "report.md").read_text()


def test_scale_auto_tune_tunes_the_loaded_collection_before_the_timed_pass(tmp_path, monkeypatch):
    import himir_rag.autoconfig as autoconfig

    options = {"images": 400, "dim": 16, "queries": 6, "modes": "himir", "plots": False, "progress": False}
    plain = run_scale_benchmark(tmp_path / "scale", **options)
    assert plain["autoconfig"] is None and plain["config"]["auto_tune"] is False
    chosen = {"candidate_k": 12}  # the record auto_tune returns, whatever the probes would pick
    monkeypatch.setattr(autoconfig, "auto_tune", lambda index, probes: {"source": "auto", "params": chosen,
                                                                         "probes": probes, "images": len(index)})
    tuned = run_scale_benchmark(tmp_path / "scale", reuse=True, auto_tune=True, **options)
    assert tuned["autoconfig"] == {"source": "auto", "params": chosen, "probes": 200, "images": 400}
    assert tuned["config"]["scheduler"] == chosen and tuned["config"]["scheduler_params"]["candidate_k"] == 12
    assert "- scheduler parameters: auto-tuned" in (tmp_path / "scale" / "report.md").read_text()
    saved = HiMIRIndex.load(tmp_path / "scale" / "index")  # the saved index keeps its own parameters
    assert saved.autoconfig is None and saved.config.scheduler.overrides() == {}
    with pytest.raises(ConfigError, match="not both"):
        run_scale_benchmark(tmp_path / "scale", reuse=True, auto_tune=True, scheduler={"candidate_k": 8}, **options)


def test_scale_benchmark_stage_table(tmp_path):
    report = run_scale_benchmark(tmp_path / "scale", images=400, dim=32, queries=6, seed=1, signal=3.0,
                                 distractors=5, modes="himir-full,himir", plots=False, progress=False, stages=True)
    rows = {row["stage"]: row for row in report["stages"]}
    assert "no candidate generation (every image scored)" in rows  # small: the exhaustive row is kept
    assert rows["index settings"]["agreement"] is not None
    assert rows["index settings"]["recall@k"] == report["modes"]["himir"]["recall@10"]
    assert "## Pruning stages of himir" in (tmp_path / "scale" / "report.md").read_text()


def test_focus_settings_apply_to_this_run_only(tiny_bench):
    from himir_rag.index import HiMIRIndex

    modes = "mvr,himir-full"
    region = _quick_run(tiny_bench, modes=modes, decomposer="oracle", focus={"focus_temperature": 0})
    focus = _quick_run(tiny_bench, modes=modes, decomposer="oracle", focus={"focus_temperature": 0.3,
                                                                            "focus_spread": 3.0})
    mean_box = _quick_run(tiny_bench, modes=modes, decomposer="oracle", focus={"focus_temperature": 0.3,
                                                                               "focus_spread": 0})
    assert (region["config"]["focus_temperature"], focus["config"]["focus_spread"]) == (0, 3.0)
    # at temperature 0 a mode reports its best region's box: himir-full's grounding is its region column's
    assert region["grounding"]["hit_rate"]["himir-full"] == region["grounding"]["hit_rate"]["himir-full region"]
    assert focus["grounding"]["hit_rate"]["himir-full region"] == region["grounding"]["hit_rate"]["himir-full region"]
    ious = [[r["iou"]["himir-full"] for r in run["grounding_rows"]] for run in (region, focus, mean_box)]
    assert ious[0] != ious[1] != ious[2]  # the temperature and the spread both move the scored boxes
    saved = HiMIRIndex.read_manifest(tiny_bench / "index")["config"]
    assert (saved["focus_temperature"], saved["focus_spread"]) == (0.3, 0.5)  # the saved index keeps its own
    with pytest.raises(ConfigError, match="focus takes focus_temperature and focus_spread"):
        _quick_run(tiny_bench, focus={"temperature": 0.3})
    with pytest.raises(ConfigError, match="focus_spread must be a finite number"):
        _quick_run(tiny_bench, focus={"focus_spread": -1})


def test_scale_rejects_too_small_collection():
    with pytest.raises(ConfigError, match="too small"):
        build_synthetic_collection(images=50, dim=16, queries=10, progress=False)


def test_scheduler_parameters_apply_to_this_run_only(tiny_bench):
    report = _quick_run(tiny_bench, modes="himir", scheduler={"candidate_k": -1})
    assert report["config"]["scheduler"] == {"candidate_k": -1}
    assert report["modes"]["himir"]["images_scored"] == 10  # no candidate generation: every image scored
    from himir_rag.index import HiMIRIndex

    assert HiMIRIndex.read_manifest(tiny_bench / "index")["config"]["scheduler"] == {}

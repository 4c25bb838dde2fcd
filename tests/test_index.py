from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from himir_rag.config import HiMIRConfig
from himir_rag.errors import EmptyIndexError, IncompatibleIndexError, IndexFormatError
from himir_rag.index import FORMAT_VERSION, HiMIRIndex
from himir_rag.scheduler import maxsim, score_exhaustive
from himir_rag.hierarchy import Level
from tests.conftest import ColorEncoder, make_scene


def names(result):
    return [Path(h.path).name for h in result.hits]


@pytest.fixture
def index(scene_dir, color_encoder):
    return HiMIRIndex.build(scene_dir, encoder=color_encoder, progress=False)


def test_build_recursive_and_search_ranks_two_object_scene_first(index):
    assert len(index) == 6
    result = index.search("a red square and a blue square", k=3)
    assert result.subqueries == ("a red square", "a blue square")
    assert names(result)[0] == "red_blue.png"
    hit = result.hits[0]
    assert hit.score == pytest.approx(np.mean([m.score for m in hit.regions]))
    by_sub = {m.subquery: m for m in hit.regions}
    # the best region for "red" lies in the top-left, for "blue" in the bottom-right
    assert by_sub["a red square"].bbox[0] < 80 and by_sub["a blue square"].bbox[2] > 80
    assert all(m.level in ("global", "region", "segment") for m in hit.regions)


def test_modes_differ_in_levels_and_cost(index):
    full = index.search("a red square and a blue square", k=6, mode="himir-full")
    mvr = index.search("a red square and a blue square", k=6, mode="mvr")
    single = index.search("a red square and a blue square", k=6, mode="single")
    assert full.stats.dot_products == 2 * 6 * 21
    assert mvr.stats.dot_products == 2 * 6 * 17
    assert single.stats.dot_products == 1 * 6
    assert all(m.level != "region" for h in mvr.hits for m in h.regions)
    assert all(m.level == "global" for h in single.hits for m in h.regions)
    assert len(single.hits[0].regions) == 1


def test_himir_full_beats_single_on_two_object_scenes(index):
    full = index.search("a red square and a blue square", k=6, mode="himir-full")
    single = index.search("a red square and a blue square", k=6, mode="single")
    assert names(full)[0] == "red_blue.png"
    assert names(single)[0] != "red_blue.png"  # the whole-photo view is diluted by the white background


def test_explicit_subqueries(index):
    result = index.search("anything", subqueries=["green", "red"], k=1)
    assert result.subqueries == ("green", "red") and names(result) == ["red_green.png"]


def test_metadata_and_filters(scene_dir, color_encoder):
    meta = {"red_blue.png": {"album": "a", "year": 2020}, "red_green.png": {"album": "b", "year": 2021}}
    index = HiMIRIndex.build(scene_dir, encoder=color_encoder, metadata=meta, progress=False)
    assert names(index.search("red", k=6, filters={"album": "b"})) == ["red_green.png"]
    assert set(names(index.search("red", k=6, filters={"year": [2020, 2021]}))) == {"red_blue.png", "red_green.png"}
    assert names(index.search("red", k=6, filters=lambda m: m.get("year", 0) > 2020)) == ["red_green.png"]
    assert index.search("red", k=6, filters={"no_such_key": 1}).hits == ()
    hit = index.search("red", k=1, filters={"album": "a"}).hits[0]
    assert hit.metadata == {"album": "a", "year": 2020}


def test_filter_reduces_work(index):
    assert index.search("red", k=1, filters={"x": 1}).stats.dot_products == 0


def test_save_load_roundtrip_identical(index, tmp_path, color_encoder):
    queries = ["a red square and a blue square", "green", "yellow next to purple", "orange"]
    before = {(q, m): index.search(q, k=6, mode=m) for q in queries for m in ("himir-full", "mvr", "single")}
    index.save(tmp_path / "idx")
    loaded = HiMIRIndex.load(tmp_path / "idx", encoder=color_encoder)
    assert len(loaded) == len(index)
    for (q, m), result in before.items():
        again = loaded.search(q, k=6, mode=m)
        assert [h.path for h in again.hits] == [h.path for h in result.hits]
        np.testing.assert_allclose([h.score for h in again.hits], [h.score for h in result.hits], rtol=1e-6)
        assert [h.regions for h in again.hits] == [h.regions for h in result.hits]


def test_add_and_delete(index, tmp_path, color_encoder):
    extra = make_scene(tmp_path / "more" / "green_blue.png", [("green", (0, 0, 60, 60)), ("blue", (90, 60, 160, 120))])
    report = index.add([extra], progress=False)
    assert report.added == 1 and len(index) == 7
    assert names(index.search("a green square and a blue square", k=1)) == ["green_blue.png"]
    assert index.delete(extra) == 1
    assert "green_blue.png" not in names(index.search("a green square and a blue square", k=6))
    first = index.images[0]
    assert index.delete(first.image_id) == 1 and index.delete(first.image_id) == 0
    assert len(index) == 5
    # the tree of the remaining images is intact (parents point inside the same image)
    snap = index.snapshot
    has_parent = snap.parents >= 0
    assert (snap.region_image[snap.parents[has_parent]] == snap.region_image[has_parent]).all()
    index.save(tmp_path / "idx")
    assert len(HiMIRIndex.load(tmp_path / "idx", encoder=color_encoder)) == 5


def test_reindex_only_new_or_changed(scene_dir, color_encoder):
    index = HiMIRIndex.build(scene_dir, encoder=color_encoder, progress=False)
    calls = color_encoder.image_calls
    report = index.add(scene_dir, progress=False)
    assert (report.added, report.updated, report.unchanged) == (0, 0, 6)
    assert color_encoder.image_calls == calls
    target = scene_dir / "all_red.png"
    make_scene(target, [("green", (0, 0, 160, 120))])
    os.utime(target, ns=(1, 1))  # a different mtime for sure
    report = index.add(scene_dir, progress=False)
    assert (report.added, report.updated, report.unchanged) == (0, 1, 5)
    assert len(index) == 6
    # its whole-photo view is green now (a region of red_green.png is as green: objects bound the square)
    assert names(index.search("green", k=1, mode="single")) == ["all_red.png"]


def test_bad_files_skipped_rest_indexed(scene_dir, color_encoder):
    (scene_dir / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (scene_dir / "empty.png").write_bytes(b"")
    (scene_dir / "notes.png").write_text("hello")
    (scene_dir / "readme.txt").write_text("ignored: not an image extension")
    index = HiMIRIndex.build(scene_dir, encoder=color_encoder, progress=False)
    assert len(index) == 6
    skipped = dict(index.skipped)
    assert {Path(p).name for p in skipped} == {"broken.jpg", "empty.png", "notes.png"}
    assert all(reason for reason in skipped.values())


def test_empty_index_and_bad_queries(color_encoder, index):
    with pytest.raises(EmptyIndexError, match="no image"):
        HiMIRIndex(color_encoder).search("red")
    with pytest.raises(ValueError, match="query is empty"):
        index.search("   ")
    with pytest.raises(ValueError, match="k must be a positive integer"):
        index.search("red", k=0)
    with pytest.raises(ValueError, match="mode 'dense' is unknown; valid modes: single, mvr, himir-full"):
        index.search("red", mode="dense")
    assert len(index.search("red", k=1000).hits) == 6


def test_load_errors(index, tmp_path, color_encoder):
    with pytest.raises(IndexFormatError, match="no such index directory"):
        HiMIRIndex.load(tmp_path / "missing", encoder=color_encoder)
    version = index.save(tmp_path / "idx")
    manifest = json.loads((version / "manifest.json").read_text())

    class OtherEncoder(ColorEncoder):
        name = "test:other"

    with pytest.raises(IncompatibleIndexError, match="built with encoder 'test:color'"):
        HiMIRIndex.load(tmp_path / "idx", encoder=OtherEncoder())

    class WiderEncoder(ColorEncoder):
        dim = 12

    with pytest.raises(IncompatibleIndexError, match="dim=9"):
        HiMIRIndex.load(tmp_path / "idx", encoder=WiderEncoder())
    (version / "manifest.json").write_text(json.dumps({**manifest, "format_version": FORMAT_VERSION + 1}))
    with pytest.raises(IncompatibleIndexError, match=f"format version {FORMAT_VERSION + 1}, this himir-rag reads"):
        HiMIRIndex.load(tmp_path / "idx", encoder=color_encoder)
    (version / "manifest.json").write_text(json.dumps(manifest))
    vectors = version / "vectors.bin"
    vectors.write_bytes(vectors.read_bytes()[:-40])
    with pytest.raises(IndexFormatError, match="truncated"):
        HiMIRIndex.load(tmp_path / "idx", encoder=color_encoder)


def test_save_is_atomic_and_replaces_old_version(index, tmp_path, color_encoder):
    first = index.save(tmp_path / "idx")
    second = index.save(tmp_path / "idx")
    assert first != second and not first.exists() and second.exists()
    assert (tmp_path / "idx" / "CURRENT").read_text().strip() == second.name
    # a crashed save leaves a staging directory behind: the live version is unaffected
    (tmp_path / "idx" / ".v999.tmp").mkdir()
    assert len(HiMIRIndex.load(tmp_path / "idx", encoder=color_encoder)) == 6


def test_nothing_pickled_on_disk(index, tmp_path):
    version = index.save(tmp_path / "idx")
    # records and the skipped report are JSON, vectors and regions raw arrays, candidate stores FAISS's own format
    assert sorted(p.name for p in version.iterdir()) == [
        "candidates-v2.level1.flat.faiss", "candidates-v2.level2.flat.faiss", "images.jsonl", "manifest.json",
        "region_image.i64", "regions.i32", "skipped.json", "vectors.bin"]
    for line in (version / "images.jsonl").read_text().splitlines():
        assert isinstance(json.loads(line), list)
    assert json.loads((version / "skipped.json").read_text()) == []
    assert (version / "vectors.bin").stat().st_size == index.snapshot.vectors.nbytes


def test_granularity_pruning_drops_redundant_segments(scene_dir, color_encoder):
    plain = HiMIRIndex.build(scene_dir, encoder=color_encoder, progress=False)
    pruned_index = HiMIRIndex(color_encoder, HiMIRConfig(prune_cosine=0.98))
    report = pruned_index.add(scene_dir, progress=False)
    assert report.regions_pruned > 0
    assert report.regions_stored + report.regions_pruned == len(plain.snapshot.levels)
    assert (pruned_index.snapshot.levels == Level.GLOBAL).sum() == 6
    assert names(pruned_index.search("a red square and a blue square", k=1)) == ["red_blue.png"]


def test_maxsim_matches_brute_force():
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(50, 8)).astype(np.float32)
    groups = np.sort(rng.integers(0, 7, size=50))
    queries = rng.normal(size=(3, 8)).astype(np.float32)
    best, arg = maxsim(queries, vectors, groups)
    for g_pos, g in enumerate(np.unique(groups)):
        rows = np.flatnonzero(groups == g)
        sims = queries @ vectors[rows].T
        np.testing.assert_allclose(best[:, g_pos], sims.max(axis=1), rtol=1e-5)
        assert (arg[:, g_pos] == rows[sims.argmax(axis=1)]).all()


def test_score_exhaustive_level_mask(index):
    snap = index.snapshot
    q = index.encoder.embed_texts(["red"])
    scored = score_exhaustive(snap, q, levels=(Level.GLOBAL,))
    assert scored.dot_products == len(snap)
    assert (snap.levels[scored.best_rows] == Level.GLOBAL).all()


def test_progress_bar_moves_photo_by_photo(scene_dir, color_encoder, monkeypatch):
    """The bar advances as each photo is encoded, not once per chunk of ``chunk_images``."""
    import himir_rag.index as index_module

    updates: list[int] = []
    real_tqdm = index_module.tqdm

    def recording_tqdm(*args, **kwargs):
        bar = real_tqdm(*args, **{**kwargs, "disable": True})
        bar.update = lambda n=1: updates.append(n)
        return bar

    monkeypatch.setattr(index_module, "tqdm", recording_tqdm)
    index = HiMIRIndex(color_encoder, HiMIRConfig(layout="1+4+16", batch_size=4))
    report = index.add(scene_dir, chunk_images=16)
    assert report.added == 6
    # 6 photos x 21 crops in batches of 4: the bar moves as each photo's last crop is encoded
    assert sum(updates) == 6 and max(updates) <= 2 and len(updates) >= 5
    make_scene(scene_dir / "new.png", [("red", (0, 0, 80, 60))])
    (scene_dir / "broken.png").write_bytes(b"not a png")
    updates.clear()
    report = index.add(scene_dir, chunk_images=16)  # one new photo, one the decoder skips
    assert report.added == 1 and len(report.skipped) == 1
    assert sum(updates) == 2  # the skipped file moves the bar at commit


# -- focus boxes: where a match is reported ------------------------------------------------------
def test_focus_boxes_weigh_region_boxes_by_their_similarity():
    from himir_rag.hierarchy import focus_boxes

    boxes = np.array([[0, 0, 100, 100], [0, 0, 50, 50], [50, 0, 100, 50], [0, 50, 50, 100]])
    sims = np.array([[0.2, 0.5], [0.9, 0.1], [0.9, 0.1], [0.1, 0.95]])
    # temperature 0: the best region's own box, per query column
    assert focus_boxes(sims, boxes, 0).tolist() == [[0, 0, 50, 50], [0, 50, 50, 100]]
    sharp, wide = focus_boxes(sims, boxes, 0.2), focus_boxes(sims, boxes, 1e6)
    # two cells that score alike (an object across both): the box lies across both, at their mean size
    assert sharp[0].tolist() == [25, 0, 75, 50]
    # one cell far above the rest: its own box
    assert focus_boxes(np.array([[0.0], [0.0], [0.0], [1.0]]), boxes, 0.2).tolist() == [[0, 50, 50, 100]]
    # a very high temperature: centred on the boxes' mean centre, half-widths their root mean square
    centres, halves = (boxes[:, :2] + boxes[:, 2:]) / 2, (boxes[:, 2:] - boxes[:, :2]) / 2
    rms = np.sqrt((halves ** 2).mean(axis=0))
    expected = np.r_[centres.mean(axis=0) - rms, centres.mean(axis=0) + rms]
    assert np.abs(wide[0] - expected).max() <= 0.5 + 1e-9
    assert ((wide >= 0) & (wide <= 100)).all() and (wide[:, :2] < wide[:, 2:]).all()
    # the temperature is in units of the similarities' spread: any positive affine map of them keeps the box
    assert (focus_boxes(3 * sims + 7, boxes, 0.2) == sharp).all()
    assert focus_boxes(sims[:1], boxes[:1], 0.4).tolist() == [[0, 0, 100, 100], [0, 0, 100, 100]]


def test_focus_spread_grows_the_box_over_regions_apart_and_keeps_it_in_the_photo():
    from himir_rag.hierarchy import focus_boxes

    boxes = np.array([[0, 0, 100, 100], [0, 0, 50, 50], [50, 0, 100, 50], [0, 50, 50, 100]])
    pair = np.array([[0.2], [0.9], [0.9], [0.1]])  # an object across the two top cells
    # spread 3 matches the mixture's second moment: two equal adjacent cells give exactly their union
    assert focus_boxes(pair, boxes, 0.2, 3).tolist() == [[0, 0, 100, 50]]
    widths = [np.diff(focus_boxes(pair, boxes, 0.2, k)[0, [0, 2]])[0] for k in (0, 0.5, 1, 3)]
    assert widths == sorted(widths) and widths[0] == 50 and widths[-1] == 100
    # nested boxes with one clear best: the spread moves nothing (its weight is almost all on one box)
    alone = np.array([[0.0], [0.0], [0.0], [1.0]])
    assert focus_boxes(alone, boxes, 0.2, 3).tolist() == [[0, 50, 50, 100]]
    # however wide, the box stays within the photo's regions
    wide = focus_boxes(np.ones((4, 1)), boxes, 0.3, 50)
    assert wide.tolist() == [[0, 0, 100, 100]]


@pytest.mark.parametrize("temperature, spread", [(0.0, 0.5), (0.4, 0.0), (0.3, 0.5), (2.0, 3.0)])
def test_grouped_focus_boxes_equal_the_formula_one_photo_at_a_time(temperature, spread):
    from himir_rag.hierarchy import grouped_focus_boxes

    def reference(sims, boxes):  # the docstring's formula, one photo, one query at a time
        out = []
        for s in sims.T:
            if temperature == 0:
                out.append(boxes[int(np.argmax(s))])
                continue
            w = np.exp((s - s.max()) / (temperature * max(s.std(), 1e-6)))
            w /= w.sum()
            centres, halves = (boxes[:, :2] + boxes[:, 2:]) / 2, (boxes[:, 2:] - boxes[:, :2]) / 2
            centre = w @ centres
            half = np.sqrt(w @ halves ** 2 + spread * (w @ (centres - centre) ** 2))
            low, high = boxes[:, :2].min(axis=0), boxes[:, 2:].max(axis=0)
            out.append(np.rint(np.r_[np.maximum(centre - half, low), np.minimum(centre + half, high)]))
        return np.array(out)

    rng = np.random.default_rng(3)
    counts = [21, 1, 5, 17]  # photos of unequal sizes (pruned segments), one of a single region
    starts = np.r_[0, np.cumsum(counts)[:-1]]
    sims = rng.normal(size=(sum(counts), 3))
    corner = rng.integers(0, 50, size=(sum(counts), 2))
    boxes = np.c_[corner, corner + rng.integers(1, 50, size=(sum(counts), 2))]
    together = grouped_focus_boxes(sims, boxes, starts, temperature, spread)
    for photo, (start, count) in enumerate(zip(starts, counts)):
        alone = reference(sims[start:start + count], boxes[start:start + count])
        assert (together[photo] == alone).all()
    assert (together[1] == boxes[starts[1]]).all()  # one region: its own box at any temperature


@pytest.mark.parametrize("mode", ["himir-full", "mvr", "himir", "single"])
def test_search_reports_focus_boxes_over_the_modes_levels(index, mode):
    from himir_rag.hierarchy import focus_boxes
    from himir_rag.modes import MODES

    query = "a red square and a blue square"
    result = index.search(query, k=3, mode=mode)
    snap, temperature, spread = index.snapshot, index.config.focus_temperature, index.config.focus_spread
    assert (temperature, spread) == (0.3, 0.5)
    labels = list(result.subqueries) if MODES[mode].subqueries else [query]
    vectors = index.encoder.embed_texts(labels)
    levels = [int(level) for level in MODES[mode].levels]
    for hit in result.hits:
        rows = snap.image_rows(hit.image_id)
        rows = rows[np.isin(snap.levels[rows], levels)]
        sims = snap.region_vectors(rows) @ vectors.T
        expected = focus_boxes(sims, snap.boxes[rows], temperature, spread)
        assert [list(m.bbox) for m in hit.regions] == expected.tolist()
        for col, match in enumerate(hit.regions):  # region_bbox: the stored best region the score came from
            best = rows[int(np.argmax(sims[:, col]))]
            assert list(match.region_bbox) == snap.boxes[best].tolist()
            assert match.score == pytest.approx(float(sims[:, col].max()), abs=1e-5) or mode == "himir"
    assert result.stats.extra["focus_dot_products"] == sum(
        len(labels) * int(np.isin(snap.levels[snap.image_rows(h.image_id)], levels).sum()) for h in result.hits)
    assert result.stats.dot_products > 0


def test_focus_temperature_zero_reports_the_best_regions_box(scene_dir, color_encoder):
    index = HiMIRIndex.build(scene_dir, encoder=color_encoder, config=HiMIRConfig(focus_temperature=0),
                             progress=False)
    result = index.search("a red square and a blue square", k=3)
    assert all(m.bbox == m.region_bbox for h in result.hits for m in h.regions)
    assert "focus_dot_products" not in result.stats.extra


@pytest.mark.parametrize("name", ["focus_temperature", "focus_spread"])
@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf"), True, "0.4"])
def test_focus_settings_are_validated(name, bad):
    from himir_rag.errors import ConfigError

    with pytest.raises(ConfigError, match=f"{name} must be a finite number >= 0"):
        HiMIRConfig(**{name: bad})


def test_focus_settings_survive_save_and_load(scene_dir, color_encoder, tmp_path):
    index = HiMIRIndex.build(scene_dir, encoder=color_encoder,
                             config=HiMIRConfig(focus_temperature=0.7, focus_spread=2.0), progress=False)
    index.save(tmp_path / "idx")
    loaded = HiMIRIndex.load(tmp_path / "idx", encoder=color_encoder)
    assert (loaded.config.focus_temperature, loaded.config.focus_spread) == (0.7, 2.0)
    # an index saved before the fields existed loads with the defaults (query-time settings)
    old = HiMIRConfig.from_dict({"layout": "1+4+16"})
    assert (old.focus_temperature, old.focus_spread) == (0.3, 0.5)


def test_new_indexes_cut_objects_and_old_manifests_keep_the_grid(index):
    assert HiMIRConfig().decomposer == "objects"
    assert index.config.decomposer == "objects"
    assert HiMIRConfig.from_dict({"layout": "1+4+16"}).decomposer == "grid"  # saved before the field: the grid
    assert HiMIRConfig.from_dict(HiMIRConfig(decomposer="grid").to_dict()).decomposer == "grid"

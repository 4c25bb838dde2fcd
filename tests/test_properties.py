"""Property-based tests (hypothesis) of the region tree and the MaxSim scorer."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from himir_rag.catalog import ImageRecord, Snapshot
from himir_rag.hierarchy import GridDecomposer, Level, RegionTree
from himir_rag.ingest import area_keep, crop_box
from himir_rag.scheduler import maxsim, score_exhaustive

FAST = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
EPS = 1e-5

# -- region tree --------------------------------------------------------------------------------------
sides = st.one_of(st.integers(1, 8), st.integers(1, 4000), st.sampled_from([1, 2, 3, 10_000, 20_000]))
layouts = st.sampled_from(["1+1+1", "1+2+4", "1+4+16", "1+3+7", "1+9+36", "1+4+64", "1+6+6"])


def assert_valid_tree(tree: RegionTree, width: int, height: int) -> None:
    boxes, levels, parents = tree.boxes, tree.levels, tree.parents
    assert tuple(boxes[0]) == (0, 0, width, height) and levels[0] == Level.GLOBAL and parents[0] == -1
    assert (levels[1:] != Level.GLOBAL).all() and (np.diff(levels) >= 0).all()  # root, regions, segments
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
    assert (boxes[:, 2] <= width).all() and (boxes[:, 3] <= height).all()
    assert (boxes[:, 2] - boxes[:, 0] >= 1).all() and (boxes[:, 3] - boxes[:, 1] >= 1).all()  # >= 1 px
    rows = np.arange(len(tree))
    assert (parents[1:] >= 0).all() and (parents[1:] < rows[1:]).all()
    assert (levels[parents[1:]] < levels[1:]).all()  # a parent is always coarser


@FAST
@given(width=sides, height=sides, layout=layouts, overlap=st.floats(0.0, 0.5))
def test_grid_tree_is_valid_for_any_image_shape(width, height, layout, overlap):
    tree = GridDecomposer(layout, overlap=overlap).decompose(SimpleNamespace(size=(width, height)))
    m, n = (int(v) for v in layout.split("+")[1:])
    assert len(tree) == 1 + m + n
    assert (tree.levels == Level.REGION).sum() == m and (tree.levels == Level.SEGMENT).sum() == n
    assert_valid_tree(tree, width, height)


@settings(max_examples=15, deadline=None)
@given(width=st.integers(1, 300), height=st.integers(1, 300), layout=layouts, seed=st.integers(0, 2**32 - 1),
       flat=st.booleans())
def test_segmentation_tree_is_valid_for_any_image(width, height, layout, seed, flat):
    from PIL import Image

    from himir_rag.hierarchy import SegmentationDecomposer

    rng = np.random.default_rng(seed)
    pixels = np.zeros((height, width, 3), np.uint8) if flat else rng.integers(0, 256, (height, width, 3), np.uint8)
    tree = SegmentationDecomposer(layout).decompose(Image.fromarray(pixels))
    m, n = (int(v) for v in layout.split("+")[1:])
    assert len(tree) == 1 + m + n
    assert_valid_tree(tree, width, height)


@FAST
@given(width=sides, height=sides, layout=layouts, data=st.data())
def test_pruned_tree_stays_valid(width, height, layout, data):
    """Dropping any regions or segments (granularity pruning) re-attaches children to a kept ancestor."""
    tree = GridDecomposer(layout).decompose(SimpleNamespace(size=(width, height)))
    keep = np.array([True] + data.draw(st.lists(st.booleans(), min_size=len(tree) - 1, max_size=len(tree) - 1)))
    pruned = tree.select(keep)
    assert len(pruned) == keep.sum()
    assert_valid_tree(pruned, width, height)
    assert np.array_equal(pruned.boxes, tree.boxes[keep])
    kept_area = tree.select(area_keep(tree, 0.01))
    assert_valid_tree(kept_area, width, height)


@FAST
@given(width=sides, height=sides, layout=layouts, scale=st.floats(0.0001, 1.0))
def test_crop_boxes_on_the_downscaled_copy_are_never_empty(width, height, layout, scale):
    tree = GridDecomposer(layout).decompose(SimpleNamespace(size=(width, height)))
    work = (max(1, round(width * scale)), max(1, round(height * scale)))
    for box in tree.boxes:
        x0, y0, x1, y1 = crop_box(box, (width, height), work)
        assert 0 <= x0 < x1 <= work[0] and 0 <= y0 < y1 <= work[1]


# -- MaxSim ---------------------------------------------------------------------------------------------
def unit_rows(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.normal(size=(n, dim)).astype(np.float32)
    x[np.linalg.norm(x, axis=1) < 1e-6, 0] = 1.0
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@st.composite
def grouped_vectors(draw):
    """(queries (s, dim), vectors (r, dim), groups (r,) non-decreasing runs), all unit rows."""
    seed = draw(st.integers(0, 2**32 - 1))
    dim = draw(st.integers(1, 16))
    counts = draw(st.lists(st.integers(1, 8), min_size=1, max_size=8))
    n_queries = draw(st.integers(1, 4))
    rng = np.random.default_rng(seed)
    groups = np.repeat(np.arange(len(counts)) * 3 + 1, counts).astype(np.int64)  # any increasing labels
    return unit_rows(rng, n_queries, dim), unit_rows(rng, len(groups), dim), groups, rng


@FAST
@given(grouped_vectors())
def test_maxsim_scores_are_bounded_and_exact(case):
    queries, vectors, groups, _ = case
    best, arg = maxsim(queries, vectors, groups)
    labels = np.unique(groups)
    assert best.shape == arg.shape == (len(queries), len(labels))
    assert (best >= -1 - EPS).all() and (best <= 1 + EPS).all()
    sims = queries @ vectors.T
    for pos, label in enumerate(labels):
        rows = np.flatnonzero(groups == label)
        np.testing.assert_allclose(best[:, pos], sims[:, rows].max(axis=1), atol=EPS)
        assert np.isin(arg[:, pos], rows).all()  # the argmax row belongs to that group
        np.testing.assert_allclose(sims[np.arange(len(queries)), arg[:, pos]], best[:, pos], atol=EPS)


@FAST
@given(grouped_vectors(), st.data())
def test_maxsim_is_monotone_in_added_regions(case, data):
    queries, vectors, groups, rng = case
    labels = np.unique(groups)
    target = data.draw(st.sampled_from(labels.tolist()))
    extra = unit_rows(rng, data.draw(st.integers(1, 3)), vectors.shape[1])
    at = np.flatnonzero(groups == target)[-1] + 1  # append to the end of that group's run
    more_vectors = np.concatenate([vectors[:at], extra, vectors[at:]])
    more_groups = np.concatenate([groups[:at], np.full(len(extra), target), groups[at:]])
    before, _ = maxsim(queries, vectors, groups)
    after, _ = maxsim(queries, more_vectors, more_groups)
    changed = labels == target
    assert (after[:, changed] >= before[:, changed] - EPS).all()  # adding a region never lowers the score
    np.testing.assert_allclose(after[:, ~changed], before[:, ~changed], atol=EPS)  # other images untouched


@FAST
@given(grouped_vectors(), st.data())
def test_maxsim_is_independent_of_region_order(case, data):
    queries, vectors, groups, _ = case
    order = np.concatenate([
        np.random.default_rng(data.draw(st.integers(0, 1000))).permutation(np.flatnonzero(groups == g))
        for g in np.unique(groups)
    ])
    best, _ = maxsim(queries, vectors, groups)
    shuffled, _ = maxsim(queries, vectors[order], groups[order])
    np.testing.assert_allclose(shuffled, best, atol=EPS)


# -- score_exhaustive over a snapshot -----------------------------------------------------------------------
@st.composite
def snapshots(draw):
    """A snapshot of 1-6 images, each a global view plus 0-8 regions/segments, with unit vectors."""
    seed = draw(st.integers(0, 2**32 - 1))
    dim = draw(st.integers(2, 12))
    sizes = draw(st.lists(st.integers(0, 8), min_size=1, max_size=6))
    rng = np.random.default_rng(seed)
    records, region_image, levels, parents = {}, [], [], []
    for image_id, n_children in enumerate(sizes, start=1):
        root = len(levels)
        records[image_id] = ImageRecord(image_id, f"/p/{image_id}.png", 10, 10)
        region_image += [image_id] * (1 + n_children)
        levels += [int(Level.GLOBAL)] + rng.integers(1, 3, size=n_children).tolist()
        parents += [-1] + [root] * n_children
    n = len(levels)
    boxes = np.tile(np.array([0, 0, 10, 10], np.int32), (n, 1))
    snap = Snapshot(records, unit_rows(rng, n, dim), np.array(region_image, np.int64), np.array(levels, np.int8),
                    np.array(parents, np.int64), boxes)
    return snap, unit_rows(rng, draw(st.integers(1, 4)), dim)


ALL_LEVELS = (Level.GLOBAL, Level.REGION, Level.SEGMENT)


def permuted_within_images(snap: Snapshot, rng: np.random.Generator) -> Snapshot:
    """The same snapshot with each image's non-global rows shuffled (parents stay the root)."""
    order = []
    for image_id in snap.images:
        rows = snap.image_rows(image_id)
        order += [rows[0], *rng.permutation(rows[1:])]
    order = np.array(order)
    new_row = np.empty_like(order)
    new_row[order] = np.arange(len(order))
    parents = np.where(snap.parents[order] >= 0, new_row[np.maximum(snap.parents[order], 0)], -1)
    return Snapshot(snap.images, snap.vectors[order], snap.region_image[order], snap.levels[order], parents,
                    snap.boxes[order])


@FAST
@given(snapshots(), st.sampled_from([ALL_LEVELS, (Level.GLOBAL,), (Level.GLOBAL, Level.SEGMENT)]))
def test_score_exhaustive_bounded_and_order_independent(case, levels):
    snap, queries = case
    snap.check_integrity()
    scored = score_exhaustive(snap, queries, levels=levels)
    assert list(scored.image_ids) == list(snap.images)  # every image has a global view: all are scored
    assert (scored.best >= -1 - EPS).all() and (scored.best <= 1 + EPS).all()  # per sub-query
    assert (scored.scores >= -1 - EPS).all() and (scored.scores <= 1 + EPS).all()
    shuffled = permuted_within_images(snap, np.random.default_rng(0))
    shuffled.check_integrity()
    again = score_exhaustive(shuffled, queries, levels=levels)
    assert list(again.image_ids) == list(scored.image_ids)
    np.testing.assert_allclose(again.best, scored.best, atol=EPS)
    np.testing.assert_allclose(again.scores, scored.scores, atol=EPS)


@FAST
@given(snapshots(), st.data())
def test_score_exhaustive_monotone_in_added_regions(case, data):
    snap, queries = case
    target = data.draw(st.sampled_from(sorted(snap.images)))
    level = data.draw(st.sampled_from([Level.REGION, Level.SEGMENT]))
    rng = np.random.default_rng(data.draw(st.integers(0, 1000)))
    rows = snap.image_rows(target)
    at = rows[-1] + 1
    vector = unit_rows(rng, 1, snap.dim)
    parents = np.where(snap.parents >= at, snap.parents + 1, snap.parents)
    grown = Snapshot(
        snap.images,
        np.concatenate([snap.vectors[:at], vector, snap.vectors[at:]]),
        np.concatenate([snap.region_image[:at], [target], snap.region_image[at:]]),
        np.concatenate([snap.levels[:at], [int(level)], snap.levels[at:]]).astype(np.int8),
        np.concatenate([parents[:at], [rows[0]], parents[at:]]),
        np.concatenate([snap.boxes[:at], [[0, 0, 10, 10]], snap.boxes[at:]]).astype(np.int32),
    )
    grown.check_integrity()
    before = score_exhaustive(snap, queries, levels=ALL_LEVELS)
    after = score_exhaustive(grown, queries, levels=ALL_LEVELS)
    assume(len(before.image_ids) == len(after.image_ids))
    is_target = before.image_ids == target
    assert (after.best[:, is_target] >= before.best[:, is_target] - EPS).all()
    assert (after.scores[is_target] >= before.scores[is_target] - EPS).all()
    np.testing.assert_allclose(after.scores[~is_target], before.scores[~is_target], atol=EPS)

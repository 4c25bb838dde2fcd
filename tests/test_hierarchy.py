from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from himir_rag.config import HiMIRConfig, Layout, parse_layout
from himir_rag.errors import ConfigError
from himir_rag.hierarchy import GridDecomposer, Level, SegmentationDecomposer, get_decomposer, intersection_areas


def check_tree(tree, width, height, layout):
    boxes = tree.boxes
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
    assert (boxes[:, 2] <= width).all() and (boxes[:, 3] <= height).all()
    assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
    assert tree.levels[0] == Level.GLOBAL and tuple(boxes[0]) == (0, 0, width, height)
    assert tree.parents[0] == -1
    regions = np.flatnonzero(tree.levels == Level.REGION)
    segments = np.flatnonzero(tree.levels == Level.SEGMENT)
    assert len(regions) == layout.regions and len(segments) == layout.segments
    assert (tree.parents[regions] == 0).all()
    assert (tree.levels[tree.parents[segments]] == Level.REGION).all()
    # each segment's parent is the region holding most of it
    overlap = intersection_areas(boxes[segments], boxes[regions])
    best = overlap.max(axis=1)
    chosen = overlap[np.arange(len(segments)), tree.parents[segments] - regions[0]]
    assert (chosen == best).all()


@pytest.mark.parametrize("layout", ["1+4+16", "1+2+8", "1+9+36", "1+1+4", "1+6+24"])
@pytest.mark.parametrize("size", [(640, 480), (300, 800), (33, 17)])
def test_grid_tree_is_valid(layout, size):
    tree = GridDecomposer(layout).decompose(Image.new("RGB", size))
    check_tree(tree, *size, parse_layout(layout))
    assert len(tree) == parse_layout(layout).total


def test_grid_regions_overlap_and_cover():
    tree = GridDecomposer("1+4+16", overlap=0.2).decompose(Image.new("RGB", (400, 400)))
    regions = tree.boxes[tree.levels == Level.REGION]
    assert regions[0][2] > 200 and regions[1][0] < 200  # neighbours overlap
    segments = tree.boxes[tree.levels == Level.SEGMENT]
    assert ((segments[:, 2] - segments[:, 0]) * (segments[:, 3] - segments[:, 1])).sum() == 400 * 400


def test_segmentation_tree_follows_objects():
    img = Image.new("RGB", (320, 240), (255, 255, 255))
    img.paste((200, 20, 20), (20, 30, 120, 130))
    img.paste((20, 20, 200), (200, 120, 300, 220))
    tree = SegmentationDecomposer("1+4+16").decompose(img)
    check_tree(tree, 320, 240, Layout(4, 16))
    # some stored box hugs the red square
    red = np.array([[20, 30, 120, 130]])
    inter = intersection_areas(tree.boxes[1:], red)[:, 0]
    areas = (tree.boxes[1:, 2] - tree.boxes[1:, 0]) * (tree.boxes[1:, 3] - tree.boxes[1:, 1])
    iou = inter / (areas + 100 * 100 - inter)
    assert iou.max() > 0.7


def test_objects_decomposer_follows_objects_with_regions_and_keeps_the_grid_segments():
    img = Image.new("RGB", (320, 240), (255, 255, 255))
    img.paste((200, 20, 20), (20, 30, 120, 130))
    img.paste((20, 20, 200), (200, 120, 300, 220))
    decomposer = get_decomposer("objects", "1+4+16")
    assert decomposer.name == "objects" and get_decomposer("segments").name == "segments"
    tree = decomposer.decompose(img)
    check_tree(tree, 320, 240, Layout(4, 16))
    grid = GridDecomposer("1+4+16").decompose(img)
    np.testing.assert_array_equal(tree.boxes[tree.levels == Level.SEGMENT], grid.boxes[grid.levels == Level.SEGMENT])
    regions = tree.boxes[tree.levels == Level.REGION]
    red = np.array([[20, 30, 120, 130]])
    inter = intersection_areas(regions, red)[:, 0]
    areas = (regions[:, 2] - regions[:, 0]) * (regions[:, 3] - regions[:, 1])
    assert (inter / (areas + 100 * 100 - inter)).max() > 0.7  # a region hugs the red square
    with pytest.raises(ConfigError, match="fine must be"):
        SegmentationDecomposer("1+4+16", fine="dots")
    assert HiMIRConfig(decomposer="objects").decomposer == "objects"
    with pytest.raises(ConfigError, match="'objects'"):
        HiMIRConfig(decomposer="blobs")


def test_select_reattaches_children():
    tree = GridDecomposer("1+4+16").decompose(Image.new("RGB", (64, 64)))
    keep = np.ones(len(tree), bool)
    keep[1] = False  # drop the first region: its segments move up to the global view
    pruned = tree.select(keep)
    assert len(pruned) == 20
    orphans = [i for i, p in enumerate(tree.parents) if p == 1]
    new_rows = np.cumsum(keep) - 1
    assert all(pruned.parents[new_rows[i]] == 0 for i in orphans)


@pytest.mark.parametrize("bad", ["4+16", "1+0+4", "1+8+4", "1+4+16+64", "one", "", "1+4+2000"])
def test_bad_layouts_rejected(bad):
    with pytest.raises(ConfigError, match="layout"):
        parse_layout(bad)


def test_config_validation():
    with pytest.raises(ConfigError, match="decomposer"):
        HiMIRConfig(decomposer="quadtree")
    with pytest.raises(ConfigError, match="prune_cosine"):
        HiMIRConfig(prune_cosine=1.5)
    with pytest.raises(ConfigError, match="image decomposer"):
        get_decomposer("quadtree")
    config = HiMIRConfig(layout="1+9+36", prune_cosine=0.97)
    assert HiMIRConfig.from_dict({**config.to_dict(), "future_field": 1}) == config


def test_segment_work_size_reaches_the_decomposer_and_old_indexes_keep_256():
    from himir_rag.ingest import region_decomposer

    assert HiMIRConfig().segment_work_size == 128
    assert region_decomposer(HiMIRConfig(decomposer="objects", segment_work_size=64)).work_size == 64
    assert region_decomposer(HiMIRConfig(decomposer="segments")).work_size == 128
    old = {k: v for k, v in HiMIRConfig(decomposer="objects").to_dict().items() if k != "segment_work_size"}
    assert HiMIRConfig.from_dict(old).segment_work_size == 256  # as saved before the field existed
    assert HiMIRConfig.from_dict(HiMIRConfig(segment_work_size=96).to_dict()).segment_work_size == 96
    for bad in (8, 0, 128.0, True, "128"):
        with pytest.raises(ConfigError, match="segment_work_size must be an int >= 16"):
            HiMIRConfig(segment_work_size=bad)
    img = Image.new("RGB", (640, 480), (255, 255, 255))
    img.paste((200, 20, 20), (40, 60, 240, 260))
    red = np.array([[40, 60, 240, 260]])
    for size in (96, 128, 256):  # the boxes are scaled back to the photo at every work size
        regions = get_decomposer("objects", work_size=size).decompose(img).boxes[1:5]
        inter = intersection_areas(regions, red)[:, 0]
        areas = (regions[:, 2] - regions[:, 0]) * (regions[:, 3] - regions[:, 1])
        assert (inter / (areas + 200 * 200 - inter)).max() > 0.7, size


@settings(max_examples=60, deadline=None)
@given(width=st.integers(1, 2000), height=st.integers(1, 2000), m=st.sampled_from([1, 2, 4, 6, 9]),
       factor=st.sampled_from([1, 2, 4]))
def test_grid_tree_property(width, height, m, factor):
    layout = Layout(m, m * factor)
    tree = GridDecomposer(layout).decompose(Image.new("RGB", (width, height)))
    boxes = tree.boxes
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= width).all() and (boxes[:, 3] <= height).all()
    assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
    assert (tree.parents[1:] >= 0).all() and (tree.parents[1:] < np.arange(1, len(tree))).all()

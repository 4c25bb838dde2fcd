"""Regions at each granularity: the 1+M+N tree and the decomposers that build it.

Every image becomes one global view (level 0), up to M intermediate regions
(level 1, parent = the global view) and up to N fine segments (level 2, parent =
the intermediate region holding most of the segment). Boxes are
``(x0, y0, x1, y1)`` in original pixel coordinates, ``x1``/``y1`` exclusive.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import IntEnum
from typing import Protocol, runtime_checkable

import numpy as np
from PIL import Image

from himir_rag.config import IMAGE_DECOMPOSERS, Layout, parse_layout
from himir_rag.errors import ConfigError

__all__ = [
    "Level",
    "Region",
    "RegionTree",
    "ImageDecomposer",
    "GridDecomposer",
    "SegmentationDecomposer",
    "get_decomposer",
    "focus_boxes",
    "grouped_focus_boxes",
]


class Level(IntEnum):
    """Granularity of a region."""

    GLOBAL = 0
    REGION = 1
    SEGMENT = 2


@dataclass(frozen=True)
class Region:
    """One node of the tree: a box at a level, with the index of its parent (-1 for root)."""

    level: Level
    bbox: tuple[int, int, int, int]
    parent: int


@dataclass(frozen=True)
class RegionTree:
    """The regions of one image as arrays, root first, then level 1, then level 2.

    Attributes
    ----------
    boxes : np.ndarray
        (n_regions, 4) int32 ``x0, y0, x1, y1``.
    levels : np.ndarray
        (n_regions,) int8 :class:`Level` values.
    parents : np.ndarray
        (n_regions,) int32 parent row, -1 for the global view.
    width, height : int
        Image size in pixels.
    """

    boxes: np.ndarray
    levels: np.ndarray
    parents: np.ndarray
    width: int
    height: int

    def __len__(self) -> int:
        return int(self.boxes.shape[0])

    @property
    def regions(self) -> list[Region]:
        """The tree as :class:`Region` objects."""
        return [
            Region(Level(int(lv)), tuple(int(v) for v in box), int(p))  # type: ignore[arg-type]
            for box, lv, p in zip(self.boxes, self.levels, self.parents)
        ]

    def select(self, keep: np.ndarray) -> RegionTree:
        """Keep a subset of rows (boolean mask); parents are re-indexed.

        A dropped region's children are re-attached to its own parent.
        """
        keep = np.asarray(keep, dtype=bool)
        if not keep[0]:
            raise ValueError("the global view (row 0) cannot be dropped")
        parents = self.parents.copy()
        for row in range(len(parents)):  # lift children of dropped rows (tree is shallow)
            while parents[row] >= 0 and not keep[parents[row]]:
                parents[row] = parents[parents[row]]
        new_row = np.cumsum(keep) - 1
        new_parents = np.where(parents >= 0, new_row[np.maximum(parents, 0)], -1)
        return RegionTree(
            self.boxes[keep], self.levels[keep], new_parents[keep].astype(np.int32), self.width, self.height
        )


@runtime_checkable
class ImageDecomposer(Protocol):
    """Turns an image into its region tree."""

    name: str

    def decompose(self, image: Image.Image) -> RegionTree:
        """Return the 1+M+N region tree of ``image``."""
        ...


def _grid_shape(count: int, width: int, height: int) -> tuple[int, int]:
    """(rows, cols) with rows*cols == count, closest to the image's aspect ratio."""
    pairs = [(r, count // r) for r in range(1, count + 1) if count % r == 0]
    aspect = width / max(height, 1)
    return min(pairs, key=lambda rc: abs(math.log((rc[1] / rc[0]) / aspect)))


def grid_boxes(width: int, height: int, count: int, *, overlap: float = 0.0) -> np.ndarray:
    """Boxes of a grid of ``count`` cells, each grown by ``overlap`` of its size.

    Returns
    -------
    np.ndarray
        (count, 4) int32, clipped to the image.
    """
    rows, cols = _grid_shape(count, width, height)
    xs = np.linspace(0, width, cols + 1)
    ys = np.linspace(0, height, rows + 1)
    x0, y0 = np.meshgrid(xs[:-1], ys[:-1])
    x1, y1 = np.meshgrid(xs[1:], ys[1:])
    grow_x, grow_y = (x1 - x0) * overlap / 2, (y1 - y0) * overlap / 2
    boxes = np.stack([x0 - grow_x, y0 - grow_y, x1 + grow_x, y1 + grow_y], axis=-1).reshape(-1, 4)
    return _clip_boxes(np.rint(boxes), width, height)


def _clip_boxes(boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    boxes = boxes.astype(np.int64)
    boxes[:, [0, 2]] = np.clip(boxes[:, [0, 2]], 0, width)
    boxes[:, [1, 3]] = np.clip(boxes[:, [1, 3]], 0, height)
    boxes[:, 2] = np.maximum(boxes[:, 2], boxes[:, 0] + 1)
    boxes[:, 3] = np.maximum(boxes[:, 3], boxes[:, 1] + 1)
    boxes[:, [0, 2]] = np.minimum(boxes[:, [0, 2]], [width - 1, width])
    boxes[:, [1, 3]] = np.minimum(boxes[:, [1, 3]], [height - 1, height])
    return boxes.astype(np.int32)


def intersection_areas(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise intersection areas of boxes ``a`` (n, 4) and ``b`` (m, 4) -> (n, m)."""
    x0 = np.maximum(a[:, None, 0], b[None, :, 0])
    y0 = np.maximum(a[:, None, 1], b[None, :, 1])
    x1 = np.minimum(a[:, None, 2], b[None, :, 2])
    y1 = np.minimum(a[:, None, 3], b[None, :, 3])
    return np.clip(x1 - x0, 0, None).astype(np.int64) * np.clip(y1 - y0, 0, None)


def focus_boxes(sims: np.ndarray, boxes: np.ndarray, temperature: float, spread: float = 0.0) -> np.ndarray:
    """Where each query matched in one photo: the box of the photo's regions weighted by
    ``w = exp((s - s_max) / (temperature * std(s)))`` over that query's similarities ``s``.

    The best region's box alone is the one grid cell (or segment, or region) that scored
    highest, wherever in it the object lies. The weighted regions are read as one shape: the
    reported box is centred on their weighted mean centre ``c``, and its half-width (and
    half-height) is ``sqrt(sum w h^2 + spread * sum w (x - c)^2)`` over the regions' centres
    ``x`` and half-widths ``h`` (weights summing to 1). With ``spread = 0`` that is about the
    regions' weighted mean box: across two cells an object straddles, or between a cell and
    the larger region around it that scores almost as well. With ``spread > 0`` the box also
    grows with how far apart the near-best regions lie, so a large object whose pieces all
    score well is reported whole (``spread = 3`` matches the second moment of the weighted
    mixture of the boxes exactly). The temperature is in units of the standard deviation of
    the photo's similarities, so it means the same for encoders whose similarities lie on
    different scales. On the composite benchmark's tuning set the share of sub-queries whose
    reported box overlaps the named object at IoU >= 0.3 is 0.311 for the best region, 0.385
    for the weighted mean of the boxes' corners at temperature 0.4 (the rule before
    ``spread``) and 0.422 at temperature 0.3, spread 0.5 (benchmarks/README.md, "Focus boxes
    that grow").

    Parameters
    ----------
    sims : np.ndarray
        (n_regions, n_queries) similarities of one photo's regions.
    boxes : np.ndarray
        (n_regions, 4) their boxes.
    temperature : float
        0 = the best region's box.
    spread : float
        How much the box grows with the distance between the weighted regions (>= 0).

    Returns
    -------
    np.ndarray
        (n_queries, 4) int32 boxes, inside the bounding box of ``boxes``.

    Example
    -------
    >>> boxes = np.array([[0, 0, 10, 10], [10, 0, 20, 10], [0, 10, 10, 20]])
    >>> focus_boxes(np.array([[0.9], [0.9], [0.1]]), boxes, 0.5).tolist()
    [[5, 0, 15, 10]]
    >>> focus_boxes(np.array([[0.9], [0.9], [0.1]]), boxes, 0.5, spread=3).tolist()
    [[0, 0, 20, 10]]
    """
    return grouped_focus_boxes(sims, boxes, np.zeros(1, np.int64), temperature, spread)[0]


def grouped_focus_boxes(sims: np.ndarray, boxes: np.ndarray, starts: np.ndarray, temperature: float,
                        spread: float = 0.0) -> np.ndarray:
    """:func:`focus_boxes` of several photos at once: rows ``starts[i]:starts[i+1]`` are photo ``i``'s.

    Returns (n_photos, n_queries, 4) int32 boxes; a few array operations for all photos
    (a search reports ten of them per query).
    """
    sims = np.asarray(sims, dtype=np.float64)
    boxes = np.asarray(boxes, dtype=np.float64)
    starts = np.asarray(starts, dtype=np.int64)
    counts = np.diff(np.r_[starts, len(sims)])
    owner = np.repeat(np.arange(len(starts)), counts)
    best = np.maximum.reduceat(sims, starts, axis=0)  # (photos, queries)
    if temperature <= 0:  # each photo's first row at its maximum, per query
        top = np.where(sims == best[owner], np.arange(len(sims))[:, None], len(sims))
        first = np.minimum.reduceat(top, starts, axis=0)
        return boxes[first].astype(np.int32)
    mean = np.add.reduceat(sims, starts, axis=0) / counts[:, None]
    std = np.sqrt(np.maximum(np.add.reduceat(sims * sims, starts, axis=0) / counts[:, None] - mean * mean, 0))
    weights = np.exp((sims - best[owner]) / (temperature * np.maximum(std, 1e-6)[owner]))  # (rows, queries)
    weights /= np.add.reduceat(weights, starts, axis=0)[owner]
    centres, halves = (boxes[:, :2] + boxes[:, 2:]) / 2, (boxes[:, 2:] - boxes[:, :2]) / 2  # (rows, 2) as x, y

    def weighted(values: np.ndarray) -> np.ndarray:  # (rows, 1 or queries, 2) -> (photos, queries, 2)
        return np.add.reduceat(weights[:, :, None] * values, starts, axis=0)

    centre = weighted(centres[:, None, :])  # (photos, queries, 2)
    half = weighted(halves[:, None, :] ** 2)
    if spread > 0:
        half += spread * weighted((centres[:, None, :] - centre[owner]) ** 2)
    half = np.sqrt(half)
    low = np.minimum.reduceat(boxes[:, :2], starts, axis=0)[:, None, :]  # the photo's extent
    high = np.maximum.reduceat(boxes[:, 2:], starts, axis=0)[:, None, :]
    focus = np.concatenate([np.maximum(centre - half, low), np.minimum(centre + half, high)], axis=2)
    return np.rint(focus).astype(np.int32)


def build_tree(width: int, height: int, regions: np.ndarray, segments: np.ndarray) -> RegionTree:
    """Assemble a tree: global view, ``regions`` (M, 4), ``segments`` (N, 4).

    Each segment's parent is the region that contains the largest part of it.
    """
    n_regions, n_segments = len(regions), len(segments)
    root = np.array([[0, 0, width, height]], dtype=np.int32)
    boxes = np.concatenate([root, regions.reshape(-1, 4), segments.reshape(-1, 4)]).astype(np.int32)
    levels = np.array([0] + [1] * n_regions + [2] * n_segments, dtype=np.int8)
    parents = np.full(len(boxes), -1, dtype=np.int32)
    parents[1 : 1 + n_regions] = 0
    if n_segments:
        owner = intersection_areas(segments, regions).argmax(axis=1) if n_regions else None
        parents[1 + n_regions :] = 0 if owner is None else owner + 1
    return RegionTree(boxes, levels, parents, width, height)


class GridDecomposer:
    """Regular grids: M overlapping regions (2x2 by default), N segments (4x4).

    Parameters
    ----------
    layout : str or Layout
        ``"1+M+N"``, default ``"1+4+16"``.
    overlap : float
        Regions grow by this fraction of their cell, so objects on a cell border
        still fall wholly inside one region.

    Example
    -------
    >>> tree = GridDecomposer("1+4+16").decompose(Image.new("RGB", (640, 480)))
    >>> len(tree)
    21
    """

    name = "grid"

    def __init__(self, layout: str | Layout = "1+4+16", *, overlap: float = 0.15) -> None:
        self.layout = parse_layout(layout)
        self.overlap = overlap

    def decompose(self, image: Image.Image) -> RegionTree:
        width, height = image.size
        regions = grid_boxes(width, height, self.layout.regions, overlap=self.overlap)
        segments = grid_boxes(width, height, self.layout.segments)
        return build_tree(width, height, regions, segments)


class SegmentationDecomposer:
    """Regions that follow the objects: Felzenszwalb segmentation at two scales.

    The coarse scale gives up to M regions, the fine scale up to N segments. Each
    segment's bounding box is kept when its area lies between ``min_frac`` and
    ``max_frac`` of the image; near-duplicate boxes (IoU above ``nms_iou``) are
    merged, the largest first. Slots left empty are filled with grid boxes so the
    whole image stays covered.

    Parameters
    ----------
    layout : str or Layout
        ``"1+M+N"``.
    work_size : int
        The image is segmented at this longest side (speed); boxes are scaled back.
    fine : str
        ``"segments"`` (the fine Felzenszwalb scale) or ``"grid"``: the grid's N cells as the
        fine level under object-following regions, the ``objects`` decomposer. Colour
        segments split objects into parts the classifier cannot name, the grid's cells
        do not: on the composite benchmark's tuning set ``objects`` kept the grid's
        segment-level accuracy and lifted himir-full's Recall@10 and grounding over both
        (``benchmarks/README.md``, "Accuracy").
    """

    def __init__(
        self,
        layout: str | Layout = "1+4+16",
        *,
        work_size: int = 128,
        min_frac: float = 0.01,
        max_frac: float = 0.7,
        nms_iou: float = 0.6,
        overlap: float = 0.15,
        fine: str = "segments",
    ) -> None:
        if fine not in ("segments", "grid"):
            raise ConfigError(f"fine must be 'segments' or 'grid', got {fine!r}")
        self.layout = parse_layout(layout)
        self.work_size = work_size
        self.min_frac, self.max_frac, self.nms_iou = min_frac, max_frac, nms_iou
        self.overlap = overlap
        self.fine = fine
        self.name = "segments" if fine == "segments" else "objects"

    def decompose(self, image: Image.Image) -> RegionTree:
        width, height = image.size
        scale = min(1.0, self.work_size / max(width, height))
        small = image.resize((max(1, round(width * scale)), max(1, round(height * scale))))
        pixels = np.asarray(small, dtype=np.float64) / 255.0
        regions = self._boxes(pixels, scale=600.0, count=self.layout.regions)
        regions = self._fill(regions / scale, width, height, self.layout.regions, self.overlap)
        if self.fine == "grid":
            segments = grid_boxes(width, height, self.layout.segments)
        else:
            segments = self._boxes(pixels, scale=150.0, count=self.layout.segments)
            segments = self._fill(segments / scale, width, height, self.layout.segments, 0.0)
        return build_tree(width, height, regions, segments)

    def _boxes(self, pixels: np.ndarray, *, scale: float, count: int) -> np.ndarray:
        from skimage.measure import regionprops
        from skimage.segmentation import felzenszwalb

        labels = felzenszwalb(pixels, scale=scale, sigma=0.8, min_size=max(8, pixels[..., 0].size // 400))
        area_total = labels.size
        boxes, areas = [], []
        for prop in regionprops(labels + 1):
            y0, x0, y1, x1 = prop.bbox
            frac = (x1 - x0) * (y1 - y0) / area_total
            if self.min_frac <= frac <= self.max_frac:
                boxes.append((x0, y0, x1, y1))
                areas.append(prop.area)
        if not boxes:
            return np.zeros((0, 4))
        order = np.argsort(areas)[::-1]
        return _suppress(np.asarray(boxes, dtype=np.float64)[order], self.nms_iou)[:count]

    @staticmethod
    def _fill(boxes: np.ndarray, width: int, height: int, count: int, overlap: float) -> np.ndarray:
        boxes = _clip_boxes(np.rint(boxes), width, height) if len(boxes) else np.zeros((0, 4), np.int32)
        if len(boxes) >= count:
            return boxes[:count]
        grid = grid_boxes(width, height, count, overlap=overlap)
        if len(boxes):  # add the grid cells the found boxes cover least
            covered = intersection_areas(grid, boxes).max(axis=1) / _areas(grid)
            grid = grid[np.argsort(covered, kind="stable")]
        return np.concatenate([boxes, grid[: count - len(boxes)]]).astype(np.int32)


def _areas(boxes: np.ndarray) -> np.ndarray:
    return np.maximum(boxes[:, 2] - boxes[:, 0], 0) * np.maximum(boxes[:, 3] - boxes[:, 1], 0)


def _suppress(boxes: np.ndarray, iou: float) -> np.ndarray:
    """Greedy non-maximum suppression of boxes already sorted by priority."""
    kept: list[int] = []
    areas = _areas(boxes)
    inter = intersection_areas(boxes, boxes)
    union = areas[:, None] + areas[None, :] - inter
    overlaps = inter / np.maximum(union, 1e-9)
    for row in range(len(boxes)):
        if all(overlaps[row, k] <= iou for k in kept):
            kept.append(row)
    return boxes[kept]


def get_decomposer(name: str, layout: str | Layout = "1+4+16", *, overlap: float = 0.15,
                   work_size: int = 128) -> ImageDecomposer:
    """Decomposer by name: ``"grid"``, ``"segments"`` (object-following regions and segments) or
    ``"objects"`` (object-following regions over the grid's segments); ``work_size`` is the
    longest side the last two segment at (see :class:`SegmentationDecomposer`).

    Raises
    ------
    ConfigError
        For an unknown name.
    """
    if name == "grid":
        return GridDecomposer(layout, overlap=overlap)
    if name in ("segments", "segmentation"):
        return SegmentationDecomposer(layout, overlap=overlap, work_size=work_size)
    if name == "objects":
        return SegmentationDecomposer(layout, overlap=overlap, work_size=work_size, fine="grid")
    raise ConfigError(f"image decomposer {name!r} is unknown; use one of {', '.join(map(repr, IMAGE_DECOMPOSERS))}")

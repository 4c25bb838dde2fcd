"""HiMIRConfig: every tunable of indexing and search, validated, saved with the index as JSON."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from himir_rag.errors import ConfigError

# The image decomposers by name (built by himir_rag.hierarchy.get_decomposer)
IMAGE_DECOMPOSERS = ("grid", "segments", "objects")

if TYPE_CHECKING:  # the scheduler imports the hierarchy, which imports this module
    from himir_rag.scheduler import SchedulerParams

__all__ = ["HiMIRConfig", "Layout", "parse_layout", "REGION_ENCODINGS"]

REGION_ENCODINGS = ("crops", "roi")
# what an index saved before a field existed did, whatever today's default is
_BEFORE_THE_FIELD = {"decomposer": "grid", "region_encoding": "crops", "segment_work_size": 256}

_LAYOUT_RE = re.compile(r"^\s*1\s*\+\s*(\d+)\s*\+\s*(\d+)\s*$")


@dataclass(frozen=True)
class Layout:
    """The 1+M+N hierarchy: one global view, M regions, N fine segments.

    For the grid decomposer M and N must be perfect squares (2x2, 4x4...).
    """

    regions: int = 4
    segments: int = 16

    def __str__(self) -> str:
        return f"1+{self.regions}+{self.segments}"

    @property
    def total(self) -> int:
        """Number of regions of one image, all levels together."""
        return 1 + self.regions + self.segments


def parse_layout(text: str | Layout) -> Layout:
    """Parse a layout string such as ``"1+4+16"``.

    Parameters
    ----------
    text : str or Layout
        ``"1+M+N"`` with M >= 1 and N >= M.

    Returns
    -------
    Layout

    Raises
    ------
    ConfigError
        If the text is not of the form ``1+M+N`` or the counts are out of range.

    Example
    -------
    >>> parse_layout("1+4+16")
    Layout(regions=4, segments=16)
    """
    if isinstance(text, Layout):
        return text
    match = _LAYOUT_RE.match(str(text))
    if not match:
        raise ConfigError(
            f"layout {text!r} is not of the form '1+M+N' (e.g. '1+4+16'); "
            "the first level is always the single global view"
        )
    regions, segments = int(match.group(1)), int(match.group(2))
    if not 1 <= regions <= 64 or not regions <= segments <= 1024:
        raise ConfigError(
            f"layout {text!r}: need 1 <= M <= 64 and M <= N <= 1024, got M={regions}, N={segments}"
        )
    return Layout(regions=regions, segments=segments)


def _default_scheduler() -> SchedulerParams:
    from himir_rag.scheduler import SchedulerParams  # not at import: see TYPE_CHECKING above

    return SchedulerParams()


@dataclass(frozen=True)
class HiMIRConfig:
    """All tunables. Saved in the index manifest; ``search`` uses the saved values.

    Parameters
    ----------
    layout : str
        ``"1+M+N"`` hierarchy layout.
    decomposer : str
        Image decomposer: ``"objects"`` (object-following regions over the grid's fine cells;
        the default), ``"grid"`` or ``"segments"`` (see :func:`himir_rag.hierarchy.get_decomposer`;
        benchmarks/README.md, "Focus boxes"). Indexes saved before the field existed load as
        ``"grid"``.
    region_overlap : float
        Fraction by which grid regions grow beyond their cell (0 = no overlap).
    segment_work_size : int
        Longest side, in pixels, at which the ``segments`` and ``objects`` decomposers segment a
        photo (boxes are scaled back; the grid ignores it). 128 segments 4.6x faster than 256 and
        found the objects better on the composite benchmark (``benchmarks/README.md``,
        "Accuracy"); indexes saved before this field existed load as 256, so photos added to
        them are cut as before.
    max_image_pixels : int
        Images with more pixels are rejected (decompression-bomb guard).
    min_region_frac : float
        Segments whose area is below this fraction of the image are not stored.
    prune_cosine : float
        Segments whose embedding has cosine above this with their parent's are not
        stored (offline granularity pruning). 1.0 disables.
    batch_size : int
        Crops encoded per batch (2 was the fastest measured on CPU, with a build's parallel encoder
        calls; see benchmarks/README.md, "Indexing throughput").
    region_encoding : str
        How regions are embedded: ``"crops"`` (each region cut out and encoded on its own)
        or ``"roi"`` (one forward per photo, each region pooled from its feature map; needs
        an encoder with ``embed_regions``, e.g. the offline one). Indexes saved before this
        field existed load as ``"crops"``.
    scheduler : SchedulerParams or dict
        Parameters of the scheduled pruning pass, a :class:`~himir_rag.scheduler.SchedulerParams`;
        a dict of some of them (the form manifests store, see :meth:`to_dict`) is validated
        and converted once, here. None = the defaults.
    default_mode : str
        Mode of ``search`` (and of the CLI and the retrievers) when none is given:
        ``"himir"`` (the scheduled pass), or any other of :data:`himir_rag.modes.MODES`.
    search_threads : int
        Threads for query-time FAISS and torch work (1 is fastest on small or shared machines).
    scan_workers : int
        Threads a large candidate scan (IVF, at least ``store.faiss.SPLIT_MIN_SCAN`` vectors,
        e.g. from about 100k photos) splits its probed lists over, each on one FAISS thread: one per core
        when 0 (the default, at most 8); 1 never splits. The same hits either way, up to
        which of several IVF-PQ hits tied at the k-th score is kept.
    precision : str
        Storage type of the region vectors: ``"float32"`` or ``"float16"`` (half the memory
        and disk; scores are computed in float32 either way).
    auto_tune : bool
        Tune the scheduler without labels when ``add`` finishes (probes drawn from the
        collection, ``himir-full`` as the reference; see :func:`himir_rag.autoconfig.auto_tune`).
        On by default: on four of five composite collections it chose a setting with 9-19% fewer
        dot products and Recall@10 on real queries within 0.3 points of the defaults' (+0.3 to
        -0.3), on the fifth and at 100k synthetic images it kept the defaults
        (``benchmarks/README.md``, "Projected list ranking").
        It costs about 1-2 minutes at 400 photos and 3-5 at 100k on 2 cores.
    auto_tune_min_images : int
        Smallest collection tuned automatically (below it the defaults are used).
    auto_tune_max_images : int
        Largest collection tuned automatically: the probes' reference is an exhaustive
        ``himir-full`` search each (about 0.45 s at 100k photos here, 7 s at 1M), so above
        this size tune with ``himir tune`` (real queries) or call ``auto_tune`` yourself.
    auto_tune_growth : float
        Tune again when the collection has grown this many times since the last tuning.
    auto_tune_probes : int
        Probe queries drawn for it (each costs one exhaustive ``himir-full`` search).
    follow_symlinks : bool
        Index, and show at retrieval, photos whose real path lies outside the collection
        folder (symlinks out of it, edited catalog rows). Off by default: they are skipped
        at index time and left out of results (see :mod:`himir_rag.paths`).
    thumbnails : bool
        Keep a small JPEG of every photo (longer side 256 px) inside the saved index, so
        results still carry an image when the originals are gone.
    max_query_chars : int
        Longest query ``search`` accepts, in characters (longer raises ``ValueError``).
    max_subqueries : int
        Most sub-queries one search matches; extra ones (given or from a decomposer) are
        dropped with a logged warning.
    max_subquery_chars : int
        Longest sub-query, in characters: a longer explicit one raises ``ValueError``, a
        longer one from a decomposer is cut with a logged warning.
    focus_temperature : float
        How each hit reports where a sub-query matched (``RegionMatch.bbox``): the box of the
        photo's regions at the levels the mode matches, weighted by
        ``exp((s - s_best) / (T * std(s)))`` over their similarities to the sub-query
        (:func:`himir_rag.hierarchy.focus_boxes`); 0 = the best region's own box
        (``RegionMatch.region_bbox`` always holds it). Query-time only: changing it needs no
        re-indexing.
    focus_spread : float
        How much that box grows with the distance between the weighted regions (0: about
        their weighted mean box; larger: a large object whose pieces all score well is
        reported whole). Query-time only. 0.3 and 0.5 were chosen together on the composite
        tuning set (benchmarks/README.md, "Focus boxes").
    """

    layout: str = "1+4+16"
    decomposer: str = "objects"
    region_overlap: float = 0.15
    segment_work_size: int = 128
    max_image_pixels: int = 50_000_000
    min_region_frac: float = 0.002
    prune_cosine: float = 1.0
    batch_size: int = 2
    region_encoding: str = "crops"
    scheduler: SchedulerParams = field(default_factory=_default_scheduler)
    default_mode: str = "himir"  # himir_rag.modes.DEFAULT_MODE
    search_threads: int = 1
    scan_workers: int = 0
    precision: str = "float16"
    auto_tune: bool = True
    auto_tune_min_images: int = 300
    auto_tune_max_images: int = 200_000
    auto_tune_growth: float = 2.0
    auto_tune_probes: int = 200
    follow_symlinks: bool = False
    thumbnails: bool = False
    max_query_chars: int = 2048
    max_subqueries: int = 16
    max_subquery_chars: int = 512
    focus_temperature: float = 0.3
    focus_spread: float = 0.5

    def __post_init__(self) -> None:
        from himir_rag.modes import parse_mode
        from himir_rag.scheduler import SchedulerParams

        if not isinstance(self.scheduler, (dict, SchedulerParams)) and self.scheduler is not None:
            raise ConfigError(f"scheduler must be a JSON object of parameters, got {type(self.scheduler).__name__}")
        object.__setattr__(self, "scheduler", SchedulerParams.from_dict(self.scheduler))
        object.__setattr__(self, "default_mode", parse_mode(self.default_mode).value)
        if self.precision not in ("float32", "float16"):
            raise ConfigError(f"precision {self.precision!r} is unknown; use 'float32' or 'float16'")
        if isinstance(self.search_threads, bool) or not isinstance(self.search_threads, int) or self.search_threads < 1:
            raise ConfigError(f"search_threads must be an int >= 1, got {self.search_threads!r}")
        if isinstance(self.scan_workers, bool) or not isinstance(self.scan_workers, int) or self.scan_workers < 0:
            raise ConfigError(f"scan_workers must be an int >= 0 (0: one per core), got {self.scan_workers!r}")
        for name in ("max_query_chars", "max_subqueries", "max_subquery_chars"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be an int >= 1, got {value!r}")
        for name, meaning in (("focus_temperature", "0: the best region's box"),
                              ("focus_spread", "0: the weighted mean box")):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ConfigError(f"{name} must be a finite number >= 0 ({meaning}), got {value!r}")
        if (isinstance(self.segment_work_size, bool) or not isinstance(self.segment_work_size, int)
                or self.segment_work_size < 16):
            raise ConfigError(f"segment_work_size must be an int >= 16 (pixels), got {self.segment_work_size!r}")
        parse_layout(self.layout)
        if self.decomposer not in IMAGE_DECOMPOSERS:
            raise ConfigError(f"decomposer {self.decomposer!r} is unknown; "
                              f"use one of {', '.join(map(repr, IMAGE_DECOMPOSERS))}")
        _check_range("region_overlap", self.region_overlap, 0.0, 0.5)
        _check_range("min_region_frac", self.min_region_frac, 0.0, 0.5)
        _check_range("prune_cosine", self.prune_cosine, 0.0, 1.0)
        if self.max_image_pixels < 1:
            raise ConfigError(f"max_image_pixels must be >= 1, got {self.max_image_pixels}")
        for name in ("follow_symlinks", "thumbnails"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.region_encoding not in REGION_ENCODINGS:
            raise ConfigError(f"region_encoding {self.region_encoding!r} is unknown; use one of "
                              f"{', '.join(REGION_ENCODINGS)}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if not isinstance(self.auto_tune, bool):
            raise ConfigError(f"auto_tune must be true or false, got {self.auto_tune!r}")
        if self.auto_tune_min_images < 1 or self.auto_tune_growth <= 1 or self.auto_tune_probes < 1:
            raise ConfigError("auto_tune_min_images and auto_tune_probes must be >= 1, auto_tune_growth > 1")
        if self.auto_tune_max_images < self.auto_tune_min_images:
            raise ConfigError(f"auto_tune_max_images ({self.auto_tune_max_images}) must be >= auto_tune_min_images "
                              f"({self.auto_tune_min_images})")

    @property
    def scheduler_params(self) -> SchedulerParams:
        """:attr:`scheduler` (the name of earlier versions)."""
        return self.scheduler

    @property
    def parsed_layout(self) -> Layout:
        """The layout as a :class:`Layout`."""
        return parse_layout(self.layout)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable view; ``scheduler`` holds only the parameters that differ from the
        defaults (:meth:`SchedulerParams.overrides`), the form every version reads."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {**values, "scheduler": self.scheduler.overrides()}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> HiMIRConfig:
        """Build from a dict (e.g. :meth:`to_dict`'s, or a manifest of any version), ignoring unknown
        keys written by newer versions; a key that older versions did not write takes the value they
        behaved by (``region_encoding="crops"``, ``segment_work_size=256``).

        Example
        -------
        >>> HiMIRConfig.from_dict({"scheduler": {"candidate_k": 8}}).scheduler.candidate_k
        8
        """
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{**_BEFORE_THE_FIELD, **{k: v for k, v in values.items() if k in known}})

    def replace(self, **changes: Any) -> HiMIRConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


FOCUS_FIELDS = ("focus_temperature", "focus_spread")  # how a match's box is reported: query time only


def focus_overrides(temperature: float | None, spread: float | None) -> dict[str, float]:
    """The :data:`FOCUS_FIELDS` a caller set (None: keep the index's), for ``HiMIRConfig.replace``."""
    return {name: value for name, value in zip(FOCUS_FIELDS, (temperature, spread)) if value is not None}


def _check_range(name: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise ConfigError(f"{name} must be in [{low}, {high}], got {value}")

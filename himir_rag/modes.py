"""The retrieval modes in one table: what each mode matches, and which scorer ranks it.

Every caller reads :data:`MODES` instead of naming modes: ``HiMIRIndex.search`` (one
query vector or sub-queries, which scorer), the tuner (its exact reference), the
benchmarks (which modes exist), the CLI and the adapters (whether to decompose).
Adding a mode is one :class:`RetrievalMode` member and one :class:`ModeSpec` row (plus a
:class:`Scorer` and its branch in :func:`himir_rag.scheduler.score_mode`, which
:func:`himir_rag.scheduler.rank` calls per block, if no existing scorer fits). Every store, Qdrant
included, only supplies candidates and vectors: the scheduler scores every mode.

==============  ===========  =========  ==========  =========================================
mode            levels       queries    scorer      what it is
==============  ===========  =========  ==========  =========================================
``single``      global       one        exhaustive  conventional single-vector retrieval
``mvr``         global, seg  sub-query  exhaustive  multi-vector baseline, no hierarchy
``himir-full``  all 1+M+N    sub-query  exhaustive  the exact reference of ``himir``
``himir``       all 1+M+N    sub-query  scheduled   the scheduled pruning pass (default)
==============  ===========  =========  ==========  =========================================
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from himir_rag.errors import ConfigError
from himir_rag.hierarchy import Level

__all__ = ["RetrievalMode", "Scorer", "ModeSpec", "MODES", "MODE_LEVELS", "DEFAULT_MODE", "parse_mode",
           "mode_spec", "reference_mode", "mode_names"]


class RetrievalMode(str, Enum):
    """What is matched (see :data:`MODES`)."""

    SINGLE = "single"
    MVR = "mvr"
    HIMIR_FULL = "himir-full"
    HIMIR = "himir"


class Scorer(str, Enum):
    """How a mode ranks images (both score by MaxSim, :func:`himir_rag.scheduler.maxsim`)."""

    EXHAUSTIVE = "exhaustive"  # every region at the mode's levels of every allowed image
    SCHEDULED = "scheduled"  # candidates, bounds, sparsity: himir_rag.scheduler.scheduled_search


@dataclass(frozen=True)
class ModeSpec:
    """One retrieval mode.

    Attributes
    ----------
    mode : RetrievalMode
    levels : tuple of Level
        Hierarchy levels whose regions the mode matches.
    subqueries : bool
        True: the query's sub-queries are matched (it is decomposed); False: the whole
        query is one vector (no decomposition; a query photo is its global view only).
    scorer : Scorer
    reference : bool
        The exact ranking the scheduled pass is measured against (the tuner's reference).
    """

    mode: RetrievalMode
    levels: tuple[Level, ...]
    subqueries: bool
    scorer: Scorer
    reference: bool = False

    @property
    def name(self) -> str:
        """The mode's name, e.g. ``"himir-full"``."""
        return self.mode.value


_ALL_LEVELS = (Level.GLOBAL, Level.REGION, Level.SEGMENT)

MODES: dict[RetrievalMode, ModeSpec] = {spec.mode: spec for spec in (
    ModeSpec(RetrievalMode.SINGLE, (Level.GLOBAL,), subqueries=False, scorer=Scorer.EXHAUSTIVE),
    ModeSpec(RetrievalMode.MVR, (Level.GLOBAL, Level.SEGMENT), subqueries=True, scorer=Scorer.EXHAUSTIVE),
    ModeSpec(RetrievalMode.HIMIR_FULL, _ALL_LEVELS, subqueries=True, scorer=Scorer.EXHAUSTIVE, reference=True),
    ModeSpec(RetrievalMode.HIMIR, _ALL_LEVELS, subqueries=True, scorer=Scorer.SCHEDULED),
)}

MODE_LEVELS: dict[RetrievalMode, tuple[Level, ...]] = {mode: spec.levels for mode, spec in MODES.items()}
DEFAULT_MODE = RetrievalMode.HIMIR  # HiMIRConfig.default_mode's default


def parse_mode(mode: str | RetrievalMode) -> RetrievalMode:
    """Mode by name; unknown names raise ConfigError listing the valid ones.

    Example
    -------
    >>> parse_mode("himir-full")
    <RetrievalMode.HIMIR_FULL: 'himir-full'>
    """
    try:
        return RetrievalMode(mode)
    except ValueError:
        raise ConfigError(f"mode {mode!r} is unknown; valid modes: {', '.join(mode_names())}") from None


def mode_spec(mode: str | RetrievalMode) -> ModeSpec:
    """The :class:`ModeSpec` of a mode given by name or member (unknown names raise ConfigError)."""
    return MODES[parse_mode(mode)]


def reference_mode() -> RetrievalMode:
    """The mode whose ranking is the exact reference (``himir-full``)."""
    return next(spec.mode for spec in MODES.values() if spec.reference)


def mode_names() -> tuple[str, ...]:
    """Every mode's name, in table order (``single, mvr, himir-full, himir``)."""
    return tuple(spec.name for spec in MODES.values())

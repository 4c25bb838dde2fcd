"""Label-free probe queries drawn from a collection, for tuning the scheduler without user queries.

A probe imitates a multi-object question about one photo: 2-3 sub-queries, each a
different region of the same random photo (regions or fine segments, never the global
view) turned away from that region by a fixed angle in a random direction, so its best
match is a region like it rather than an exact copy. The photo it was drawn from is the
probe's answer. Which photos and regions are drawn, and the directions, depend only on
the seed and the collection, so the same collection gives the same probes.
Nothing here depends on the encoder: probes live in the collection's own vector space,
for the offline encoder, CLIP, or synthetic vectors alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from himir_rag.catalog import Snapshot
from himir_rag.hierarchy import Level

__all__ = ["Probe", "probe_queries"]


@dataclass(frozen=True)
class Probe:
    """One probe: ``vectors`` (s, dim) unit sub-queries, drawn from the image ``source``."""

    vectors: np.ndarray
    source: int


def probe_queries(snapshot: Snapshot, *, count: int = 200, seed: int = 0, similarity: float = 0.6,
                  subqueries: tuple[int, int] = (2, 3)) -> list[Probe]:
    """``count`` probes from ``snapshot`` (a photo with fewer regions than sub-queries gives fewer).

    Parameters
    ----------
    similarity : float
        Cosine between a sub-query and the region it was drawn from (0 < similarity <= 1).
    subqueries : (int, int)
        Fewest and most sub-queries of a probe.
    """
    if not 0 < similarity <= 1:
        raise ValueError(f"similarity must be in (0, 1], got {similarity}")
    rng = np.random.default_rng(seed)
    if len(snapshot) == 0 or count <= 0:
        return []
    starts = snapshot.image_starts
    probes = []
    for position in rng.integers(0, len(snapshot), count):
        rows = np.arange(starts[position], starts[position + 1])
        finer = rows[snapshot.levels[rows] != Level.GLOBAL]
        rows = finer if len(finer) else rows
        n_subs = min(int(rng.integers(subqueries[0], subqueries[1] + 1)), len(rows))
        chosen = np.sort(rng.choice(rows, n_subs, replace=False))
        vectors = _turn(snapshot.region_vectors(chosen), similarity, rng)
        probes.append(Probe(vectors, int(snapshot.image_ids[position])))
    return probes


def _turn(vectors: np.ndarray, similarity: float, rng: np.random.Generator) -> np.ndarray:
    """Unit vectors at cosine ``similarity`` to each row of ``vectors``, in random directions."""
    unit = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    noise = rng.normal(size=unit.shape).astype(np.float32)
    noise -= np.einsum("ij,ij->i", noise, unit)[:, None] * unit  # orthogonal to the source
    noise /= np.maximum(np.linalg.norm(noise, axis=1, keepdims=True), 1e-12)
    turned = similarity * unit + np.sqrt(max(1.0 - similarity**2, 0.0)) * noise
    return np.ascontiguousarray(turned, dtype=np.float32)

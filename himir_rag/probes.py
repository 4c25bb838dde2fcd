"""Label-free probe queries drawn from a collection, for tuning the scheduler without user queries.

A probe imitates a multi-object question about one photo: 2-3 sub-queries, each drawn from
a different region of the same random photo (regions or fine segments, never the global
view). The photo it was drawn from is the probe's answer. Which photos and regions are
drawn depends only on the seed and the collection, so the same collection gives the same
probes. Two kinds:

- :func:`text_probes` (what :func:`himir_rag.autoconfig.auto_tune` uses when the index has a
  text encoder): each sub-query is the text embedding of the word the encoder assigns to
  the region, its nearest name in a fixed vocabulary (the 1000 ImageNet class names shipped
  with the package), embedded by the index's own text tower as a user's sub-query is. The
  probes thus sit where real text queries sit: at text-to-image similarities, not near
  copies of stored vectors.
- :func:`probe_queries`: each sub-query is the region's own vector turned away from it by a
  fixed angle in a random direction. It needs no encoder, so it serves collections of
  synthetic vectors.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from himir_rag.catalog import Snapshot
from himir_rag.hierarchy import Level

__all__ = ["Probe", "probe_queries", "text_probes", "default_vocabulary"]


@dataclass(frozen=True)
class Probe:
    """One probe: ``vectors`` (s, dim) unit sub-queries, drawn from the image ``source``;
    ``texts`` are the sub-queries' words for a text probe (empty for a vector probe)."""

    vectors: np.ndarray
    source: int
    texts: tuple[str, ...] = ()


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
    _check_subqueries(subqueries)
    rng = np.random.default_rng(seed)
    probes = []
    for source, rows in _drawn_photos(snapshot, count, rng):
        n_subs = min(int(rng.integers(subqueries[0], subqueries[1] + 1)), len(rows))
        chosen = np.sort(rng.choice(rows, n_subs, replace=False))
        probes.append(Probe(_turn(snapshot.region_vectors(chosen), similarity, rng), source))
    return probes


def _drawn_photos(snapshot: Snapshot, count: int, rng: np.random.Generator) -> Iterator[tuple[int, np.ndarray]]:
    """``count`` random photos (with repeats): each one's image id and rows, its non-global ones
    (all of them for a photo with only its global view); none for an empty collection."""
    if len(snapshot) == 0 or count <= 0:
        return
    starts = snapshot.image_starts
    for position in rng.integers(0, len(snapshot), count):
        rows = np.arange(starts[position], starts[position + 1])
        finer = rows[snapshot.levels[rows] != Level.GLOBAL]
        yield int(snapshot.image_ids[position]), finer if len(finer) else rows


def _turn(vectors: np.ndarray, similarity: float, rng: np.random.Generator) -> np.ndarray:
    """Unit vectors at cosine ``similarity`` to each row of ``vectors``, in random directions."""
    unit = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    noise = rng.normal(size=unit.shape).astype(np.float32)
    noise -= np.einsum("ij,ij->i", noise, unit)[:, None] * unit  # orthogonal to the source
    noise /= np.maximum(np.linalg.norm(noise, axis=1, keepdims=True), 1e-12)
    turned = similarity * unit + np.sqrt(max(1.0 - similarity**2, 0.0)) * noise
    return np.ascontiguousarray(turned, dtype=np.float32)


def text_probes(snapshot: Snapshot, vocabulary: Sequence[str], embeddings: np.ndarray, *, count: int = 200,
                seed: int = 0, subqueries: tuple[int, int] = (2, 3), ranks: int = 1) -> list[Probe]:
    """``count`` probes whose sub-queries are words of ``vocabulary`` the collection's regions evoke.

    For each probe a random photo is drawn and its non-global regions visited in random
    order; each region names its nearest word (the row of ``embeddings`` with the highest
    dot product with the region's vector), or with ``ranks`` > 1 one of its ``ranks``
    nearest words drawn uniformly, and the first 2-3 distinct words are the probe's
    sub-queries, as their ``embeddings`` rows. A photo whose regions name fewer distinct
    words than drawn gives a probe with fewer sub-queries (at least one).

    Parameters
    ----------
    vocabulary : sequence of str
        The words (e.g. :func:`default_vocabulary`).
    embeddings : ndarray (len(vocabulary), dim)
        The words embedded by the index's text encoder (unit rows).
    subqueries : (int, int)
        Fewest and most sub-queries of a probe.
    ranks : int
        How many of a region's nearest words it may name (1: the nearest). A user's word is
        not always the one the encoder finds nearest a region; a lower-ranked word makes a
        harder probe. The probes draw the same photos for any ``ranks``, but the rank draw
        also changes the later photos' region order and sub-query counts.
    """
    if ranks < 1:
        raise ValueError(f"ranks must be at least 1, got {ranks}")
    embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
    if embeddings.ndim != 2 or len(embeddings) != len(vocabulary) or len(vocabulary) == 0:
        raise ValueError(f"embeddings must be one row per word of a non-empty vocabulary, got shape "
                         f"{embeddings.shape} for {len(vocabulary)} words")
    if embeddings.shape[1] != snapshot.dim:
        raise ValueError(f"the vocabulary's embeddings have {embeddings.shape[1]} dims, the collection {snapshot.dim}")
    _check_subqueries(subqueries)
    rng = np.random.default_rng(seed)
    probes = []
    for source, rows in _drawn_photos(snapshot, count, rng):
        rows = rng.permutation(rows)
        n_subs = int(rng.integers(subqueries[0], subqueries[1] + 1))
        scores = snapshot.region_vectors(rows).astype(np.float32) @ embeddings.T
        if ranks == 1:  # no draw: the same probes as before ranks existed, for a seed
            nearest = np.argmax(scores, axis=1)
        else:
            top = np.argsort(-scores, axis=1)[:, :min(ranks, len(vocabulary))]
            nearest = top[np.arange(len(top)), rng.integers(0, top.shape[1], len(top))]
        words = list(dict.fromkeys(int(w) for w in nearest))[:n_subs]  # distinct, in visiting order
        probes.append(Probe(embeddings[words].copy(), source, tuple(vocabulary[w] for w in words)))
    return probes


def default_vocabulary() -> list[str]:
    """The words text probes are drawn from: the ImageNet class names (first name of each of the
    1000 classes in ``himir_rag/data/imagenet_classes.tsv``, each name once: 998), whatever the encoder."""
    from himir_rag.encoders.offline import imagenet_class_names

    return list(dict.fromkeys(imagenet_class_names()))


def _check_subqueries(subqueries: tuple[int, int]) -> None:
    low, high = subqueries
    if not 1 <= low <= high:
        raise ValueError(f"subqueries must be (fewest, most) with 1 <= fewest <= most, got {subqueries}")

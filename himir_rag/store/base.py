"""The vector store contract: add / remove / search / get by int64 region id."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

__all__ = ["VectorStore"]


@runtime_checkable
class VectorStore(Protocol):
    """Inner-product vector storage keyed by int64 ids.

    ``search`` returns ``(scores, ids)`` of shapes (n_queries, k), best first, padded
    with ``-inf`` / ``-1`` when fewer than k vectors are stored. ``distance_computations``
    counts query x stored-vector inner products spent by searches so far.
    """

    dim: int
    distance_computations: int

    def __len__(self) -> int: ...

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Store (n, dim) float32 ``vectors`` under (n,) int64 ``ids``."""
        ...

    def remove(self, ids: np.ndarray) -> int:
        """Delete ids; returns how many were present."""
        ...

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k by inner product -> (scores (q, k) float32, ids (q, k) int64)."""
        ...

    def get(self, ids: np.ndarray) -> np.ndarray:
        """Vectors of ``ids`` -> (n, dim) float32."""
        ...

    def save(self, path: Path) -> None:
        """Write to ``path`` (a file or directory the store owns)."""
        ...

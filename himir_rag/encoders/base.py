"""The encoder contract: images and texts into one L2-normalised float32 space."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np
from PIL import Image

__all__ = ["Encoder", "l2_normalize", "resolve_device"]


@runtime_checkable
class Encoder(Protocol):
    """Embeds image crops and texts into one space.

    Attributes
    ----------
    name : str
        Stable identifier recorded in the index (same name => same vectors).
    dim : int
        Embedding dimension.
    """

    name: str
    dim: int

    def embed_images(self, images: list[Image.Image]) -> np.ndarray:
        """Embed RGB images -> (n, dim) float32, rows L2-normalised."""
        ...

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        """Embed texts -> (n, dim) float32, rows L2-normalised."""
        ...


def l2_normalize(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows stay zero), as float32 (n, dim)."""
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return np.divide(vectors, norms, out=np.zeros_like(vectors), where=norms > 0)


def resolve_device(device: str | None) -> str:
    """``"auto"``/None -> ``"cuda"`` when torch sees one, else ``"cpu"``; a ``cuda`` request without
    CUDA raises :class:`~himir_rag.errors.EncoderUnavailableError` (one line)."""
    if device == "cpu":
        return device  # no torch import for the common case
    import torch

    from himir_rag.errors import EncoderUnavailableError

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise EncoderUnavailableError(f"device {device!r} was asked for but torch sees no CUDA device; use --device cpu")
    return device

"""The encoder contract: images and texts into one L2-normalised float32 space."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from typing import Protocol, runtime_checkable

import numpy as np
from PIL import Image

from himir_rag.threads import torch_threads

__all__ = ["Encoder", "RegionEncoder", "l2_normalize", "resolve_device", "inference_threads",
           "set_inference_threads", "cpu_threads", "DEFAULT_CPU_THREADS"]

# 1 thread was the fastest CPU inference measured on 2 shared cores (benchmarks/encoder_batches.py:
# 55.5 crops/s at batch 4; 2 threads were 1.7-4x slower): OpenMP threads stall each other there.
# A build uses the other cores with parallel calls instead (himir_rag.ingest.encode_workers).
DEFAULT_CPU_THREADS = 1
_process_threads: int | None = None  # set_inference_threads: the caller's choice for this process


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


@runtime_checkable
class RegionEncoder(Encoder, Protocol):
    """An encoder that can also embed boxes of a photo in one pass (``--region-encoding roi``)."""

    def embed_regions(self, images: Sequence[Image.Image], boxes: Sequence[np.ndarray]) -> np.ndarray:
        """Embed the boxes of photos: one (n_i, 4) pixel-box array per photo -> (sum n_i, dim) float32,
        rows L2-normalised, photo 0's boxes first."""
        ...


def set_inference_threads(count: int | None) -> None:
    """Choose the torch thread count of CPU inference for this process (None: back to the default),
    for encoders built without ``threads=``; e.g. ``himir bench run --torch-threads``."""
    global _process_threads
    if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 1):
        raise ValueError(f"torch threads must be an int >= 1, got {count!r}")
    _process_threads = count


@contextlib.contextmanager
def inference_threads(device: str, threads: int | None) -> Iterator[None]:
    """Run a CPU forward on ``threads`` torch threads, restoring torch's count afterwards.

    ``threads=None`` means the count chosen with :func:`set_inference_threads`, else torch's
    own count when the user set ``OMP_NUM_THREADS``, else :data:`DEFAULT_CPU_THREADS`. GPU
    work and a count already in force change nothing.
    """
    threads = cpu_threads(threads)
    if threads is None or not device.startswith("cpu"):
        yield
        return
    with torch_threads(threads):
        yield


def cpu_threads(threads: int | None) -> int | None:
    """The torch threads a CPU forward runs on for an encoder built with ``threads`` (see
    :func:`inference_threads`); None = torch's own count (the user set ``OMP_NUM_THREADS``)."""
    if threads is None:
        threads = _process_threads
    if threads is None and "OMP_NUM_THREADS" not in os.environ:
        threads = DEFAULT_CPU_THREADS
    return threads


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

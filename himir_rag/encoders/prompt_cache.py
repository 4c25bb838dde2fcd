"""On-disk cache of sentence embeddings of fixed prompts (the offline encoder's 1000 class prompts).

Embedding the class prompts costs seconds on a quiet CPU and half a minute under load, at every
process start. They depend only on the sentence model and the prompts, so they are computed once
and kept under the user's cache directory (``platformdirs.user_cache_dir("himir-rag")``, or
``$HIMIR_CACHE_DIR``), in a ``.npy`` file whose name hashes the model key and the prompts. The file
is written atomically and read with ``allow_pickle=False``; a file that is unreadable, of the
wrong shape or not unit-normalised is ignored and rewritten, and a cache that cannot be written
only costs the recomputation.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

__all__ = ["CACHE_ENV", "cache_dir", "cache_path", "cached_sentence_embeddings"]

logger = logging.getLogger(__name__)

CACHE_ENV = "HIMIR_CACHE_DIR"


def cache_dir() -> Path:
    """``$HIMIR_CACHE_DIR`` when set, else the platform's user cache directory for himir-rag."""
    override = os.environ.get(CACHE_ENV, "").strip()
    if override:
        return Path(override).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("himir-rag"))


def cache_path(model_key: str, prompts: Sequence[str]) -> Path:
    """The cache file of ``prompts`` under ``model_key``: ``prompt-embeddings-<sha256 prefix>.npy``."""
    digest = hashlib.sha256()
    digest.update(model_key.encode("utf-8") + b"\0")
    for prompt in prompts:
        digest.update(prompt.encode("utf-8") + b"\n")
    return cache_dir() / f"prompt-embeddings-{digest.hexdigest()[:32]}.npy"


def cached_sentence_embeddings(model_key: str, prompts: Sequence[str], *, dim: int,
                               encode: Callable[[list[str]], np.ndarray]) -> np.ndarray:
    """The (len(prompts), dim) float32 unit embeddings of ``prompts``, from the cache or ``encode``.

    Parameters
    ----------
    model_key : str
        Names the sentence model and its version: another key, another file.
    prompts : sequence of str
        The texts; their hash is part of the file name.
    dim : int
        Expected embedding dimension (a cached array of another shape is recomputed).
    encode : callable
        ``encode(list_of_texts) -> (n, dim)`` L2-normalised array, called on a cache miss.

    Returns
    -------
    np.ndarray
        (len(prompts), dim) float32.

    Example
    -------
    >>> cached_sentence_embeddings("model==1", ["a cat"], dim=2, encode=lambda t: np.ones((1, 2)) / 2**0.5)
    ... # doctest: +SKIP
    """
    path = cache_path(model_key, prompts)
    cached = _read(path, (len(prompts), dim))
    if cached is not None:
        return cached
    vectors = np.ascontiguousarray(encode(list(prompts)), dtype=np.float32)
    _write(path, vectors)
    return vectors


def _read(path: Path, shape: tuple[int, int]) -> np.ndarray | None:
    """The cached array, or None when it is missing or not what was written (then it is rewritten)."""
    if not path.is_file():
        return None
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        logger.warning("ignoring unreadable prompt-embedding cache %s (%s); recomputing it", path, exc)
        return None
    if (array.shape != shape or array.dtype != np.float32 or not np.isfinite(array).all()
            or not np.allclose(np.linalg.norm(array, axis=1), 1.0, atol=1e-3)):
        logger.warning("ignoring prompt-embedding cache %s (shape %s, dtype %s; expected %s float32 unit rows); "
                       "recomputing it", path, array.shape, array.dtype, shape)
        return None
    return array


def _write(path: Path, vectors: np.ndarray) -> None:
    """Write ``vectors`` to ``path`` atomically (temporary file, then rename); failures only log."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(handle, "wb") as stream:
                np.save(stream, vectors, allow_pickle=False)
                stream.flush()
                os.fsync(stream.fileno())
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
    except OSError as exc:
        logger.warning("cannot write the prompt-embedding cache %s (%s); it will be recomputed next time "
                       "(set %s to a writable folder)", path, exc, CACHE_ENV)

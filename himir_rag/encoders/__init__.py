"""Encoders: images and texts into one L2-normalised float32 space."""

from __future__ import annotations

from himir_rag.encoders.base import Encoder, RegionEncoder, l2_normalize, set_inference_threads
from himir_rag.errors import ConfigError

__all__ = ["Encoder", "RegionEncoder", "l2_normalize", "set_inference_threads", "get_encoder", "ClipEncoder",
           "OfflineEncoder"]


def get_encoder(spec: str = "offline", *, device: str = "cpu", threads: int | None = None) -> Encoder:
    """Build an encoder from a CLI-style spec.

    Parameters
    ----------
    spec : str
        ``"offline"``, ``"offline:lite2"``, ``"clip"`` (default checkpoint) or
        ``"clip:MODEL_ID_OR_PATH"``.
    device : str
        torch device (``"cpu"``, ``"cuda"``, ``"auto"``).
    threads : int, optional
        torch threads for CPU inference (default 1 unless ``OMP_NUM_THREADS`` is set).
    threads : int, optional
        torch threads for CPU inference (default 1 unless ``OMP_NUM_THREADS`` is set).

    Raises
    ------
    ConfigError
        For an unknown spec.
    """
    kind, _, arg = spec.partition(":")
    if kind == "offline":
        from himir_rag.encoders.offline import OfflineEncoder

        return OfflineEncoder(arg or "lite0", device=device, threads=threads)
    if kind == "clip":
        from himir_rag.encoders.clip import DEFAULT_CLIP_MODEL, ClipEncoder

        return ClipEncoder(arg or DEFAULT_CLIP_MODEL, device=device, threads=threads)
    raise ConfigError(f"encoder {spec!r} is unknown; use 'offline', 'offline:lite2', 'clip' or 'clip:MODEL_OR_PATH'")


def __getattr__(name: str):
    if name == "ClipEncoder":
        from himir_rag.encoders.clip import ClipEncoder

        return ClipEncoder
    if name == "OfflineEncoder":
        from himir_rag.encoders.offline import OfflineEncoder

        return OfflineEncoder
    raise AttributeError(name)

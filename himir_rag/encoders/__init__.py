"""Encoders: images and texts into one L2-normalised float32 space."""

from __future__ import annotations

from himir_rag.encoders.base import Encoder, RegionEncoder, l2_normalize, set_inference_threads
from himir_rag.errors import ConfigError

__all__ = ["Encoder", "RegionEncoder", "l2_normalize", "set_inference_threads", "get_encoder", "saved_encoder_spec",
           "ClipEncoder", "OfflineEncoder"]


def get_encoder(spec: str = "offline", *, device: str = "cpu", threads: int | None = None) -> Encoder:
    """Build an encoder from a CLI-style spec.

    Parameters
    ----------
    spec : str
        ``"offline"``, ``"offline:lite2"``, ``"offline:VARIANT:CLASS_TEXTS"`` (``ensemble``, the
        default, or ``prompt``), ``"clip"`` (default checkpoint) or ``"clip:MODEL_ID_OR_PATH"``.
    device : str
        torch device (``"cpu"``, ``"cuda"``, ``"auto"``).
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

        variant, _, class_texts = arg.partition(":")
        try:
            return OfflineEncoder(variant or "lite0", device=device, threads=threads,
                                  class_texts=class_texts or "ensemble")
        except ValueError as exc:
            raise ConfigError(f"encoder {spec!r}: {exc}") from None
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


def saved_encoder_spec(spec: str, name: str | None) -> str:
    """The spec that rebuilds the encoder an index was saved with.

    Indexes saved before the offline encoder had class-text options recorded the spec
    ``"offline"`` (or ``"offline:lite2"``) and a name without a class-text suffix: they were
    built with one prompt per class, so that is what they are opened with.

    Example
    -------
    >>> saved_encoder_spec("offline", "offline:efficientnet-lite0+all-minilm-l6-v2:top20")
    'offline:lite0:prompt'
    >>> saved_encoder_spec("offline:lite0:ensemble", "offline:efficientnet-lite0+all-minilm-l6-v2:top20:ensemble")
    'offline:lite0:ensemble'
    >>> saved_encoder_spec("offline:efficientnet-lite2+all-minilm-l6-v2:top20", "offline:efficientnet-lite2+all-minilm-l6-v2:top20")
    'offline:lite2:prompt'
    """
    if name is None or not name.startswith("offline:efficientnet-") or not spec.startswith("offline"):
        return spec
    kind, _, arg = spec.partition(":")
    variant, _, class_texts = arg.partition(":")
    if kind == "offline" and class_texts in ("ensemble", "prompt") and "efficientnet-" not in arg:
        return spec  # written by this version
    # "offline", "offline:lite2", or the encoder's name (saved when an encoder object was given)
    variant = name.removeprefix("offline:efficientnet-").split("+", 1)[0]
    return f"offline:{variant}:{'ensemble' if name.endswith(':ensemble') else 'prompt'}"

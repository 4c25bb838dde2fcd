"""Package exceptions. Each also subclasses a builtin, so callers can catch either."""

from __future__ import annotations

__all__ = [
    "HiMIRError",
    "ConfigError",
    "ImageLoadError",
    "IndexFormatError",
    "IncompatibleIndexError",
    "EmptyIndexError",
    "EncoderUnavailableError",
    "MissingDependencyError",
]


class HiMIRError(Exception):
    """Base class of every error raised by himir_rag."""


class ConfigError(HiMIRError, ValueError):
    """A configuration value (layout, threshold, mode...) is invalid."""


class ImageLoadError(HiMIRError, ValueError):
    """An image file cannot be decoded, is too large, or is not an image."""


class IndexFormatError(HiMIRError, ValueError):
    """An index directory is missing files, truncated or otherwise unreadable."""


class IncompatibleIndexError(IndexFormatError):
    """An index was built with another encoder, dimension or format version."""


class EmptyIndexError(HiMIRError, LookupError):
    """A search was asked of an index that holds no image."""


class EncoderUnavailableError(HiMIRError, ImportError):
    """An encoder's model or optional dependency cannot be loaded."""


class MissingDependencyError(HiMIRError, ImportError):
    """An optional dependency himir_rag needs for this call (e.g. faiss) is not installed."""

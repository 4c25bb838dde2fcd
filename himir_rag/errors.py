"""Package exceptions. Each also subclasses a builtin, so callers can catch either."""

from __future__ import annotations

import errno

__all__ = [
    "HiMIRError",
    "ConfigError",
    "ImageLoadError",
    "IndexFormatError",
    "IncompatibleIndexError",
    "EmptyIndexError",
    "EncoderUnavailableError",
    "MissingDependencyError",
    "UntrustedLocationError",
    "IndexLockedError",
    "IndexConflictError",
    "IndexWriteError",
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


class UntrustedLocationError(IndexFormatError):
    """A manifest names a store outside its index directory that the caller did not name again."""


class IndexLockedError(HiMIRError, TimeoutError):
    """Another writer held the index directory's lock for longer than the caller would wait."""


class IndexConflictError(HiMIRError, RuntimeError):
    """Another process saved the index after this copy was loaded; saving would lose its changes."""


class IndexWriteError(HiMIRError, OSError):
    """An index directory cannot be written: disk full, permission denied, read-only file system."""

    @classmethod
    def from_os_error(cls, directory: object, exc: OSError, *, needed_bytes: int | None = None) -> IndexWriteError:
        """A one-line error for ``exc``, raised while writing the index ``directory``; keeps ``exc.errno``."""
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            needed = "" if needed_bytes is None else f": about {_mib(needed_bytes)} MiB needed"
            error = cls(f"disk full while saving {directory}{needed}; free some space or save elsewhere")
        elif exc.errno in (errno.EACCES, errno.EPERM):
            error = cls(f"cannot write {directory}: permission denied")
        elif exc.errno == errno.EROFS:
            error = cls(f"cannot write {directory}: read-only file system")
        else:
            error = cls(f"cannot write {directory}: {exc.strerror or exc}")
        error.errno = exc.errno  # strerror/filename stay unset: they would replace the message in str()
        return error


def _mib(n_bytes: int) -> int:
    return max(1, -(-n_bytes // (1 << 20)))

"""The writer lock of an index directory: one writer at a time, across processes and threads.

Every writer (``save``, ``add(..., checkpoint_dir=...)``, ``himir index``, ``himir tune``)
holds ``INDEX_DIR/.lock`` while it writes. The lock is POSIX advisory locking
(``fcntl.flock``) on that file, plus a per-directory re-entrant thread lock, so a writer
that already holds it (the CLI around ``add``, ``add`` around its checkpoint saves) may take
it again. Readers never take it. It works on local file systems; network file systems
without ``flock`` support (some NFS setups) give no protection. POSIX only.

The holder writes its pid into the lock file, so a writer that gives up can name it.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from himir_rag.errors import IndexLockedError, IndexWriteError

__all__ = ["LOCK_NAME", "DEFAULT_LOCK_TIMEOUT", "lock_index"]

logger = logging.getLogger(__name__)

LOCK_NAME = ".lock"
DEFAULT_LOCK_TIMEOUT = 60.0  # seconds a writer waits for another one by default
_POLL_S = 0.05
_UNLOCKED = -1  # a directory this process cannot write: nothing to lock (no writer of ours can change it)
_READ_ONLY_ERRNOS = (errno.EACCES, errno.EPERM, errno.EROFS)


@dataclass
class _Holding:
    """This process's hold on one directory's lock."""

    thread_lock: threading.RLock = field(default_factory=threading.RLock)
    fd: int | None = None
    depth: int = 0


_HOLDINGS: dict[str, _Holding] = {}
_HOLDINGS_LOCK = threading.Lock()


@contextmanager
def lock_index(directory: str | os.PathLike[str], *, timeout: float | None = DEFAULT_LOCK_TIMEOUT,
               create: bool = False) -> Iterator[None]:
    """Hold the writer lock of the index ``directory`` for the ``with`` block.

    Parameters
    ----------
    directory : path-like
        The index directory (``INDEX_DIR``, not a version inside it).
    timeout : float or None
        Seconds to wait for another writer (logged once); 0 fails at once, None waits forever.
    create : bool
        Create ``directory`` (and its parents) when missing.

    Raises
    ------
    IndexLockedError
        Another writer still held the lock after ``timeout`` seconds; names its pid when known.
    IndexWriteError
        ``directory`` cannot be created (permission denied, read-only file system, disk full).

    Example
    -------
    >>> with lock_index("photos.himir", timeout=10):  # doctest: +SKIP
    ...     index = HiMIRIndex.load("photos.himir"); index.add("new/"); index.save("photos.himir")
    """
    directory = Path(directory)
    if create and not directory.is_dir():  # an existing (maybe read-only) directory is not touched
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise IndexWriteError.from_os_error(directory, exc) from exc
    with _HOLDINGS_LOCK:
        holding = _HOLDINGS.setdefault(os.path.realpath(directory), _Holding())
    deadline = None if timeout is None else time.monotonic() + max(timeout, 0.0)
    if not holding.thread_lock.acquire(timeout=-1 if deadline is None else max(timeout, 0.0)):  # type: ignore[arg-type]
        raise IndexLockedError(f"{directory} is being written by another thread of this process (pid "
                               f"{os.getpid()}); waited {timeout:g} s")
    try:
        if holding.depth == 0:
            holding.fd = _lock_file(directory, deadline, timeout)
        holding.depth += 1
        try:
            yield
        finally:
            holding.depth -= 1
            if holding.depth == 0:
                if holding.fd not in (None, _UNLOCKED):
                    os.close(holding.fd)  # closing the descriptor releases the flock
                holding.fd = None
    finally:
        holding.thread_lock.release()


def _lock_file(directory: Path, deadline: float | None, timeout: float | None) -> int:
    """Open ``directory/.lock`` and flock it exclusively, polling until ``deadline``."""
    fd, writable = _open_lock_file(directory / LOCK_NAME)
    if fd == _UNLOCKED:
        return fd
    waiting = False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if deadline is not None and time.monotonic() >= deadline:
                os.close(fd)
                raise IndexLockedError(
                    f"{directory} is being written by another process ({_holder(directory / LOCK_NAME)}); gave up "
                    f"after {timeout:g} s -- try again when it has finished, or wait longer (--wait SECONDS / "
                    "lock_timeout=)") from None
            if not waiting:  # the holder is read for the messages only, not on every poll
                logger.warning("%s is being written by another process (%s); waiting%s", directory,
                               _holder(directory / LOCK_NAME), "" if timeout is None else f" up to {timeout:g} s")
                waiting = True
            time.sleep(_POLL_S)
        except BaseException:
            os.close(fd)
            raise
    if writable:
        try:  # best effort: only used to name the holder in a waiting writer's message
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError:
            pass
    return fd


def _open_lock_file(path: Path) -> tuple[int, bool]:
    """(descriptor, writable); ``_UNLOCKED`` when the directory is read-only and holds no lock file."""
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644), True
    except OSError as exc:
        if exc.errno not in _READ_ONLY_ERRNOS:
            raise IndexWriteError.from_os_error(path.parent, exc) from exc
    try:  # flock works on a read-only descriptor too
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC), False
    except FileNotFoundError:
        logger.debug("%s is not writable and has no lock file; nothing to lock", path.parent)
        return _UNLOCKED, False


def _holder(path: Path) -> str:
    """'pid N' from the lock file, or 'pid unknown'."""
    try:
        text = path.read_text(encoding="ascii", errors="replace").strip()
    except OSError:
        text = ""
    return f"pid {text}" if text.isdigit() else "pid unknown"

"""Thread counts: query-time work (FAISS's OpenMP pool and torch) and parallel calls (:func:`worker_count`).

A search runs a handful of query vectors: spreading that over several OpenMP threads
costs more in wake-ups than it saves, and on small or shared machines two threads
stall each other (measured on 2 shared cores: 25-30 ms per FAISS search at 2 threads,
0.3-1.4 ms at 1). So query-time work runs on ``HiMIRConfig.search_threads`` threads (default 1); building
keeps every core.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Iterator

__all__ = ["limit_threads", "torch_threads", "worker_count", "MAX_WORKERS"]

_LOCK = threading.RLock()
MAX_WORKERS = 8  # parallel calls (encoder calls of a build, candidate scan shares) at most


def worker_count(threads_each: int = 1) -> int:
    """Parallel calls of ``threads_each`` threads that fit on the cores this process may use (1 to
    :data:`MAX_WORKERS`)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(MAX_WORKERS, cores // threads_each))


@contextlib.contextmanager
def limit_threads(threads: int | None, *, torch: bool = False) -> Iterator[None]:
    """Run the block with FAISS (and, with ``torch=True``, torch) limited to ``threads``; None = unchanged.

    Both pools are process-wide: the previous counts are restored on exit.
    """
    if threads is None:
        yield
        return
    from himir_rag.store.faiss import import_faiss  # here: store.faiss imports this module

    faiss = import_faiss()

    with _LOCK:  # held while switching only: a search must not wait for another to finish
        previous = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(int(threads))
    # never import torch just for this
    torch_pool = torch_threads(threads) if torch and "torch" in sys.modules else contextlib.nullcontext()
    try:
        with torch_pool:
            yield
    finally:
        with _LOCK:
            faiss.omp_set_num_threads(previous)


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Run the block with torch's intra-op pool on ``threads`` threads, restoring its count on exit
    (under the same lock as :func:`limit_threads`).

    With torch's OpenMP backend the count is per thread (a thread that never set one starts
    from the last count set anywhere), so parallel encoder calls each set and restore their own.
    """
    import torch

    with _LOCK:
        previous = torch.get_num_threads()
        if previous != threads:
            torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        if previous != threads:
            with _LOCK:
                torch.set_num_threads(previous)

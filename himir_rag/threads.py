"""Thread counts for query-time work (FAISS's OpenMP pool and torch).

A search runs a handful of query vectors: spreading that over several OpenMP threads
costs more in wake-ups than it saves, and on small or shared machines two threads
stall each other (measured on 2 shared cores: 25-30 ms per FAISS search at 2 threads,
0.3-1.4 ms at 1). So query-time work runs on ``HiMIRConfig.search_threads`` threads (default 1); building
keeps every core.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Iterator

__all__ = ["limit_threads", "torch_threads"]

_LOCK = threading.RLock()


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


_torch_holders = 0  # torch_threads blocks running now, in all threads
_torch_restore = 0  # torch's count before the first of them entered
_torch_depth = threading.local()  # per thread: how many torch_threads blocks it is inside


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Run the block with torch's intra-op pool on ``threads`` threads (under the same lock as
    :func:`limit_threads`: both switch process-wide pools).

    A block nested in another of the same thread gives the outer block's count back on exit;
    blocks running in several threads at once (parallel encoder calls) keep the count until
    the last of them exits, which restores what torch had before the first.
    """
    import torch

    global _torch_holders, _torch_restore
    with _LOCK:
        outer = torch.get_num_threads()
        if _torch_holders == 0:
            _torch_restore = outer
        _torch_holders += 1
        _torch_depth.value = getattr(_torch_depth, "value", 0) + 1
        if outer != threads:
            torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        with _LOCK:
            _torch_holders -= 1
            _torch_depth.value -= 1
            back = _torch_restore if _torch_holders == 0 else outer if _torch_depth.value else None
            if back is not None and torch.get_num_threads() != back:
                torch.set_num_threads(back)

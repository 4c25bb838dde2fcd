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

__all__ = ["limit_threads"]

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
        torch_module = sys.modules.get("torch") if torch else None  # never import torch just for this
        torch_previous = torch_module.get_num_threads() if torch_module is not None else None
        faiss.omp_set_num_threads(int(threads))
        if torch_module is not None and torch_previous != threads:
            torch_module.set_num_threads(int(threads))
    try:
        yield
    finally:
        with _LOCK:
            faiss.omp_set_num_threads(previous)
            if torch_module is not None and torch_previous != threads:
                torch_module.set_num_threads(torch_previous)

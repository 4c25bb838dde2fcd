"""Benchmark data and metrics: composite photo scenes with qrels, and retrieval metrics.

``scenes`` builds the collection (``himir bench build``) from Debian's
``tuxpaint-stamps-default`` photo cut-outs; ``metrics`` scores rankings against its qrels.
"""

from himir_rag.bench.metrics import box_iou, hit_at_k, mrr, ndcg_at_k, percentile, recall_at_k, summarize
from himir_rag.bench.scenes import (
    BenchmarkSummary,
    StampsNotInstalledError,
    build_composite_benchmark,
    load_stamp_catalog,
    read_jsonl,
)

__all__ = [
    "BenchmarkSummary",
    "StampsNotInstalledError",
    "build_composite_benchmark",
    "load_stamp_catalog",
    "read_jsonl",
    "box_iou",
    "hit_at_k",
    "mrr",
    "ndcg_at_k",
    "percentile",
    "recall_at_k",
    "summarize",
]

"""Benchmark data, metrics and harness.

``scenes`` builds the composite photo collection (``himir bench build``) from Debian's
``tuxpaint-stamps-default`` photo cut-outs; ``metrics`` scores rankings against its qrels;
``runner`` runs every mode on it (``himir bench run``); ``scale`` runs the matching engine
on planted synthetic vectors (``himir bench scale``); ``report`` writes report.md/json and
plots. The harness is imported lazily (it pulls in the index and matplotlib).
"""

from himir_rag.bench.metrics import box_iou, hit_at_k, mrr, ndcg_at_k, percentile, recall_at_k, summarize

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
    "run_benchmark",
    "run_scale_benchmark",
    "write_report",
]

_LAZY = {  # scenes pulls in scipy: imported on first use, so `himir --help` stays fast
    "BenchmarkSummary": "himir_rag.bench.scenes",
    "StampsNotInstalledError": "himir_rag.bench.scenes",
    "build_composite_benchmark": "himir_rag.bench.scenes",
    "load_stamp_catalog": "himir_rag.bench.scenes",
    "read_jsonl": "himir_rag.bench.scenes",
    "run_benchmark": "himir_rag.bench.runner",
    "run_scale_benchmark": "himir_rag.bench.scale",
    "write_report": "himir_rag.bench.report",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'himir_rag.bench' has no attribute {name!r}")

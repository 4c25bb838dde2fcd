"""Sweep scheduler settings of mode ``himir`` on a composite benchmark collection.

Usage (a directory written by ``himir bench build`` and indexed by ``himir bench run``)::

    python benchmarks/sweep_scheduler.py /tmp/bench-tune '{}' '{"probe_share": 0.05}' ...

Queries are decomposed (rule decomposer) and encoded once; each setting then runs every
query through ``HiMIRIndex.search_vectors``. Prints Recall@10 against the qrels, the mean
dot products and ``mvr mean / mode mean`` for ``mvr``, ``himir-full`` and each setting.
Use it on a collection built with another ``--seed`` than the one you report on, so the
chosen defaults are not tuned on the evaluation queries.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from himir_rag import HiMIRIndex
from himir_rag.decompose import RuleDecomposer


_COUNTERS = ("candidates", "candidate_dot_products", "coarse_dot_products", "segments_visited",
             "images_pruned")


def main(bench_dir: str, settings: list[str], k: int = 10) -> None:
    root = Path(bench_dir)
    index = HiMIRIndex.load(root / "index")
    queries = [json.loads(line) for line in (root / "queries.jsonl").read_text().splitlines() if line.strip()]
    qrels = {}
    for line in (root / "qrels.jsonl").read_text().splitlines():
        if line.strip():
            item = json.loads(line)
            qrels[item["query_id"]] = {str((root / p).absolute()) for p in item["paths"]}
    splitter = RuleDecomposer()
    work = [(q["id"], index.encoder.embed_texts(splitter.decompose(q["query"]) or [q["query"]])) for q in queries]
    base = index.config
    rows = []
    for name, mode, scheduler in [("mvr", "mvr", {}), ("himir-full", "himir-full", {}),
                                  *[(s, "himir", json.loads(s)) for s in settings]]:
        index.set_config(base.replace(scheduler=scheduler))
        recall, dots, extra = [], [], {}
        for query_id, vectors in work:
            result = index.search_vectors(vectors, k=k, mode=mode)
            found = {hit.path for hit in result.hits}
            recall.append(len(found & qrels[query_id]) / len(qrels[query_id]))
            dots.append(result.stats.dot_products)
            for key in _COUNTERS:
                extra.setdefault(key, []).append(result.stats.extra.get(key, 0))
        rows.append((name, float(np.mean(recall)), float(np.mean(dots)),
                     " ".join(f"{key}={np.mean(values):.0f}" for key, values in extra.items())))
    mvr_dots = rows[0][2]
    print(f"{'setting':60s} Recall@{k}  mean dots  mvr/mode")
    for name, recall, dots, counters in rows:
        print(f"{name:60s} {recall:8.4f} {dots:10.0f} {mvr_dots / dots:8.2f}  {counters}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])

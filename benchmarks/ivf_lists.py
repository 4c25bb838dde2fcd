"""How many of a text sub-query's best vectors an IVF probe finds, by list count and cost.

Usage (a directory written by ``himir bench build`` and indexed by ``himir bench run``)::

    python benchmarks/ivf_lists.py /tmp/bench-tune index-objects-128 [--factors 1,2,3,4] [--spill 1,2]

For the region and the segment level of the saved index, each sub-query's exact top-20 vectors
(rule decomposer over the set's queries) are the truth. Lists are trained here with FAISS's
spherical k-means (``factor * sqrt(n)`` lists, seed 1), each vector assigned to its ``spill``
nearest centroids; a sub-query probes lists in the order of its centroid scores until the cost
(centroids plus the vectors scanned, as ``himir_rag.store.faiss.search_cost`` counts an IVF-Flat
search) reaches a budget. Printed: the share of the top-20 in the probed lists at each budget.
This is what chose ``himir_rag.store.faiss.ivf_nlist``'s ~3 sqrt(n) lists for IVF-Flat levels
(benchmarks/README.md, "Finer IVF-Flat lists"); nothing is saved.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from himir_rag import HiMIRIndex
from himir_rag.decompose import RuleDecomposer
from himir_rag.hierarchy import Level
from himir_rag.store.faiss import import_faiss

_TOP = 20
_BUDGETS = (150, 250, 400, 600, 900)  # dot products a sub-query


def main(bench_dir: str, index_name: str, factors: list[float], spills: list[int]) -> None:
    faiss = import_faiss()
    root = Path(bench_dir)
    index = HiMIRIndex.load(root / index_name)
    queries = [json.loads(line) for line in (root / "queries.jsonl").read_text().splitlines() if line.strip()]
    splitter = RuleDecomposer()
    subqueries = np.concatenate([index.encoder.embed_texts(splitter.decompose(q["query"]) or [q["query"]])
                                 for q in queries]).astype(np.float32)
    snapshot = index.snapshot
    print(f"{len(subqueries)} sub-queries; share of each one's exact top-{_TOP} in the probed lists, by cost")
    for level in (Level.REGION, Level.SEGMENT):
        vectors = np.ascontiguousarray(snapshot.region_vectors(np.flatnonzero(snapshot.levels == level)), np.float32)
        top = np.argsort(-(subqueries @ vectors.T), axis=1)[:, :_TOP]
        for factor in factors:
            n_lists = max(4, int(factor * np.sqrt(len(vectors))))
            kmeans = faiss.Kmeans(vectors.shape[1], n_lists, niter=20, spherical=True, seed=1,
                                  min_points_per_centroid=1, verbose=False)
            kmeans.train(vectors)
            nearest = np.argsort(-(vectors @ kmeans.centroids.T), axis=1)
            order = np.argsort(-(subqueries @ kmeans.centroids.T), axis=1)  # lists, best first, per sub-query
            for spill in spills:
                member = np.zeros((len(vectors), n_lists), bool)
                member[np.arange(len(vectors))[:, None], nearest[:, :spill]] = True
                scanned = np.cumsum(member.sum(axis=0)[order], axis=1)
                cells = []
                for budget in _BUDGETS:
                    if budget <= n_lists:
                        cells.append(f"c{budget}=  -  ")
                        continue
                    probes = np.maximum(1, (scanned < budget - n_lists).sum(axis=1))
                    found = [member[top[i]][:, order[i, :probes[i]]].any(axis=1).mean() for i in range(len(top))]
                    cells.append(f"c{budget}={np.mean(found):.3f}")
                print(f"{level.name.lower():8s} {len(vectors):6d} vectors {n_lists:5d} lists spill {spill}: {' '.join(cells)}")


def _values(args: list[str], name: str, default: str) -> tuple[str, list[str]]:
    if name not in args:
        return default, args
    at = args.index(name)
    return args[at + 1], args[:at] + args[at + 2:]


if __name__ == "__main__":
    rest = sys.argv[1:]
    factor_text, rest = _values(rest, "--factors", "1,2,3,4")
    spill_text, rest = _values(rest, "--spill", "1")
    if len(rest) != 2:
        sys.exit(__doc__)
    main(rest[0], rest[1], [float(f) for f in factor_text.split(",")], [int(s) for s in spill_text.split(",")])

"""Where a scale-benchmark query loses its targets: per missed target, sub-query and candidate
level, the target's best similarity and its rank among the candidate store's hits with 10%
and with all IVF lists probed (an empty rank: not among the top 400 hits).

Usage (a directory written by ``himir bench scale``; query ids from its report)::

    python benchmarks/analyze_misses.py /tmp/s1m q00179,q00176
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from himir_rag import HiMIRIndex
from himir_rag.bench.scale import saved_collection
from himir_rag.hierarchy import Level
from himir_rag.store.candidates import KEY_SHIFT

_HITS = 400


def main(bench_dir: str, query_ids: list[str], k: int = 10) -> None:
    root = Path(bench_dir)
    recipe = json.loads((root / "collection.json").read_text())["recipe"]
    planted, _ = saved_collection(root, recipe)
    by_id = {q.query_id: q for q in planted}
    index = HiMIRIndex.load(root / "index")
    snapshot, stores = index.snapshot, index.candidate_stores
    for query_id in query_ids:
        query = by_id[query_id]
        found = {hit.image_id for hit in index.search_vectors(query.subquery_vectors, k=k).hits}
        print(query_id, "targets", sorted(query.relevant), "found", sorted(found & query.relevant))
        for level in (Level.REGION, Level.SEGMENT):
            _, probed, _, _ = stores.search(level, query.subquery_vectors, _HITS, probe_share=0.1)
            _, every, _, _ = stores.search(level, query.subquery_vectors, _HITS, probe_share=1.0)
            for target in sorted(query.relevant - found):
                rows = snapshot.image_rows(target)
                vectors = snapshot.region_vectors(rows[snapshot.levels[rows] == level])
                for sub, vector in enumerate(query.subquery_vectors):
                    rank = np.flatnonzero((probed[sub] >> KEY_SHIFT) == target)[:1].tolist()
                    rank_all = np.flatnonzero((every[sub] >> KEY_SHIFT) == target)[:1].tolist()
                    print(f"  {level.name.lower():7s} target {target} sub-query {sub}: best similarity "
                          f"{float((vectors @ vector).max()):.3f}, rank with 10% of the lists {rank}, "
                          f"with all {rank_all}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2].split(","))

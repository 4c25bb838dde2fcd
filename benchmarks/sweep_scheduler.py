"""Sweep scheduler settings of mode ``himir`` on a composite benchmark collection.

Usage (a directory written by ``himir bench build`` and indexed by ``himir bench run``)::

    python benchmarks/sweep_scheduler.py /tmp/bench-tune '{}' '{"probe_share": 0.05}' ...

Queries are decomposed (rule decomposer) and encoded once; each setting then runs every
query through ``HiMIRIndex.search_vectors``. Prints Recall@10 against the qrels, the mean
dot products and ``mvr mean / mode mean`` for ``mvr``, ``himir-full`` and each setting, and
``vs-full``: the share of ``himir-full``'s top-10 each setting returns (a measure of how exactly
the pass keeps the exhaustive ranking that does not depend on the qrels).
Use it on a collection built with another ``--seed`` than the one you report on, so the
chosen defaults are not tuned on the evaluation queries.

A directory written by ``himir bench scale`` (it holds ``collection.json``) is swept on its
planted queries instead: ``--range A:B`` picks them (tune on 0:100, report on 100:200),
``himir-full``'s top-k is the reference (cached in ``sweep-full-A-B.json``), ``mvr`` is
skipped, and the median search time is printed too (indicative: one process, no warm-up)::

    python benchmarks/sweep_scheduler.py /tmp/s100k --range 0:100 '{}' '{"pq_error_quantile": 1.0}'

``--stages`` adds one row per pruning stage of the pass, switched off (or on, for the ones
off by default): what each stage saves and what it costs in Recall@10 (``ms`` is the mean
search time of a setting: indicative, one process).

``--index NAME`` sweeps ``BENCH_DIR/NAME`` instead of ``BENCH_DIR/index`` (e.g. ``index-416``
of ``himir bench run --index-dir``). ``--dims-per-code D`` rebuilds the loaded index's
candidate stores first with one 4-bit PQ sub-quantizer per D dimensions in every IVF-PQ level
(the library picks 4 or 8 by the level's size, see ``himir_rag.store.faiss.pq_subquantizers``;
this overrides that rule for the sweep only; nothing is saved). ``--list-ranking R:X`` ranks every IVF store's lists
in ``R`` dimensions with ``X`` x nprobe re-scored, whatever the centroids' energy (the rule in
``himir_rag.store.faiss.ListRanking`` picks 32 or 64 with 2; overridden for the sweep only).
``--no-reference`` (scale directories) skips himir-full's top-k and reports Recall@10 against
the planted targets only::

    python benchmarks/sweep_scheduler.py /tmp/s100k-tune --range 0:200 --dims-per-code 4 '{}' '{"probe_share": 0.1}'
    python benchmarks/sweep_scheduler.py /tmp/bench-tune --index index-416 --dims-per-code 8 '{}'
    python benchmarks/sweep_scheduler.py /tmp/s1m --range 100:200 --no-reference '{}' '{"probe_share": 0.1}'
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from himir_rag import HiMIRIndex
from himir_rag.decompose import RuleDecomposer


_COUNTERS = ("candidates", "candidate_dot_products", "coarse_dot_products", "segments_visited",
             "images_pruned", "levels_skipped")

# --stages: the rows of himir_rag.bench.stages (each pruning stage switched off, or on, in turn);
# `himir bench run --stages` / `himir bench scale --stages` put the same table in their reports
from himir_rag.bench.stages import STAGES, StageQuery, measure_setting  # noqa: E402


def main(bench_dir: str, settings: list[str], k: int = 10, *, index_name: str = "index",
         dims_per_code: int = 0) -> None:
    root = Path(bench_dir)
    index = _load(root / index_name, dims_per_code)
    queries = [json.loads(line) for line in (root / "queries.jsonl").read_text().splitlines() if line.strip()]
    qrels = {}
    for line in (root / "qrels.jsonl").read_text().splitlines():
        if line.strip():
            item = json.loads(line)
            qrels[item["query_id"]] = {str((root / p).absolute()) for p in item["paths"]}
    splitter = RuleDecomposer()
    vectors = [index.encoder.embed_texts(splitter.decompose(q["query"]) or [q["query"]]) for q in queries]
    # himir-full's top-k of each query: the reference the agreement column compares with
    full = [frozenset(hit.path for hit in index.search_vectors(v, k=k, mode="himir-full").hits) for v in vectors]
    work = [StageQuery(v, frozenset(qrels[q["id"]]), ref) for v, q, ref in zip(vectors, queries, full)]
    base = index.config
    rows = []
    for name, mode, scheduler in [("mvr", "mvr", {}), ("himir-full", "himir-full", {}),
                                  *[(s, "himir", _setting(s)) for s in settings]]:
        index.set_config(base.replace(scheduler=scheduler))
        rows.append((name, _measure(index, work, k=k, mode=mode, key=lambda hit: hit.path)))
    mvr_dots = rows[0][1]["dot_products"]
    print(f"{'setting':60s} Recall@{k}  vs-full  mean dots  mvr/mode")
    for name, m in rows:
        print(f"{name:60s} {m['recall@k']:8.4f} {m['agreement']:8.4f} {m['dot_products']:10.0f} "
              f"{mvr_dots / m['dot_products']:8.2f}  ms={m['search_ms_mean']:.0f} {_counters(m)}")


def main_scale(bench_dir: str, settings: list[str], query_range: str, k: int = 10, *, index_name: str = "index",
               dims_per_code: int = 0, reference: bool = True) -> None:
    from himir_rag.bench.scale import saved_collection

    root = Path(bench_dir)
    recipe = json.loads((root / "collection.json").read_text())["recipe"]
    planted, _ = saved_collection(root, recipe)
    start, stop = (int(x) for x in query_range.split(":"))
    planted = planted[start:stop]
    index = _load(root / index_name, dims_per_code)
    cache = root / f"sweep-full-{start}-{stop}.json"
    if not reference:  # recall against the planted targets only (at 1M each exhaustive query takes seconds)
        full = None
    elif cache.is_file():
        full = {q: set(ids) for q, ids in json.loads(cache.read_text()).items()}
    else:
        full = {q.query_id: {h.image_id for h in index.search_vectors(q.subquery_vectors, k=k, mode="himir-full").hits}
                for q in planted}
        cache.write_text(json.dumps({q: sorted(ids) for q, ids in full.items()}))
    if full is not None:
        truth = [len(full[q.query_id] & q.relevant) / len(q.relevant) for q in planted]
        print(f"himir-full Recall@{k} {np.mean(truth):.4f} on queries {start}:{stop}")
    work = [StageQuery(q.subquery_vectors, frozenset(q.relevant), None if full is None else frozenset(full[q.query_id]))
            for q in planted]
    base = index.config
    print(f"{'setting':60s} Recall@{k}  vs-full  mean dots  p50 ms")
    for setting in settings:
        index.set_config(base.replace(scheduler=_setting(setting)))
        index.search_vectors(planted[0].subquery_vectors, k=k)  # builds stores the setting asks for
        m = _measure(index, work, k=k)
        agreement = "-" if m["agreement"] is None else f"{m['agreement']:.4f}"
        print(f"{setting:60s} {m['recall@k']:8.4f} {agreement:>8s} {m['dot_products']:10.0f} "
              f"{m['search_ms_p50']:7.1f}  {_counters(m)}")


def _measure(index: HiMIRIndex, work: list[StageQuery], *, k: int, mode: str = "himir",
             key=lambda hit: hit.image_id) -> dict:
    """One setting over ``work`` (:func:`himir_rag.bench.stages.measure_setting`, with the scheduler's cost counters)."""
    return measure_setting(index, work, k=k, key=key, mode=mode, counters=_COUNTERS)


def _counters(m: dict) -> str:
    return " ".join(f"{name}={value:.0f}" for name, value in m["counters"].items())

def _load(directory: Path, dims_per_code: int) -> HiMIRIndex:
    """The saved index; with ``dims_per_code``, its candidate stores rebuilt with that PQ code size."""
    index = HiMIRIndex.load(directory)
    if dims_per_code:
        import himir_rag.store.candidates as candidates
        from himir_rag.store.candidates import CandidateStores

        candidates.pq_subquantizers = lambda dim, n_vectors=0: dim // dims_per_code if dim % dims_per_code == 0 else 0
        index._candidate_stores = CandidateStores(index.snapshot.dim, threads=index.config.search_threads)
        index.sync_candidate_stores()
        print(f"candidate stores rebuilt with {dims_per_code} dimensions a PQ code")
    return index


def _option(args: list[str], name: str, default: str) -> tuple[str, list[str]]:
    """The value of ``--name VALUE`` in ``args`` (``default`` when absent) and the other arguments."""
    if name not in args:
        return default, args
    at = args.index(name)
    return args[at + 1], args[:at] + args[at + 2:]


def _setting(name: str) -> dict:
    """A JSON setting, or the name of a --stages row."""
    return dict(STAGES[name]) if name in STAGES else json.loads(name)


if __name__ == "__main__":
    args = sys.argv[2:]
    if "--stages" in args:
        args = [a for a in args if a != "--stages"] + list(STAGES)
    index_name, args = _option(args, "--index", "index")
    dims, args = _option(args, "--dims-per-code", "0")
    ranking, args = _option(args, "--list-ranking", "")
    if ranking:  # R:X = lists ranked in R dimensions, X x nprobe re-scored, whatever the centroids' energy
        import himir_rag.store.faiss as faiss_store

        ranking_dims, rerank = ranking.split(":")
        faiss_store._RANKING_DIMS, faiss_store._RANKING_RERANK = (int(ranking_dims),), int(rerank)
        faiss_store._RANKING_ENERGY = 0.0
        print(f"IVF lists ranked in {ranking_dims} dimensions, {rerank} x nprobe re-scored")
    if (Path(sys.argv[1]) / "collection.json").is_file():
        chosen, args = _option(args, "--range", "0:100")
        reference = "--no-reference" not in args
        args = [a for a in args if a != "--no-reference"]
        main_scale(sys.argv[1], args, chosen, index_name=index_name, dims_per_code=int(dims), reference=reference)
    else:
        main(sys.argv[1], args, index_name=index_name, dims_per_code=int(dims))

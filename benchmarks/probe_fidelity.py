"""How well do auto-tuning's probes stand in for real queries? A grid of scheduler settings, side by side.

Usage (a composite set written by ``himir bench build`` and indexed by ``himir bench run --index-dir``)::

    python benchmarks/probe_fidelity.py grid /tmp/bench-tune --index index-416-r5 --out /tmp/lab/grid-s1.jsonl
    python benchmarks/probe_fidelity.py grid /tmp/bench-tune --index index-416-r5 --kinds text,text-r3 --out /tmp/lab/ranks-s1.jsonl
    python benchmarks/probe_fidelity.py defaults /tmp/bench-tune --index index-416-r5
    python benchmarks/probe_fidelity.py rules /tmp/lab/grid-s1.jsonl /tmp/lab/grid-t11.jsonl /tmp/lab/grid-t12.jsonl

``grid`` runs himir-full, the defaults and 90 settings of ``candidate_k`` x ``probe_share`` x
``candidate_pool`` (plus single changes of the other stages) on the set's real queries with
their qrels and on 200 probes of each kind ``--kinds`` names (:mod:`himir_rag.probes`, seed 0,
as :func:`himir_rag.autoconfig.auto_tune` draws them; default ``text,vectors``; ``text-rN``:
text probes whose regions name one of their N nearest words). Each row (one JSON line) holds each
workload's Recall@10 (of the probe's source photo, or of the qrels), agreement with
himir-full's top-10 and median dot products. ``rules`` prints how closely each kind of probe
follows the real queries (correlation of the agreements over the grid, dot products ratio) and
what each selection rule would choose: the real queries' Recall@10 gap to himir-full and dot
products against the defaults. ``defaults`` counts, on 200 and 600 text probes, the probes
himir-full finds and the defaults miss and the other way round, with the sign test's p that
decides whether ``auto_tune``'s recall floor falls to the defaults' recall. Tune rules on
tuning sets only (seeds 1, 11, 12 here).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import sys
from pathlib import Path

import numpy as np

from himir_rag import HiMIRIndex
from himir_rag import autoconfig
from himir_rag.modes import reference_mode
from himir_rag.scheduler import gather

GRID = {"candidate_k": [0, 8, 12, 16, 32], "probe_share": [0.03, 0.06, 0.1, 0.15, 0.2, 0.3], "candidate_pool": [1, 4, 16]}
SINGLE_CHANGES = [{"ann_bound": False}, {"pq_error_quantile": 0.5}, {"sparsity_margin": 0.1}, {"sparsity_margin": 0.2},
                  {"bound_scale": 0.5}, {"consistency_overlap": 0.8, "consistency_margin": 0.0},
                  {"consistency_overlap": 0.6, "consistency_margin": 0.02}]
K = 10


def grid(bench_dir: str, index_name: str, out: str, kinds: tuple[str, ...] = ("text", "vectors")) -> None:
    """Write the grid's rows to ``out``; ``kinds`` the probe workloads besides the real queries:
    ``text``, ``vectors`` or ``text-rN`` (text probes whose regions name one of their N nearest words)."""
    root = Path(bench_dir)
    index, snapshot = _load(root / index_name)
    store = index.image_store
    work = {}
    for kind in kinds:
        ranks = int(kind.removeprefix("text-r")) if kind.startswith("text-r") else 1
        work[kind] = _probe_workload(index, snapshot, count=200, kind="text" if ranks > 1 else kind, ranks=ranks)
    # the real queries as `himir tune --qrels` reads, decomposes (rule decomposer) and encodes them
    queries = [json.loads(line) for line in (root / "queries.jsonl").read_text().splitlines() if line.strip()]
    relevant = autoconfig.read_qrels(str(root / "qrels.jsonl"), queries)
    real, _ = autoconfig._workload(index, [q["query"] for q in queries], relevant, k=K, decomposer=None)
    work["real"] = _with_reference(store, real)
    settings = [None, {}, *[dict(zip(GRID, combo)) for combo in itertools.product(*GRID.values())], *SINGLE_CHANGES]
    with open(out, "w") as sink:
        for params in settings:
            row = {"params": "himir-full" if params is None else params}
            for kind, (workload, reference) in work.items():
                if params is None:
                    trial = autoconfig._trial({}, workload, *reference)
                else:
                    trial = autoconfig._run(index, workload, params, K, _report())
                row[kind] = {"recall": trial.accuracy, "agreement": trial.agreement, "dots": trial.dot_products}
            sink.write(json.dumps(row) + "\n")
            sink.flush()
            print(json.dumps(row), flush=True)


def defaults(bench_dir: str, index_name: str, counts: tuple[int, ...] = (200, 600)) -> None:
    """The defaults against himir-full on text probes: probe Recall@10 of both, the probes himir-full
    finds and the defaults miss / the other way round, and the one-sided sign test's p (auto_tune's
    recall floor falls to the defaults' recall when p >= 0.05)."""
    index, snapshot = _load(Path(bench_dir) / index_name)
    for count in counts:
        workload, reference = _probe_workload(index, snapshot, count=count, kind="text")
        full = autoconfig._trial({}, workload, *reference)
        current = autoconfig._run(index, workload, index.config.scheduler.overrides(), K, _report())
        missed, found, p = autoconfig._sign_test(current, full)
        print(f"{bench_dir} {count} probes: recall himir-full {full.accuracy:.3f} / defaults {current.accuracy:.3f}, "
              f"missed {missed} / found {found}, p {p:.3f}")


def _load(directory):
    """The index and its live snapshot (what auto_tune draws probes from)."""
    index = HiMIRIndex.load(directory)
    store = index.image_store
    return index, gather([(v.snapshot, v.positions) for v in store.scan()], dim=store.dim)


def _probe_workload(index, snapshot, *, count, kind, ranks=1):
    """``count`` probes (seed 0) drawn as auto_tune draws them, with himir-full's reference (see below)."""
    drawn, _ = autoconfig._draw_probes(index, snapshot, count=count, seed=0, kind=kind, ranks=ranks)
    return _with_reference(index.image_store,
                           autoconfig._Workload([p.vectors for p in drawn], [{p.source} for p in drawn]))


def _report():
    """An empty trial log for autoconfig._run (each setting runs once, so nothing is cached across rows)."""
    return autoconfig.TuneReport(chosen=None, target="", k=K, budget_dot_products=None, budget_ms=None, queries=0)


def _with_reference(store, workload):
    """``workload`` with himir-full's top-k (for the agreement) and himir-full's own pass."""
    reference = autoconfig._exhaustive_pass(store, workload.vectors, reference_mode(), K)
    return dataclasses.replace(workload, full_top=[set(f.tolist()) for f in reference[0]]), reference


def _cheapest(rows, probe, *, tolerance=None, min_agreement=0.0, full=None):
    """The cheapest row reaching the floors (himir-full when none does: a simplification of
    ``auto_tune``'s fallback, which never applied on the tuning sets' grids)."""
    ok = [r for r in rows if r[probe]["agreement"] >= min_agreement - 1e-9
          and (tolerance is None or r[probe]["recall"] >= full[probe]["recall"] - tolerance - 1e-9)]
    return min(ok or [full], key=lambda r: r[probe]["dots"])


def _old_rule(rows, probe, full):
    """The fifth and sixth sessions' rule: recall within 0.5 points, agreement within 0.01 of the best."""
    reached = [r for r in rows if r[probe]["recall"] >= full[probe]["recall"] - 0.005 - 1e-9] or [
        max(rows, key=lambda r: r[probe]["recall"])]
    best = max(r[probe]["agreement"] for r in rows) - 0.01
    ok = [r for r in reached if r[probe]["agreement"] >= best - 1e-9]
    return min(ok, key=lambda r: r[probe]["dots"]) if ok else max(reached, key=lambda r: r[probe]["agreement"])


SHARED_RULES = {
    "hand defaults": lambda rows, full, d: d,
    "best possible (real queries: cheapest within 0.5 points)":
        lambda rows, full, d: _cheapest(rows, "real", tolerance=0.005, full=full),
}
# each applied to every kind of probe in the grid files
PROBE_RULES = {
    "old rule (agreement within 0.01 of the best)": lambda rows, full, d, probe: _old_rule(rows, probe, full),
    "recall within 0.5 points (the issue's rule)":
        lambda rows, full, d, probe: _cheapest(rows, probe, tolerance=0.005, full=full),
    "agreement >= 0.94 alone": lambda rows, full, d, probe: _cheapest(rows, probe, min_agreement=0.94, full=full),
    **{f"recall within 0.5 points and agreement >= {a}" + (" (seventh session's)" if a == 0.94 else ""):
       (lambda rows, full, d, probe, a=a: _cheapest(rows, probe, tolerance=0.005, min_agreement=a, full=full))
       for a in (0.92, 0.94, 0.96)},
    "recall within 1 point and agreement >= 0.94":
        lambda rows, full, d, probe: _cheapest(rows, probe, tolerance=0.01, min_agreement=0.94, full=full),
    "recall within 2 points and agreement >= 0.94":
        lambda rows, full, d, probe: _cheapest(rows, probe, tolerance=0.02, min_agreement=0.94, full=full),
    # auto_tune's floors where the defaults' probe recall is not significantly below himir-full's (the sign test
    # that `defaults` prints found so on the three tuning sets at 200 text probes; it is not rerun here, and the
    # grid rows hold neither candidates for auto_tune's every-image filter nor its min_saving): both floors fall
    # to the defaults' own figures when lower
    "recall >= min(himir-full's - 0.5 points, the defaults') and agreement >= min(0.94, the defaults') "
    "(auto_tune's floors, defaults within chance)":
        lambda rows, full, d, probe: _cheapest(rows, probe, min_agreement=min(0.94, d[probe]["agreement"]),
                                               tolerance=full[probe]["recall"] - min(full[probe]["recall"] - 0.005,
                                                                                     d[probe]["recall"]), full=full),
    # relative to the defaults' own agreement on the probes: an offset the probes share cancels
    **{f"recall within 0.5 points and agreement >= the defaults' - {m}":
       (lambda rows, full, d, probe, m=m: _cheapest(rows, probe, tolerance=0.005,
                                                     min_agreement=d[probe]["agreement"] - m, full=full))
       for m in (0.0, 0.01, 0.02)},
}


def rules(paths: list[str]) -> None:
    sets = {Path(p).stem: [json.loads(line) for line in Path(p).read_text().splitlines() if line.strip()] for p in paths}
    # the probe kinds every file holds (grids run with other --kinds share some)
    probes = [kind for kind in next(iter(sets.values()))[0] if kind not in ("params", "real")
              and all(kind in rows[0] for rows in sets.values())]
    print("| probes | " + " | ".join(f"{name}: agreement r / mean abs diff / dots probe:real" for name in sets) + " |")
    for probe in probes:
        cells = []
        for rows in sets.values():
            a = np.array([r[probe]["agreement"] for r in rows[1:]])
            b = np.array([r["real"]["agreement"] for r in rows[1:]])
            ratio = np.median([r[probe]["dots"] / r["real"]["dots"] for r in rows[1:]])
            cells.append(f"{np.corrcoef(a, b)[0, 1]:.3f} / {np.abs(a - b).mean():.3f} / {ratio:.2f}")
        print(f"| {probe} | " + " | ".join(cells) + " |")
    print()
    print("| rule | " + " | ".join(f"{name}: real Recall@10 gap (points) / dots vs defaults" for name in sets) + " |")
    table = [(name, None, rule) for name, rule in SHARED_RULES.items()]
    table += [(f"{probe} probes, {name}", probe, lambda rows, full, d, rule=rule, probe=probe: rule(rows, full, d, probe))
              for probe in probes for name, rule in PROBE_RULES.items()]
    for name, probe, rule in table:
        cells = []
        for rows in sets.values():
            full, defaults = rows[0], rows[1]
            tuned_on = probe or "real"  # the workload the rule tunes on
            pruning = [r for r in rows[1:] if r[tuned_on]["dots"] < full[tuned_on]["dots"]]
            chosen = rule(pruning, full, defaults)
            gap = (chosen["real"]["recall"] - full["real"]["recall"]) * 100
            cells.append(f"{gap:+.2f} / {chosen['real']['dots'] / defaults['real']['dots']:.2f}x")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    if command == "grid":
        index_name = args[args.index("--index") + 1] if "--index" in args else "index"
        kinds = tuple(args[args.index("--kinds") + 1].split(",")) if "--kinds" in args else ("text", "vectors")
        grid(args[0], index_name, args[args.index("--out") + 1], kinds)
    elif command == "rules":
        rules(args)
    elif command == "defaults":
        defaults(args[0], args[args.index("--index") + 1] if "--index" in args else "index")
    else:
        raise SystemExit(f"unknown command {command!r}: use grid, rules or defaults")

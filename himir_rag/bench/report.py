"""Benchmark report: ``report.json``, ``report.md`` and PNG plots from a run's report dict.

:func:`write_report` takes the dict built by :func:`himir_rag.bench.runner.run_benchmark`
(``kind="composite"``) or :func:`himir_rag.bench.scale.run_scale_benchmark`
(``kind="scale"``); sections whose data is absent are left out. Plots use matplotlib's Agg
backend (no display needed).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from himir_rag.info import describe_autoconfig

__all__ = ["write_report", "render_markdown", "summary_tables", "plot_report"]

_QUALITY = ("recall@1", "recall@5", "recall@10", "ndcg@10", "mrr")
_STAGES = ("decompose", "encode", "search", "total")
_MODE_COLORS = {"single": "#9e9e9e", "mvr": "#f58231", "himir-full": "#4363d8", "himir": "#3cb44b"}


def write_report(report: dict[str, Any], out_dir: str | Path, *, plots: bool = True) -> dict[str, Path]:
    """Write plots (unless ``plots=False``), ``report.json`` and ``report.md`` into ``out_dir``.

    The plot file names are stored in ``report["plots"]`` (relative to ``out_dir``).

    Returns
    -------
    dict
        ``{"json": path, "markdown": path, <plot name>: path, ...}``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    drawn = plot_report(report, out_dir) if plots else {}
    report["plots"] = {name: path.name for name, path in drawn.items()}
    json_path, md_path = out_dir / "report.json", out_dir / "report.md"
    json_path.write_text(json.dumps(report, indent=1, default=_json_default) + "\n", encoding="utf-8")
    md_path.write_text(render_markdown(report), encoding="utf-8")
    return {"json": json_path, "markdown": md_path, **drawn}


def _json_default(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else str(value)


# -- markdown ----------------------------------------------------------------------------------
def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "**no**"
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer()):
        return f"{int(value):,}"
    if isinstance(value, float):
        return f"{value:,.{digits}f}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_fmt(cell) if not isinstance(cell, str) else cell for cell in row) + " |"
              for row in rows]
    return "\n".join(lines)


def summary_tables(report: Mapping[str, Any]) -> str:
    """Quality, compute, latency and target tables (markdown), as printed by the CLI."""
    modes: Mapping[str, Any] = report["modes"]
    mvr_mean = modes.get("mvr", {}).get("dot_products", {}).get("mean")
    parts = ["Retrieval quality (mean over queries)\n",
             _table(["mode", "Recall@1", "Recall@5", "Recall@10", "nDCG@10", "MRR@10"],
                    [[m] + [s[name] for name in _QUALITY] for m, s in modes.items()]),
             "\nDot products per query (query vectors x stored region vectors)\n",
             _table(["mode", "median", "mean", "images scored (mean)", "mvr mean / mode mean"],
                    [[m, s["dot_products"]["median"], s["dot_products"]["mean"], s["images_scored"],
                      (mvr_mean / s["dot_products"]["mean"]) if mvr_mean and s["dot_products"]["mean"] else None]
                     for m, s in modes.items()]),
             "\nLatency per query, ms (p50 / p95"
             + (", after an untimed warm pass over the same queries)\n" if report.get("config", {}).get("warm_pass")
                else ")\n"),
             _table(["mode"] + list(_STAGES) + ["first query (warm-up)"],
                    [[m] + [_pair(s["latency_ms"].get(stage)) for stage in _STAGES]
                     + [_fmt(report.get("first_query_ms", {}).get(m), 1)] for m, s in modes.items()])]
    parts += _region_encodings_table(report)
    if report.get("targets"):
        parts += ["\nTargets\n", _table(["target", "measured", "met"],
                                        [[t["target"], _fmt(t["value"], 2) + ("" if t["value"] is None else f" {t['unit']}"),
                                          "-" if t["met"] is None else _fmt(t["met"])] for t in report["targets"]])]
    return "\n".join(parts) + "\n"


def _region_encodings_table(report: Mapping[str, Any]) -> list[str]:
    """Region encodings side by side (``--region-encoding crops,roi``): Recall@10 per mode, the
    himir-full grounding hit rate and indexing photos/s of each encoding's index."""
    encodings: Mapping[str, Any] = report.get("region_encodings") or {}
    if not encodings:
        return []
    mode_names = list(next(iter(encodings.values()))["modes"])
    rows = []
    for name, run in encodings.items():
        indexing, grounding = run.get("indexing") or {}, run.get("grounding") or {}
        speed = (_fmt(indexing.get("images_per_s"), 2) + ("" if not indexing.get("reused") else " (earlier build)")
                 if indexing.get("measured") else "not measured (reused index)")
        rows.append([name] + [run["modes"][m]["recall@10"] for m in mode_names]
                    + [(grounding.get("hit_rate") or {}).get("himir-full"), speed])
    return ["\nRegion encodings side by side (Recall@10 per mode; grounding = himir-full hit rate)\n",
            _table(["encoding"] + mode_names + ["grounding", "indexing photos/s"], rows)]


def _stages_section(report: Mapping[str, Any]) -> list[str]:
    if not report.get("stages"):
        return []
    from himir_rag.bench.stages import stage_markdown

    return ["## Pruning stages of himir (each switched off, or on, against the index's settings)\n",
            *stage_markdown(report["stages"], k=max(int(report.get("config", {}).get("k", 10)), 10)), ""]


def _pair(stage: Mapping[str, float] | None) -> str:
    if not stage:
        return "-"
    digits = 2 if stage["p95"] < 10 else 1
    return f"{stage['p50']:.{digits}f} / {stage['p95']:.{digits}f}"


def render_markdown(report: Mapping[str, Any]) -> str:
    """The whole report as markdown (``report.md``)."""
    kind = report.get("kind", "composite")
    title = "HiMIR composite photo benchmark" if kind == "composite" else "HiMIR synthetic-vector scale benchmark"
    parts = [f"# {title}\n", _header(report)]
    if report.get("skipped_modes"):
        parts.append("Skipped modes (not available in this build; not faked):\n")
        parts += [f"- `{mode}`: {reason}" for mode, reason in report["skipped_modes"].items()]
        parts.append("")
    parts.append("## Results\n")
    parts.append(summary_tables(report))
    ratios = report.get("comparison", {}).get("dot_products_ratio", {})
    if ratios:
        parts.append("Dot-product ratios: " + "; ".join(
            f"{name} = {r['mean']:.2f}x (means), {r['median']:.2f}x (medians), {r['per_query_median']:.2f}x "
            "(median per-query ratio)" for name, r in ratios.items()) + "\n")
    parts += _indexing_section(report) + _memory_section(report) + _grounding_section(report)
    parts += _stages_section(report)
    if report.get("plots"):
        parts.append("## Plots\n")
        parts += [f"![{name}]({path})\n" for name, path in report["plots"].items()]
    return "\n".join(parts).rstrip() + "\n"


def _header(report: Mapping[str, Any]) -> str:
    machine, config, bench = report.get("machine", {}), report.get("config", {}), report.get("benchmark", {})
    lines = [f"- created: {report.get('created_at', '-')}, wall time {report.get('wall_s', 0):.0f} s",
             f"- machine: {machine.get('cpu_count')} CPUs, {machine.get('platform')}, python {machine.get('python')}, "
             f"numpy {machine.get('numpy')}" + (f", torch {machine['torch']} ({machine.get('torch_threads')} threads)"
                                                 if "torch" in machine else "")
             + (f"; load average {machine['load_average']} (1/5/15 min, at report time)"
                if machine.get("load_average") else "")]
    lines.append("- benchmark: " + ", ".join(f"{k}={v}" for k, v in bench.items() if v is not None))
    lines.append("- config: " + ", ".join(f"{k}={v}" for k, v in config.items() if v is not None))
    if "autoconfig" in report:  # reports since auto-tuning is on by default
        lines.append("- scheduler parameters: " + describe_autoconfig(report["autoconfig"]))
    return "\n".join(lines) + "\n"


def _indexing_section(report: Mapping[str, Any]) -> list[str]:
    indexing, alone = report.get("indexing") or {}, report.get("encoder_throughput") or {}
    index = report.get("index") or {}
    if not indexing and not index:
        return []
    rows = []
    if (report.get("collection") or {}).get("build_s") is not None:
        rows.append(["synthetic collection drawn and assembled (s)", report["collection"]["build_s"]])
    if indexing.get("measured"):
        rows += [["images indexed", indexing["images"]], ["crops encoded", indexing["crops_encoded"]],
                 ["indexing time (s)", indexing["seconds"]],
                 ["encoder load (s, not in indexing time)", indexing.get("encoder_load_s")],
                 ["indexing throughput (images/s)", indexing["images_per_s"]],
                 ["indexing throughput (crops/s)", indexing["crops_per_s"]]]
        if indexing.get("reused"):
            rows.append(["(figures from the first build; this run reused the saved index)", ""])
    elif indexing:
        rows.append(["indexing", "reused an existing index: throughput not measured in this run"])
    if alone.get("crops"):
        label = (f"encoder alone (regions/s; {alone['crops']} regions of {alone['images']} images, one pass each)"
                 if alone.get("region_encoding") == "roi" else
                 f"encoder alone (crops/s; {alone['crops']} crops of {alone['images']} images, batch {alone['batch_size']})")
        rows += [[label, alone["crops_per_s"]], ["encoder alone (ms per crop)", alone["ms_per_crop"]]]
        if indexing.get("measured"):
            rows.append(["indexing crops/s as a share of the encoder's", indexing["crops_per_s"] / alone["crops_per_s"]])
    for key, label in (("bytes_on_disk", "index size on disk (MiB)"), ("vector_bytes", "vectors in memory (MiB)")):
        if index.get(key) is not None:
            rows.append([label, index[key] / 2**20])
    for key in ("regions", "global", "region", "segment"):
        if key in index:
            rows.append([f"stored {key if key != 'regions' else 'vectors (all levels)'}", index[key]])
    return ["## Indexing\n", _table(["", "value"], rows), ""]


def _memory_section(report: Mapping[str, Any]) -> list[str]:
    memory = report.get("memory") or {}
    rows = []
    build = (report.get("indexing") or {}).get("memory") or memory.get("build")
    if build:
        rows.append(["index build", build["start_rss_mb"], build["peak_rss_mb"]])
    if memory.get("search"):
        rows.append(["queries (all modes)", memory["search"]["start_rss_mb"], memory["search"]["peak_rss_mb"]])
    if not rows:
        return []
    note = f"Process lifetime peak RSS (getrusage ru_maxrss): {memory.get('process_peak_rss_mb', 0):,.0f} MiB.\n"
    return ["## Memory (RSS, MiB; sampled every 50 ms with psutil)\n",
            _table(["phase", "RSS at start", "peak RSS"], rows), "", note]


def _grounding_section(report: Mapping[str, Any]) -> list[str]:
    grounding = report.get("grounding")
    if not grounding or not grounding.get("n_subqueries"):
        return []
    names = list(grounding["hit_rate"])
    rows = [["all sizes", grounding["n_subqueries"]] + [grounding["hit_rate"][n] for n in names],
            ["mean IoU", ""] + [grounding["mean_iou"][n] for n in names]]
    if grounding.get("reachable_rate"):
        rows.append(["geometric ceiling (some region has IoU >= threshold)", ""]
                    + [grounding["reachable_rate"][n] for n in names])
    rows += [[label, bucket["n"]] + [bucket.get(n) for n in names] for label, bucket in grounding["by_size"].items()]
    share = grounding.get("himir_full_level_share", {})
    return [f"## Region grounding (reported box on the source scene, IoU >= {grounding['threshold']})\n",
            "Each sub-query matched to an object name of the query's source scene (oracle: exact names; "
            "other decomposers: string containment) is scored against every stored region of that scene; "
            "a hit is when the box overlaps the object's ground-truth box with IoU >= the threshold: for a "
            "level, its best region; for a mode (mvr, himir-full), the focus box a search reports "
            "(RegionMatch.bbox) over the levels it matches; 'himir-full region' is himir-full's best "
            "region's own box (RegionMatch.region_bbox). The ceiling counts stored regions only.\n",
            _table(["objects", "n", *names], rows), "",
            "Level himir-full picks: " + ", ".join(f"{k} {v:.0%}" for k, v in share.items()) + "\n"]


# -- plots -------------------------------------------------------------------------------------
def plot_report(report: Mapping[str, Any], out_dir: Path) -> dict[str, Path]:
    """Quality, compute, latency, trade-off (and grounding) PNGs; returns ``{name: path}``."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    modes: Mapping[str, Any] = report["modes"]
    if not modes:
        return {}
    plots = {}
    for name, draw in (("quality", _plot_quality), ("compute", _plot_compute), ("latency", _plot_latency),
                       ("tradeoff", _plot_tradeoff), ("grounding", _plot_grounding)):
        fig = draw(plt, report)
        if fig is None:
            continue
        path = out_dir / f"{name}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        plots[name] = path
    return plots


def _grouped_bars(ax: Any, groups: list[str], series: dict[str, list[float]], *, colors: dict[str, str] | None = None,
                  label_fmt: str = "{:.2f}") -> None:
    width = 0.8 / max(1, len(series))
    for i, (label, values) in enumerate(series.items()):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        bars = ax.bar(xs, values, width, label=label, color=(colors or {}).get(label))
        ax.bar_label(bars, labels=[label_fmt.format(v) for v in values], fontsize=7, padding=1)
    ax.set_xticks(range(len(groups)), groups)


def _plot_quality(plt: Any, report: Mapping[str, Any]) -> Any:
    modes = report["modes"]
    fig, ax = plt.subplots(figsize=(8, 4))
    _grouped_bars(ax, ["Recall@1", "Recall@5", "Recall@10", "nDCG@10", "MRR@10"],
                  {m: [s[q] for q in _QUALITY] for m, s in modes.items()}, colors=_MODE_COLORS)
    ax.set_ylim(0, 1.08)
    ax.set_title("Retrieval quality per mode")
    ax.legend(fontsize=8)
    return fig


def _plot_compute(plt: Any, report: Mapping[str, Any]) -> Any:
    modes = report["modes"]
    fig, ax = plt.subplots(figsize=(6, 4))
    _grouped_bars(ax, list(modes), {"median": [s["dot_products"]["median"] for s in modes.values()],
                                    "mean": [s["dot_products"]["mean"] for s in modes.values()]},
                  label_fmt="{:,.0f}")
    ax.set_yscale("log")
    ax.set_ylabel("dot products per query (log)")
    ax.set_title("Matching computation per query")
    ax.legend(fontsize=8)
    return fig


def _plot_latency(plt: Any, report: Mapping[str, Any]) -> Any:
    modes = report["modes"]
    stages = [s for s in ("decompose", "encode", "search") if any(s in m["latency_ms"] for m in modes.values())]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, pct in zip(axes, ("p50", "p95")):
        _grouped_bars(ax, list(modes), {stage: [m["latency_ms"].get(stage, {}).get(pct, 0.0) for m in modes.values()]
                                        for stage in stages}, label_fmt="{:.1f}")
        ax.set_title(f"latency {pct} per query (ms)")
        ax.legend(fontsize=8)
    return fig


def _plot_tradeoff(plt: Any, report: Mapping[str, Any]) -> Any:
    modes = report["modes"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for mode, s in modes.items():
        ax.scatter(s["dot_products"]["mean"], s["recall@10"], s=60, color=_MODE_COLORS.get(mode), label=mode)
        ax.annotate(mode, (s["dot_products"]["mean"], s["recall@10"]), fontsize=8, xytext=(4, 4),
                    textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("mean dot products per query (log)")
    ax.set_ylabel("Recall@10")
    ax.set_title("Accuracy vs computation")
    return fig


def _plot_grounding(plt: Any, report: Mapping[str, Any]) -> Any:
    grounding = report.get("grounding")
    if not grounding or not grounding.get("n_subqueries"):
        return None
    names = list(grounding["hit_rate"])
    fig, ax = plt.subplots(figsize=(8, 4))
    series = {"all": [grounding["hit_rate"][n] or 0.0 for n in names]}
    if grounding.get("reachable_rate"):
        series["ceiling (all)"] = [grounding["reachable_rate"][n] or 0.0 for n in names]
    series.update({label: [b.get(n) or 0.0 for n in names] for label, b in grounding["by_size"].items() if b["n"]})
    _grouped_bars(ax, names, series)
    ax.set_ylim(0, 1.08)
    ax.set_title(f"Best region overlaps the object (IoU >= {grounding['threshold']}), by level / mode")
    ax.legend(fontsize=8)
    return fig

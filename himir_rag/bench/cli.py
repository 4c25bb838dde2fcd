"""`himir bench ...` commands: build the composite benchmark, run every mode on it, scale test."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Optional

import typer

from himir_rag.config import HiMIRConfig, focus_overrides
from himir_rag.errors import HiMIRError
from himir_rag.modes import mode_names

bench_app = typer.Typer(no_args_is_help=True, add_completion=False,
                        help="Benchmarks: composite photos, all modes side by side, scale.")

_ALL_MODES = ",".join(mode_names())
_MODES_HELP = f"Comma-separated modes: {', '.join(mode_names())}."


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=1)


def _parse_scheduler(text: str | None) -> dict | None:
    if text is None:
        return None
    try:
        values = json.loads(text)
    except json.JSONDecodeError as exc:
        raise typer.BadParameter(f"{text!r} is not JSON ({exc}); e.g. '{{\"index_kind\": \"flat\"}}'") from exc
    if not isinstance(values, dict):
        raise typer.BadParameter(f"{text!r} is not a JSON object of scheduler parameters")
    return values


def _parse_size(text: str) -> tuple[int, int]:
    width, sep, height = text.lower().partition("x")
    if not sep or not width.strip().isdigit() or not height.strip().isdigit():
        raise typer.BadParameter(f"{text!r} is not WIDTHxHEIGHT, e.g. 640x480")
    return int(width), int(height)


@bench_app.command("build")
def build_command(
    out_dir: Path = typer.Argument(..., help="Output directory (images/, scenes.jsonl, queries.jsonl, qrels.jsonl)."),
    scenes: int = typer.Option(400, min=1, help="Number of scene images."),
    queries: int = typer.Option(150, min=1, help="Number of queries (2-3 objects each)."),
    seed: int = typer.Option(0, help="Seed of every random choice (same seed: same benchmark)."),
    size: str = typer.Option("640x480", help="Scene size WIDTHxHEIGHT."),
    stamps_dir: Optional[Path] = typer.Option(None, help="Tux Paint stamps folder (default: the installed package)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bar on stderr."),
    templates: str = typer.Option("v1", help="Query phrasings: v1 (default) or v2 (the held-out set)."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Build the composite photo benchmark from Debian's tuxpaint-stamps-default cut-outs."""
    from himir_rag.bench.scenes import StampsNotInstalledError, build_composite_benchmark

    _setup_logging(verbose)
    try:
        summary = build_composite_benchmark(out_dir, scenes=scenes, queries=queries, seed=seed,
                                            image_size=_parse_size(size), stamps_dir=stamps_dir, progress=progress,
                                            templates=templates)
    except StampsNotInstalledError as exc:
        _fail(f"{exc}\nThe benchmark needs the photo cut-outs of Debian's tuxpaint-stamps-default (GPL-2, not "
              "shipped with himir-rag). Install them with:\n    sudo apt-get install tuxpaint-stamps-default\n"
              "or run benchmarks/install_stamps.sh, or pass --stamps-dir.")
        return
    except (HiMIRError, ValueError, OSError) as exc:
        _fail(str(exc))
        return
    typer.echo(f"wrote {summary.n_scenes} scenes ({summary.n_objects} objects from {summary.n_stamps} stamps) and "
               f"{summary.n_queries} queries to {summary.out_dir}. Next: himir bench run {summary.out_dir}")


@bench_app.command("run")
def run_command(
    out_dir: Path = typer.Argument(..., help="A directory written by `himir bench build`."),
    modes: str = typer.Option(_ALL_MODES, help=_MODES_HELP),
    encoder: str = typer.Option("offline", help="offline | offline:lite2 | clip | clip:MODEL_OR_PATH"),
    decomposer: str = typer.Option("rule", help="rule | oracle (ground-truth object names) | llm (HIMIR_LLM) | none"),
    layout: str = typer.Option("1+4+16", help="Hierarchy 1+M+N (when the index is built)."),
    image_decomposer: str = typer.Option(HiMIRConfig.decomposer, "--image-decomposer",
                                         help="objects | grid | segments: how a new index cuts photos into regions "
                                         "(a reused index must match: grid for one saved before objects was the default)."),
    segment_work_size: int = typer.Option(128, "--segment-work-size", min=16,
                                          help="Longest side segments/objects segment a new index's photos at."),
    k: int = typer.Option(10, min=1, help="Hits per query (at least 10 are retrieved for Recall@10)."),
    limit_queries: Optional[int] = typer.Option(None, "--limit-queries", min=1, help="Run only the first N queries."),
    index_dir: Optional[list[Path]] = typer.Option(
        None, "--index-dir", metavar="DIR", help="Index of OUT_DIR/images: reused when it exists, built there when not; once per "
        "--region-encoding [default: OUT_DIR/index, OUT_DIR/index-roi]."),
    region_encoding: str = typer.Option("crops", "--region-encoding",
                                        help="crops | roi | crops,roi (one index each, side by side in the report)."),
    device: str = typer.Option("cpu", help="cpu | cuda | auto (encoder device)."),
    batch_size: int = typer.Option(2, "--batch-size", min=1, help="Crops per encoder batch (new index)."),
    throughput_images: int = typer.Option(20, min=0, help="Images whose crops time the encoder alone (0: skip)."),
    plots: bool = typer.Option(True, "--plots/--no-plots", help="Draw PNG plots."),
    report_dir: Optional[Path] = typer.Option(None, "--report-dir", help="Where the report goes (default OUT_DIR)."),
    torch_threads: Optional[int] = typer.Option(None, "--torch-threads", min=1,
                                                help="torch threads of the encoder (default: 1 on CPU, or torch's own "
                                                     "count when OMP_NUM_THREADS is set)."),
    scheduler: Optional[str] = typer.Option(None, "--scheduler",
                                            help='Scheduler parameters of mode himir as JSON, e.g. \'{"probe_share": 0.2}\'.'),
    focus_temperature: Optional[float] = typer.Option(
        None, "--focus-temperature", help="Temperature of the reported boxes grounding scores, for this run "
        "[default: the index's]."),
    focus_spread: Optional[float] = typer.Option(
        None, "--focus-spread", help="Spread of the reported boxes grounding scores, for this run [default: the index's]."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bars on stderr."),
    stages: bool = typer.Option(False, "--stages", help="Add the per-stage table of the scheduled pass (each "
                                "pruning stage switched off or on in turn: its savings and its Recall@10 cost)."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Index OUT_DIR/images once, run every mode on the same queries, write OUT_DIR/report.{md,json} and plots."""
    from himir_rag.bench.runner import run_benchmark

    _setup_logging(verbose)
    try:
        report = run_benchmark(out_dir, modes=modes, encoder=encoder, decomposer=decomposer, layout=layout, k=k,
                               limit_queries=limit_queries, index_dir=index_dir or None, device=device, batch_size=batch_size,
                               throughput_images=throughput_images, plots=plots, report_dir=report_dir,
                               scheduler=_parse_scheduler(scheduler), torch_threads=torch_threads,
                               progress=progress, region_encodings=region_encoding, stages=stages,
                               image_decomposer=image_decomposer, segment_work_size=segment_work_size,
                               focus=focus_overrides(focus_temperature, focus_spread))
    except (HiMIRError, ValueError, FileNotFoundError, ImportError) as exc:
        _fail(str(exc))
        return
    _print_report(report, report_dir or out_dir)


@bench_app.command("scale")
def scale_command(
    images: int = typer.Option(100_000, min=1, help="Collection size (synthetic vectors)."),
    dim: int = typer.Option(384, min=8, help="Vector dimension."),
    layout: str = typer.Option("1+4+16", help="Hierarchy 1+M+N."),
    queries: int = typer.Option(200, min=1, help="Queries (2-3 planted sub-queries each)."),
    seed: int = typer.Option(0, help="Seed."),
    modes: str = typer.Option(_ALL_MODES, help=_MODES_HELP),
    k: int = typer.Option(10, min=1, help="Hits per query."),
    distractors: int = typer.Option(30, min=0, help="Hard negatives per query (hold some of its sub-queries)."),
    signal: float = typer.Option(2.0, min=0.01, help="Strength of a planted sub-query in a region that holds it."),
    out: Path = typer.Option(Path("himir-bench-scale"), "--out", help="Report directory."),
    scheduler: Optional[str] = typer.Option(None, "--scheduler",
                                            help='Scheduler parameters of mode himir as JSON, e.g. \'{"probe_share": 0.2}\'.'),
    precision: str = typer.Option("float32", help="Stored vector type: float32 | float16 (1M images: float16)."),
    save: bool = typer.Option(True, "--save/--no-save",
                              help="Save the index to OUT/index and query the reloaded copy (first query after load)."),
    reuse: bool = typer.Option(False, "--reuse", help="Load OUT/index saved by an earlier run of the same recipe "
                                                      "instead of rebuilding (--scheduler then overrides its settings)."),
    query_range: Optional[str] = typer.Option(None, "--query-range", help="Evaluate planted queries A:B only."),
    plots: bool = typer.Option(True, "--plots/--no-plots", help="Draw PNG plots."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bars on stderr."),
    stages: bool = typer.Option(False, "--stages", help="Add the per-stage table of the scheduled pass."),
    warm_pass: bool = typer.Option(False, "--warm-pass", help="Run every query once, untimed, in each mode before "
                                   "the timed pass (latency with the index's pages already in the page cache)."),
    auto_tune: bool = typer.Option(False, "--auto-tune", help="Tune the scheduler on probes drawn from the "
                                   "collection before the timed pass, as indexing does (not with --scheduler)."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Matching engine at scale: synthetic vectors with planted multi-object targets (no encoder)."""
    from himir_rag.bench.scale import run_scale_benchmark

    _setup_logging(verbose)
    try:
        report = run_scale_benchmark(out, images=images, dim=dim, layout=layout, queries=queries, seed=seed,
                                     modes=modes, k=k, signal=signal, distractors=distractors, plots=plots,
                                     scheduler=_parse_scheduler(scheduler), precision=precision, save=save,
                                     reuse=reuse, query_range=_parse_range(query_range), progress=progress,
                                     stages=stages, warm_pass=warm_pass, auto_tune=auto_tune)
    except (HiMIRError, ValueError, MemoryError) as exc:
        _fail(str(exc))
        return
    _print_report(report, out)


def _parse_range(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    start, sep, stop = text.partition(":")
    if not sep or not start.isdigit() or not stop.isdigit() or int(start) >= int(stop):
        raise typer.BadParameter(f"{text!r}: expected A:B with 0 <= A < B, e.g. 0:100")
    return int(start), int(stop)


def _print_report(report: dict, out_dir: Path) -> None:
    from himir_rag.bench.report import summary_tables

    for mode, reason in report.get("skipped_modes", {}).items():
        typer.secho(f"mode {mode} skipped: {reason}", fg=typer.colors.YELLOW, err=True)
    typer.echo(summary_tables(report))
    typer.echo(f"report: {Path(out_dir) / 'report.md'} (and report.json, *.png)")

"""The ``himir`` command: index, search, demo (and the benchmark/tuning commands)."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

import typer

from himir_rag.config import HiMIRConfig
from himir_rag.errors import HiMIRError
from himir_rag.index import HiMIRIndex, SearchResult
from himir_rag.retriever import result_json

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="HiMIR: hierarchical multi-vector image retrieval for multimodal RAG.")
logger = logging.getLogger("himir_rag.cli")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")


def _set_offline(offline: bool) -> None:
    """``--offline``: no model download (Hugging Face's own switch, read by transformers and himir's clip encoder)."""
    if offline:
        os.environ["HF_HUB_OFFLINE"] = "1"


_OFFLINE_HELP = "Never download models (as HF_HUB_OFFLINE=1); clip: models then come from the HF cache or a folder."


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=1)


@app.command("index")
def index_command(
    images_dir: Path = typer.Argument(..., help="Folder of photos (searched recursively) or one image file."),
    index_dir: Path = typer.Option(..., "--index", help="Index directory (created, or updated when it exists)."),
    encoder: str = typer.Option("offline", help="offline | offline:lite2 | clip | clip:MODEL_OR_PATH"),
    layout: str = typer.Option("1+4+16", help="Hierarchy 1+M+N."),
    decomposer: str = typer.Option("grid", help="Image decomposer: grid | segments."),
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="Crops per encoder batch."),
    device: str = typer.Option("cpu", help="cpu | cuda | auto"),
    prune_cosine: Optional[float] = typer.Option(None, help="Drop segments this similar to their parent (0-1)."),
    precision: str = typer.Option("float16", help="Stored vector type of a new index: float16 (default, half the size) | float32."),
    checkpoint_every: int = typer.Option(256, min=1, help="Save the index every N images (resumable)."),
    store: str = typer.Option("faiss", help="Where region vectors live: faiss (in memory) | qdrant."),
    qdrant_url: Optional[str] = typer.Option(None, help="Qdrant server/cluster URL (with --store qdrant)."),
    qdrant_path: Optional[Path] = typer.Option(None, help="Qdrant embedded local folder (with --store qdrant)."),
    collection: Optional[str] = typer.Option(None, help="Qdrant collection (default: the index folder's name)."),
    ray: Optional[str] = typer.Option(None, "--ray", help="Encode on Ray: local | auto | ray://HOST:PORT."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bar on stderr."),
    auto_tune: Optional[bool] = typer.Option(None, "--auto-tune/--no-auto-tune",
                                             help="Tune the scheduler on probes drawn from the collection when "
                                                  "indexing finishes (>= 300 photos; again after 2x growth) "
                                                  "[default: on, or as the index was built]."),
    follow_symlinks: Optional[bool] = typer.Option(
        None, "--follow-symlinks/--no-follow-symlinks",
        help="Also index (and show) photos whose real path is outside the folder [default: no; kept per index]."),
    thumbnails: bool = typer.Option(False, "--thumbnails", help="Keep 256-px JPEG thumbnails in the index "
                                    "(results still show images when the originals are gone)."),
    offline: bool = typer.Option(False, "--offline", help=_OFFLINE_HELP),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Index a photo folder. Re-running indexes only new or changed files."""
    _setup_logging(verbose)
    _set_offline(offline)
    try:
        index = _open_or_create(index_dir, encoder=encoder, layout=layout, decomposer=decomposer,
                                batch_size=batch_size, device=device, prune_cosine=prune_cosine,
                                precision=precision)
        index.config = index.config.replace(
            thumbnails=index.config.thumbnails or thumbnails,
            follow_symlinks=index.config.follow_symlinks if follow_symlinks is None else follow_symlinks)
        if index.store is None and store != "faiss":
            index.store = _make_store(store, index, qdrant_url=qdrant_url, qdrant_path=qdrant_path,
                                      collection=collection or index_dir.name)
        if auto_tune is not None:
            index.set_config(index.config.replace(auto_tune=auto_tune))
        # checkpoints and the final save happen inside add (crash-safe, resumable)
        report = index.add(images_dir, progress=progress, checkpoint_dir=index_dir,
                           checkpoint_every=checkpoint_every, ray_address=ray)
    except (HiMIRError, FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
        return
    for path, reason in report.skipped:
        typer.echo(f"skipped {path}: {reason}", err=True)
    typer.echo(
        f"indexed {report.added} new, {report.updated} changed, {report.unchanged} unchanged, "
        f"{len(report.skipped)} skipped; {len(index)} images, {report.regions_stored} regions stored "
        f"({report.regions_pruned} pruned) in {report.seconds:.1f}s -> {index_dir}"
    )
    if report.auto_tuned and index.autoconfig is not None:
        record = index.autoconfig
        typer.echo(f"auto-tuned the scheduler on {record['probes']} probes in {record['seconds']:.1f}s: "
                   f"{json.dumps(record['params'])} (probe Recall@{record['k']} {record['recall']:.3f}, "
                   f"himir-full {record['himir_full']['recall']:.3f}; {record['dot_products']:.0f} dot products, "
                   f"before {record['before']['dot_products']:.0f})")


def _make_store(kind: str, index: HiMIRIndex, *, qdrant_url: str | None, qdrant_path: Path | None,
                collection: str) -> Any:
    """The external store of a new index (``--store qdrant``)."""
    if kind != "qdrant":
        raise HiMIRError(f"store {kind!r} is unknown; use faiss or qdrant")
    if len(index):
        raise HiMIRError("this index already keeps its vectors in FAISS; build a new one to use Qdrant")
    if (qdrant_url is None) == (qdrant_path is None):
        raise HiMIRError("--store qdrant needs exactly one of --qdrant-url URL or --qdrant-path FOLDER")
    from himir_rag.store.qdrant import QdrantImageStore

    path = None if qdrant_path is None else str(qdrant_path.absolute())
    return QdrantImageStore.open(collection, dim=index.encoder.dim, url=qdrant_url, path=path)


def _open_or_create(index_dir: Path, *, encoder: str, layout: str, decomposer: str, batch_size: int,
                    device: str, prune_cosine: float | None, precision: str = "float32") -> HiMIRIndex:
    if (index_dir / "CURRENT").exists():
        index = HiMIRIndex.load(index_dir, device=device)
        wanted = HiMIRConfig(layout=layout, decomposer=decomposer)
        if (index.config.layout, index.config.decomposer) != (wanted.layout, wanted.decomposer):
            raise HiMIRError(
                f"{index_dir} was built with layout {index.config.layout} / {index.config.decomposer}, "
                f"asked for {layout} / {decomposer}; use another --index to build a new one"
            )
        if encoder != index.encoder_spec and not index.encoder_spec.startswith(encoder):
            raise HiMIRError(f"{index_dir} was built with encoder {index.encoder_spec!r}, asked for {encoder!r}")
        index.config = index.config.replace(batch_size=batch_size)
        return index
    config = HiMIRConfig(layout=layout, decomposer=decomposer, batch_size=batch_size, precision=precision,
                         **({} if prune_cosine is None else {"prune_cosine": prune_cosine}))
    return HiMIRIndex(encoder, config, device=device)


def _print_result(result: SearchResult) -> None:
    if result.image is not None:
        typer.echo(f"query photo: {result.image}")
    if result.query or result.image is None:
        typer.echo(f"query: {result.query}")
    typer.echo(f"sub-queries: {', '.join(result.subqueries)}")
    for rank, hit in enumerate(result.hits, 1):
        missing = "" if os.path.isfile(hit.path) else "  (missing on disk; `himir relocate` if the folder moved)"
        typer.echo(f"{rank:>3}. {hit.score:.4f}  {hit.path}{missing}")
        for match in hit.regions:
            typer.echo(f"       {match.subquery!r}: {match.level} {list(match.bbox)} sim {match.score:.3f}")
    typer.echo(f"({result.stats.dot_products} dot products, {result.stats.latency_ms.get('total', 0):.1f} ms)")


def _get_decomposer(name: str) -> Any:
    from himir_rag.decompose import get_decomposer

    return get_decomposer(name)


@app.command("search")
def search_command(
    index_dir: Path = typer.Argument(..., help="Index directory."),
    query: Optional[str] = typer.Argument(None, help="The question (or use --queries)."),
    k: int = typer.Option(10, "-k", "--k", help="Number of photos to return."),
    mode: Optional[str] = typer.Option(None, help="himir | himir-full | mvr | single "
                                       "[default: the index's default_mode, himir]"),
    queries: Optional[Path] = typer.Option(None, "--queries", help='JSONL file of {"id", "query"} lines.'),
    image: Optional[Path] = typer.Option(None, "--image", help="Query photo: find photos like it "
                                         "(with QUERY too: photo and text together)."),
    image_weight: float = typer.Option(0.5, "--image-weight", help="Share of the score the photo carries "
                                       "when QUERY is given too (0-1, exclusive)."),
    as_json: bool = typer.Option(False, "--json", help="JSON output."),
    decomposer: str = typer.Option("rule", help="Query decomposer: rule | llm | none"),
    device: str = typer.Option("cpu", help="cpu | cuda | auto"),
    offline: bool = typer.Option(False, "--offline", help=_OFFLINE_HELP),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Search an index with one query (text, --image PHOTO or both), or a JSONL file of queries (model loaded once)."""
    _setup_logging(verbose)
    _set_offline(offline)
    if queries is not None and (query is not None or image is not None):
        _fail("give either a QUERY argument and/or --image PHOTO, or --queries FILE.jsonl, not both")
    if query is None and image is None and queries is None:
        _fail("give either a QUERY argument, --image PHOTO or --queries FILE.jsonl")
    try:
        index = HiMIRIndex.load(index_dir, device=device)
        splitter = _get_decomposer(decomposer)
        if queries is None:
            photo = {} if image is None else {"image": image, "image_weight": image_weight}
            result = index.search(query, k=k, mode=mode, decomposer=splitter, **photo)
            if as_json:
                typer.echo(json.dumps(result_json(result, index=index)))
            else:
                _print_result(result)
            return
        for query_id, text in _read_queries(queries):
            result = index.search(text, k=k, mode=mode, decomposer=splitter)
            if as_json:
                typer.echo(json.dumps(result_json(result, query_id, index=index)))
            else:
                _print_result(result)
    except (HiMIRError, ValueError, FileNotFoundError, ImportError) as exc:
        _fail(str(exc))


def _read_queries(path: Path):
    """Yield (id, query) from a JSONL file; a bad line is an error naming its number."""
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                yield item.get("id", number), str(item["query"])
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
                raise ValueError(f"{path}:{number}: expected a JSON object with a 'query' field ({exc})") from exc


@app.command("relocate")
def relocate_command(
    index_dir: Path = typer.Argument(..., help="Index directory."),
    root: Path = typer.Option(..., "--root", help="The photo folder's new location."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Point an index at its moved photo folder (photos are stored relative to the folder)."""
    _setup_logging(verbose)
    try:
        index = HiMIRIndex.load(index_dir)
        report = index.relocate(root)
        if report.rebased and report.missing == report.rebased:
            _fail(f"none of the {report.rebased} photos exist under {report.root}; index left unchanged "
                  "(check --root: it is the folder that was indexed, at its new place)")
        index.save(index_dir)
    except (HiMIRError, ValueError, FileNotFoundError) as exc:
        _fail(str(exc))
        return
    typer.echo(f"root -> {report.root}: {report.rebased} photos rebased ({report.missing} missing there), "
               f"{report.outside_root} stored outside the root left as they are")


@app.command("demo")
def demo_command(
    out: Path = typer.Option(Path("himir-demo"), help="Folder for the photos, the index and the picture."),
    k: int = typer.Option(3, "-k", help="Photos per question."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Index bundled sample photos (no download), answer example questions, draw the matches."""
    _setup_logging(verbose)
    from himir_rag.demo import DEMO_QUESTIONS, write_demo_photos
    from himir_rag.viz import plot_results

    started = time.perf_counter()
    photos = write_demo_photos(out / "photos")
    typer.echo(f"{len(photos)} sample photos in {out / 'photos'}; loading the offline encoder and indexing...")
    index = HiMIRIndex.build(out / "photos", encoder="offline", progress=True)
    index.save(out / "index")
    results = []
    for question in DEMO_QUESTIONS:
        result = index.search(question, k=k)
        results.append(result)
        typer.echo("")
        _print_result(result)
    picture = out / "matches.png"
    plot_results(results, top=k, path=picture)
    typer.echo(f"\nmatched regions drawn in {picture}; index saved in {out / 'index'} "
               f"({time.perf_counter() - started:.0f}s). Try: himir search {out / 'index'} \"a cat\"")


@app.command("serve")
def serve_command(
    index_dir: Path = typer.Argument(..., help="Index directory."),
    host: str = typer.Option("127.0.0.1", help="Address to bind (127.0.0.1: this machine only)."),
    port: int = typer.Option(8000, min=0, max=65535, help="TCP port."),
    allow_writes: bool = typer.Option(False, "--allow-writes", help="Enable POST /api/index (add photos from a "
                                      "server-side path); read-only otherwise."),
    max_upload_mb: float = typer.Option(20.0, "--max-upload-mb", min=0.001, help="Largest query photo accepted."),
    device: str = typer.Option("cpu", help="cpu | cuda | auto"),
    offline: bool = typer.Option(False, "--offline", help=_OFFLINE_HELP),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Serve an index over HTTP (JSON API + a search page), models loaded once. Needs the [serve] extra."""
    _setup_logging(verbose)
    _set_offline(offline)
    try:
        from himir_rag.server import serve

        mode = "read-write" if allow_writes else "read-only"
        typer.echo(f"himir serve: loading {index_dir}; then http://{host}:{port}/ ({mode})", err=True)
        serve(index_dir, host=host, port=port, allow_writes=allow_writes, device=device,
              max_upload_bytes=int(max_upload_mb * 1024 * 1024))
    except (HiMIRError, ValueError, FileNotFoundError, ImportError, OSError) as exc:
        _fail(str(exc))


@app.command("tune")
def tune_command(
    index_dir: Path = typer.Argument(..., help="Index directory (the chosen config is written into it)."),
    queries: Path = typer.Option(..., "--queries", help='JSONL of {"id", "query"} sample queries.'),
    qrels: Optional[Path] = typer.Option(None, "--qrels", help='JSONL of {"query_id", "paths": [...]} labels.'),
    budget_dot_products: Optional[float] = typer.Option(None, "--budget-dot-products", help="Median per query."),
    budget_ms: Optional[float] = typer.Option(None, "--budget-ms", help="p50 search latency per query."),
    k: int = typer.Option(10, "-k", "--k", min=1),
    limit: int = typer.Option(200, help="Use at most this many queries."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Report only; do not write the config."),
    as_json: bool = typer.Option(False, "--json"),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Tune the scheduler for the best Recall@k (or agreement with himir-full) under a budget."""
    _setup_logging(verbose)
    from himir_rag.autoconfig import apply, read_qrels, tune

    if budget_dot_products is not None and budget_ms is not None:
        _fail("give --budget-dot-products or --budget-ms, not both")
    try:
        index = HiMIRIndex.load(index_dir)
        items = [{"id": qid, "query": text} for qid, text in _read_queries(queries)][:limit]
        relevant = read_qrels(str(qrels), items) if qrels is not None else None
        report = tune(index, [q["query"] for q in items], relevant=relevant, k=k,
                      budget_dot_products=budget_dot_products, budget_ms=budget_ms)
        if not dry_run:
            apply(index, report)
            index.save(index_dir)
    except (HiMIRError, ValueError, FileNotFoundError) as exc:
        _fail(str(exc))
        return
    if as_json:
        typer.echo(json.dumps(report.to_dict()))
        return
    chosen, mvr, full = report.chosen, report.baselines["mvr"], report.baselines["himir-full"]
    typer.echo(f"target: {report.target}@{report.k} on {len(items)} queries; {len(report.trials)} trials "
               f"in {report.seconds:.1f}s")
    for name, trial in (("mvr", mvr), ("himir-full", full), ("himir (chosen)", chosen)):
        typer.echo(f"  {name:<15} accuracy {trial.accuracy:.3f}  dot products {trial.dot_products:>10.0f}  "
                   f"p50 {trial.latency_ms:.2f} ms")
    typer.echo(f"  {mvr.dot_products / max(chosen.dot_products, 1):.1f}x fewer dot products than mvr")
    typer.echo(f"chosen: {json.dumps(chosen.to_dict()['params'])}" + ("" if dry_run else f" -> written to {index_dir}"))


@app.command("info")
def info_command(
    index_dir: Path = typer.Argument(..., help="Index directory."),
    as_json: bool = typer.Option(False, "--json", help="JSON output."),
) -> None:
    """What an index holds: counts, layout, encoder, store, config, autotuning record, size on disk."""
    from himir_rag.info import describe_index, format_info

    try:
        info = describe_index(index_dir)
    except (HiMIRError, OSError) as exc:
        _fail(str(exc))
        return
    typer.echo(json.dumps(info, indent=2, allow_nan=False) if as_json else format_info(info))


def _mount_subcommands() -> None:
    from himir_rag.bench.cli import bench_app

    app.add_typer(bench_app, name="bench", help="Benchmarks: composite photos, all modes side by side, scale.")


def main() -> None:
    """Entry point of the ``himir`` console script."""
    app()


_mount_subcommands()

if __name__ == "__main__":
    main()

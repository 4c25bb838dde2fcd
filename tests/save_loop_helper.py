"""Save one index over and over, for the multi-process tests (a writer racing readers).

Usage::

    python tests/save_loop_helper.py INDEX --saves N [--pause S]

Loads INDEX (with the test suite's ``ColorEncoder``), then saves it N times, each save a new
version that replaces the live one (the old one is removed), pausing S seconds in between.
Prints ``saved`` after each save, flushed.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from himir_rag.index import HiMIRIndex  # noqa: E402
from tests.conftest import ColorEncoder  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("index")
    parser.add_argument("--saves", type=int, required=True)
    parser.add_argument("--pause", type=float, default=0.0)
    args = parser.parse_args()
    index = HiMIRIndex.load(args.index, encoder=ColorEncoder())
    for _ in range(args.saves):
        index.save(args.index)
        print("saved", flush=True)
        time.sleep(args.pause)


if __name__ == "__main__":
    main()

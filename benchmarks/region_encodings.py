"""Indexing photos/s of region encoding crops vs roi, interleaved in one process (same load for both).

Usage::

    python benchmarks/region_encodings.py [IMAGES_DIR] [PHOTOS] [ROUNDS]

Each round indexes PHOTOS photos (default 40) with ``region_encoding="crops"``, then PHOTOS other
photos with ``"roi"``, into throw-away in-memory indexes (the offline encoder loaded once,
before the clock); prints photos/s per round and the load average. Default folder:
``/tmp/bench/images`` (``himir bench build /tmp/bench``).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

from himir_rag.config import HiMIRConfig
from himir_rag.encoders import get_encoder
from himir_rag.index import HiMIRIndex


def photos_per_second(encoder, photos: list[Path], encoding: str) -> float:
    """Index ``photos`` (linked into a temporary folder) with ``encoding``; photos/s of the add."""
    with tempfile.TemporaryDirectory() as folder:
        for photo in photos:
            os.symlink(photo.resolve(), Path(folder) / photo.name)
        index = HiMIRIndex(encoder, HiMIRConfig(region_encoding=encoding, follow_symlinks=True))
        tick = time.perf_counter()
        added = index.add(folder, progress=False).added
        return added / (time.perf_counter() - tick)


def main() -> None:
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/bench/images")
    count = int(sys.argv[2]) if len(sys.argv) > 2 else 40
    rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 2
    photos = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if len(photos) < 2 * count * rounds:
        raise SystemExit(f"{folder} holds {len(photos)} photos; {2 * count * rounds} needed")
    encoder = get_encoder("offline")
    encoder.load()
    for round_ in range(rounds):
        start = 2 * count * round_
        crops = photos_per_second(encoder, photos[start : start + count], "crops")
        roi = photos_per_second(encoder, photos[start + count : start + 2 * count], "roi")
        print(f"round {round_}: crops {crops:.2f} photos/s, roi {roi:.2f} photos/s, roi/crops {roi / crops:.1f}x; "
              f"load average {os.getloadavg()}", flush=True)


if __name__ == "__main__":
    main()

"""Rebuild a saved index's collection with the current code and compare the vectors.

Usage::

    python benchmarks/rebuild_check.py /tmp/bench/index /tmp/bench/images

Prints the build time (photos/s) and the largest difference between the old and the new
region vectors of each photo (same paths and region counts expected): a refactor of the
indexing path must not change what is stored.
"""

from __future__ import annotations

import sys
import time

import numpy as np

from himir_rag import HiMIRIndex
from himir_rag.config import HiMIRConfig


def main(index_dir: str, images: str) -> None:
    old = HiMIRIndex.load(index_dir)
    tick = time.perf_counter()
    config = HiMIRConfig(precision="float32", layout=old.config.layout, decomposer=old.config.decomposer)
    new = HiMIRIndex.build(images, encoder=old.encoder_spec, config=config, progress=False)
    seconds = time.perf_counter() - tick
    print(f"built {len(new)} photos in {seconds:.0f} s ({len(new) / seconds:.2f} photos/s); old index {len(old)}")
    a, b = old.snapshot, new.snapshot
    ids_a = {r.path: r.image_id for r in a.images.values()}
    ids_b = {r.path: r.image_id for r in b.images.values()}
    print("same paths:", set(ids_a) == set(ids_b))
    worst, mismatched = 0.0, []
    for path in sorted(set(ids_a) & set(ids_b)):
        va = np.asarray(a.vectors[a.image_rows(ids_a[path])], np.float32)
        vb = np.asarray(b.vectors[b.image_rows(ids_b[path])], np.float32)
        if va.shape != vb.shape:
            mismatched.append(path)
            continue
        worst = max(worst, float(np.abs(va - vb).max()))
    print(f"largest vector difference {worst:.3g}; photos with other region counts: {len(mismatched)}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

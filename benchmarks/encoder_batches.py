"""Offline-encoder throughput by batch size and torch threads, side by side in one run.

Usage::

    python benchmarks/encoder_batches.py

64 crops (a 4x4 grid of 4 demo photos) are embedded at batch 2, 4, 8, 16 and 32 with 1 and 2
torch threads; prints crops/s (median of 3) and the load average before and after.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time

import torch
from PIL import Image

from himir_rag.demo import write_demo_photos
from himir_rag.encoders.offline import OfflineEncoder


def main() -> None:
    with tempfile.TemporaryDirectory() as folder:
        crops = []
        for path in write_demo_photos(folder)[:4]:
            image = Image.open(path).convert("RGB")
            w, h = image.size
            crops += [image.crop((i * w // 4, j * h // 4, (i + 1) * w // 4, (j + 1) * h // 4))
                      for i in range(4) for j in range(4)]
    encoder = OfflineEncoder()
    encoder.load()
    print("load average", os.getloadavg())
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for batch in (2, 4, 8, 16, 32):
            rates = []
            for _ in range(3):
                tick = time.perf_counter()
                for i in range(0, len(crops), batch):
                    encoder.embed_images(crops[i : i + batch])
                rates.append(len(crops) / (time.perf_counter() - tick))
            print(f"threads {threads} batch {batch:2d}: {statistics.median(rates):6.1f} crops/s", flush=True)
    print("load average", os.getloadavg())


if __name__ == "__main__":
    main()

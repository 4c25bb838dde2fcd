"""Append-only persistence at scale: a build with checkpoints, a load, and a one-photo add + save.

Usage::

    nice python benchmarks/append_checkpoints.py OUT_DIR [--images 100000] [--checkpoint-every 256]
                                                 [--dim 384] [--precision float16]
    nice python benchmarks/append_checkpoints.py OUT_DIR --load-only [--dim 384]   # time loads of OUT_DIR/index

Runs the real ``HiMIRIndex.add(folder, checkpoint_dir=..., checkpoint_every=N)`` over OUT_DIR/photos
(tiny 64x48 PNGs written first, one per photo) with a stand-in encoder that returns random unit
vectors (no model: what is measured is the index, not the encoder), then:

- bytes written by every save of the build (checkpoints and the final save): for each file of
  the new version, its size minus the size it had in the previous version when it is the same
  file (hard link, same inode) -- the bytes that version added -- and, as a cross-check, the
  process's ``wchar`` (/proc/self/io: every byte it passed to write()) during the build;
- the seconds of each 16-photo chunk (commit included) early and late in the build;
- ``HiMIRIndex.load`` of the finished index, three times (warm: the files are in the page cache);
- one more photo added to the loaded index and saved: bytes that save wrote, per file.

Writes OUT_DIR/append_report.json and prints it.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
from PIL import Image

from himir_rag import HiMIRIndex
from himir_rag.config import HiMIRConfig


class RandomEncoder:
    """Random unit vectors for every crop and text: an encoder that costs nothing."""

    def __init__(self, dim: int) -> None:
        self.dim, self.name = dim, f"bench:random-dim{dim}"
        self._rng = np.random.default_rng(0)

    def _unit(self, n: int) -> np.ndarray:
        vectors = self._rng.standard_normal((n, self.dim), dtype=np.float32)
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)

    def embed_images(self, images: list) -> np.ndarray:
        return self._unit(len(images))

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        return self._unit(len(texts))


def wchar() -> int:
    """Bytes this process has passed to write() so far."""
    with open("/proc/self/io", encoding="ascii") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("wchar:"))


def version_files(version: Path) -> dict[str, os.stat_result]:
    return {str(p.relative_to(version)): p.stat() for p in version.rglob("*") if p.is_file()}


def live_version(index_dir: Path) -> Path | None:
    pointer = index_dir / "CURRENT"
    return index_dir / pointer.read_text().strip() if pointer.is_file() else None


class MeasuredIndex(HiMIRIndex):
    """An index that records what each of its saves wrote."""

    saves: list[dict]

    def save(self, directory, **options):  # type: ignore[override]
        directory = Path(directory)
        previous = live_version(directory)
        before = {} if previous is None else {s.st_ino: s.st_size for s in version_files(previous).values()}
        tick = time.perf_counter()
        version = super().save(directory, **options)
        seconds = time.perf_counter() - tick
        written = {name: s.st_size - before.get(s.st_ino, 0) for name, s in version_files(version).items()}
        self.saves.append({"images": len(self), "checkpoint": bool(options.get("checkpoint")), "seconds": seconds,
                           "bytes_written": sum(written.values()),
                           "version_bytes": sum(s.st_size for s in version_files(version).values()),
                           "largest": dict(sorted(written.items(), key=lambda kv: -kv[1])[:4])})
        return version


def write_photos(folder: Path, n: int) -> list[Path]:
    rng = np.random.default_rng(1)
    paths = []
    for i in range(n):
        path = folder / f"{i // 1000:03d}" / f"p{i:06d}.png"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (64, 48), tuple(int(c) for c in rng.integers(0, 256, 3))).save(path)
        paths.append(path)
    return paths


def time_loads(index_dir: Path, encoder: RandomEncoder, times: int = 3) -> list[dict[str, float]]:
    """Wall and CPU seconds of ``times`` loads of ``index_dir`` in a row (the first may read from disk; the
    others are warm). CPU seconds tell what a load costs when other processes share the cores."""
    seconds = []
    for _ in range(times):
        wall, cpu = time.perf_counter(), time.process_time()
        loaded = HiMIRIndex.load(index_dir, encoder=encoder)
        seconds.append({"wall_s": round(time.perf_counter() - wall, 3), "cpu_s": round(time.process_time() - cpu, 3)})
        del loaded
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--checkpoint-every", type=int, default=256)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--precision", default="float16")
    parser.add_argument("--load-only", action="store_true", help="only time loads of the index OUT_DIR holds")
    args = parser.parse_args()
    if args.load_only:
        print(json.dumps({"load_s": time_loads(args.out / "index", RandomEncoder(args.dim))}))
        return
    photos, index_dir = args.out / "photos", args.out / "index"
    write_photos(photos, args.images)
    extra = write_photos(args.out / "extra", 1)[0]

    encoder = RandomEncoder(args.dim)
    index = MeasuredIndex(encoder, HiMIRConfig(precision=args.precision))
    index.saves = []
    chunks: list[tuple[int, float]] = []
    last = [time.perf_counter()]

    def on_chunk(report) -> None:
        now = time.perf_counter()
        chunks.append((report.added, now - last[0]))
        last[0] = now

    written_before, tick = wchar(), time.perf_counter()
    index.add(photos, progress=False, checkpoint_dir=index_dir, checkpoint_every=args.checkpoint_every,
              on_chunk=on_chunk)
    build_s, build_wchar = time.perf_counter() - tick, wchar() - written_before
    final = live_version(index_dir)
    final_bytes = sum(s.st_size for s in version_files(final).values())
    saves = index.saves
    total_written = sum(s["bytes_written"] for s in saves)

    loads = time_loads(index_dir, encoder)
    one = MeasuredIndex.load(index_dir, encoder=encoder)
    one.saves = []
    written_before = wchar()
    one.add([extra], progress=False)
    one.save(index_dir)
    one_save = {**one.saves[0], "wchar": wchar() - written_before}
    del one

    def chunk_stats(part: list[tuple[int, float]]) -> dict:
        return {"images_at": [part[0][0], part[-1][0]], "median_chunk_s": float(np.median([s for _, s in part]))}

    report = {
        "images": len(index), "regions": len(index.snapshot.levels), "dim": args.dim, "precision": args.precision,
        "checkpoint_every": args.checkpoint_every, "build_s": build_s,
        "saves": len(saves), "checkpoints": sum(s["checkpoint"] for s in saves),
        "bytes_written_all_saves": total_written, "wchar_build": build_wchar, "final_version_bytes": final_bytes,
        "written_over_final": total_written / final_bytes,
        "checkpoint_save_s_median": float(np.median([s["seconds"] for s in saves if s["checkpoint"]] or [0.0])),
        "final_save": saves[-1],
        "chunks_early": chunk_stats(chunks[10:110]), "chunks_late": chunk_stats(chunks[-100:]),
        "load_s": loads,
        "add_one_photo_save": one_save,
        "add_one_over_index": one_save["bytes_written"] / final_bytes,
    }
    (args.out / "append_report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

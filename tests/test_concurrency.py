"""Concurrent use: searches racing adds and saves see whole snapshots, never torn ones."""

from __future__ import annotations

import asyncio
import random
import threading
from pathlib import Path

import numpy as np
import pytest

from himir_rag.hierarchy import Level
from himir_rag.index import HiMIRIndex, SearchResult
from himir_rag.scheduler import MODE_LEVELS, RetrievalMode
from tests.conftest import ColorEncoder, make_scene

_COLORS = ["red", "green", "blue", "yellow", "purple", "orange", "black"]
QUERIES = ["a red square and a blue square", "green", "yellow next to purple", "orange and black", "blue"]
EXHAUSTIVE = ("himir-full", "mvr", "single")


def make_photos(root: Path, n: int, *, seed: int) -> list[Path]:
    """``n`` photos, each of a distinct size, so a region box from another image would not fit."""
    rng = random.Random(seed)
    paths = []
    for i in range(n):
        width, height = 60 + 3 * i, 40 + 2 * i
        squares = [(rng.choice(_COLORS), (rng.randrange(0, width // 2), rng.randrange(0, height // 2),
                                          rng.randrange(width // 2 + 1, width), rng.randrange(height // 2 + 1, height)))
                   for _ in range(2)]
        paths.append(make_scene(root / f"p{seed}_{i:03d}.png", squares, size=(width, height)))
    return paths


class SlowColorEncoder(ColorEncoder):
    """Yields the GIL while "encoding", as a real model does, so threads interleave."""

    def embed_images(self, images):
        threading.Event().wait(0.002)
        return super().embed_images(images)


def check_result(result: SearchResult, final: HiMIRIndex, queries_by_sub: dict, mode: str, sizes: set[int]) -> None:
    """A result computed on one whole snapshot: every hit's regions are its own, with the
    exact similarity of that region's vector, and (exhaustive modes) the best of that image's
    regions, over one snapshot's worth of images."""
    snap = final.snapshot
    if mode in EXHAUSTIVE:
        assert result.stats.images_scored in sizes, (result.stats.images_scored, sorted(sizes))
    assert [h.score for h in result.hits] == sorted((h.score for h in result.hits), reverse=True)
    levels = [int(lv) for lv in MODE_LEVELS[RetrievalMode(mode)]]
    labels = [result.query] if mode == "single" else list(result.subqueries)
    vectors = np.stack([queries_by_sub[label] for label in labels])
    for hit in result.hits:
        record = snap.images[hit.image_id]  # images are only added: the id still names the same image
        assert (hit.path, hit.width, hit.height) == (record.path, record.width, record.height)
        rows = snap.image_rows(hit.image_id)
        rows = rows[np.isin(snap.levels[rows], levels)]
        sims = vectors @ snap.vectors[rows].T  # (n_labels, n_rows) of this image
        assert hit.score == pytest.approx(float(np.mean([m.score for m in hit.regions])), abs=1e-5)
        for label_pos, match in enumerate(hit.regions):
            x0, y0, x1, y1 = match.bbox
            assert 0 <= x0 < x1 <= record.width and 0 <= y0 < y1 <= record.height
            own = [pos for pos, row in enumerate(rows) if tuple(snap.boxes[row]) == match.region_bbox
                   and Level(int(snap.levels[row])).name.lower() == match.level]
            assert any(abs(sims[label_pos, pos] - match.score) < 1e-5 for pos in own), (mode, hit.path, match)
            if mode in EXHAUSTIVE:
                assert match.score == pytest.approx(float(sims[label_pos].max()), abs=1e-5)


def test_many_searching_threads_while_another_adds(tmp_path):
    first = make_photos(tmp_path / "a", 6, seed=1)
    later = make_photos(tmp_path / "b", 20, seed=2)
    index = HiMIRIndex(SlowColorEncoder())
    index.add(first, progress=False)
    sizes = {len(index)}
    results: list[tuple[str, SearchResult]] = []
    errors: list[BaseException] = []
    adding = threading.Event()
    adding.set()

    def adder() -> None:
        try:
            index.add(later, progress=False, chunk_images=2, on_chunk=lambda report: sizes.add(len(index)))
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)
        finally:
            adding.clear()

    def searcher(worker: int) -> None:
        turn = 0
        try:
            while adding.is_set() or turn < 3:
                mode = ("himir-full", "mvr", "single", "himir")[(worker + turn) % 4]
                query = QUERIES[(worker * 7 + turn) % len(QUERIES)]
                results.append((mode, index.search(query, k=4, mode=mode)))
                turn += 1
                threading.Event().wait(0.002)  # leave the adder some GIL: more snapshot swaps per search
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=adder)] + [threading.Thread(target=searcher, args=(w,)) for w in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    assert len(index) == 26 and sizes >= {6, 26}
    seen_sizes = {r.stats.images_scored for m, r in results if m in EXHAUSTIVE}
    assert len(seen_sizes) > 1, "no search overlapped an add; the test proved nothing"
    encoder = ColorEncoder()
    subs = {s for _, r in results for s in (*r.subqueries, r.query)}
    queries_by_sub = dict(zip(subs, encoder.embed_texts(list(subs))))
    for mode, result in results:
        check_result(result, index, queries_by_sub, mode, sizes)


def test_saves_racing_adds_and_searches_write_consistent_versions(tmp_path):
    photos = make_photos(tmp_path / "p", 24, seed=3)
    index = HiMIRIndex(SlowColorEncoder())
    index.add(photos[:4], progress=False)
    done = threading.Event()
    errors: list[BaseException] = []
    loaded_sizes: list[int] = []

    def adder() -> None:
        try:
            index.add(photos[4:], progress=False, chunk_images=2)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)
        finally:
            done.set()

    def saver() -> None:
        try:
            while not done.is_set():
                index.save(tmp_path / "idx")
                loaded = HiMIRIndex.load(tmp_path / "idx", encoder=ColorEncoder())  # checks integrity
                rows_per_image = np.bincount(loaded.snapshot.region_image)[list(loaded.snapshot.images)]
                assert (rows_per_image == 21).all()
                assert (loaded.snapshot.levels == Level.GLOBAL).sum() == len(loaded)
                loaded_sizes.append(len(loaded))
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    def searcher() -> None:
        try:
            while not done.is_set():
                index.search("red and blue", k=3, mode="himir")
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=f) for f in (adder, saver, searcher)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    assert loaded_sizes and all(4 <= n <= 24 for n in loaded_sizes)
    index.save(tmp_path / "idx")
    assert len(HiMIRIndex.load(tmp_path / "idx", encoder=ColorEncoder())) == 24


async def test_asearch_gather_of_100_queries_matches_sync_search(tmp_path):
    index = HiMIRIndex(ColorEncoder())
    index.add(make_photos(tmp_path, 12, seed=4), progress=False)
    queries = [(QUERIES[i % len(QUERIES)], ("himir-full", "himir", "mvr", "single")[i % 4]) for i in range(100)]
    results = await asyncio.gather(*(index.asearch(q, k=5, mode=m) for q, m in queries))
    assert len(results) == 100
    for (query, mode), result in zip(queries, results):
        expected = index.search(query, k=5, mode=mode)
        assert result.query == query and result.subqueries == expected.subqueries
        assert [h.path for h in result.hits] == [h.path for h in expected.hits]
        assert [h.score for h in result.hits] == pytest.approx([h.score for h in expected.hits], abs=1e-6)


async def test_asearch_while_adding_in_a_thread(tmp_path):
    index = HiMIRIndex(SlowColorEncoder())
    index.add(make_photos(tmp_path / "a", 4, seed=5), progress=False)
    adder = asyncio.create_task(asyncio.to_thread(index.add, make_photos(tmp_path / "b", 12, seed=6),
                                                  progress=False, chunk_images=1))
    results = await asyncio.gather(*(index.asearch(QUERIES[i % 5], k=3) for i in range(100)))
    await adder
    assert len(index) == 16
    assert all(4 <= r.stats.images_scored <= 16 and len(r.hits) == 3 for r in results)

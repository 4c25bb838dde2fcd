"""Crash safety: ``kill -9`` during ``himir index`` (checkpoints and saves) loses nothing.

A subprocess runs the real CLI code (``tests/crash_index_helper.py``: ``himir index`` with
the fast ColorEncoder slowed down, and events printed before pauses). The test kills it
with SIGKILL at chosen points of the build and of the atomic save, then checks that

- the index directory holds the previous checkpoint, loadable and consistent: every
  catalog image has all its regions and vectors, equal to those of an uninterrupted build,
  and the images are a complete prefix of the work (one checkpoint's worth);
- re-running the index command resumes and ends in the same state as an uninterrupted
  run (same paths, same regions and vectors per path, same skipped files).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from himir_rag.config import HiMIRConfig
from himir_rag.errors import IndexFormatError
from himir_rag.hierarchy import Level
from himir_rag.index import HiMIRIndex
from tests.conftest import ColorEncoder, make_scene

HELPER = Path(__file__).with_name("crash_index_helper.py")
REPO = Path(__file__).resolve().parents[1]
N_GOOD, CHUNK = 40, 16  # checkpoint every 16 files (--checkpoint-every 16, one chunk of the CLI's add())
LAYOUT, N_REGIONS = "1+2+4", 7  # a small tree keeps the fake encoder's work (and the test) short
BAD_FILES = {"broken.png": "not an image file", "zero.jpg": "empty file"}
_COLORS = ["red", "green", "blue", "yellow", "purple", "orange", "black"]

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL is POSIX")


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("photos")
    rng = random.Random(7)
    for i in range(N_GOOD):
        squares = [(rng.choice(_COLORS), (rng.randrange(0, 40), rng.randrange(0, 30), rng.randrange(40, 80),
                                          rng.randrange(30, 60))) for _ in range(2)]
        make_scene(root / ("nested" if i % 3 else "") / f"p{i:03d}.png", squares, size=(80, 60))
    (root / "broken.png").write_text("not a png")
    (root / "zero.jpg").write_bytes(b"")
    return root


def per_path(index: HiMIRIndex) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """path -> (vectors, boxes, levels, parents relative to the image's first row)."""
    snap = index.snapshot
    out = {}
    for record in snap.images.values():
        rows = snap.image_rows(record.image_id)
        parents = np.where(snap.parents[rows] >= 0, snap.parents[rows] - rows[0], -1)
        out[record.path] = (snap.vectors[rows], snap.boxes[rows], snap.levels[rows], parents)
    return out


@pytest.fixture(scope="module")
def reference(photos) -> tuple[dict, dict[str, str], list[str]]:
    """An uninterrupted build: (per-path regions, skipped {path: reason}, work order of the files)."""
    index = HiMIRIndex(ColorEncoder(), HiMIRConfig(layout=LAYOUT, batch_size=8))
    report = index.add(photos, progress=False)
    assert report.added == N_GOOD and len(report.skipped) == len(BAD_FILES)
    from himir_rag.images import iter_image_files

    order = [str(p.absolute()) for p in iter_image_files(photos)]
    return per_path(index), dict(index.skipped), order


def assert_consistent_checkpoint(index_dir: Path, reference) -> int:
    """The live version loads, is internally consistent, equals the reference for every
    image it holds, and holds whole chunks of the work, in order. Returns how many chunks."""
    regions, skipped, order = reference
    index = HiMIRIndex.load(index_dir, encoder=ColorEncoder())  # integrity is checked on load too
    index.snapshot.check_integrity()
    got = per_path(index)
    for path, (vectors, boxes, levels, parents) in got.items():
        ref = regions[path]
        assert len(vectors) == N_REGIONS and (levels == Level.GLOBAL).sum() == 1  # all regions of every image
        np.testing.assert_allclose(vectors, ref[0], atol=1e-6)
        assert np.array_equal(boxes, ref[1]) and np.array_equal(levels, ref[2]) and np.array_equal(parents, ref[3])
    manifest = HiMIRIndex.read_manifest(index_dir)
    assert manifest["counts"]["images"] == len(index) and manifest["counts"]["regions"] == len(index.snapshot.levels)
    # the images are those of the first c chunks of the work: nothing in between is missing
    chunks = [c for c in range(len(order) // CHUNK + 2) if set(got) == set(order[: c * CHUNK]) & set(regions)]
    assert chunks, sorted(got)
    # skipped files are reported as found (the next chunk is decoded ahead, so it may list more)
    assert all(skipped[p] == reason for p, reason in index.skipped)
    return chunks[0]


def resume_in_process(photos: Path, index_dir: Path, monkeypatch) -> None:
    """Re-run ``himir index`` (the CLI itself) on the same folder and index."""
    import himir_rag.index as index_module
    from himir_rag.cli import app

    monkeypatch.setattr(index_module, "get_encoder", lambda spec, device="cpu": ColorEncoder())
    result = CliRunner().invoke(app, ["index", str(photos), "--index", str(index_dir), "--encoder", "test:color",
                                      "--layout", LAYOUT, "--no-progress", "--checkpoint-every", str(CHUNK)])
    assert result.exit_code == 0, result.output


def assert_same_as_reference(index_dir: Path, reference) -> None:
    regions, skipped, _ = reference
    index = HiMIRIndex.load(index_dir, encoder=ColorEncoder())
    got = per_path(index)
    assert set(got) == set(regions)  # same paths: nothing lost, nothing twice
    assert len(index) == len(regions)
    for path, (vectors, boxes, levels, parents) in got.items():
        np.testing.assert_allclose(vectors, regions[path][0], atol=1e-6)
        assert np.array_equal(boxes, regions[path][1]) and np.array_equal(levels, regions[path][2])
        assert np.array_equal(parents, regions[path][3])
    assert dict(index.skipped) == skipped
    for name, fragment in BAD_FILES.items():
        assert any(Path(p).name == name and fragment in r for p, r in index.skipped)
    # a killed save's leftovers are gone after the next save
    version = index.save(index_dir)
    assert sorted(p.name for p in index_dir.iterdir()) == sorted([".lock", "CURRENT", version.name])


def nth(event: str, n: int, *, after: tuple[str, int] | None = None):
    """Kill point: the n-th ``event`` (counted after the ``after[1]``-th ``after[0]`` event, if given)."""

    def reached(events: list[str]) -> bool:
        start = 0
        if after is not None:
            seen = [i for i, e in enumerate(events) if e == after[0]]
            if len(seen) < after[1]:
                return False
            start = seen[after[1] - 1] + 1
        return events[-1] == event and events[start:].count(event) == n

    return reached


def run_and_kill(photos: Path, index_dir: Path, kill_on, *, after_s: float = 0.0,
                 fsync_delay: float = 0.1, encode_delay: float = 0.005) -> list[str]:
    """Run the helper; SIGKILL it as soon as ``kill_on(events)`` is true (or ``after_s``
    seconds after the first ``save-end`` when ``kill_on`` is None). Returns the events seen."""
    process = subprocess.Popen(
        [sys.executable, str(HELPER), str(photos), str(index_dir), "--fsync-delay", str(fsync_delay),
         "--encode-delay", str(encode_delay)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, bufsize=1,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    watchdog = threading.Timer(60, process.kill)  # never hang the suite
    watchdog.start()
    events: list[str] = []
    try:
        for line in process.stdout:  # type: ignore[union-attr]
            events.append(line.strip())
            if kill_on is not None and kill_on(events):
                os.kill(process.pid, signal.SIGKILL)  # it is paused right after this event
                break
            if kill_on is None and events[-1] == "save-end":
                threading.Timer(after_s, process.kill).start()  # Popen.kill: SIGKILL, and only if still running
                kill_on = lambda events: False  # noqa: E731 - the timer kills
        process.wait(timeout=60)
    finally:
        watchdog.cancel()
        process.stdout.close()  # type: ignore[union-attr]
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == -signal.SIGKILL, (process.returncode, events[-5:])
    return events


KILL_POINTS = {  # where the process stands when it dies
    "first save, vectors written": nth("fsync vectors.bin", 1),
    "second save, appended vectors written": nth("fsync vectors.bin", 2),
    "second save, staging complete": nth("fsync manifest.json", 2),
    "second save, renamed, CURRENT not swapped": nth("fsync CURRENT", 2),
    "first chunk, encoding": nth("encode", 3),
    "third chunk, encoding after two checkpoints": nth("encode", 3, after=("save-end", 2)),
}


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_kill_during_index_keeps_last_checkpoint_and_resume_matches(point, photos, reference, tmp_path, monkeypatch):
    index_dir = tmp_path / "idx"
    events = run_and_kill(photos, index_dir, KILL_POINTS[point])
    saves_done = events.count("save-end")
    if saves_done == 0:
        with pytest.raises(IndexFormatError, match=r"no such index directory|not a himir index \(no CURRENT file\)"):
            HiMIRIndex.load(index_dir, encoder=ColorEncoder())
    else:
        assert assert_consistent_checkpoint(index_dir, reference) == saves_done
    resume_in_process(photos, index_dir, monkeypatch)
    assert_same_as_reference(index_dir, reference)


@pytest.mark.parametrize("after_s", [0.05, 0.3])
def test_kill_at_arbitrary_moments(after_s, photos, reference, tmp_path, monkeypatch):
    index_dir = tmp_path / "idx"
    run_and_kill(photos, index_dir, None, after_s=after_s, fsync_delay=0.1)
    assert assert_consistent_checkpoint(index_dir, reference) >= 1
    resume_in_process(photos, index_dir, monkeypatch)
    assert_same_as_reference(index_dir, reference)


def test_killed_twice_then_resumed(photos, reference, tmp_path, monkeypatch):
    index_dir = tmp_path / "idx"
    run_and_kill(photos, index_dir, nth("fsync manifest.json", 2))  # dies in its 2nd save: 1 checkpoint on disk
    assert assert_consistent_checkpoint(index_dir, reference) == 1
    # the resumed run has 24 files left: its first save is the one killed, after the pointer file is written
    events = run_and_kill(photos, index_dir, nth("fsync CURRENT", 1))
    assert events.count("save-begin") == 1
    assert assert_consistent_checkpoint(index_dir, reference) == 1
    leftovers = {p.name for p in index_dir.iterdir()} - {"CURRENT", (index_dir / "CURRENT").read_text().strip()}
    assert leftovers  # the killed saves left an unpublished version / temp files behind...
    resume_in_process(photos, index_dir, monkeypatch)
    assert_same_as_reference(index_dir, reference)  # ...which the final state does not contain


def test_uninterrupted_cli_run_matches_the_library_build(photos, reference, tmp_path, monkeypatch):
    saves = []
    real_save = HiMIRIndex.save
    monkeypatch.setattr(HiMIRIndex, "save", lambda self, directory, **options: saves.append(1) or
                        real_save(self, directory, **options))
    resume_in_process(photos, tmp_path / "idx", monkeypatch)  # from scratch: a plain `himir index` run
    assert len(saves) == 3  # after each of the 3 chunks; the last one already holds everything
    assert_same_as_reference(tmp_path / "idx", reference)

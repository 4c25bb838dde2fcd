"""Several processes on one index directory: writers wait for each other, nothing is lost.

Real subprocesses run the real ``himir index`` (``tests/crash_index_helper.py``, with the fast
ColorEncoder) or save in a loop (``tests/save_loop_helper.py``) on the same index:

- two writers adding different photos: the index ends with both (the second waited for the lock);
- two no-op writers at once: the index is untouched (no new version) and loads;
- a reader loading in a loop while another process saves over and over never fails;
- a writer that cannot get the lock in ``--wait`` seconds fails with one line naming the holder;
- the Python API refuses to save over a version newer than the one it loaded (IndexConflictError).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import himir_rag.index as index_module
from himir_rag.config import HiMIRConfig
from himir_rag.errors import IndexConflictError, IndexLockedError
from himir_rag.index import HiMIRIndex
from himir_rag.locking import lock_index
from tests.conftest import ColorEncoder, make_scene

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="the index lock is POSIX (fcntl.flock)")

REPO = Path(__file__).resolve().parents[1]
INDEX_HELPER = Path(__file__).with_name("crash_index_helper.py")
SAVE_HELPER = Path(__file__).with_name("save_loop_helper.py")
LAYOUT = "1+2+4"  # the helper's layout
_COLORS = ["red", "green", "blue", "yellow"]


def photo_folder(root: Path, name: str, n: int = 4) -> Path:
    folder = root / name
    for i in range(n):
        make_scene(folder / f"{name}{i}.png", [(_COLORS[i % 4], (5 * i, 3 * i, 40 + 5 * i, 30 + 3 * i))], size=(80, 60))
    return folder


def paths_of(folder: Path) -> set[str]:
    return {str(p.absolute()) for p in folder.iterdir()}


def indexed_paths(index_dir: Path) -> set[str]:
    return {r.path for r in HiMIRIndex.load(index_dir, encoder=ColorEncoder()).images}


def build(photos: Path, index_dir: Path) -> None:
    HiMIRIndex(ColorEncoder(), HiMIRConfig(layout=LAYOUT, batch_size=8)).add(photos, progress=False,
                                                                               checkpoint_dir=index_dir)


def start_index(photos: Path, index_dir: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(INDEX_HELPER), str(photos), str(index_dir), *extra], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def finish(process: subprocess.Popen) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=120)
    return process.returncode, out, err


def wait_for_stderr(process: subprocess.Popen, text: str, timeout: float = 60.0) -> str:
    """Read ``process``'s stderr until a line holds ``text``; returns what was read."""
    seen: list[str] = []
    timer = threading.Timer(timeout, process.kill)  # never hang the suite
    timer.start()
    try:
        for line in process.stderr:  # type: ignore[union-attr]
            seen.append(line)
            if text in line:
                return "".join(seen)
    finally:
        timer.cancel()
    raise AssertionError(f"{text!r} never appeared on stderr: {''.join(seen)}")


def test_two_writers_adding_different_photos_lose_nothing(tmp_path):
    a, b, c, d, e = (photo_folder(tmp_path, name) for name in "abcde")
    index_dir = tmp_path / "idx"
    build(a, index_dir)
    # both writers start while the lock is held, so both must wait, then each loads what the other wrote
    with lock_index(index_dir):
        writers = [start_index(folder, index_dir) for folder in (b, c)]
        for writer in writers:
            wait_for_stderr(writer, f"is being written by another process (pid {os.getpid()}); waiting up to 60 s")
    results = [finish(writer) for writer in writers]
    assert [rc for rc, _, _ in results] == [0, 0], results
    assert indexed_paths(index_dir) == paths_of(a) | paths_of(b) | paths_of(c)
    # started at the same moment, whichever gets the lock first: still nothing lost
    both = [start_index(folder, index_dir, "--encode-delay", "0.02") for folder in (d, e)]
    assert [finish(p)[0] for p in both] == [0, 0]
    assert indexed_paths(index_dir) == set().union(*(paths_of(f) for f in (a, b, c, d, e)))


def test_simultaneous_noop_writers_keep_the_index(tmp_path):
    a = photo_folder(tmp_path, "a")
    index_dir = tmp_path / "idx"
    build(a, index_dir)
    before = sorted(p.name for p in index_dir.iterdir())
    for _ in range(2):
        runs = [start_index(a, index_dir) for _ in range(2)]
        results = [finish(p) for p in runs]
        assert [rc for rc, _, _ in results] == [0, 0], results
        assert all("0 new, 0 changed, 4 unchanged" in out for _, out, _ in results)
        assert sorted(p.name for p in index_dir.iterdir()) == before  # no new version, nothing removed
        assert indexed_paths(index_dir) == paths_of(a)


def test_reader_loading_while_another_process_saves_never_fails(tmp_path, monkeypatch):
    a = photo_folder(tmp_path, "a")
    index_dir = tmp_path / "idx"
    build(a, index_dir)
    real_read_vectors = index_module._read_vectors

    def slow_read_vectors(*args, **kwargs):  # widen the window in which a writer can replace the version
        time.sleep(0.005)
        return real_read_vectors(*args, **kwargs)

    monkeypatch.setattr(index_module, "_read_vectors", slow_read_vectors)
    writer = subprocess.Popen([sys.executable, str(SAVE_HELPER), str(index_dir), "--saves", "25", "--pause", "0.02"],
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert writer.stdout.readline().strip() == "saved"  # the writer is running
    loads, versions = 0, set()
    while writer.poll() is None:
        versions.add((index_dir / "CURRENT").read_text().strip())
        assert len(HiMIRIndex.load(index_dir, encoder=ColorEncoder())) == 4  # never "missing; incomplete"
        loads += 1
    rc, _, err = finish(writer)
    assert rc == 0, err
    assert loads >= 10 and len(versions) >= 3, (loads, len(versions))  # the loads overlapped many saves
    assert len([p for p in index_dir.iterdir() if p.is_dir()]) == 1  # the old versions were removed


def test_writer_gives_up_after_wait_naming_the_holder(tmp_path):
    a = photo_folder(tmp_path, "a")
    index_dir = tmp_path / "idx"
    build(a, index_dir)
    before = (index_dir / "CURRENT").read_text()
    with lock_index(index_dir):  # this process is the holder
        rc, _, err = finish(start_index(photo_folder(tmp_path, "b"), index_dir, "--wait", "0.3"))
    assert rc == 1
    lines = [line for line in err.splitlines() if not line.startswith("WARNING")]
    assert lines == [f"error: {index_dir} is being written by another process (pid {os.getpid()}); gave up "
                     "after 0.3 s -- try again when it has finished, or wait longer (--wait SECONDS / lock_timeout=)"]
    assert (index_dir / "CURRENT").read_text() == before and indexed_paths(index_dir) == paths_of(a)


def test_lock_is_reentrant_in_a_thread_and_exclusive_across_threads(tmp_path):
    errors: list[BaseException] = []

    def other_thread() -> None:
        try:
            with lock_index(tmp_path, timeout=0.1):
                pass
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    with lock_index(tmp_path):
        with lock_index(tmp_path, timeout=0):  # the same thread again: no deadlock
            thread = threading.Thread(target=other_thread)
            thread.start()
            thread.join()
    assert len(errors) == 1 and isinstance(errors[0], IndexLockedError)
    assert "another thread of this process" in str(errors[0])
    with lock_index(tmp_path, timeout=0):  # released
        pass


class CountingEncoder(ColorEncoder):
    crops = 0

    def embed_images(self, images):
        CountingEncoder.crops += len(images)
        return super().embed_images(images)


def test_api_save_refuses_to_replace_a_newer_version(tmp_path):
    a, b, c = (photo_folder(tmp_path, name) for name in "abc")
    index_dir = tmp_path / "idx"
    build(a, index_dir)
    mine = HiMIRIndex.load(index_dir, encoder=ColorEncoder())
    theirs = HiMIRIndex.load(index_dir, encoder=ColorEncoder())
    theirs.add(b, progress=False)
    theirs.save(index_dir)
    mine.add(c, progress=False)
    with pytest.raises(IndexConflictError, match=r"was saved by another writer .* save\(\.\.\., overwrite=True\)"):
        mine.save(index_dir)
    assert indexed_paths(index_dir) == paths_of(a) | paths_of(b)  # their photos are still there
    # add(..., checkpoint_dir=) on a stale copy refuses before encoding anything
    stale = HiMIRIndex.load(index_dir, encoder=CountingEncoder())
    theirs.delete(next(iter(paths_of(b))))
    theirs.save(index_dir)
    CountingEncoder.crops = 0
    with pytest.raises(IndexConflictError):
        stale.add(c, progress=False, checkpoint_dir=index_dir)
    assert CountingEncoder.crops == 0
    mine.save(index_dir, overwrite=True)  # the explicit override replaces it
    assert indexed_paths(index_dir) == paths_of(a) | paths_of(c)
    mine.save(index_dir)  # its own save is the new base: no conflict


def test_tune_refuses_to_save_over_an_index_changed_while_tuning(tmp_path, monkeypatch):
    import himir_rag.autoconfig as autoconfig
    from typer.testing import CliRunner

    from himir_rag.cli import app

    a = photo_folder(tmp_path, "a")
    index_dir = tmp_path / "idx"
    build(a, index_dir)
    (tmp_path / "q.jsonl").write_text('{"id": 1, "query": "red"}\n{"id": 2, "query": "blue"}\n')
    real_tune = autoconfig.tune

    def tune_while_another_writer_saves(index, *args, **kwargs):
        report = real_tune(index, *args, **kwargs)
        HiMIRIndex.load(index_dir, encoder=ColorEncoder()).save(index_dir)  # another writer, meanwhile
        return report

    monkeypatch.setattr(index_module, "get_encoder", lambda spec, device="cpu": ColorEncoder())
    monkeypatch.setattr(autoconfig, "tune", tune_while_another_writer_saves)
    live = (index_dir / "CURRENT").read_text()
    result = CliRunner().invoke(app, ["tune", str(index_dir), "--queries", str(tmp_path / "q.jsonl"), "-k", "2"])
    assert result.exit_code == 1 and result.stderr.startswith(f"error: {index_dir} was saved by another writer")
    assert len(result.stderr.splitlines()) == 1
    assert (index_dir / "CURRENT").read_text() != live  # the other writer's version stays live
    monkeypatch.setattr(autoconfig, "tune", real_tune)
    result = CliRunner().invoke(app, ["tune", str(index_dir), "--queries", str(tmp_path / "q.jsonl"), "-k", "2"])
    assert result.exit_code == 0, result.output


def test_load_retries_when_the_version_it_read_is_removed_under_it(tmp_path, monkeypatch):
    """Deterministic form of the reader race: CURRENT read, then another writer publishes and removes it."""
    import himir_rag.manifest as manifest_module

    a = photo_folder(tmp_path, "a")
    index_dir = tmp_path / "idx"
    build(a, index_dir)
    writer = HiMIRIndex.load(index_dir, encoder=ColorEncoder())
    old = (index_dir / "CURRENT").read_text().strip()
    real_read_pointer, calls = manifest_module.read_pointer, []

    def read_pointer(directory):
        calls.append(directory)
        if len(calls) == 2:  # current_version's read: the other writer replaces the version right after it
            writer.save(index_dir)
            return old
        return real_read_pointer(directory)

    monkeypatch.setattr(manifest_module, "read_pointer", read_pointer)
    assert len(HiMIRIndex.load(index_dir, encoder=ColorEncoder())) == 4
    assert not (index_dir / old).exists() and len(calls) >= 4  # the first attempt failed; the second read anew

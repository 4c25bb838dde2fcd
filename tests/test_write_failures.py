"""Disk full, permission denied, read-only index directories: one error line, the old version intact.

Simulated failures (ENOSPC raised by the write path, EACCES / EROFS raised by every write into
the index directory) run everywhere. Real ones run where the test can make them: a full tmpfs
(needs ``mount``, usually root), an immutable directory (``chattr +i``, root), a ``chmod``-ed
directory (not as root, where permissions do not stop writes).
"""

from __future__ import annotations

import builtins
import errno
import hashlib
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import himir_rag.index as index_module
from himir_rag.errors import IndexWriteError
from himir_rag.index import HiMIRIndex
from himir_rag.locking import LOCK_NAME
from tests.conftest import ColorEncoder
from tests.test_multiprocess import build, indexed_paths, paths_of, photo_folder

DISK_FULL = r"error: disk full while saving {}: about \d+ MiB needed; free some space or save elsewhere"


class CountingEncoder(ColorEncoder):
    crops = 0

    def embed_images(self, images):
        CountingEncoder.crops += len(images)
        return super().embed_images(images)


@pytest.fixture
def himir(monkeypatch):
    """Run ``himir ARGS`` in this process (the fast encoder); returns (exit code, stdout, stderr lines)."""
    from himir_rag.cli import app

    monkeypatch.setattr(index_module, "get_encoder", lambda spec, device="cpu": CountingEncoder())
    CountingEncoder.crops = 0

    def run(*args: str) -> tuple[int, str, list[str]]:
        result = CliRunner().invoke(app, list(args))
        assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
        return result.exit_code, result.stdout, [line for line in result.stderr.splitlines()
                                                 if not line.startswith("WARNING")]

    return run


@pytest.fixture
def collection(tmp_path) -> tuple[Path, Path, Path]:
    """(photos already indexed, new photos, the index directory)."""
    a, b = photo_folder(tmp_path, "a"), photo_folder(tmp_path, "b")
    build(a, tmp_path / "idx")
    return a, b, tmp_path / "idx"


def listing(directory: Path) -> dict[str, tuple[int, str]]:
    """Every path under ``directory`` with its size and content digest: any change shows (but the lock file's pid).

    Contents, not mtimes: a failed append-only save cuts the live version's shared files back to
    their sizes, which leaves their bytes as they were but touches their mtime.
    """
    return {str(p.relative_to(directory)): (p.stat().st_size, hashlib.sha1(p.read_bytes()).hexdigest() if p.is_file()
                                            else "dir") for p in directory.rglob("*") if p.name != LOCK_NAME}


def index_args(photos: Path, index_dir: Path) -> list[str]:
    return ["index", str(photos), "--index", str(index_dir), "--encoder", "test:color", "--layout", "1+2+4",
            "--no-progress"]


def assert_intact(index_dir: Path, before: dict, photos: Path) -> None:
    assert listing(index_dir) == before  # nothing new, nothing left behind
    assert indexed_paths(index_dir) == paths_of(photos)


# -- disk full -------------------------------------------------------------------------------------
def assert_disk_full_reported(himir, args, index_dir, before, a) -> None:
    """``himir index`` ends with one disk-full line (exit 1) and the previous version is intact."""
    code, _, errors = himir(*args)
    assert code == 1 and len(errors) == 1 and errors[0].startswith(f"error: disk full while saving {index_dir}: about")
    assert_intact(index_dir, before, a)


@pytest.mark.parametrize("failing", ["vectors.bin", "images.jsonl", "skipped.json", "manifest.json", "CURRENT"])
def test_disk_full_while_writing_a_file_of_the_version(himir, collection, monkeypatch, failing):
    a, b, index_dir = collection
    before = listing(index_dir)
    real_fsync = index_module._fsync

    def fsync(fh) -> None:  # CURRENT: the version is complete and renamed, only the pointer swap fails
        if failing in Path(fh.name).name:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fh)

    monkeypatch.setattr(index_module, "_fsync", fsync)
    assert_disk_full_reported(himir, index_args(b, index_dir), index_dir, before, a)


def test_disk_full_while_writing_a_faiss_store(himir, collection, monkeypatch):
    from himir_rag.store.faiss import FaissStore

    a, b, index_dir = collection
    before = listing(index_dir)

    def save(self, path):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(FaissStore, "save", save)
    assert_disk_full_reported(himir, index_args(b, index_dir), index_dir, before, a)


def test_too_little_space_is_refused_before_encoding(himir, collection, monkeypatch):
    a, b, index_dir = collection
    before = listing(index_dir)
    usage = shutil.disk_usage(index_dir)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=4096))
    code, _, errors = himir(*index_args(b, index_dir))
    assert code == 1 and len(errors) == 1 and errors[0].startswith(f"error: disk full while saving {index_dir}")
    assert CountingEncoder.crops == 0  # the preflight ran before any photo was encoded
    assert_intact(index_dir, before, a)


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 1 MiB tmpfs (skipped where this process cannot mount one)."""
    mount_point = tmp_path / "mnt"
    mount_point.mkdir()
    if shutil.which("mount") is None or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN)")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


def test_real_full_disk_keeps_the_previous_version(small_tmpfs, tmp_path, monkeypatch):
    a, b = photo_folder(tmp_path, "a"), photo_folder(tmp_path, "b", n=8)
    index_dir = small_tmpfs / "idx"
    build(a, index_dir)
    before = listing(index_dir)
    free = shutil.disk_usage(small_tmpfs).free
    (small_tmpfs / "filler").write_bytes(b"\0" * (free - 16 * 1024))  # leave less than a version needs
    index = HiMIRIndex.load(index_dir, encoder=ColorEncoder())
    index.add(b, progress=False)
    with pytest.raises(IndexWriteError, match=f"disk full while saving {index_dir}") as failure:
        index.save(index_dir)  # refused by the free-space check
    assert failure.value.errno == errno.ENOSPC
    monkeypatch.setattr(index_module, "_check_free_space", lambda directory, needed: None)
    with pytest.raises(IndexWriteError, match=f"disk full while saving {index_dir}"):
        index.save(index_dir)  # now the write itself runs out of space
    assert_intact(index_dir, before, a)


# -- read-only -------------------------------------------------------------------------------------
def simulate_read_only(monkeypatch, directory: Path, code: int) -> None:
    """Every attempt to create or write a file or folder inside ``directory`` raises ``OSError(code)``."""
    inside = lambda path: str(os.path.abspath(path)).startswith(str(directory) + os.sep)  # noqa: E731
    refuse = OSError(code, os.strerror(code))
    writing = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    real_os_open, real_open, real_mkdir = os.open, builtins.open, Path.mkdir

    def os_open(path, flags, *args, **kwargs):
        if flags & writing and inside(path):
            raise refuse
        return real_os_open(path, flags, *args, **kwargs)

    def open_(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and set(mode) & set("wax+") and inside(file):
            raise refuse
        return real_open(file, mode, *args, **kwargs)

    def mkdir(self, *args, **kwargs):
        if inside(self):
            raise refuse
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(os, "open", os_open)
    monkeypatch.setattr(builtins, "open", open_)
    monkeypatch.setattr(io, "open", open_)  # what pathlib's Path.open calls
    monkeypatch.setattr(Path, "mkdir", mkdir)


@pytest.mark.parametrize("code, reason", [(errno.EACCES, "permission denied"), (errno.EROFS, "read-only file system"),
                                          (errno.EPERM, "permission denied")])
def test_read_only_index_directory_simulated(himir, collection, monkeypatch, code, reason):
    a, b, index_dir = collection
    (index_dir / ".lock").unlink()  # a lock file cannot be created either
    before = listing(index_dir)
    simulate_read_only(monkeypatch, index_dir, code)
    code_, out, errors = himir(*index_args(a, index_dir))  # nothing new: nothing to write, succeeds
    assert code_ == 0 and "0 new, 0 changed, 4 unchanged" in out, errors
    code_, _, errors = himir(*index_args(b, index_dir))
    assert code_ == 1 and errors == [f"error: cannot write {index_dir}: {reason}"]
    assert CountingEncoder.crops == 0  # refused before encoding
    index = HiMIRIndex.load(index_dir, encoder=ColorEncoder())
    index.add(b, progress=False)
    with pytest.raises(IndexWriteError, match=f"cannot write {index_dir}: {reason}"):
        index.save(index_dir)
    assert_intact(index_dir, before, a)


def test_unwritable_parent_of_a_new_index(himir, tmp_path, monkeypatch):
    photos = photo_folder(tmp_path, "a")
    simulate_read_only(monkeypatch, tmp_path / "ro", errno.EACCES)
    code, _, errors = himir(*index_args(photos, tmp_path / "ro" / "idx"))
    assert code == 1 and errors == [f"error: cannot write {tmp_path / 'ro' / 'idx'}: permission denied"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through chmod; covered by the simulated and chattr tests")
def test_read_only_index_directory_chmod(himir, collection):
    a, b, index_dir = collection
    before = listing(index_dir)
    modes = {p: p.stat().st_mode for p in [index_dir, *index_dir.rglob("*")]}
    for path in modes:
        path.chmod(modes[path] & ~0o222)
    try:
        code, out, errors = himir(*index_args(a, index_dir))
        assert code == 0 and "4 unchanged" in out, errors
        code, _, errors = himir(*index_args(b, index_dir))
        assert code == 1 and errors == [f"error: cannot write {index_dir}: permission denied"]
    finally:
        for path, mode in modes.items():
            path.chmod(mode)
    assert_intact(index_dir, before, a)


def test_immutable_index_directory(himir, collection):
    a, b, index_dir = collection
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(index_dir)],
                                                        capture_output=True).returncode:
        pytest.skip("chattr +i is not available here (needs root and a file system that supports it)")
    try:
        before = listing(index_dir)
        code, out, errors = himir(*index_args(a, index_dir))
        assert code == 0 and "4 unchanged" in out, errors
        code, _, errors = himir(*index_args(b, index_dir))
        assert code == 1 and errors == [f"error: cannot write {index_dir}: permission denied"]
        assert CountingEncoder.crops == 0
    finally:
        subprocess.run(["chattr", "-i", str(index_dir)], capture_output=True)
    assert_intact(index_dir, before, a)


def test_any_os_error_is_one_line_from_the_himir_command(tmp_path):
    """Through the real entry point (``main``), even a command without its own error handling."""
    (tmp_path / "a-file").write_text("")
    result = subprocess.run([sys.executable, "-m", "himir_rag.cli", "demo", "--out", str(tmp_path / "a-file" / "out")],
                            capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 1
    assert result.stderr.splitlines() == [f"error: {tmp_path / 'a-file' / 'out' / 'photos'}: Not a directory"]

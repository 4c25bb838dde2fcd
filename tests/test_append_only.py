"""Append-only saves (format 2): what a save writes, what a load reads, compaction, and their guarantees.

A save onto the version an index came from links that version's append-only files and appends
what changed (see :mod:`himir_rag.appendlog`); these tests check that the results are those of a
fresh full save, that a one-photo save writes only that photo, that deletes survive a round trip,
that a failed or killed append leaves the live version reading what it published, and that
format-1 indexes still load and convert.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from himir_rag.appendlog import APPENDED_FILES, COMPACT_SHARE
from himir_rag.catalog import ImageRecord, Snapshot
from himir_rag.config import HiMIRConfig
from himir_rag.errors import IndexConflictError, IndexFormatError
from himir_rag.hierarchy import GridDecomposer, Level
from himir_rag.index import HiMIRIndex
from tests.conftest import ColorEncoder, make_scene, save_format_1

QUERIES = ["a red square and a blue square", "green", "a yellow square next to a purple square", "orange"]
_COLORS = ["red", "green", "blue", "yellow", "purple", "orange"]


def ranked(index: HiMIRIndex) -> list[list[tuple[int, float]]]:
    """(image id, score) of every hit of every query, in every mode that reads the stored vectors."""
    return [[(hit.image_id, hit.score) for hit in index.search(query, k=10, mode=mode).hits]
            for query in QUERIES for mode in ("himir", "himir-full", "mvr", "single")]


def live(index_dir: Path) -> Path:
    return index_dir / (index_dir / "CURRENT").read_text().strip()


def inodes(version: Path) -> dict[int, int]:
    """inode -> size of every file of a version (thumbnails included)."""
    return {p.stat().st_ino: p.stat().st_size for p in version.rglob("*") if p.is_file()}


def bytes_written(before: dict[int, int], version: Path) -> dict[str, int]:
    """Per file of ``version``: its bytes that were not in a file of the previous version (``before``)."""
    return {str(p.relative_to(version)): p.stat().st_size - before.get(p.stat().st_ino, 0)
            for p in version.rglob("*") if p.is_file()}


def more_photos(folder: Path, n: int, *, start: int = 0) -> list[Path]:
    paths = []
    for i in range(start, start + n):
        path = folder / f"extra{i:03d}.png"
        make_scene(path, [(_COLORS[i % 6], (4 * (i % 8), 3 * (i % 8), 60 + 4 * (i % 8), 50))], size=(120, 90))
        paths.append(path)
    return paths


@pytest.fixture
def built(scene_dir: Path, tmp_path: Path) -> tuple[HiMIRIndex, Path]:
    index = HiMIRIndex.build(scene_dir, encoder=ColorEncoder(), progress=False)
    index.save(tmp_path / "idx")
    return index, tmp_path / "idx"


def test_appends_deletes_and_compaction_give_the_results_of_a_fresh_full_save(built, tmp_path):
    index, index_dir = built
    chain = json.loads((live(index_dir) / "manifest.json").read_text())["chain"]
    index.add(more_photos(tmp_path / "more", 5), progress=False)
    index.save(index_dir)
    index.delete([index.images[1].image_id, index.images[7].image_id])
    index.update_metadata({index.images[0].path: {"album": "x"}})
    index.save(index_dir)
    manifest = json.loads((live(index_dir) / "manifest.json").read_text())
    assert manifest["chain"] == chain and manifest["format_version"] == 2  # both saves appended

    fresh = tmp_path / "fresh"
    index.save(fresh)  # another directory: written in full
    assert json.loads((live(fresh) / "manifest.json").read_text())["chain"] != chain
    expected = ranked(index)
    appended = HiMIRIndex.load(index_dir, encoder=ColorEncoder())
    assert ranked(appended) == ranked(HiMIRIndex.load(fresh, encoder=ColorEncoder())) == expected
    assert [r.image_id for r in appended.images] == [r.image_id for r in index.images]
    assert appended.images[0].metadata == {"album": "x"}
    np.testing.assert_array_equal(appended.snapshot.vectors, index.snapshot.vectors)
    np.testing.assert_array_equal(appended.snapshot.parents, index.snapshot.parents)

    report = appended.compact()
    assert report.bytes_after < report.bytes_before  # the deleted photos' rows are gone
    compacted = HiMIRIndex.load(index_dir, encoder=ColorEncoder())
    assert ranked(compacted) == expected
    manifest = json.loads((live(index_dir) / "manifest.json").read_text())
    assert manifest["chain"] != chain and manifest["appended"]["vectors.bin"] == index.snapshot.vectors.nbytes


def test_adding_one_photo_appends_only_that_photo(built, tmp_path):
    index, index_dir = built
    before_version = live(index_dir)
    before = inodes(before_version)
    old_sizes = {name: (before_version / name).stat().st_size for name in APPENDED_FILES}
    index.add(more_photos(tmp_path / "more", 1), progress=False)
    version = index.save(index_dir)
    written = bytes_written(before, version)
    rows = len(index.snapshot.image_rows(index.images[-1].image_id))
    row_vector = index.snapshot.dim * index.snapshot.vectors.dtype.itemsize
    assert written["vectors.bin"] == rows * row_vector  # the photo's rows, and nothing else, appended
    assert (written["region_image.i64"], written["regions.i32"]) == (rows * 8, rows * 24)
    assert 0 < written["images.jsonl"] < 400  # one record line
    for name in APPENDED_FILES:  # the same files (hard links), grown
        assert (version / name).stat().st_ino in before and (version / name).stat().st_size > old_sizes[name]
    assert not before_version.exists()  # the old version is removed; its links are, the files are not
    assert ranked(HiMIRIndex.load(index_dir, encoder=ColorEncoder())) == ranked(index)


def test_deletes_survive_save_and_load_and_many_deletes_compact_on_save(built, tmp_path):
    index, index_dir = built
    index.add(more_photos(tmp_path / "more", 6), progress=False)
    index.save(index_dir)
    gone = [index.images[2].path, index.images[9].path]
    assert index.delete(gone) == 2
    index.save(index_dir)
    manifest = json.loads((live(index_dir) / "manifest.json").read_text())
    assert manifest["appended"]["vectors.bin"] > manifest["vectors"]["shape"][0] * index.snapshot.dim * 2
    loaded = HiMIRIndex.load(index_dir, encoder=ColorEncoder())
    assert len(loaded) == 10 and not {r.path for r in loaded.images} & set(gone)
    assert ranked(loaded) == ranked(index)
    chain = manifest["chain"]

    loaded.delete([r.image_id for r in loaded.images[:4]])  # now past COMPACT_SHARE of the rows are dead
    loaded.save(index_dir)
    manifest = json.loads((live(index_dir) / "manifest.json").read_text())
    assert COMPACT_SHARE < 6 / 12 and manifest["chain"] != chain  # rewritten in full
    assert manifest["appended"]["vectors.bin"] == loaded.snapshot.vectors.nbytes
    assert ranked(HiMIRIndex.load(index_dir, encoder=ColorEncoder())) == ranked(loaded)


def test_bytes_a_killed_append_left_behind_are_ignored_then_cut(built, tmp_path):
    index, index_dir = built
    version = live(index_dir)
    sizes = {name: (version / name).stat().st_size for name in APPENDED_FILES}
    for name in APPENDED_FILES:  # what a save killed mid-append leaves after the live version's bytes
        with open(version / name, "ab") as fh:
            fh.write(b"\x7f" * 1000)
    loaded = HiMIRIndex.load(index_dir, encoder=ColorEncoder())
    assert ranked(loaded) == ranked(index)
    loaded.add(more_photos(tmp_path / "more", 1), progress=False)
    new = loaded.save(index_dir)
    manifest = json.loads((new / "manifest.json").read_text())
    assert all((new / name).stat().st_size == manifest["appended"][name] > sizes[name] for name in APPENDED_FILES)
    assert ranked(HiMIRIndex.load(index_dir, encoder=ColorEncoder())) == ranked(loaded)


def test_a_reader_of_the_old_version_keeps_reading_it_while_a_writer_appends(built, tmp_path):
    index, index_dir = built
    reader = HiMIRIndex.load(index_dir, encoder=ColorEncoder())  # vectors memory-mapped from the live files
    assert isinstance(reader.snapshot.vectors, np.memmap)
    expected = ranked(reader)
    writer = HiMIRIndex.load(index_dir, encoder=ColorEncoder())
    writer.add(more_photos(tmp_path / "more", 4), progress=False)
    writer.save(index_dir)
    assert ranked(reader) == expected  # its rows are a prefix the append never touched
    with pytest.raises(IndexConflictError, match="was saved by another writer"):
        reader.save(index_dir)
    reader.save(index_dir, overwrite=True)  # replaces the writer's version: a full write, a new chain
    assert len(HiMIRIndex.load(index_dir, encoder=ColorEncoder())) == len(reader)
    with pytest.raises(IndexConflictError):
        writer.save(index_dir)


def test_failed_append_cuts_the_shared_files_back(built, tmp_path, monkeypatch):
    import himir_rag.index as index_module

    index, index_dir = built
    version = live(index_dir)
    contents = {name: (version / name).read_bytes() for name in APPENDED_FILES}
    index.add(more_photos(tmp_path / "more", 2), progress=False)

    def fail_on_manifest(fh) -> None:
        if "manifest" in Path(fh.name).name:
            raise OSError(28, "No space left on device")
        os.fsync(fh.fileno())

    monkeypatch.setattr(index_module, "_fsync", fail_on_manifest)
    with pytest.raises(Exception, match="disk full"):
        index.save(index_dir)
    assert live(index_dir) == version
    assert {name: (version / name).read_bytes() for name in APPENDED_FILES} == contents
    monkeypatch.undo()
    index.save(index_dir)
    assert ranked(HiMIRIndex.load(index_dir, encoder=ColorEncoder())) == ranked(index)


def test_format_1_index_loads_and_its_next_save_converts_it(scene_dir, tmp_path):
    index = HiMIRIndex.build(scene_dir, encoder=ColorEncoder(), progress=False)
    save_format_1(index, tmp_path / "old")
    old = HiMIRIndex.load(tmp_path / "old", encoder=ColorEncoder())
    assert ranked(old) == ranked(index)
    old.add(more_photos(tmp_path / "more", 2), progress=False)
    first = old.save(tmp_path / "old")  # in full, format 2
    assert sorted(p.name for p in tmp_path.joinpath("old").iterdir()) == [".lock", "CURRENT", first.name]
    assert not (first / "vectors.npy").exists() and (first / "vectors.bin").is_file()
    inode = (first / "vectors.bin").stat().st_ino
    old.add(more_photos(tmp_path / "more", 1, start=2), progress=False)
    second = old.save(tmp_path / "old")  # then appended: the same file, grown
    assert (second / "vectors.bin").stat().st_ino == inode
    assert ranked(HiMIRIndex.load(tmp_path / "old", encoder=ColorEncoder())) == ranked(old)


@pytest.mark.parametrize("every", [1, 5, 20])
def test_checkpoints_every_n_photos(tmp_path, monkeypatch, every):
    photos = more_photos(tmp_path / "photos", 13)
    saves = []
    real_save = HiMIRIndex.save

    def counting_save(self, directory, **options):
        saves.append((len(self), options.get("checkpoint", False)))
        return real_save(self, directory, **options)

    monkeypatch.setattr(HiMIRIndex, "save", counting_save)
    index = HiMIRIndex(ColorEncoder())
    index.add(tmp_path / "photos", progress=False, checkpoint_dir=tmp_path / "idx", checkpoint_every=every)
    checkpoints = [n for n, checkpoint in saves if checkpoint]
    assert checkpoints == [every * (i + 1) for i in range(len(photos) // every)]
    assert saves[-1] == (13, False) and len(saves) == len(checkpoints) + 1  # the final save writes the stores too
    loaded = HiMIRIndex.load(tmp_path / "idx", encoder=ColorEncoder())
    assert sorted(live(tmp_path / "idx").glob("candidates-v2.level*.faiss"))  # the final save wrote them
    assert ranked(loaded) == ranked(index)


def test_a_checkpoint_without_candidate_stores_loads_and_searches(tmp_path):
    photos = more_photos(tmp_path / "photos", 6)
    index = HiMIRIndex(ColorEncoder())
    index.add(photos, progress=False)
    version = index.save(tmp_path / "idx", checkpoint=True)
    assert not list(version.glob("*.faiss"))
    loaded = HiMIRIndex.load(tmp_path / "idx", encoder=ColorEncoder())
    assert ranked(loaded) == ranked(index)  # the stores are rebuilt on the first search
    assert loaded._needs_save(tmp_path / "idx") is False and index._needs_save(tmp_path / "idx") is True


@pytest.mark.parametrize("change, message", [
    ({"chain": "not hex!"}, "chain must be 1 to 64 hex digits"),
    ({"appended": {"vectors.bin": 0}}, "appended must list exactly"),
    ({"appended": {"vectors.bin": 0, "region_image.i64": 0, "regions.i32": 0, "../images.jsonl": 0}},
     "appended must list exactly"),
    ({"appended": {"vectors.bin": 7, "region_image.i64": 8, "regions.i32": 24, "images.jsonl": 0}},
     "do not hold one row count"),
    ({"appended": {"vectors.bin": 0, "region_image.i64": 0, "regions.i32": 0, "images.jsonl": -1}},
     "must be an int >= 0"),
])
def test_manifest_appended_fields_are_checked(built, change, message):
    _, index_dir = built
    path = live(index_dir) / "manifest.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    with pytest.raises(IndexFormatError, match=message):
        HiMIRIndex.load(index_dir, encoder=ColorEncoder())


def test_damaged_append_only_files_are_refused(built):
    index, index_dir = built
    version = live(index_dir)
    vectors = version / "vectors.bin"
    original = vectors.read_bytes()
    vectors.write_bytes(original[:-10])
    with pytest.raises(IndexFormatError, match=r"vectors.bin: expected at least \d+ bytes, found \d+; the index is"):
        HiMIRIndex.load(index_dir, encoder=ColorEncoder())
    bad = np.frombuffer(original, dtype=index.snapshot.vectors.dtype).copy()
    bad[5] = np.nan
    vectors.write_bytes(bad.tobytes())
    with pytest.raises(IndexFormatError, match="vectors.bin: holds NaN or infinite values"):
        HiMIRIndex.load(index_dir, encoder=ColorEncoder())
    vectors.write_bytes(original)
    regions = version / "regions.i32"
    columns = np.fromfile(regions, dtype="<i4").reshape(-1, 6)
    columns[3, 1] = 500  # a parent row outside its image
    columns.tofile(regions)
    with pytest.raises(IndexFormatError, match="parent"):
        HiMIRIndex.load(index_dir, encoder=ColorEncoder())
    (version / "images.jsonl").write_bytes(b"[1, 2, 3]\n" + (version / "images.jsonl").read_bytes()[10:])
    with pytest.raises(IndexFormatError, match="unreadable catalog or region files"):
        HiMIRIndex.load(index_dir, encoder=ColorEncoder())


def test_cli_compact(built, tmp_path, monkeypatch):
    import himir_rag.index as index_module
    from himir_rag.cli import app

    index, index_dir = built
    index.delete(index.images[0].image_id)
    index.save(index_dir)
    monkeypatch.setattr(index_module, "get_encoder", lambda spec, device="cpu": ColorEncoder())
    result = CliRunner().invoke(app, ["compact", str(index_dir)])
    assert result.exit_code == 0, result.output
    assert f"compacted {index_dir}:" in result.output and "(5 photos" in result.output
    assert ranked(HiMIRIndex.load(index_dir, encoder=ColorEncoder())) == ranked(index)
    missing = CliRunner().invoke(app, ["compact", str(tmp_path / "nowhere")])
    assert missing.exit_code == 1 and "no such index directory" in missing.output


def test_ivf_candidate_stores_are_saved_as_a_base_and_deltas(tmp_path):
    config = HiMIRConfig(scheduler={"index_kind": "ivf"})  # IVF from 64 vectors a level: 16 photos' regions
    index = HiMIRIndex(ColorEncoder(), config)
    index.add(more_photos(tmp_path / "photos", 40), progress=False)
    first = index.save(tmp_path / "idx")
    base = "candidates-v2.level2.ivf.faiss"
    assert index.candidate_stores.store(Level.SEGMENT).kind == "ivf" and (first / base).is_file()
    base_inode = (first / base).stat().st_ino

    index.add(more_photos(tmp_path / "photos", 2, start=40), progress=False)
    before = inodes(first)
    second = index.save(tmp_path / "idx")
    written = bytes_written(before, second)
    assert (second / base).stat().st_ino == base_inode and written[base] == 0  # linked, not rewritten
    delta = second / "candidates-v2.level2.ivf.delta1.faiss"
    assert delta.is_file() and written[delta.name] == delta.stat().st_size < (second / base).stat().st_size / 4
    loaded = HiMIRIndex.load(tmp_path / "idx", encoder=ColorEncoder())
    assert len(loaded.candidate_stores.store(Level.SEGMENT)) == index.snapshot.level_counts()["segment"]
    assert ranked(loaded) == ranked(index)

    loaded.delete([loaded.images[3].image_id])
    loaded.add(more_photos(tmp_path / "photos", 1, start=42), progress=False)
    third = loaded.save(tmp_path / "idx")  # a second delta; the deleted photo's vectors leave after loading
    assert (third / "candidates-v2.level2.ivf.delta2.faiss").is_file()
    reloaded = HiMIRIndex.load(tmp_path / "idx", encoder=ColorEncoder())
    assert ranked(reloaded) == ranked(loaded)
    fresh = HiMIRIndex.load(loaded.save(tmp_path / "fresh").parent, encoder=ColorEncoder())
    assert not list(live(tmp_path / "fresh").glob("*.delta*.faiss")) and ranked(fresh) == ranked(loaded)

    reloaded.add(more_photos(tmp_path / "photos", 12, start=43), progress=False)  # past DELTA_SHARE of the base
    fourth = reloaded.save(tmp_path / "idx")
    assert not list(fourth.glob("candidates-v2.level2.*delta*")) and (fourth / base).stat().st_ino != base_inode
    assert ranked(HiMIRIndex.load(tmp_path / "idx", encoder=ColorEncoder())) == ranked(reloaded)


@pytest.mark.parametrize("precision", ["float16", "float32"])
@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan, -np.nan])
def test_non_finite_vectors_are_found_by_the_bit_test(tmp_path, precision, bad):
    tree = GridDecomposer("1+4+16").decompose(Image.new("RGB", (64, 48)))
    rng = np.random.default_rng(0)
    vectors = [rng.standard_normal((len(tree), 9)) for _ in range(3)]
    vectors[2][20, 8] = bad  # the very last value
    records = [ImageRecord(i + 1, f"/p/{i}.png", 64, 48) for i in range(3)]
    dtype = np.float16 if precision == "float16" else np.float32
    snapshot = Snapshot.empty(9, dtype=dtype).with_images(records, [tree] * 3, vectors)
    with pytest.raises(IndexFormatError, match="NaN or infinite"):
        HiMIRIndex.from_snapshot(snapshot, encoder=ColorEncoder(), config=HiMIRConfig(precision=precision))
    vectors[2][20, 8] = np.finfo(dtype).max  # the largest finite value is no infinity
    snapshot = Snapshot.empty(9, dtype=dtype).with_images(records, [tree] * 3, vectors)
    index = HiMIRIndex.from_snapshot(snapshot, encoder=ColorEncoder(), config=HiMIRConfig(precision=precision))
    index.save(tmp_path / "idx")
    vectors_file = live(tmp_path / "idx") / "vectors.bin"
    data = np.fromfile(vectors_file, dtype=dtype)
    data[len(data) // 2] = bad
    data.tofile(vectors_file)
    with pytest.raises(IndexFormatError, match="vectors.bin: holds NaN or infinite values"):
        HiMIRIndex.load(tmp_path / "idx", encoder=ColorEncoder())

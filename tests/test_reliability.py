"""Reliability: bad images, bad queries, bad index directories, LLM faults.

Every bad input is either skipped with a clear reason (``index.skipped``, persisted in the
catalog) or handled; the rest of the collection is always indexed.
"""

from __future__ import annotations

import asyncio
import builtins
import errno
import io
import json
import logging
import os
import pickle
import sqlite3
import struct
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from himir_rag.config import HiMIRConfig
from himir_rag.decompose import LLMDecomposer, RuleDecomposer
from himir_rag.errors import ConfigError, ImageLoadError, IncompatibleIndexError, IndexFormatError
from himir_rag.hierarchy import Level
from himir_rag.images import iter_image_files, load_image
from himir_rag.index import FORMAT_VERSION, HiMIRIndex
from tests.conftest import COLORS, ColorEncoder, make_scene, save_format_1

_COLOR_NAMES = list(COLORS)


# -- helpers ----------------------------------------------------------------------------------------
def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims ``width`` x ``height`` (a decompression bomb, tiny on disk)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def encoded(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def record(index: HiMIRIndex, name: str):
    return next(r for r in index.images if Path(r.path).name == name)


def global_color_weights(index: HiMIRIndex, name: str) -> dict[str, float]:
    """ColorEncoder histogram of an image's global view, by colour name."""
    snap = index.snapshot
    rows = snap.image_rows(record(index, name).image_id)
    vector = snap.vectors[rows[snap.levels[rows] == Level.GLOBAL][0]]
    return dict(zip(_COLOR_NAMES, vector[: len(_COLOR_NAMES)].tolist()))


def assert_tree_valid(index: HiMIRIndex, name: str) -> None:
    """Regions of one image: inside the recorded (displayed) size, >= 1 px, parents coarser and in-image."""
    rec = record(index, name)
    snap = index.snapshot
    snap.check_integrity()
    rows = snap.image_rows(rec.image_id)
    boxes = snap.boxes[rows]
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
    assert (boxes[:, 2] <= rec.width).all() and (boxes[:, 3] <= rec.height).all()
    assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
    assert tuple(boxes[0]) == (0, 0, rec.width, rec.height)


class CropSizeEncoder(ColorEncoder):
    """Records the size of every crop it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.crop_sizes: list[tuple[int, int]] = []

    def embed_images(self, images):
        self.crop_sizes.extend(img.size for img in images)
        return super().embed_images(images)


# -- bad images ---------------------------------------------------------------------------------------
@pytest.fixture
def bad_collection(tmp_path) -> tuple[Path, dict[str, str], set[str]]:
    """A folder of 4 good photos, 10 odd-but-valid images and 11 bad files.

    Returns (folder, {bad file name: expected reason fragment}, {names that must be indexed}).
    """
    root = tmp_path / "photos"
    good = {
        "red_blue.png": [("red", (5, 5, 50, 45)), ("blue", (100, 70, 150, 115))],
        "green.png": [("green", (20, 20, 140, 100))],
        "sub/yellow.png": [("yellow", (0, 0, 160, 120))],
        "sub/purple.png": [("purple", (40, 30, 120, 90))],
    }
    for name, squares in good.items():
        make_scene(root / name, squares)
    odd = root / "odd"
    odd.mkdir()
    Image.new("RGB", (1, 1), COLORS["red"]).save(odd / "one_pixel.png")
    Image.new("RGB", (10000, 3), COLORS["blue"]).save(odd / "wide_10000x3.png")
    Image.new("RGB", (3, 10000), COLORS["green"]).save(odd / "tall_3x10000.png")
    Image.fromarray((np.arange(48 * 64, dtype=np.uint16).reshape(48, 64) * 21)).save(odd / "grey16.png")
    Image.new("CMYK", (64, 48), (0, 255, 255, 0)).save(odd / "cmyk.jpg")  # CMYK red
    Image.new("RGB", (64, 48), COLORS["orange"]).save(odd / "photo.webp")
    Image.new("RGB", (64, 48), COLORS["purple"]).convert("P").save(odd / "palette.gif")
    frames = [Image.new("RGB", (64, 48), COLORS[c]) for c in ("red", "green", "blue")]
    frames[0].save(odd / "animated.gif", save_all=True, append_images=frames[1:], duration=50, loop=0)
    transparent = Image.new("P", (64, 48), 0)
    transparent.putpalette([*COLORS["red"], *COLORS["blue"]] + [0] * 762)
    transparent.paste(1, (48, 0, 64, 48))  # right quarter opaque blue, the rest transparent red
    transparent.save(odd / "palette_transparent.png", transparency=0)
    exif_photo = Image.new("RGB", (80, 40), COLORS["blue"])
    exif_photo.paste(COLORS["red"], (0, 0, 40, 40))  # stored: red left half; displayed (rotated): red top half
    exif = exif_photo.getexif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    exif_photo.save(odd / "exif_rotated.jpg", exif=exif, quality=95)

    bad = root / "bad"
    bad.mkdir()
    png = encoded(Image.new("RGB", (64, 48), COLORS["green"]), "PNG")
    jpg = encoded(Image.new("RGB", (64, 48), COLORS["green"]), "JPEG")
    (bad / "truncated.png").write_bytes(png[: len(png) // 2])
    (bad / "truncated.jpg").write_bytes(jpg[: len(jpg) // 2])
    (bad / "corrupt_header.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg" * 4)
    (bad / "text.png").write_text("hello, I am a text file")
    (bad / "page.gif").write_text("<html><body>not a gif</body></html>")
    (bad / "random.webp").write_bytes(np.random.default_rng(0).bytes(2048))
    (bad / "zero.jpg").write_bytes(b"")
    png_header_only(bad / "bomb_100000x100000.png", 100_000, 100_000)
    png_header_only(bad / "bomb_10000x10000.png", 10_000, 10_000)
    os.symlink(root, root / "loop")  # a directory symlink loop
    os.symlink("self_loop.png", bad / "self_loop.png")  # a file symlink pointing at itself
    os.symlink("no_such_file.png", bad / "dangling.png")
    expected_bad = {
        "truncated.png": "truncated or corrupt",
        "truncated.jpg": "truncated or corrupt",
        "corrupt_header.jpg": "truncated or corrupt",
        "text.png": "not an image file Pillow can decode",
        "page.gif": "not an image file Pillow can decode",
        "random.webp": "not an image file Pillow can decode",
        "zero.jpg": "empty file (0 bytes)",
        "bomb_100000x100000.png": "10000000000 pixels exceeds max_image_pixels=50000000",
        "bomb_10000x10000.png": "10000x10000 = 100000000 pixels exceeds max_image_pixels=50000000",
        "self_loop.png": "cannot stat (Too many levels of symbolic links)",
        "dangling.png": "broken symlink",
    }
    indexed = {Path(n).name for n in good} | {p.name for p in odd.iterdir()}
    return root, expected_bad, indexed


def test_bad_collection_skips_each_bad_file_with_its_reason_and_indexes_the_rest(bad_collection, tmp_path):
    root, expected_bad, must_index = bad_collection
    encoder = CropSizeEncoder()
    index = HiMIRIndex(encoder)
    report = index.add(root, progress=False)

    assert sorted(Path(r.path).name for r in index.images) == sorted(must_index)  # nothing good lost
    assert len({r.path for r in index.images}) == len(index)  # the symlink loop indexed nothing twice
    reasons = {Path(p).name: reason for p, reason in report.skipped}
    assert set(reasons) == set(expected_bad)
    for name, fragment in expected_bad.items():
        assert fragment in reasons[name], (name, reasons[name])
    assert "unexpected error" not in " ".join(reasons.values())
    assert report.added == len(must_index)
    assert min(min(size) for size in encoder.crop_sizes) >= 1  # every crop at least 1 px
    for name in must_index:
        assert_tree_valid(index, name)

    # the build report is persisted with the index
    index.save(tmp_path / "idx")
    loaded = HiMIRIndex.load(tmp_path / "idx", encoder=ColorEncoder())
    assert {Path(p).name: r for p, r in loaded.skipped} == reasons
    # ...and a re-run skips the same files again, indexing nothing twice
    again = loaded.add(root, progress=False)
    assert (again.added, again.updated, again.unchanged) == (0, 0, len(must_index))
    assert {Path(p).name for p, _ in again.skipped} == set(expected_bad)


def test_odd_but_valid_images_are_decoded_correctly(bad_collection):
    root, _, _ = bad_collection
    index = HiMIRIndex(ColorEncoder())
    index.add(root / "odd", progress=False)
    sizes = {Path(r.path).name: (r.width, r.height) for r in index.images}
    assert sizes["one_pixel.png"] == (1, 1)
    assert sizes["wide_10000x3.png"] == (10000, 3) and sizes["tall_3x10000.png"] == (3, 10000)
    # 16-bit greyscale is rescaled to 8 bits, not clipped to white
    assert global_color_weights(index, "grey16.png")["white"] < 0.9
    assert max(global_color_weights(index, "cmyk.jpg").items(), key=lambda kv: kv[1])[0] == "red"
    # animated GIF: the first frame (red), not a later one
    animated = global_color_weights(index, "animated.gif")
    assert animated["red"] > 0.9 and animated["green"] == animated["blue"] == 0
    # transparent palette pixels are composited on white: no red shows through
    transparent = global_color_weights(index, "palette_transparent.png")
    assert transparent["red"] == 0 and transparent["white"] > transparent["blue"] > 0


def test_exif_rotated_photo_is_indexed_in_displayed_orientation(bad_collection):
    root, _, _ = bad_collection
    index = HiMIRIndex(ColorEncoder())
    index.add([root / "odd" / "exif_rotated.jpg"], progress=False)
    rec = index.images[0]
    assert (rec.width, rec.height) == (40, 80)  # stored 80x40, Orientation=6: swapped
    assert_tree_valid(index, "exif_rotated.jpg")
    # the red half is on the top once displayed: the best "red" region lies in the top half
    hit = index.search("red", subqueries=["red"], k=1).hits[0]
    x0, y0, x1, y1 = hit.regions[0].bbox
    assert (hit.width, hit.height) == (40, 80) and y1 <= 48 and x1 <= 40
    blue = index.search("blue", subqueries=["blue"], k=1).hits[0].regions[0].bbox
    assert blue[1] >= 32


@pytest.mark.parametrize("decomposer", ["grid", "segments"])
def test_extremely_elongated_images_have_valid_trees_and_nonempty_crops(tmp_path, decomposer):
    encoder = CropSizeEncoder()
    index = HiMIRIndex(encoder, HiMIRConfig(layout="1+4+16", decomposer=decomposer))
    for size in [(10000, 3), (3, 10000), (20000, 1), (1, 1), (2, 1), (1025, 1)]:
        Image.new("RGB", size, COLORS["green"]).save(tmp_path / f"strip_{size[0]}x{size[1]}.png")
    report = index.add(tmp_path, progress=False)
    assert report.added == 6 and not report.skipped
    assert len(encoder.crop_sizes) == 6 * 21 and min(min(s) for s in encoder.crop_sizes) >= 1
    for rec in index.images:
        assert_tree_valid(index, Path(rec.path).name)


def test_decompression_bomb_rejected_from_header_without_decoding(tmp_path):
    bomb = png_header_only(tmp_path / "bomb.png", 100_000, 100_000)
    started = time.perf_counter()
    with pytest.raises(ImageLoadError, match=r"image of 10000000000 pixels exceeds max_image_pixels=50000000 "
                                             r"\(decompression-bomb guard\); raise max_image_pixels"):
        load_image(bomb)
    assert time.perf_counter() - started < 1.0  # refused from the header: nothing was allocated
    # the configured limit is the one that decides, below Pillow's own
    photo = tmp_path / "photo.png"
    Image.new("RGB", (100, 100)).save(photo)
    with pytest.raises(ImageLoadError, match=r"100x100 = 10000 pixels exceeds max_image_pixels=9999"):
        load_image(photo, max_pixels=9999)
    assert load_image(photo, max_pixels=10_000).size == (100, 100)
    index = HiMIRIndex(ColorEncoder(), HiMIRConfig(max_image_pixels=9999))
    report = index.add(tmp_path, progress=False)
    assert report.added == 0 and {Path(p).name for p, _ in report.skipped} == {"bomb.png", "photo.png"}


def test_unreadable_file_is_skipped_with_permission_reason(tmp_path, monkeypatch):
    make_scene(tmp_path / "ok.png", [("red", (0, 0, 40, 40))])
    locked = make_scene(tmp_path / "locked.png", [("blue", (0, 0, 40, 40))])
    locked.chmod(0)
    if os.access(locked, os.R_OK):  # running as root: chmod 000 does not stop reads, so simulate it
        real_open = builtins.open

        def denying_open(file, *args, **kwargs):
            if str(file) == str(locked):
                raise PermissionError(errno.EACCES, "Permission denied", str(file))
            return real_open(file, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", denying_open)
    try:
        index = HiMIRIndex(ColorEncoder())
        report = index.add(tmp_path, progress=False)
    finally:
        monkeypatch.undo()
        locked.chmod(0o644)
    assert [Path(r.path).name for r in index.images] == ["ok.png"]
    assert report.skipped == [(str(locked), "cannot read file (Permission denied); check its permissions")]


def test_unlistable_directory_is_reported(tmp_path, monkeypatch):
    make_scene(tmp_path / "ok.png", [("red", (0, 0, 40, 40))])
    closed = tmp_path / "closed"
    make_scene(closed / "hidden.png", [("blue", (0, 0, 40, 40))])
    closed.chmod(0)
    real_scandir = os.scandir
    if os.access(closed, os.R_OK):  # root: simulate the permission error

        def denying_scandir(path="."):
            if Path(path) == closed:
                raise PermissionError(errno.EACCES, "Permission denied", str(path))
            return real_scandir(path)

        monkeypatch.setattr(os, "scandir", denying_scandir)
    try:
        index = HiMIRIndex(ColorEncoder())
        report = index.add(tmp_path, progress=False)
    finally:
        monkeypatch.undo()
        closed.chmod(0o755)
    assert [Path(r.path).name for r in index.images] == ["ok.png"]
    assert report.skipped == [(str(closed), "cannot list directory (Permission denied)")]


def test_symlink_loops_terminate_and_yield_each_file_once(tmp_path):
    root = tmp_path / "photos"
    make_scene(root / "a.png", [("red", (0, 0, 40, 40))])
    make_scene(root / "sub" / "b.png", [("blue", (0, 0, 40, 40))])
    os.symlink(root, root / "sub" / "to_root")
    os.symlink("..", root / "sub" / "up")
    os.symlink(root / "sub", root / "alias_of_sub")
    skipped: list[tuple[Path, str]] = []
    files = list(iter_image_files(root, on_skip=lambda p, r: skipped.append((p, r))))
    assert sorted(p.name for p in files) == ["a.png", "b.png"]
    assert skipped == []  # a loop loses nothing: every file is yielded once


def test_file_vanishing_during_indexing_is_skipped(tmp_path, monkeypatch):
    from himir_rag import ingest

    make_scene(tmp_path / "a.png", [("red", (0, 0, 40, 40))])
    gone = make_scene(tmp_path / "gone.png", [("blue", (0, 0, 40, 40))])
    real = ingest.load_image

    def decode_then_delete(path, **kwargs):
        image = real(path, **kwargs)
        if Path(path) == gone:
            gone.unlink()  # deleted between decoding and the stat that records its size
        return image

    monkeypatch.setattr(ingest, "load_image", decode_then_delete)
    index = HiMIRIndex(ColorEncoder())
    report = index.add([tmp_path / "a.png", gone, tmp_path / "never_there.png"], progress=False)
    assert [Path(r.path).name for r in index.images] == ["a.png"]
    assert sorted(report.skipped) == [(str(gone), "cannot read file (No such file or directory)"),
                                      (str(tmp_path / "never_there.png"), "cannot stat: No such file or directory")]


def test_unexpected_error_on_one_image_does_not_lose_the_collection(scene_dir, monkeypatch, caplog):
    from himir_rag import ingest

    real = ingest.load_image

    def flaky(path, **kwargs):
        if Path(path).name == "orange.png":
            raise RuntimeError("decoder bug")
        return real(path, **kwargs)

    monkeypatch.setattr(ingest, "load_image", flaky)
    index = HiMIRIndex(ColorEncoder())
    with caplog.at_level(logging.ERROR, logger="himir_rag.ingest"):
        report = index.add(scene_dir, progress=False)
    assert len(index) == 5
    assert report.skipped == [(str(scene_dir / "sub" / "orange.png"),
                               "unexpected error (RuntimeError: decoder bug); please report it")]
    assert "unexpected error while preparing" in caplog.text


def test_non_json_metadata_stops_the_run_with_a_clear_error(scene_dir):
    with pytest.raises(ConfigError, match="is not JSON-serialisable"):
        HiMIRIndex(ColorEncoder()).add(scene_dir, progress=False, metadata=lambda p: {"when": object()})


def test_fixed_file_leaves_the_skipped_list(tmp_path):
    broken = tmp_path / "later.png"
    broken.write_bytes(b"")
    index = HiMIRIndex(ColorEncoder())
    index.add(tmp_path, progress=False)
    assert [Path(p).name for p, _ in index.skipped] == ["later.png"]
    make_scene(broken, [("red", (0, 0, 40, 40))])
    index.add(tmp_path, progress=False)
    assert index.skipped == [] and len(index) == 1


# -- bad queries ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shared_index(tmp_path_factory) -> HiMIRIndex:
    """The six scenes of ``scene_dir``, built once for the read-only query tests."""
    root = tmp_path_factory.mktemp("photos")
    make_scene(root / "red_blue.png", [("red", (5, 5, 50, 45)), ("blue", (100, 70, 150, 115))])
    make_scene(root / "red_green.png", [("red", (100, 5, 150, 45)), ("green", (5, 70, 55, 115))])
    make_scene(root / "all_red.png", [("red", (0, 0, 160, 120))])
    make_scene(root / "all_blue.png", [("blue", (0, 0, 160, 120))])
    make_scene(root / "sub" / "yellow_purple.png", [("yellow", (10, 10, 60, 60)), ("purple", (90, 60, 150, 110))])
    make_scene(root / "sub" / "orange.png", [("orange", (40, 30, 120, 90))])
    return HiMIRIndex.build(root, encoder=ColorEncoder(), progress=False)


@pytest.fixture
def index(scene_dir) -> HiMIRIndex:
    return HiMIRIndex.build(scene_dir, encoder=ColorEncoder(), progress=False)


@pytest.mark.parametrize("query", ["", "   ", "\n\t "])
def test_empty_query_is_a_clear_value_error(shared_index, query):
    with pytest.raises(ValueError, match="query is empty; pass a non-empty description"):
        shared_index.search(query)


@pytest.mark.parametrize("query", [None, 42, b"red"])
def test_non_string_query_is_rejected(shared_index, query):
    with pytest.raises(ValueError, match="query is empty"):
        shared_index.search(query)  # type: ignore[arg-type]


@pytest.mark.parametrize("k", [0, -1, 2.5, "3", True, None])
def test_bad_k_is_a_clear_error(shared_index, k):
    with pytest.raises(ValueError, match=r"k must be a positive integer, got "):
        shared_index.search("red", k=k)  # type: ignore[arg-type]


def test_huge_k_is_capped_with_a_warning(shared_index, caplog):
    with caplog.at_level(logging.WARNING, logger="himir_rag.index"):
        result = shared_index.search("red", k=10**12)
    assert len(result.hits) == 6
    assert "k=1000000000000 is larger than the collection (6 images); returning 6" in caplog.text
    assert len(shared_index.search("red", k=np.int64(2)).hits) == 2


@pytest.mark.parametrize("mode", ["dense", "", "HIMIR"])
def test_unknown_mode_lists_the_valid_ones(shared_index, mode):
    with pytest.raises(ConfigError, match=r"is unknown; valid modes: single, mvr, himir-full, himir"):
        shared_index.search("red", mode=mode)  # type: ignore[arg-type]


def test_no_mode_means_the_configured_default(shared_index):
    assert shared_index.search("red", mode=None).stats.mode == "himir"


@pytest.mark.parametrize("query", [
    "ein roter Würfel neben einem blauen", "赤い四角と青い四角", "красный квадрат",
    "🟥 and 🟦 🐶🏖️🚲",
    "a red\x00square", "'; DROP TABLE images; --", "red " * 500, "?!.,;:", "\u202eder",
])
@pytest.mark.parametrize("mode", ["himir-full", "himir", "mvr", "single"])
def test_odd_queries_do_not_crash(shared_index, query, mode):
    result = shared_index.search(query, k=3, mode=mode)
    assert len(result.hits) == 3 and result.subqueries
    assert all(-1.0 - 1e-5 <= h.score <= 1.0 + 1e-5 for h in result.hits)


def test_a_query_beyond_max_query_chars_is_refused_clearly(shared_index):
    with pytest.raises(ValueError, match="20000 characters long, more than max_query_chars=2048"):
        shared_index.search("red " * 5000, k=3)


def test_filter_on_unknown_key_returns_nothing(shared_index):
    for mode in ("himir-full", "himir", "mvr", "single"):
        assert shared_index.search("red", k=3, mode=mode, filters={"no_such_key": 1}).hits == ()
    assert shared_index.search("red", k=3, filters=lambda metadata: metadata.get("no_such_key") == 1).hits == ()


def test_blank_explicit_subqueries_fall_back_to_the_query(shared_index):
    result = shared_index.search("red", subqueries=["", "  "], k=1)
    assert result.subqueries == ("red",)


class FakeTokenizer:
    """Word-level stand-in for a Hugging Face tokenizer (adds 2 special tokens)."""

    def __call__(self, texts, **kwargs):
        return {"input_ids": [[0] + [1] * len(t.split()) + [2] for t in texts]}


class FakeSentenceModel:
    max_seq_length = 16
    tokenizer = FakeTokenizer()

    def encode(self, texts, **kwargs):
        return np.ones((len(texts), 384), np.float32)


def _offline_with_fake_model():
    from himir_rag.encoders.offline import OfflineEncoder

    encoder = OfflineEncoder()
    encoder._sentence_model = FakeSentenceModel()  # no model load: only the truncation check is under test
    encoder._class_embeddings = np.ones((1000, 384), np.float32)
    return encoder


def test_offline_encoder_warns_when_a_text_is_truncated(caplog):
    encoder = _offline_with_fake_model()
    with caplog.at_level(logging.WARNING, logger="himir_rag.encoders.offline"):
        vectors = encoder.embed_texts(["a red square", "word " * 40])
    assert vectors.shape == (2, 384)
    assert len(caplog.records) == 1
    assert ("text of 42 tokens exceeds the offline encoder's max_seq_length=16; only its first 16 tokens are "
            "embedded") in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="himir_rag.encoders.offline"):
        encoder.embed_texts(["short", "exactly fourteen words " * 4 + "x x"])  # 14 words + 2 = 16: fits
    assert caplog.records == []


@pytest.mark.slow
def test_offline_encoder_warns_on_a_real_long_query(offline_encoder, caplog):
    with caplog.at_level(logging.WARNING, logger="himir_rag.encoders.offline"):
        vectors = offline_encoder.embed_texts(["a dog on a beach " * 100, "a cat", "🐶🏖️ 犬 auf dem Strand"])
    assert vectors.shape == (3, 384) and np.isfinite(vectors).all()
    assert "exceeds the offline encoder's max_seq_length=256" in caplog.text
    assert caplog.text.count("exceeds") == 1


# -- bad index directories -----------------------------------------------------------------------------
@pytest.fixture
def saved(index, tmp_path) -> Path:
    """A saved index; returns its live version directory."""
    index.sync_candidate_stores()  # the FAISS candidate stores are saved too
    return index.save(tmp_path / "idx")


@pytest.fixture
def saved_v1(index, tmp_path) -> Path:
    """The same index saved in format 1 (one vectors.npy + catalog.sqlite per version); its version directory."""
    return save_format_1(index, tmp_path / "idx1")


def refresh_sizes(version: Path) -> None:
    """Update the manifest's file sizes so damage reaches the checks past the size check."""
    manifest = json.loads((version / "manifest.json").read_text())
    manifest["files"] = {p.name: p.stat().st_size for p in version.iterdir()
                         if p.is_file() and p.name != "manifest.json" and p.name not in manifest.get("appended", {})}
    (version / "manifest.json").write_text(json.dumps(manifest))


def edit_manifest(version: Path, **changes) -> None:
    manifest = json.loads((version / "manifest.json").read_text())
    manifest.update(changes)
    (version / "manifest.json").write_text(json.dumps(manifest))


def load(version: Path, encoder=None) -> HiMIRIndex:
    return HiMIRIndex.load(version.parent, encoder=encoder or ColorEncoder())


def test_missing_index_pieces_are_named(saved_v1, tmp_path):
    with pytest.raises(IndexFormatError, match="no such index directory; build one with `himir index`"):
        HiMIRIndex.load(tmp_path / "nowhere", encoder=ColorEncoder())
    (tmp_path / "empty").mkdir()
    with pytest.raises(IndexFormatError, match=r"not a himir index \(no CURRENT file\)"):
        HiMIRIndex.load(tmp_path / "empty", encoder=ColorEncoder())
    for name in ("vectors.npy", "catalog.sqlite"):
        backup = saved_v1 / name
        data = backup.read_bytes()
        backup.unlink()
        with pytest.raises(IndexFormatError, match=rf"{name}: missing; the index is incomplete"):
            load(saved_v1)
        backup.write_bytes(data)
    (saved_v1 / "manifest.json").rename(saved_v1 / "manifest.bak")
    with pytest.raises(IndexFormatError, match="manifest.json is missing"):
        load(saved_v1)
    (saved_v1 / "manifest.bak").rename(saved_v1 / "manifest.json")
    (saved_v1.parent / "CURRENT").write_text("v123-gone\n")
    with pytest.raises(IndexFormatError, match="CURRENT names 'v123-gone', which is missing"):
        load(saved_v1)
    (saved_v1.parent / "CURRENT").write_text("../../etc\n")
    with pytest.raises(IndexFormatError, match="CURRENT names"):
        load(saved_v1)


def test_truncated_vector_file_is_refused(saved_v1):
    vectors = saved_v1 / "vectors.npy"
    vectors.write_bytes(vectors.read_bytes()[:-40])
    with pytest.raises(IndexFormatError, match=r"vectors.npy: expected \d+ bytes, found \d+; the index is truncated"):
        load(saved_v1)
    refresh_sizes(saved_v1)  # even with a matching manifest, the short array is refused
    with pytest.raises(IndexFormatError, match="vectors.npy: unreadable vector file"):
        load(saved_v1)


def test_manifest_problems_are_named(saved):
    (saved / "manifest.json").write_text("{not json")
    with pytest.raises(IndexFormatError, match="manifest.json: not valid JSON"):
        load(saved)
    (saved / "manifest.json").write_text("[1, 2]")
    with pytest.raises(IndexFormatError, match="not a himir-rag index manifest"):
        load(saved)
    (saved / "manifest.json").write_text(json.dumps({"format": "something else", "format_version": FORMAT_VERSION}))
    with pytest.raises(IndexFormatError, match="not a himir-rag index manifest"):
        load(saved)


def test_newer_format_version_is_refused(saved):
    edit_manifest(saved, format_version=FORMAT_VERSION + 1)
    with pytest.raises(IncompatibleIndexError, match=rf"index format version {FORMAT_VERSION + 1}, this himir-rag "
                                                     rf"reads versions 1 and {FORMAT_VERSION}; upgrade himir-rag"):
        load(saved)


def test_manifest_without_encoder_or_with_escaping_names_is_refused(saved):
    manifest = json.loads((saved / "manifest.json").read_text())
    edit_manifest(saved, encoder={"name": "x"})
    with pytest.raises(IndexFormatError, match="no encoder name and dim recorded"):
        load(saved)
    edit_manifest(saved, encoder=manifest["encoder"], files={**manifest["files"], "../../secret": 1})
    with pytest.raises(IndexFormatError, match="points outside the index"):
        load(saved)


def test_different_encoder_is_refused(saved):
    class OtherEncoder(ColorEncoder):
        name = "test:other"

    class WiderEncoder(ColorEncoder):
        dim = 12

    with pytest.raises(IncompatibleIndexError, match="built with encoder 'test:color' .* load with the same encoder"):
        load(saved, OtherEncoder())
    with pytest.raises(IncompatibleIndexError, match="index dim=9 but the encoder gives 12"):
        load(saved, WiderEncoder())


class _Exploit:
    """Unpickling this creates ``marker``: proof that a pickle was executed."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def test_malicious_pickle_as_vectors_is_refused_not_executed(saved_v1, tmp_path):
    marker = tmp_path / "pwned"
    with open(saved_v1 / "vectors.npy", "wb") as fh:
        np.save(fh, np.array([_Exploit(marker)], dtype=object), allow_pickle=True)
    refresh_sizes(saved_v1)
    with pytest.raises(IndexFormatError, match="vectors.npy: unreadable vector file .*allow_pickle=False"):
        load(saved_v1)
    assert not marker.exists()
    # a raw pickle (not even .npy) is refused as well
    (saved_v1 / "vectors.npy").write_bytes(pickle.dumps(_Exploit(marker)))
    refresh_sizes(saved_v1)
    with pytest.raises(IndexFormatError, match="unreadable vector file"):
        load(saved_v1)
    assert not marker.exists()


def test_other_vector_damage_is_refused(saved_v1):
    good = np.load(saved_v1 / "vectors.npy")
    np.save(saved_v1 / "vectors.npy", good.astype(np.float64))
    refresh_sizes(saved_v1)
    with pytest.raises(IncompatibleIndexError, match=r"vectors \(\d+, 9\) float64, manifest says \(n, 9\) float16"):
        load(saved_v1)
    bad = good.copy()
    bad[3, 2] = np.nan
    np.save(saved_v1 / "vectors.npy", bad)
    refresh_sizes(saved_v1)
    with pytest.raises(IndexFormatError, match="holds NaN or infinite values"):
        load(saved_v1)
    with open(saved_v1 / "vectors.npy", "wb") as fh:
        np.savez(fh, vectors=good)
    refresh_sizes(saved_v1)
    with pytest.raises(IndexFormatError, match="not a single .npy array"):
        load(saved_v1)
    np.save(saved_v1 / "vectors.npy", good[:-1])
    refresh_sizes(saved_v1)
    with pytest.raises(IndexFormatError, match=r"catalog lists \d+ regions but the vector file holds \d+"):
        load(saved_v1)


def test_damaged_catalog_is_refused(saved_v1):
    catalog = saved_v1 / "catalog.sqlite"
    original = catalog.read_bytes()
    catalog.write_bytes(b"SQLite format 3\x00" + b"\x00" * (len(original) - 16))
    refresh_sizes(saved_v1)
    with pytest.raises(IndexFormatError, match="catalog.sqlite: unreadable catalog"):
        load(saved_v1)
    # a structurally valid catalog whose tree is inconsistent never reaches search
    for statement, fragment in [
        ("UPDATE regions SET parent = 30 WHERE row = 2", "parent belongs to another image"),
        ("UPDATE regions SET parent = 9999 WHERE row = 2", "parent row is out of range"),
        ("UPDATE regions SET level = 7 WHERE row = 2", "unknown level"),
        ("UPDATE regions SET x1 = x0 WHERE row = 2", "empty box"),
        ("DELETE FROM images WHERE image_id = 1", "images and region rows do not match"),
        ("UPDATE regions SET image_id = 2 WHERE row = 0", "images and region rows do not match"),
    ]:
        catalog.write_bytes(original)
        with sqlite3.connect(catalog) as db:
            db.execute(statement)
        db.close()
        refresh_sizes(saved_v1)
        with pytest.raises(IndexFormatError, match=fragment):
            load(saved_v1)


def test_damaged_faiss_store_is_refused(saved):
    stores = sorted(saved.glob("candidates-v2.level*.faiss"))
    assert stores, "the fixture should have saved FAISS candidate stores"
    original = stores[0].read_bytes()
    stores[0].write_bytes(b"\x00garbage" * 10)
    refresh_sizes(saved)
    with pytest.raises(IndexFormatError, match="not a readable FAISS index"):
        load(saved)
    stores[0].write_bytes(original)  # a store of another level: a valid file, the wrong count
    stores[1].write_bytes(original)
    refresh_sizes(saved)
    with pytest.raises(IndexFormatError, match="vectors, the catalog has"):
        load(saved)


def test_leftovers_of_a_killed_save_are_ignored_then_cleaned(index, saved):
    directory = saved.parent
    (directory / ".v1-dead.tmp").mkdir()
    (directory / "v2-orphan").mkdir()  # renamed into place, CURRENT never switched
    (directory / ".CURRENT.dead.tmp").write_text("v2-orphan\n")
    assert len(load(saved)) == 6
    new_version = index.save(directory)
    assert sorted(p.name for p in directory.iterdir()) == sorted([".lock", "CURRENT", new_version.name])


# -- LLM faults ------------------------------------------------------------------------------------------
QUERY = "a red square and a blue square"


def _raising(prompt: str) -> str:
    raise RuntimeError("model server exploded")


@pytest.mark.parametrize("answer, logged", [
    (lambda prompt: "Sure! Here are some ideas: red things.", "no usable sub-queries"),
    (lambda prompt: "I'm sorry, I can't help with that.", "no usable sub-queries"),
    (lambda prompt: "", "no usable sub-queries"),
    (lambda prompt: None, "no usable sub-queries"),
    (lambda prompt: '["", "   "]', "no usable sub-queries"),
    (_raising, "model server exploded"),
])
def test_llm_garbage_or_errors_fall_back_and_are_logged(shared_index, caplog, answer, logged):
    decomposer = LLMDecomposer(answer, timeout=0.2)
    with caplog.at_level(logging.WARNING, logger="himir_rag.decompose"):
        result = shared_index.search(QUERY, k=2, decomposer=decomposer)
    assert list(result.subqueries) == RuleDecomposer().decompose(QUERY)
    assert Path(result.hits[0].path).name == "red_blue.png"
    assert "LLM query decomposition failed" in caplog.text and logged in caplog.text


STRUCTURED_GARBAGE = [42, '{"not": "a list"}', "[1, 2, null]", "\x00\xff" * 100, '{"subqueries": 5}']


@pytest.mark.parametrize("answer", STRUCTURED_GARBAGE)
def test_llm_structured_garbage_never_breaks_retrieval(shared_index, answer):
    result = shared_index.search(QUERY, k=2, decomposer=LLMDecomposer(lambda prompt: answer, timeout=0.2))
    assert len(result.hits) == 2 and result.subqueries
    assert all(-1.0 - 1e-5 <= h.score <= 1.0 + 1e-5 for h in result.hits)


@pytest.mark.parametrize("answer", STRUCTURED_GARBAGE)
def test_llm_structured_garbage_falls_back(shared_index, answer, caplog):
    with caplog.at_level(logging.WARNING, logger="himir_rag.decompose"):
        result = shared_index.search(QUERY, k=2, decomposer=LLMDecomposer(lambda prompt: answer, timeout=0.2))
    assert list(result.subqueries) == RuleDecomposer().decompose(QUERY)
    assert "LLM query decomposition failed" in caplog.text


def test_hanging_llm_times_out_and_retrieval_still_answers(shared_index, caplog):
    release = threading.Event()

    def hanging(prompt: str) -> str:
        release.wait(10)
        return '["red"]'

    decomposer = LLMDecomposer(hanging, timeout=0.2)
    try:
        started = time.perf_counter()
        with caplog.at_level(logging.WARNING, logger="himir_rag.decompose"):
            result = shared_index.search(QUERY, k=2, decomposer=decomposer)
        assert time.perf_counter() - started < 2.0
    finally:
        release.set()
    assert Path(result.hits[0].path).name == "red_blue.png"
    assert "LLM query decomposition failed" in caplog.text and "Timeout" in caplog.text


async def test_failing_llm_under_async_search(shared_index, caplog):
    decomposer = LLMDecomposer(_raising, timeout=0.2, cache_size=0)
    with caplog.at_level(logging.WARNING, logger="himir_rag.decompose"):
        results = await asyncio.gather(*(shared_index.asearch(QUERY, k=1, decomposer=decomposer) for _ in range(10)))
    assert all(Path(r.hits[0].path).name == "red_blue.png" for r in results)
    assert caplog.text.count("model server exploded") == 10

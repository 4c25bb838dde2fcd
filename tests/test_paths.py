"""Paths: hostile folders (symlinks out, swapped files, edited catalog rows), portable indexes, thumbnails."""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import shutil
import sqlite3
from pathlib import Path

import pytest
from llama_index.core.schema import MetadataMode
from PIL import Image
from typer.testing import CliRunner

from himir_rag.cli import app
from himir_rag.config import HiMIRConfig
from himir_rag.errors import ImageLoadError
from himir_rag.images import encode_image_file, iter_image_files
from himir_rag.index import HiMIRIndex
from himir_rag.langchain import HiMIRRetriever as LangChainRetriever
from himir_rag.langchain import documents_to_content_blocks, format_images
from himir_rag.llama_index import HiMIRRetriever
from himir_rag.retriever import file_to_base64
from tests.conftest import ColorEncoder, make_scene, save_format_1

SECRET = b"root:$6$not-an-image:19000:0:99999:7:::\n"  # stands in for /etc/shadow


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A folder next to the collection: a secret text file and two images."""
    folder = tmp_path / "outside"
    folder.mkdir()
    (folder / "shadow").write_bytes(SECRET)
    make_scene(folder / "green.png", [("green", (0, 0, 80, 60))])
    make_scene(folder / "yellow.png", [("yellow", (0, 0, 80, 60))])
    return folder


@pytest.fixture
def hostile(tmp_path: Path, outside: Path) -> Path:
    """A photo folder with two real photos and links out of it."""
    root = tmp_path / "photos"
    make_scene(root / "red.png", [("red", (0, 0, 160, 120))])
    make_scene(root / "sub" / "blue.png", [("blue", (0, 0, 160, 120))])
    (root / "shadow.png").symlink_to(outside / "shadow")  # a file outside, named like a photo
    (root / "green.png").symlink_to(outside / "green.png")  # an image outside
    (root / "more").symlink_to(outside, target_is_directory=True)  # a folder of images outside
    (root / "inside.png").symlink_to(root / "red.png")  # a link that stays inside: fine
    if Path("/usr/share").is_dir():
        (root / "share").symlink_to("/usr/share", target_is_directory=True)
    return root


def _retrieve(index: HiMIRIndex, query: str = "red", k: int = 10):
    return HiMIRRetriever(index, similarity_top_k=min(k, len(index))).retrieve(query)


def _shipped_pixels(data: bytes) -> list:
    return list(Image.open(io.BytesIO(data)).convert("RGB").getdata())


# -- index time --------------------------------------------------------------------------------
def test_links_out_of_the_folder_are_skipped_with_a_reason(hostile: Path) -> None:
    index = HiMIRIndex(ColorEncoder())
    report = index.add(hostile, progress=False)

    indexed = sorted(Path(r.path).name for r in index.images)
    assert indexed == ["blue.png", "inside.png", "red.png"]
    skipped = {Path(path).name: reason for path, reason in report.skipped}
    expected = {"shadow.png", "green.png", "more"} | ({"share"} if (hostile / "share").exists() else set())
    assert set(skipped) == expected  # one entry per linked folder, not one per file in it
    assert all("outside the indexed folder" in reason and "--follow-symlinks" in reason for reason in skipped.values())
    assert index.root == str(hostile)


def test_follow_symlinks_opts_in(hostile: Path) -> None:
    if (hostile / "share").exists():
        (hostile / "share").unlink()  # keep the opt-in test small
    index = HiMIRIndex(ColorEncoder(), HiMIRConfig(follow_symlinks=True))
    report = index.add(hostile, progress=False)

    names = sorted(Path(r.path).name for r in index.images)
    assert names == ["blue.png", "green.png", "green.png", "inside.png", "red.png", "yellow.png"]
    assert [Path(p).name for p, _ in report.skipped] == ["shadow.png"]  # followed, but not an image
    assert "not an image" in report.skipped[0][1]


def test_listed_files_leaving_their_folder_are_refused(hostile: Path) -> None:
    index = HiMIRIndex(ColorEncoder())
    report = index.add([hostile / "red.png", hostile / "green.png", hostile / "shadow.png"], progress=False)
    assert [Path(r.path).name for r in index.images] == ["red.png"]
    assert {Path(p).name for p, _ in report.skipped} == {"green.png", "shadow.png"}
    assert all("outside the collection folder" in reason for _, reason in report.skipped)


def test_walker_reports_each_refused_link_once(hostile: Path) -> None:
    skipped: list[tuple[Path, str]] = []
    found = list(iter_image_files(hostile, on_skip=lambda path, reason: skipped.append((path, reason))))
    assert sorted(p.name for p in found) == ["blue.png", "inside.png", "red.png"]
    assert len(skipped) == len({p for p, _ in skipped})


# -- retrieval time: never ship bytes that are not a decoded image ----------------------------------
def test_photo_swapped_for_a_link_to_a_secret_is_not_shipped(hostile: Path, outside: Path,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    index = HiMIRIndex(ColorEncoder())
    index.add(hostile, progress=False)
    red = hostile / "red.png"
    red.unlink()
    red.symlink_to(outside / "shadow")

    with caplog.at_level(logging.WARNING):
        nodes = _retrieve(index)
        documents = LangChainRetriever(index=index, k=3).invoke("red")
    assert "red.png" not in [n.node.metadata["file_name"] for n in nodes]
    assert "red.png" not in [d.metadata["file_name"] for d in documents]
    assert "outside the collection folder" in caplog.text
    for node in nodes:  # what is shipped decodes as an image, and is never the secret
        block = node.node.get_content_blocks(MetadataMode.LLM)[-1]
        assert SECRET not in block.resolve_image().read() and _shipped_pixels(block.resolve_image().read())
    for block in documents_to_content_blocks(documents, max_side=None):
        if block["type"] == "image":
            assert SECRET not in base64.b64decode(block["base64"])


def test_opted_in_links_still_ship_only_decoded_images(hostile: Path, outside: Path) -> None:
    index = HiMIRIndex(ColorEncoder(), HiMIRConfig(follow_symlinks=True))
    index.add([hostile / "red.png"], progress=False)
    (hostile / "red.png").unlink()
    (hostile / "red.png").symlink_to(outside / "shadow")
    assert _retrieve(index) == []  # the header check leaves it out
    with pytest.raises(ImageLoadError, match="not an image"):
        file_to_base64(hostile / "red.png")
    with pytest.raises(ImageLoadError, match="not an image"):
        encode_image_file(outside / "shadow")


def test_photo_overwritten_by_text_after_retrieval_raises_instead_of_shipping(hostile: Path) -> None:
    index = HiMIRIndex(ColorEncoder())
    index.add([hostile / "red.png"], progress=False)
    node = _retrieve(index)[0].node
    document = LangChainRetriever(index=index, k=1).invoke("red")[0]
    (hostile / "red.png").write_bytes(SECRET)  # swapped between retrieval and prompt building

    with pytest.raises(ImageLoadError):
        node.get_content_blocks(MetadataMode.LLM)
    with pytest.raises(ImageLoadError):
        format_images([document], "what colour?", max_side=None)


def test_shipped_images_are_reencoded_not_file_bytes(tmp_path: Path) -> None:
    photo = tmp_path / "photos" / "red.jpg"
    photo.parent.mkdir()
    Image.new("RGB", (64, 48), (220, 30, 30)).save(photo, quality=95)
    with open(photo, "ab") as fh:
        fh.write(b"TRAILING-PAYLOAD")  # bytes after the JPEG's end: Pillow decodes, a raw copy would carry them
    index = HiMIRIndex(ColorEncoder())
    index.add(tmp_path / "photos", progress=False)

    block = _retrieve(index)[0].node.get_content_blocks(MetadataMode.LLM)[-1]
    llama_bytes = block.resolve_image().read()
    (langchain_block,) = documents_to_content_blocks(LangChainRetriever(index=index, k=1).invoke("red"),
                                                     include_text=False, max_side=None)
    for data in (llama_bytes, base64.b64decode(langchain_block["base64"])):
        assert b"TRAILING-PAYLOAD" not in data and data != photo.read_bytes()
        assert Image.open(io.BytesIO(data)).format == "JPEG" and Image.open(io.BytesIO(data)).size == (64, 48)


def _edit_records(index_dir: Path, old_path: str, new_path: str) -> None:
    """Rewrite the stored path ``old_path`` in the live version's ``images.jsonl`` (a tampered index), keeping
    the manifest's recorded size in step."""
    version = index_dir / (index_dir / "CURRENT").read_text().strip()
    entries = [json.loads(line) for line in (version / "images.jsonl").read_text().splitlines()]
    text = "".join(json.dumps([e[0], new_path, *e[2:]] if e[1] == old_path else e) + "\n" for e in entries)
    (version / "images.jsonl").write_text(text)
    manifest = json.loads((version / "manifest.json").read_text())
    manifest["appended"]["images.jsonl"] = len(text.encode())
    (version / "manifest.json").write_text(json.dumps(manifest))


def _edit_catalog(index_dir: Path, sql: str, *args: object) -> None:
    """Run ``sql`` on the live catalog of a format-1 index and keep the manifest's recorded size in step."""
    version = index_dir / (index_dir / "CURRENT").read_text().strip()
    with sqlite3.connect(version / "catalog.sqlite") as db:
        db.execute(sql, args)
    db.close()
    manifest = json.loads((version / "manifest.json").read_text())
    manifest["files"]["catalog.sqlite"] = (version / "catalog.sqlite").stat().st_size
    (version / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("row", ["../../etc/passwd", "../" * 30 + "etc/passwd", "../outside/shadow",
                                 "/etc/passwd"])
def test_edited_catalog_row_is_not_shipped(hostile: Path, outside: Path, tmp_path: Path, row: str,
                                           caplog: pytest.LogCaptureFixture) -> None:
    index = HiMIRIndex(ColorEncoder())
    index.add([hostile / "red.png", hostile / "sub" / "blue.png"], progress=False)
    index.save(tmp_path / "index")
    _edit_records(tmp_path / "index", "red.png", row)

    loaded = HiMIRIndex.load(tmp_path / "index", encoder=ColorEncoder())
    with caplog.at_level(logging.WARNING):
        nodes = _retrieve(loaded)
        documents = LangChainRetriever(index=loaded, k=2).invoke("red")
    assert [n.node.metadata["file_name"] for n in nodes] == ["blue.png"]
    assert [d.metadata["file_name"] for d in documents] == ["blue.png"]
    assert "left out of the results" in caplog.text


# -- portable indexes --------------------------------------------------------------------------------
@pytest.fixture
def built(tmp_path: Path) -> tuple[Path, Path]:
    """A collection (with a subfolder) and its saved index, with thumbnails."""
    root = tmp_path / "photos"
    make_scene(root / "red.png", [("red", (0, 0, 160, 120))])
    make_scene(root / "trip" / "blue.png", [("blue", (0, 0, 160, 120))])
    make_scene(root / "trip" / "red_blue.png", [("red", (0, 0, 80, 120)), ("blue", (80, 0, 160, 120))])
    HiMIRIndex.build(root, encoder=ColorEncoder(), thumbnails=True, progress=False).save(tmp_path / "index")
    return root, tmp_path / "index"


def test_catalog_stores_paths_relative_to_the_recorded_root(built: tuple[Path, Path]) -> None:
    root, index_dir = built
    version = index_dir / (index_dir / "CURRENT").read_text().strip()
    assert HiMIRIndex.read_manifest(index_dir)["root"] == str(root)
    rows = sorted(json.loads(line)[1] for line in (version / "images.jsonl").read_text().splitlines())
    assert rows == ["red.png", "trip/blue.png", "trip/red_blue.png"]
    loaded = HiMIRIndex.load(index_dir, encoder=ColorEncoder())
    assert sorted(r.path for r in loaded.images) == sorted(str(p) for p in root.rglob("*.png"))


def test_moved_folder_relocate_and_search_again(built: tuple[Path, Path], tmp_path: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    root, index_dir = built
    before = {n.node.metadata["file_name"]: n.node.node_id for n in _retrieve(
        HiMIRIndex.load(index_dir, encoder=ColorEncoder()), k=3)}
    moved = tmp_path / "elsewhere" / "photos"
    moved.parent.mkdir()
    shutil.move(root, moved)

    version = index_dir / (index_dir / "CURRENT").read_text().strip()
    shutil.rmtree(version / "thumbnails")  # this test is about the originals (thumbnails: below)
    index = HiMIRIndex.load(index_dir, encoder=ColorEncoder())
    with caplog.at_level(logging.WARNING):
        assert _retrieve(index, k=3) == []
    assert "himir relocate" in caplog.text

    report = index.relocate(moved)
    assert (report.rebased, report.missing, report.outside_root) == (3, 0, 0)
    nodes = _retrieve(index, k=3)
    assert all(Path(n.node.image_path).is_file() and str(moved) in n.node.image_path for n in nodes)
    assert {n.node.metadata["file_name"]: n.node.node_id for n in nodes} == before  # ids do not depend on the place
    assert all(Path(hit.path).is_file() for hit in index.search("blue", k=3).hits)


def test_relocate_reports_missing_photos(built: tuple[Path, Path], tmp_path: Path) -> None:
    root, index_dir = built
    moved = tmp_path / "moved"
    shutil.copytree(root, moved)
    (moved / "trip" / "blue.png").unlink()
    report = HiMIRIndex.load(index_dir, encoder=ColorEncoder()).relocate(moved)
    assert (report.rebased, report.missing) == (3, 1)
    with pytest.raises(FileNotFoundError, match="no such directory"):
        HiMIRIndex.load(index_dir, encoder=ColorEncoder()).relocate(tmp_path / "nope")


def test_cli_relocate(built: tuple[Path, Path], tmp_path: Path) -> None:
    root, index_dir = built
    moved = tmp_path / "moved"
    shutil.move(root, moved)
    runner = CliRunner()

    wrong = runner.invoke(app, ["relocate", str(index_dir), "--root", str(tmp_path)])
    assert wrong.exit_code == 1 and "none of the 3 photos exist" in wrong.output
    assert HiMIRIndex.read_manifest(index_dir)["root"] == str(root)  # unchanged

    done = runner.invoke(app, ["relocate", str(index_dir), "--root", str(moved)])
    assert done.exit_code == 0, done.output
    assert "3 photos rebased (0 missing there)" in done.output
    assert HiMIRIndex.read_manifest(index_dir)["root"] == str(moved)
    hits = HiMIRIndex.load(index_dir, encoder=ColorEncoder()).search("red", k=3).hits
    assert all(Path(hit.path).is_file() for hit in hits)


def test_old_index_with_absolute_paths_still_loads_and_relocates(built: tuple[Path, Path], tmp_path: Path) -> None:
    root, index_dir = built
    index_dir = tmp_path / "format-1"  # indexes saved before roots were recorded are format 1
    version = save_format_1(HiMIRIndex.load(built[1], encoder=ColorEncoder()), index_dir)
    for row in ("red.png", "trip/blue.png", "trip/red_blue.png"):  # what indexes saved before roots hold
        _edit_catalog(index_dir, "UPDATE images SET path = ? WHERE path = ?", str(root / row), row)
    manifest = json.loads((version / "manifest.json").read_text())
    del manifest["root"]
    (version / "manifest.json").write_text(json.dumps(manifest))

    old = HiMIRIndex.load(index_dir, encoder=ColorEncoder())
    assert old.root is None and all(not r.relpath for r in old.images)
    assert len(_retrieve(old, k=3)) == 3
    moved = tmp_path / "moved"
    shutil.move(root, moved)
    assert old.relocate(moved).missing == 0  # the old root is the photos' common folder
    assert len(_retrieve(old, k=3)) == 3 and old.root == str(moved)


# -- thumbnails --------------------------------------------------------------------------------
def test_thumbnails_stand_in_when_originals_are_deleted(built: tuple[Path, Path]) -> None:
    root, index_dir = built
    shutil.rmtree(root)
    index = HiMIRIndex.load(index_dir, encoder=ColorEncoder())

    nodes = _retrieve(index, k=3)
    assert len(nodes) == 3 and {n.node.metadata["image_source"] for n in nodes} == {"thumbnail"}
    block = nodes[0].node.get_content_blocks(MetadataMode.LLM)[-1]
    thumbnail = Image.open(io.BytesIO(block.resolve_image().read()))
    assert thumbnail.size == (160, 120) and block.image_mimetype == "image/jpeg"  # small photos keep their size

    documents = LangChainRetriever(index=index, k=3).invoke("red")
    blocks = documents_to_content_blocks(documents, include_text=False)
    assert len(documents) == 3 and all(Image.open(io.BytesIO(base64.b64decode(b["base64"]))).size == (160, 120)
                                       for b in blocks)


def test_thumbnails_are_small_jpegs_linked_between_versions(tmp_path: Path) -> None:
    root = tmp_path / "photos"
    make_scene(root / "big.png", [("red", (0, 0, 400, 300))], size=(1200, 900))
    index = HiMIRIndex.build(root, encoder=ColorEncoder(), thumbnails=True, progress=False)
    first = index.save(tmp_path / "index")
    (image_id,) = index.snapshot.images
    thumb = first / "thumbnails" / f"{image_id}.jpg"
    assert Image.open(thumb).format == "JPEG" and Image.open(thumb).size == (256, 192)
    inode = thumb.stat().st_ino

    make_scene(root / "blue.png", [("blue", (0, 0, 160, 120))])
    index.add(root, progress=False)
    second = index.save(tmp_path / "index")
    assert (second / "thumbnails" / f"{image_id}.jpg").stat().st_ino == inode  # linked, not rewritten
    assert len(list((second / "thumbnails").iterdir())) == 2
    assert not first.exists()
    assert index.thumbnail_path(image_id) == second / "thumbnails" / f"{image_id}.jpg"


def test_cli_index_thumbnails_and_json_image_fields(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "photos"
    make_scene(root / "red.png", [("red", (0, 0, 160, 120))])
    monkeypatch.setattr("himir_rag.index.get_encoder", lambda spec, device="cpu": ColorEncoder())
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    runner = CliRunner()
    result = runner.invoke(app, ["index", str(root), "--index", str(tmp_path / "index"), "--thumbnails",
                                 "--no-progress", "--offline"])
    assert result.exit_code == 0, result.output
    assert os.environ.get("HF_HUB_OFFLINE") == "1"  # --offline is Hugging Face's own switch
    (root / "red.png").unlink()

    found = runner.invoke(app, ["search", str(tmp_path / "index"), "red", "--json", "--offline"])
    assert found.exit_code == 0, found.output
    (hit,) = json.loads(found.output)["results"]
    assert hit["image_source"] == "thumbnail" and hit["image"] == hit["thumbnail"] and Path(hit["thumbnail"]).is_file()
    text = runner.invoke(app, ["search", str(tmp_path / "index"), "red"])
    assert "(missing on disk; `himir relocate` if the folder moved)" in text.output


def test_cli_index_follow_symlinks_is_kept_with_the_index(hostile: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    if (hostile / "share").exists():
        (hostile / "share").unlink()
    monkeypatch.setattr("himir_rag.index.get_encoder", lambda spec, device="cpu": ColorEncoder())
    runner = CliRunner()
    refused = runner.invoke(app, ["index", str(hostile), "--index", str(tmp_path / "a"), "--no-progress"])
    assert refused.exit_code == 0, refused.output
    assert "outside the indexed folder" in refused.output and "3 images" in refused.output

    followed = runner.invoke(app, ["index", str(hostile), "--index", str(tmp_path / "b"), "--no-progress",
                                   "--follow-symlinks"])
    assert followed.exit_code == 0, followed.output
    assert "6 images" in followed.output
    assert HiMIRIndex.read_manifest(tmp_path / "b")["config"]["follow_symlinks"] is True
    again = runner.invoke(app, ["index", str(hostile), "--index", str(tmp_path / "b"), "--no-progress"])
    assert "6 unchanged" in again.output and "6 images" in again.output  # the saved choice holds

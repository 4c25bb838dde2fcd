"""``himir serve``: the FastAPI app in process (error paths, writes), then the real server
started as a subprocess (real HTTP), and the page in headless Chromium."""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("multipart")
from fastapi.testclient import TestClient  # noqa: E402

from himir_rag.index import HiMIRIndex  # noqa: E402
from himir_rag.retriever import result_json  # noqa: E402
from himir_rag.serve import create_app  # noqa: E402
from tests.conftest import ColorEncoder, make_scene  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "tests" / "artifacts"  # gitignored: the browser test's screenshot lands here
QUERY = "a red square and a blue square"


@pytest.fixture
def photo_index(color_encoder: ColorEncoder, scene_dir: Path) -> HiMIRIndex:
    index = HiMIRIndex(color_encoder)
    index.add(scene_dir, progress=False)
    return index


@pytest.fixture
def client(photo_index: HiMIRIndex) -> TestClient:
    return TestClient(create_app(photo_index))


def _upload(path: Path, name: str = "query.png") -> dict:
    return {"image": (name, path.read_bytes(), "image/png")}


def _one_line_error(response, status: int) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and "\n" not in body["error"] and body["error"]
    return body["error"]


# ------------------------------------------------------------------------- in process


def test_health_and_page(client: TestClient, photo_index: HiMIRIndex) -> None:
    health = client.get("/api/health").json()
    assert health == {"status": "ok", "images": len(photo_index), "encoder": "test:color", "dim": ColorEncoder.dim,
                      "layout": "1+4+16", "default_mode": "himir", "allow_writes": False}
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'id="search"' in page.text and "/api/search" in page.text and "/api/photo/" in page.text


def test_text_search_returns_the_cli_json(client: TestClient, photo_index: HiMIRIndex) -> None:
    response = client.get("/api/search", params={"q": QUERY, "k": 3, "mode": "himir-full"})
    assert response.status_code == 200
    payload = response.json()
    expected = result_json(photo_index.search(QUERY, k=3, mode="himir-full"), index=photo_index)
    assert set(payload) == set(expected) == {"query", "subqueries", "results", "stats"}
    assert payload["subqueries"] == expected["subqueries"] == ["a red square", "a blue square"]
    assert [h["path"] for h in payload["results"]] == [h["path"] for h in expected["results"]]
    assert [h["regions"] for h in payload["results"]] == [h["regions"] for h in expected["results"]]
    assert Path(payload["results"][0]["path"]).name == "red_blue.png"
    assert payload["results"][0]["width"] == 160 and payload["results"][0]["height"] == 120
    first = payload["results"][0]  # the file to show, as `himir search --json` gives it
    assert (first["image"], first["image_source"], first["thumbnail"]) == (first["path"], "original", None)
    assert payload["stats"]["mode"] == "himir-full" and payload["stats"]["dot_products"] > 0


def test_photo_search_by_upload(client: TestClient, scene_dir: Path) -> None:
    response = client.post("/api/search", files=_upload(scene_dir / "red_blue.png", "mine.png"), data={"k": "2"})
    payload = response.json()
    assert response.status_code == 200, payload
    assert payload["image"] == "mine.png" and payload["query"] == ""
    assert Path(payload["results"][0]["path"]).name == "red_blue.png"
    assert payload["results"][0]["score"] == pytest.approx(1.0, abs=2e-3)
    assert payload["stats"]["query_photo_regions"] == len(payload["subqueries"]) == 21
    both = client.post("/api/search", files=_upload(scene_dir / "red_blue.png"), data={"q": "green", "k": "2"}).json()
    assert both["subqueries"][0] == "green" and Path(both["results"][0]["path"]).name == "red_green.png"


def test_photos_are_served_re_encoded_and_only_from_the_index(client: TestClient, photo_index: HiMIRIndex) -> None:
    record = photo_index.images[0]
    response = client.get(f"/api/photo/{record.image_id}", params={"size": 64})
    assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
    assert response.content != Path(record.path).read_bytes()  # never the file's bytes
    assert response.headers["x-image-source"] == "original"
    with Image.open(io.BytesIO(response.content)) as img:
        assert img.format == "JPEG" and max(img.size) == 64
    for url in ("/api/photo/999999", "/api/photo/-1", "/api/photo/abc", f"/api/photo/{record.path}",
                "/api/photo/..%2F..%2Fetc%2Fpasswd", "/etc/passwd", "/api/photo"):
        _one_line_error(client.get(url), 404)


def test_a_photo_gone_from_disk_is_404(client: TestClient, photo_index: HiMIRIndex) -> None:
    record = photo_index.images[0]
    os.remove(record.path)
    assert "cannot be shown any more" in _one_line_error(client.get(f"/api/photo/{record.image_id}"), 404)
    hit = next(h for h in client.get("/api/search", params={"q": "red", "k": 6}).json()["results"]
               if h["image_id"] == record.image_id)
    assert hit["image"] is None and hit["image_source"] is None  # still ranked, nothing to show


def test_photos_leaving_the_collection_are_not_served(photo_index: HiMIRIndex, client: TestClient,
                                                      tmp_path: Path) -> None:
    """A photo swapped for a link out of the collection folder is refused (the index's containment check)."""
    secret = tmp_path / "outside" / "secret.png"
    make_scene(secret, [("green", (0, 0, 160, 120))])
    record = photo_index.images[0]
    os.remove(record.path)
    os.symlink(secret, record.path)
    assert "cannot be shown any more" in _one_line_error(client.get(f"/api/photo/{record.image_id}"), 404)


def test_thumbnails_stand_in_for_gone_photos(color_encoder: ColorEncoder, scene_dir: Path, tmp_path: Path) -> None:
    HiMIRIndex.build(scene_dir, encoder=color_encoder, thumbnails=True, progress=False).save(tmp_path / "index")
    shutil.rmtree(scene_dir)
    index = HiMIRIndex.load(tmp_path / "index", encoder=color_encoder)
    client = TestClient(create_app(index))
    hit = client.get("/api/search", params={"q": QUERY, "k": 1}).json()["results"][0]
    assert hit["image_source"] == "thumbnail" and hit["image"] == hit["thumbnail"] is not None
    response = client.get(f"/api/photo/{hit['image_id']}", params={"size": 64})
    assert response.status_code == 200 and response.headers["x-image-source"] == "thumbnail"
    with Image.open(io.BytesIO(response.content)) as img:
        assert img.format == "JPEG" and max(img.size) == 64


@pytest.mark.parametrize("params, message", [
    ({}, "q: Field required"),
    ({"q": "  "}, "query is empty"),
    ({"q": "red", "k": 0}, "k must be between 1 and 1000"),
    ({"q": "red", "k": 5000}, "k must be between 1 and 1000"),
    ({"q": "red", "k": "many"}, "k: Input should be a valid integer"),
    ({"q": "red", "mode": "dense"}, "valid modes"),
    ({"q": "x" * 3000}, "at most 2000"),
])
def test_text_search_errors_are_one_line_400(client: TestClient, params: dict, message: str) -> None:
    assert message in _one_line_error(client.get("/api/search", params=params), 400)


def test_upload_errors(photo_index: HiMIRIndex, scene_dir: Path) -> None:
    client = TestClient(create_app(photo_index, max_upload_bytes=2000))
    garbage = client.post("/api/search", files={"image": ("x.jpg", b"\x00garbage" * 10, "image/jpeg")})
    assert "not an image file Pillow can decode" in _one_line_error(garbage, 400)
    assert "'image' file field" in _one_line_error(client.post("/api/search", data={"q": "red"}), 400)
    big = Image.effect_noise((60, 60), 80).convert("RGB")  # over the cap, under the form allowance
    buffer = io.BytesIO()
    big.save(buffer, format="PNG")
    assert 2000 < len(buffer.getvalue()) < 2000 + 64 * 1024
    too_big = client.post("/api/search", files={"image": ("big.png", buffer.getvalue(), "image/png")})
    assert "larger than 2000 bytes" in _one_line_error(too_big, 413)
    header = client.post("/api/search", content=b"x" * 100, headers={"content-length": str(10**9),
                                                                     "content-type": "multipart/form-data; boundary=b"})
    assert "photos up to 2000 bytes" in _one_line_error(header, 413)
    bad_k = client.post("/api/search", files=_upload(scene_dir / "all_red.png"), data={"k": "0"})
    assert "k must be between" in _one_line_error(bad_k, 400)


def test_read_only_unless_writes_are_allowed(photo_index: HiMIRIndex, tmp_path: Path) -> None:
    client = TestClient(create_app(photo_index))
    assert "read-only" in _one_line_error(client.post("/api/index", json={"path": str(tmp_path)}), 403)
    with pytest.raises(ValueError, match="allow_writes needs index_dir"):
        create_app(photo_index, allow_writes=True)


def test_add_photos_from_a_server_side_path(photo_index: HiMIRIndex, tmp_path: Path) -> None:
    index_dir = tmp_path / "index"
    photo_index.save(index_dir)
    client = TestClient(create_app(photo_index, index_dir=index_dir, allow_writes=True))
    assert client.get("/api/health").json()["allow_writes"] is True
    make_scene(tmp_path / "new" / "all_yellow.png", [("yellow", (0, 0, 160, 120))])
    before = len(photo_index)
    report = client.post("/api/index", json={"path": str(tmp_path / "new")}).json()
    assert report["added"] == 1 and report["images"] == before + 1
    hit = client.get("/api/search", params={"q": "yellow", "k": 1}).json()["results"][0]
    assert Path(hit["path"]).name == "all_yellow.png"
    assert len(HiMIRIndex.load(index_dir, encoder=ColorEncoder())) == before + 1  # saved
    assert "no such file" in _one_line_error(client.post("/api/index", json={"path": str(tmp_path / "nope")}), 400)
    assert "path: Field required" in _one_line_error(client.post("/api/index", json={}), 400)


# --------------------------------------------------------------- the real server (slow)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get(url: str, timeout: float = 60.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _post_photo(url: str, photo: Path, fields: dict[str, str], timeout: float = 120.0) -> tuple[int, dict]:
    boundary = uuid.uuid4().hex
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
             for k, v in fields.items()]
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{photo.name}"\r\n'
                 "Content-Type: image/jpeg\r\n\r\n".encode() + photo.read_bytes() + b"\r\n")
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    request = urllib.request.Request(url, data=body, method="POST",
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return response.status, json.loads(response.read())


@pytest.fixture(scope="module")
def live_server(demo_index, tmp_path_factory: pytest.TempPathFactory):
    """``himir serve`` on the demo index, as a subprocess on a free loopback port; killed at the end."""
    index_dir, photos = demo_index
    root = tmp_path_factory.mktemp("serve")
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    log = open(root / "serve.log", "w+")
    process = subprocess.Popen([sys.executable, "-m", "himir_rag.cli", "serve", str(index_dir),
                                "--port", str(port)], stdout=log, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:  # at most 360 polls
            if process.poll() is not None:
                log.seek(0)
                pytest.fail(f"himir serve exited with {process.returncode}: {log.read()}")
            try:
                if _get(f"{base}/api/health", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(0.5)
        else:
            pytest.fail("himir serve did not answer /api/health within 180 s")
        yield base, photos
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=20)
        log.close()


@pytest.mark.slow
def test_live_server_over_http(live_server) -> None:
    base, photos = live_server
    status, body = _get(f"{base}/api/health")
    assert status == 200 and json.loads(body)["images"] == len(photos)
    status, body = _get(f"{base}/api/search?q=a+cat+next+to+a+cup+of+coffee&k=3")
    payload = json.loads(body)
    assert status == 200 and payload["subqueries"] == ["a cat", "a cup of coffee"]
    assert Path(payload["results"][0]["path"]).name == "scene_cat_and_coffee.jpg"
    status, payload = _post_photo(f"{base}/api/search", photos["motorcycle"], {"k": "3"})
    assert status == 200 and Path(payload["results"][0]["path"]).stem == "motorcycle"
    status, body = _get(f"{base}/api/photo/{payload['results'][0]['image_id']}?size=100")
    with Image.open(io.BytesIO(body)) as img:
        assert status == 200 and img.format == "JPEG" and max(img.size) == 100
    status, body = _get(f"{base}/api/photo/424242")
    assert status == 404 and "error" in json.loads(body)
    status, body = _get(f"{base}/api/search?q=")
    assert status == 400 and "query is empty" in json.loads(body)["error"]


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.slow
@pytest.mark.skipif(_chromium() is None, reason="no chromium binary (apt-get install chromium; .ci/run installs it)")
def test_page_in_headless_chromium_draws_results_and_boxes(live_server, tmp_path: Path) -> None:
    base, _ = live_server
    url = f"{base}/?q=a+cat+next+to+a+cup+of+coffee&k=3"
    browser = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
               f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=20000"]
    dom = subprocess.run([*browser, "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
    assert dom.count('<figure class="hit"') == 3, dom[-2000:]
    assert dom.count('src="/api/photo/') == 3
    assert 'data-subquery="a cat"' in dom and 'data-subquery="a cup of coffee"' in dom
    assert dom.count('class="box"') >= 3 and "dot products" in dom
    assert "#1 scene_cat_and_coffee.jpg" in dom
    try:
        ARTIFACTS.mkdir(exist_ok=True)
        shot = ARTIFACTS / "himir_serve_page.png"
    except OSError:  # a read-only checkout: keep it under tmp_path
        shot = tmp_path / "himir_serve_page.png"
    subprocess.run([*browser, "--window-size=1280,900", f"--screenshot={shot}", url], capture_output=True,
                   timeout=120, check=True)
    with Image.open(shot) as img:
        assert img.size == (1280, 900)
        assert len(img.convert("RGB").getcolors(1 << 24)) > 1000  # photos drawn, not a blank page


def test_serve_command_errors_are_one_line(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from himir_rag.cli import app

    result = CliRunner().invoke(app, ["serve", str(tmp_path / "nope"), "--port", str(_free_port())])
    assert result.exit_code == 1 and "no such index directory" in result.stderr
    assert "Traceback" not in result.output
    help_text = CliRunner().invoke(app, ["serve", "--help"]).stdout
    assert "--allow-writes" in help_text and "127.0.0.1" in help_text

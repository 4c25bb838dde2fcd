"""Opening an index trusts nothing its manifest or catalog says without checking it.

- a manifest is validated against one schema (``himir_rag.manifest``): any mutation of types,
  values or nesting (hypothesis) gives a clean load or an ``IndexFormatError``, never another
  exception; a 200k-deep JSON is one line, not a RecursionError;
- ``next_image_id`` must exceed every image id, or the load (and ``himir index``) refuses;
- a store location outside the index directory (a Qdrant folder or server URL) is never opened
  or contacted unless the caller names it again (``store_location=`` / ``HIMIR_STORE_LOCATION``);
- catalog metadata read back must be JSON objects.
"""

from __future__ import annotations

import copy
import http.server
import json
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

import himir_rag.index as index_module
from himir_rag.config import HiMIRConfig
from himir_rag.errors import IndexFormatError, UntrustedLocationError
from himir_rag.index import HiMIRIndex
from tests.conftest import ColorEncoder, make_scene


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """A saved 4-image index; returns its live version directory (tests restore what they change)."""
    root = tmp_path_factory.mktemp("manifest")
    for i, color in enumerate(["red", "green", "blue", "yellow"]):
        make_scene(root / "photos" / f"p{i}.png", [(color, (0, 0, 40, 30))], size=(80, 60))
    index = HiMIRIndex(ColorEncoder(), HiMIRConfig(layout="1+2+4"))
    index.add(root / "photos", progress=False, metadata=lambda path: {"name": path.stem})
    index.sync_candidate_stores()
    return index.save(root / "idx")


@pytest.fixture
def manifest(saved):
    """The valid manifest; written back after the test."""
    path = saved / "manifest.json"
    original = path.read_text()
    yield json.loads(original)
    path.write_text(original)


def write(version: Path, manifest_value) -> None:
    (version / "manifest.json").write_text(json.dumps(manifest_value))


def load(version: Path, **kwargs) -> HiMIRIndex:
    return HiMIRIndex.load(version.parent, encoder=ColorEncoder(), **kwargs)


def test_the_valid_manifest_loads(saved, manifest):
    assert len(load(saved)) == 4


def test_integral_floats_of_int_fields_are_read_as_ints(saved, manifest):
    write(saved, {**manifest, "config": {**manifest["config"], "max_image_pixels": 5e7, "batch_size": 16.0}})
    config = load(saved).config
    assert (config.max_image_pixels, config.batch_size) == (50_000_000, 16) and type(config.batch_size) is int


def test_deeply_nested_json_is_one_clean_error(saved, manifest):
    (saved / "manifest.json").write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(IndexFormatError, match="nested too deeply to be a manifest"):
        load(saved)
    deep: dict = {}
    for _ in range(40):  # within the parser's depth, beyond the schema's
        deep = {"x": deep}
    write(saved, {**manifest, "config": {**manifest["config"], "scheduler": deep}})
    with pytest.raises(IndexFormatError, match="nested deeper than 16 levels"):
        load(saved)


@pytest.mark.parametrize("change, message", [
    ({"config": "layout=1+2+4"}, "config must be a JSON object, got a string"),
    ({"encoder": {"name": "test:color", "dim": 9, "spec": 7}}, "encoder.spec must be a string, got an int"),
    ({"encoder": {"name": "test:color", "dim": True}}, "no encoder name and dim recorded"),
    ({"config.batch_size": "32"}, "config.batch_size must be an int, got a string"),
    ({"config.batch_size": True}, "config.batch_size must be an int, got a boolean"),
    ({"config.batch_size": 8.5}, "config.batch_size must be an int, got a number"),
    ({"config.region_overlap": "0.1"}, "config.region_overlap must be a number"),
    ({"config.region_overlap": 3.0}, r"config is invalid \(region_overlap must be in"),
    ({"config.scheduler": [1]}, "config.scheduler must be a JSON object, got a list"),
    ({"config.scheduler": {"candidate_k": "many"}}, "config.scheduler.candidate_k must be an int, got a string"),
    ({"config.scheduler": {"candidate_levels": 5}}, "config.scheduler.candidate_levels must be a list"),
    ({"config.scheduler": {"bound_scale": float("nan")}}, "config.scheduler.bound_scale must be a number"),
    ({"config.scheduler": {"no_such": 1}}, r"config is invalid \(unknown scheduler parameters"),
    ({"config.scheduler": {"probe_share": "0.2"}}, "config.scheduler.probe_share must be a number, got a string"),
    ({"config.scheduler": {"ann_bound": 1}}, "config.scheduler.ann_bound must be a boolean, got an int"),
    ({"config.layout": 4}, "config.layout must be a string"),
    ({"next_image_id": "5"}, "next_image_id must be an int >= 1"),
    ({"next_image_id": 0}, "next_image_id must be an int >= 1"),
    ({"files.vectors.npy": "big"}, "size of 'vectors.npy' must be an int >= 0"),
    ({"counts": {"images": 3}}, "counts.images=3 but the catalog holds 4"),
    ({"counts": []}, "counts must map names to ints"),
    ({"vectors": {"dtype": "float16", "shape": [1, 2, 3]}}, r"vectors.shape must be \[n, 9\]"),
    ({"vectors": "float16"}, "vectors must be"),
    ({"saved_at": 5}, "saved_at must be a string"),
    ({"store": {"kind": "qdrant"}}, "needs a collection name"),
    ({"store": {"kind": "qdrant", "collection": "c", "url": None, "path": None}}, "exactly one of url or path"),
    ({"store": {"kind": "qdrant", "collection": "c", "url": 5}}, "exactly one of url or path"),
    ({"store": "faiss"}, "unknown store kind 'faiss'"),
])
def test_mistyped_fields_are_named(saved, manifest, change, message):
    changed = copy.deepcopy(manifest)
    for key, value in change.items():
        target = changed
        *parents, last = key.split(".", 1) if key.startswith(("config.", "files.")) else [key]
        for parent in parents:
            target = target[parent]
        target[last] = value
    write(saved, changed)
    with pytest.raises(IndexFormatError, match=message):
        load(saved)


def test_optional_scheduler_fields_load_set_or_null(saved, manifest):
    """probe_share / ann_bound default to None (by the level's size): null and a value both load."""
    for values in ({"probe_share": 0.2, "ann_bound": False}, {"probe_share": None, "ann_bound": None}):
        changed = copy.deepcopy(manifest)
        changed["config"]["scheduler"] = values
        write(saved, changed)
        params = load(saved).config.scheduler_params
        assert (params.probe_share, params.ann_bound) == (values["probe_share"], values["ann_bound"])


def test_next_image_id_below_an_existing_id_is_refused_and_the_index_kept(saved, manifest, monkeypatch, tmp_path):
    write(saved, {**manifest, "next_image_id": 1})
    with pytest.raises(IndexFormatError, match="next_image_id=1 but the catalog holds image id 4"):
        load(saved)
    from himir_rag.cli import app

    monkeypatch.setattr(index_module, "get_encoder", lambda spec, device="cpu": ColorEncoder())
    make_scene(tmp_path / "new" / "n.png", [("red", (0, 0, 10, 10))], size=(40, 30))
    result = CliRunner().invoke(app, ["index", str(tmp_path / "new"), "--index", str(saved.parent), "--encoder",
                                      "test:color", "--layout", "1+2+4", "--no-progress"])
    assert result.exit_code == 1 and "next_image_id=1 but the catalog holds image id 4" in result.stderr
    assert (saved.parent / "CURRENT").read_text().strip() == saved.name and saved.is_dir()  # nothing replaced


def test_catalog_metadata_must_be_json_objects(saved, manifest):
    records = saved / "images.jsonl"
    original = records.read_bytes()
    try:
        for bad in ("[1, 2]", '"text"', "null", "[" * 100_000 + "]" * 100_000):
            lines = original.decode().splitlines()
            lines[1] = json.dumps(json.loads(lines[1])[:6])[:-1] + ", " + bad + "]"  # image 2's metadata
            records.write_text("".join(line + "\n" for line in lines))
            write(saved, {**manifest, "appended": {**manifest["appended"], "images.jsonl": records.stat().st_size}})
            with pytest.raises(IndexFormatError, match="catalog"):
                load(saved)
    finally:
        records.write_bytes(original)


# -- store locations -------------------------------------------------------------------------------
class _RecordingHandler(http.server.BaseHTTPRequestHandler):
    requests: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        _RecordingHandler.requests.append(self.path)
        self.send_response(404)
        self.end_headers()

    do_PUT = do_POST = do_GET  # noqa: N815

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def http_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _RecordingHandler)
    _RecordingHandler.requests = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_a_store_url_in_the_manifest_is_never_contacted_unless_named(saved, manifest, http_server, monkeypatch):
    pytest.importorskip("qdrant_client")
    monkeypatch.delenv("HIMIR_STORE_LOCATION", raising=False)
    write(saved, {**manifest, "store": {"kind": "qdrant", "collection": "c", "url": http_server, "path": None}})
    with pytest.raises(UntrustedLocationError, match=f"Qdrant at '{http_server}', outside the index directory"):
        load(saved)
    assert _RecordingHandler.requests == []  # no request was sent
    with pytest.raises(IndexFormatError, match="cannot open its Qdrant store"):
        load(saved, store_location=http_server)  # named again: contacted (this server is no Qdrant)
    assert _RecordingHandler.requests


def test_a_store_folder_outside_the_index_is_never_created_unless_named(saved, manifest, tmp_path, monkeypatch):
    pytest.importorskip("qdrant_client")
    monkeypatch.delenv("HIMIR_STORE_LOCATION", raising=False)
    elsewhere = tmp_path / "elsewhere"
    for path in (str(elsewhere), "../../elsewhere"):  # absolute, or relative and escaping the index
        write(saved, {**manifest, "store": {"kind": "qdrant", "collection": "c", "url": None, "path": path}})
        with pytest.raises(UntrustedLocationError, match="outside the index directory"):
            load(saved)
        assert not elsewhere.exists() and not (saved.parent.parent.parent / "elsewhere").exists()


def test_a_store_folder_inside_the_index_is_trusted(tmp_path, monkeypatch):
    pytest.importorskip("qdrant_client")
    from himir_rag.store.qdrant import QdrantImageStore

    monkeypatch.delenv("HIMIR_STORE_LOCATION", raising=False)
    for i, color in enumerate(["red", "blue"]):
        make_scene(tmp_path / "photos" / f"p{i}.png", [(color, (0, 0, 40, 30))], size=(80, 60))
    index_dir = tmp_path / "idx"
    index_dir.mkdir()
    store = QdrantImageStore.open("inside", dim=ColorEncoder.dim, path=str(index_dir / "qdrant"))
    index = HiMIRIndex(ColorEncoder(), HiMIRConfig(layout="1+2+4"), store=store)
    index.add(tmp_path / "photos", progress=False)
    index.save(index_dir)
    loaded = HiMIRIndex.load(index_dir, encoder=ColorEncoder())
    assert len(loaded) == 2 and loaded.store is not None
    # named by the environment variable, another location replaces the manifest's (here: an empty store)
    monkeypatch.setenv("HIMIR_STORE_LOCATION", str(tmp_path / "other"))
    with pytest.raises(IndexFormatError, match="counts.images=2 but the catalog holds 0"):
        HiMIRIndex.load(index_dir, encoder=ColorEncoder())
    assert (tmp_path / "other").is_dir()


# -- fuzzing ---------------------------------------------------------------------------------------
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=8)
    | st.sampled_from(["faiss", "float16", "float32", "test:color", "1+2+4", "grid", "himir", "vectors.npy"]),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=8,
)


def _paths(value, prefix=()):
    """Every key path into a JSON value (dict keys and list positions)."""
    yield prefix
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in items:
        yield from _paths(child, (*prefix, key))


@st.composite
def mutated_manifests(draw, manifest):
    """The valid manifest with 1-3 values replaced, deleted, or nested in a list."""
    value = copy.deepcopy(manifest)
    for _ in range(draw(st.integers(1, 3))):
        paths = [p for p in _paths(value) if p and "store" not in p[:1]]  # the store: tested above, without I/O
        if not paths:
            break
        *parents, last = draw(st.sampled_from(paths))
        target = value
        for key in parents:
            target = target[key]
        action = draw(st.sampled_from(["replace", "delete", "wrap"]))
        if action == "delete" and isinstance(target, dict):
            del target[last]
        elif action == "wrap":
            target[last] = [target[last]]
        else:
            target[last] = draw(json_values)
    return value


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_manifests_load_cleanly_or_raise_index_format_error(saved, manifest, data):
    write(saved, data.draw(mutated_manifests(manifest)))
    try:
        index = load(saved)
    except IndexFormatError:
        return
    assert len(index) == 4  # a mutation that loads (e.g. an unknown key) still gives the real index

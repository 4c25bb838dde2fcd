"""Hostile input: JSONL query files, LLM answers and sub-queries, query caps, metadata keys and updates."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from himir_rag.cli import app
from himir_rag.config import HiMIRConfig
from himir_rag.decompose import LLMDecomposer, parse_subqueries
from himir_rag.errors import ConfigError, IndexFormatError
from himir_rag.index import HiMIRIndex
from tests.conftest import ColorEncoder, make_scene, make_store, save_format_1

runner = CliRunner()


def strict_json(line: str):
    """Parse one output line as strict JSON (NaN / Infinity refused)."""
    def refuse(name):
        raise AssertionError(f"non-standard JSON constant {name} in {line!r}")
    return json.loads(line, parse_constant=refuse)


@pytest.fixture
def saved_index(scene_dir, tmp_path, monkeypatch) -> Path:
    """A small saved index whose encoder spec the CLI resolves to the colour encoder."""
    import himir_rag.scheduler

    monkeypatch.setattr(himir_rag.index, "get_encoder", lambda spec, device="cpu": ColorEncoder())
    target = tmp_path / "idx"
    HiMIRIndex.build(scene_dir, encoder=ColorEncoder(), progress=False).save(target)
    return target


# -- himir search --queries ----------------------------------------------------------------------------
BAD_LINES = [
    ('{"id": "a", "query": "red"}', None),
    ('{"id": "b", "query": ', "invalid JSON"),
    ('{"id": "c"}', 'no "query" field'),
    ('{"id": "d", "query": "   "}', '"query" is empty'),
    ('{"id": "e", "query": 123}', '"query" is 123'),
    ('{"id": "f", "query": null}', '"query" is null'),
    ('{"id": "g", "query": ["a cat", "a dog"]}', '"query" is \\["a cat"'),
    ('{"id": "h", "query": true}', '"query" is true'),
    ('{"id": NaN, "query": "red"}', "NaN and Infinity are not valid JSON"),
    ('{"id": 1e400, "query": "red"}', "overflows to infinity"),
    ('["red"]', "expected a JSON object"),
    ('{"id": [1], "query": "red"}', '"id" must be a string or a number'),
    ('{"id": "i", "query": "' + "x" * 3000 + '"}', "max_query_chars"),
    ('{"id": "k", "query": "red \\ud800"}', "lone UTF-16 surrogate"),
    ('{"id": "j", "query": "green"}', None),
]


def test_jsonl_bad_lines_give_error_lines_and_the_run_goes_on(saved_index, tmp_path):
    queries = tmp_path / "q.jsonl"
    queries.write_text("\n".join(line for line, _ in BAD_LINES) + "\n\n")
    result = runner.invoke(app, ["search", str(saved_index), "--queries", str(queries), "-k", "2", "--json"])
    assert result.exit_code == 1 and result.exception is None or isinstance(result.exception, SystemExit)
    out = [strict_json(line) for line in result.stdout.splitlines()]
    assert len(out) == len(BAD_LINES)  # one output line per input line, in order
    for number, ((_, problem), line) in enumerate(zip(BAD_LINES, out), 1):
        if problem is None:
            assert "results" in line and len(line["results"]) == 2
        else:
            assert line["line"] == number and set(line) == {"id", "line", "error"}
            assert __import__("re").search(problem, line["error"]), (problem, line)
            assert f"q.jsonl:{number}: " in result.stderr
    assert out[0]["id"] == "a" and out[-1]["id"] == "j" and out[8]["id"] == 9 and out[13]["id"] == 14  # unusable id -> line number
    assert "13 line(s) of" in result.stderr and "Traceback" not in result.output


def test_jsonl_without_json_reports_errors_on_stderr(saved_index, tmp_path):
    queries = tmp_path / "q.jsonl"
    queries.write_text('{"query": "red"}\n{"query": 5}\n')
    result = runner.invoke(app, ["search", str(saved_index), "--queries", str(queries), "-k", "1"])
    assert result.exit_code == 1
    assert "query: red" in result.stdout and "q.jsonl:2: \"query\" is 5" in result.stderr


def test_jsonl_with_a_wrong_mode_is_one_error(saved_index, tmp_path):
    queries = tmp_path / "q.jsonl"
    queries.write_text('{"query": "red"}\n{"query": "green"}\n')
    result = runner.invoke(app, ["search", str(saved_index), "--queries", str(queries), "--mode", "dense", "--json"])
    assert result.exit_code == 1 and result.stdout == "" and result.stderr.count("error:") == 1


@pytest.mark.parametrize("kind", ["missing", "directory", "binary"])
def test_jsonl_unusable_files_give_one_line_errors(saved_index, tmp_path, kind):
    path = tmp_path / "q.jsonl"
    if kind == "directory":
        path.mkdir()
    elif kind == "binary":
        path.write_bytes(bytes(range(256)) * 40)
    result = runner.invoke(app, ["search", str(saved_index), "--queries", str(path), "--json"])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    assert result.stdout == "" and len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith("error: ")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                HealthCheck.too_slow])
@given(st.lists(st.one_of(
    st.binary(max_size=40).filter(lambda b: b"\0" not in b),
    st.text(max_size=40).map(str.encode),
    st.builds(lambda q, i: json.dumps({"id": i, "query": q}).encode(),
              st.one_of(st.text(max_size=20), st.integers(), st.none(), st.lists(st.text(max_size=3))),
              st.one_of(st.integers(), st.text(max_size=5), st.floats(), st.booleans())),
), min_size=1, max_size=6))
def test_fuzzed_jsonl_never_gives_a_traceback(saved_index, tmp_path, lines):
    path = tmp_path / "fuzz.jsonl"
    path.write_bytes(b"\n".join(line.replace(b"\n", b" ").replace(b"\r", b" ") for line in lines))
    result = runner.invoke(app, ["search", str(saved_index), "--queries", str(path), "-k", "1", "--json"])
    assert result.exit_code in (0, 1) and (result.exception is None or isinstance(result.exception, SystemExit))
    for line in result.stdout.splitlines():
        payload = strict_json(line)
        assert "results" in payload or {"line", "error"} <= set(payload)


def test_nan_metadata_never_reaches_json_output(saved_index, tmp_path, scene_dir):
    with pytest.raises(ConfigError, match="not JSON-serialisable"):
        HiMIRIndex.build(scene_dir, encoder=ColorEncoder(), metadata=lambda p: {"x": math.nan}, progress=False)
    index = HiMIRIndex.load(saved_index)
    with pytest.raises(ConfigError, match="not JSON-serialisable"):
        index.update_metadata(lambda p: {"x": math.inf})
    # an index written before metadata was checked: its NaN gives an error, not invalid JSON
    records = [r for r in index.snapshot.images.values()]
    damaged = index.snapshot.with_records([type(r)(r.image_id, r.path, r.width, r.height, r.size, r.mtime_ns,
                                                    {"x": math.nan}) for r in records])
    damaged_index = HiMIRIndex.from_snapshot(damaged, encoder=index.encoder, config=index.config)
    with pytest.raises(ConfigError, match="its metadata is not JSON data"):  # never written in format 2
        damaged_index.save(saved_index)
    save_format_1(damaged_index, saved_index)  # as format 1 wrote it (no check)
    result = runner.invoke(app, ["search", str(saved_index), "red", "--json"])
    assert result.exit_code == 1 and "NaN or infinity" in result.stderr and result.stdout == ""


def test_non_finite_query_vectors_are_refused(scene_dir):
    index = HiMIRIndex.build(scene_dir, encoder=ColorEncoder(), progress=False)
    for bad in (np.full((1, index.snapshot.dim), np.nan), np.full((2, index.snapshot.dim), 1e30)):
        with pytest.raises(ValueError, match="NaN or infinite"):
            index.search_vectors(bad, k=2)


def test_non_finite_vectors_never_enter_an_index(scene_dir):
    class NanForOrange(ColorEncoder):
        def embed_images(self, images):
            out = super().embed_images(images)
            out[out[:, 5] > 0.3] = np.nan  # column 5: orange
            return out

    index = HiMIRIndex.build(scene_dir, encoder=NanForOrange(), progress=False)
    assert len(index) == 5 and any("NaN or infinite" in reason for _, reason in index.skipped)
    snapshot = index.snapshot
    vectors = np.array(snapshot.vectors)
    vectors[0] = np.inf
    damaged = type(snapshot)(dict(snapshot.images), vectors, snapshot.region_image, snapshot.levels,
                             snapshot.parents, snapshot.boxes)
    with pytest.raises(IndexFormatError, match="NaN or infinite"):
        HiMIRIndex.from_snapshot(damaged, encoder=index.encoder, config=index.config)


def test_non_finite_scores_are_left_out(scene_dir, monkeypatch, caplog):
    import himir_rag.scheduler

    index = HiMIRIndex.build(scene_dir, encoder=ColorEncoder(), progress=False)
    exhaustive = himir_rag.scheduler.score_exhaustive  # what scheduler.score_mode runs for himir-full

    def one_nan(*args, **kwargs):  # stands for any scorer bug or overflow
        scored = exhaustive(*args, **kwargs)
        scored.best[:, 0] = np.nan
        return scored

    monkeypatch.setattr(himir_rag.scheduler, "score_exhaustive", one_nan)
    with caplog.at_level(logging.WARNING):
        hits = index.search("red", k=6, mode="himir-full").hits
    assert len(hits) == 5 and all(math.isfinite(h.score) for h in hits)
    assert "not a finite number" in caplog.text


# -- LLM answers, sub-queries and caps ---------------------------------------------------------------
HOSTILE_ANSWERS = ["[" * 100_000, '{"a": ' * 100_000, "[" * 100_000 + '"a dog"' + "]" * 100_000,
                   "dog" * 400_000, '["' + "x" * 1_000 + '"]']


@pytest.mark.parametrize("answer", HOSTILE_ANSWERS)
def test_hostile_llm_answers_fall_back_without_recursion(answer, scene_dir, caplog):
    assert parse_subqueries(answer) == []
    decomposer = LLMDecomposer(lambda prompt: answer)
    with caplog.at_level(logging.WARNING):
        assert decomposer.decompose("a red square and a blue square") == ["a red square", "a blue square"]
    assert "using the fallback" in caplog.text
    index = HiMIRIndex.build(scene_dir, encoder=ColorEncoder(), progress=False)
    assert index.search("a red square and a blue square", k=1, decomposer=decomposer).subqueries == (
        "a red square", "a blue square")


def test_json_deeper_than_the_cap_is_read_as_lines_not_parsed():
    assert parse_subqueries("[" * 40 + '"a dog"' + "]" * 40) == ["a dog"]
    assert parse_subqueries('[["a dog"], "a cat"]') == ["a cat"]


def test_deeply_nested_structured_output_falls_back():
    nested: list = ["a dog"]
    for _ in range(100_000):
        nested = [nested]
    assert LLMDecomposer(lambda prompt: nested).decompose("a cat and a dog") == ["a cat", "a dog"]


def test_adapters_fall_back_on_a_recursive_answer(scene_dir):
    from langchain_core.language_models import FakeListChatModel
    from llama_index.core.llms import CompletionResponse, CustomLLM, LLMMetadata
    from llama_index.core.llms.callbacks import llm_completion_callback

    from himir_rag.langchain import HiMIRRetriever as LangChainRetriever
    from himir_rag.llama_index import HiMIRRetriever as LlamaRetriever

    class Brackets(CustomLLM):
        @property
        def metadata(self) -> LLMMetadata:
            return LLMMetadata(model_name="brackets")

        @llm_completion_callback()
        def complete(self, prompt: str, formatted: bool = False, **kwargs) -> CompletionResponse:
            return CompletionResponse(text="[" * 100_000)

        @llm_completion_callback()
        def stream_complete(self, prompt: str, formatted: bool = False, **kwargs):
            yield CompletionResponse(text="[" * 100_000)

    index = HiMIRIndex.build(scene_dir, encoder=ColorEncoder(), progress=False)
    docs = LangChainRetriever(index=index, k=1, llm=FakeListChatModel(responses=["[" * 100_000])).invoke(
        "a red square and a blue square")
    assert docs[0].metadata["subqueries"] == ["a red square", "a blue square"]
    nodes = LlamaRetriever(index, similarity_top_k=1, llm=Brackets()).retrieve("a red square and a blue square")
    assert nodes[0].node.metadata["subqueries"] == ["a red square", "a blue square"]


def test_subquery_and_query_caps(scene_dir, caplog):
    encoder = ColorEncoder()
    index = HiMIRIndex.build(scene_dir, encoder=encoder, progress=False)
    with caplog.at_level(logging.WARNING):
        result = index.search("red", k=1, subqueries=["red"] * 10_000, mode="himir-full")
    assert len(result.subqueries) == 16 and "10000 sub-queries given, more than max_subqueries=16" in caplog.text
    assert result.stats.dot_products == 16 * 6 * 21  # only the first 16 were matched
    with pytest.raises(ValueError, match="1000000 characters long, more than max_subquery_chars=512"):
        index.search("red", subqueries=["x" * 1_000_000])
    with pytest.raises(ValueError, match="more than max_query_chars=2048"):
        index.search("x" * 1_000_000)
    with pytest.raises(ValueError, match="subqueries must be a list of strings"):
        index.search("red", subqueries="red")
    with pytest.raises(ValueError, match="subqueries must be strings, got int"):
        index.search("red", subqueries=["red", 3])
    small = HiMIRIndex.from_snapshot(index.snapshot, encoder=encoder,
                                     config=HiMIRConfig(max_subqueries=2, max_subquery_chars=8, max_query_chars=40))
    assert small.search("red, green, blue and yellow", k=1).subqueries == ("red", "green")
    assert small.limit_subqueries(["a red square", ""]) == ["a red sq"]
    with pytest.raises(ValueError, match="max_query_chars=40"):
        small.search("red " * 20)
    for name in ("max_subqueries", "max_subquery_chars", "max_query_chars"):
        with pytest.raises(ConfigError, match=f"{name} must be an int >= 1"):
            HiMIRConfig(**{name: 0})


def test_adapters_cap_the_query_before_calling_the_llm(scene_dir):
    from langchain_core.language_models import FakeListChatModel

    from himir_rag.langchain import HiMIRRetriever

    model = FakeListChatModel(responses=['["red"]'])
    index = HiMIRIndex.build(scene_dir, encoder=ColorEncoder(), progress=False)
    with pytest.raises(ValueError, match="max_query_chars"):
        HiMIRRetriever(index=index, llm=model).invoke("red " * 1000)
    assert model.i == 0  # the model was never asked


# -- metadata keys and updates ----------------------------------------------------------------------------
def test_readme_metadata_example_with_relative_keys(tmp_path, monkeypatch, caplog):
    make_scene(tmp_path / "photos" / "beach.jpg", [("yellow", (0, 0, 80, 60))])
    make_scene(tmp_path / "photos" / "trip" / "bus.jpg", [("red", (0, 0, 80, 60))])
    make_scene(tmp_path / "photos" / "trip" / "sea.png", [("blue", (0, 0, 80, 60))])
    make_scene(tmp_path / "photos" / "x" / "sea.png", [("blue", (0, 0, 80, 60))])
    monkeypatch.chdir(tmp_path)
    metadata = {"photos/beach.jpg": {"album": "holiday"},  # relative to the working directory
                "trip/bus.jpg": {"album": "work"},  # relative to the indexed folder
                "sea.png": {"album": "?"},  # a file name two photos share: ambiguous
                "photos/missing.jpg": {"album": "lost"}}
    with caplog.at_level(logging.WARNING):
        index = HiMIRIndex.build("photos/", encoder=ColorEncoder(), metadata=metadata, progress=False)
    by_name = {Path(r.path).name + Path(r.path).parent.name: r.metadata for r in index.images}
    assert by_name["beach.jpgphotos"] == {"album": "holiday"} and by_name["bus.jpgtrip"] == {"album": "work"}
    assert by_name["sea.pngtrip"] == {} and by_name["sea.pngx"] == {}
    warnings = [r.message for r in caplog.records if "matched no indexed photo" in r.message]
    assert len(warnings) == 1 and "'sea.png'" in warnings[0] and "'photos/missing.jpg'" in warnings[0]
    assert [Path(h.path).name for h in index.search("yellow", k=4, filters={"album": "holiday"}).hits] == ["beach.jpg"]
    absolute = {str(tmp_path / "photos" / "x" / "sea.png"): {"album": "sea"}, "beach.jpg": {"album": "b"}}
    report = index.add("photos", metadata=absolute, progress=False)
    assert report.unchanged == 4 and report.metadata_updated == 2
    assert {Path(h.path).parent.name for h in index.search("blue", k=4, filters={"album": "sea"}).hits} == {"x"}


def test_rerun_with_new_metadata_updates_without_re_encoding(scene_dir, store_kind, tmp_path):
    encoder = ColorEncoder()
    index = HiMIRIndex(encoder, HiMIRConfig(precision="float32"), store=make_store(store_kind, encoder.dim, tmp_path))
    index.add(scene_dir, metadata={"red_blue.png": {"album": "a"}}, progress=False)
    calls, vectors = encoder.image_calls, np.array(index.snapshot.vectors)
    report = index.add(scene_dir, metadata={"red_blue.png": {"album": "b"}, "orange.png": {"album": "o"}},
                       progress=False)
    assert (report.added, report.updated, report.unchanged, report.metadata_updated) == (0, 0, 6, 2)
    assert encoder.image_calls == calls and np.array_equal(np.array(index.snapshot.vectors), vectors)
    assert {Path(h.path).name for h in index.search("red", k=6, filters={"album": "b"}).hits} == {"red_blue.png"}
    assert index.update_metadata({"orange.png": {}}) == 1  # {} clears
    assert index.update_metadata(lambda path: {"n": 1} if path.name.startswith("all_") else None) == 2
    assert index.update_metadata(lambda path: {"n": 1} if path.name.startswith("all_") else None) == 0
    assert encoder.image_calls == calls
    index.save(tmp_path / "saved")
    location = None if store_kind == "faiss" else str(tmp_path / "qdrant")  # outside the index: named again
    loaded = HiMIRIndex.load(tmp_path / "saved", encoder=encoder, store_location=location)
    assert {Path(r.path).name: r.metadata for r in loaded.images if r.metadata} == {
        "red_blue.png": {"album": "b"}, "all_red.png": {"n": 1}, "all_blue.png": {"n": 1}}
    assert {Path(h.path).name for h in loaded.search("red", k=6, filters={"n": 1}).hits} == {"all_red.png",
                                                                                               "all_blue.png"}


def test_himir_index_metadata_file_rerun_updates_unchanged_photos(scene_dir, tmp_path, monkeypatch):
    import himir_rag.scheduler

    encoder = ColorEncoder()
    monkeypatch.setattr(himir_rag.index, "get_encoder", lambda spec, device="cpu": encoder)
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({"red_blue.png": {"album": "a"}, "sub/orange.png": {"album": "o"}}))
    command = ["index", str(scene_dir), "--index", str(tmp_path / "idx"), "--encoder", "test:color",
               "--no-progress", "--metadata", str(meta)]
    assert runner.invoke(app, command).exit_code == 0
    calls = encoder.image_calls
    meta.write_text(json.dumps({"red_blue.png": {"album": "b"}, "sub/orange.png": {"album": "o"}}))
    result = runner.invoke(app, command)
    assert result.exit_code == 0, result.output
    assert "6 unchanged" in result.stdout and "new metadata for 1 unchanged" in result.stdout
    assert encoder.image_calls == calls  # nothing re-encoded
    loaded = HiMIRIndex.load(tmp_path / "idx", encoder=encoder)
    assert {Path(r.path).name: r.metadata for r in loaded.images if r.metadata} == {
        "red_blue.png": {"album": "b"}, "orange.png": {"album": "o"}}
    meta.write_text('{"red_blue.png": {"x": NaN}}')
    result = runner.invoke(app, command)
    assert result.exit_code == 1 and "NaN and Infinity are not valid JSON" in result.stderr
    meta.write_text('["red_blue.png"]')
    assert "expected a JSON object" in runner.invoke(app, command).stderr

"""The `himir` CLI contract, run in-process with the real offline encoder on real photos."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from himir_rag.cli import app
from himir_rag.demo import write_demo_photos

pytestmark = pytest.mark.slow
runner = CliRunner()


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("photos")
    written = {p.stem: p for p in write_demo_photos(root / "all")}
    keep = ["cat", "coffee", "astronaut", "motorcycle", "rocket", "flower", "scene_cat_and_coffee"]
    target = root / "collection"
    (target / "nested").mkdir(parents=True)
    for i, name in enumerate(keep):
        (target / ("nested" if i % 2 else "") / f"{name}.jpg").write_bytes(written[name].read_bytes())
    (target / "corrupt.jpg").write_bytes(b"\xff\xd8\xff garbage")
    (target / "empty.png").write_bytes(b"")
    return target


@pytest.fixture(scope="module")
def index_dir(photos, tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("index") / "idx"
    result = runner.invoke(app, ["index", str(photos), "--index", str(target), "--no-progress", "--batch-size", "16"])
    assert result.exit_code == 0, result.output
    assert "indexed 7 new, 0 changed, 0 unchanged, 2 skipped" in result.stdout
    assert result.stderr.count("skipped ") == 2 and "corrupt.jpg" in result.stderr
    return target


def test_rerun_indexes_only_new_files(index_dir, photos, tmp_path):
    result = runner.invoke(app, ["index", str(photos), "--index", str(index_dir), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "indexed 0 new, 0 changed, 7 unchanged, 2 skipped" in result.stdout


def test_search_json_contract(index_dir):
    result = runner.invoke(app, ["search", str(index_dir), "a cat next to a cup of coffee", "-k", "3", "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["query"] == "a cat next to a cup of coffee"
    assert payload["subqueries"] == ["a cat", "a cup of coffee"]
    assert len(payload["results"]) == 3
    top = payload["results"][0]
    assert Path(top["path"]).name == "scene_cat_and_coffee.jpg"
    assert {r["subquery"] for r in top["regions"]} == {"a cat", "a cup of coffee"}
    for region in top["regions"]:
        assert region["level"] in ("global", "region", "segment") and len(region["bbox"]) == 4
        assert -1.0 <= region["score"] <= 1.0
    assert isinstance(payload["stats"]["dot_products"], int) and payload["stats"]["dot_products"] > 0
    assert payload["stats"]["mode"] == "himir"  # the default mode: the scheduled pass
    assert isinstance(payload["stats"]["latency_ms"], float)


def test_search_focus_temperature_reports_focus_or_region_boxes(index_dir):
    def regions(*extra):
        result = runner.invoke(app, ["search", str(index_dir), "a cat next to a cup of coffee", "-k", "3", "--json",
                                     *extra])
        assert result.exit_code == 0, result.output
        payload = json.loads(result.stdout)
        # the focus box's dot products are counted apart (none at temperature 0)
        if "--focus-temperature" in extra:
            assert "focus_dot_products" not in payload["stats"]
        else:
            assert payload["stats"]["focus_dot_products"] > 0
        return [r for hit in payload["results"] for r in hit["regions"]]

    default, region_boxes = regions(), regions("--focus-temperature", "0")
    assert all(r["bbox"] == r["region_bbox"] for r in region_boxes)
    assert [r["region_bbox"] for r in default] == [r["region_bbox"] for r in region_boxes]  # the same ranking
    assert any(r["bbox"] != r["region_bbox"] for r in default)
    # --focus-spread: the same centres, boxes at least as large as the mean boxes of spread 0
    mean_boxes, grown = regions("--focus-spread", "0"), regions("--focus-spread", "3")
    area = lambda r: (r["bbox"][2] - r["bbox"][0]) * (r["bbox"][3] - r["bbox"][1])  # noqa: E731
    assert all(area(g) >= area(m) for g, m in zip(grown, mean_boxes)) and any(g != m for g, m in zip(grown, mean_boxes))
    for option in ("--focus-temperature", "--focus-spread"):
        bad = runner.invoke(app, ["search", str(index_dir), "a cat", option, "-1"])
        assert bad.exit_code == 1 and f"{option[2:].replace('-', '_')} must be a finite number >= 0" in bad.stderr


def test_search_readable_output(index_dir):
    result = runner.invoke(app, ["search", str(index_dir), "a motorcycle", "-k", "2", "--mode", "mvr"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == "query: a motorcycle"
    assert lines[2].strip().startswith("1.") and lines[2].endswith("motorcycle.jpg")
    assert "dot products" in lines[-1]


def test_search_jsonl_mode(index_dir, tmp_path):
    queries = tmp_path / "q.jsonl"
    queries.write_text(
        "\n".join(json.dumps(q) for q in [
            {"id": "q1", "query": "a cat", "extra": "ignored"},
            {"id": 2, "query": "a cup of coffee"},
            {"id": "q3", "query": "an astronaut"},
        ]) + "\n"
    )
    result = runner.invoke(app, ["search", str(index_dir), "--queries", str(queries), "-k", "2", "--json"])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["id"] for line in lines] == ["q1", 2, "q3"]
    for line in lines:
        assert set(line) >= {"id", "query", "subqueries", "results", "stats"}
        assert set(line["stats"]) >= {"dot_products", "latency_ms"}
        for hit in line["results"]:
            assert set(hit) >= {"path", "score", "regions"}
            assert all(set(r) >= {"subquery", "level", "bbox", "score"} for r in hit["regions"])
    # the cat photo, or the composed scene that holds it, comes first
    assert Path(lines[0]["results"][0]["path"]).name in ("cat.jpg", "scene_cat_and_coffee.jpg")
    assert "cat.jpg" in [Path(hit["path"]).name for hit in lines[0]["results"]]
    assert Path(lines[2]["results"][0]["path"]).name == "astronaut.jpg"


@pytest.mark.parametrize(
    "query, expected",
    # a photo holding the object; the composed scene_cat_and_coffee.jpg holds the cat photo too
    [("a cat", ("cat.jpg", "scene_cat_and_coffee.jpg")), ("an astronaut", ("astronaut.jpg",)),
     ("a cup of espresso", ("coffee.jpg",)), ("a red motorcycle", ("motorcycle.jpg",)),
     ("a daisy flower", ("flower.jpg",))],
)
def test_end_to_end_real_photos_rank_right_photo_first(index_dir, query, expected):
    result = runner.invoke(app, ["search", str(index_dir), query, "-k", "1", "--json"])
    assert result.exit_code == 0, result.output
    assert Path(json.loads(result.stdout)["results"][0]["path"]).name in expected


def test_cli_errors_are_clear(index_dir, tmp_path):
    result = runner.invoke(app, ["search", str(tmp_path / "nope"), "a cat"])
    assert result.exit_code == 1 and "no such index directory" in result.stderr
    result = runner.invoke(app, ["search", str(index_dir), "a cat", "--mode", "dense"])
    assert result.exit_code == 1 and "valid modes" in result.stderr
    result = runner.invoke(app, ["search", str(index_dir)])
    assert result.exit_code == 1 and "either a QUERY" in result.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1}\n')
    result = runner.invoke(app, ["search", str(index_dir), "--queries", str(bad), "--json"])
    assert result.exit_code == 1 and "bad.jsonl:1" in result.stderr


def test_console_script_is_installed():
    result = subprocess.run([sys.executable, "-m", "himir_rag.cli", "--help"], capture_output=True, text=True, check=True)
    for command in ("index", "search", "demo"):
        assert command in result.stdout


def test_demo_runs_and_draws(tmp_path):
    result = runner.invoke(app, ["demo", "--out", str(tmp_path / "demo"), "-k", "2"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "demo" / "matches.png").stat().st_size > 10_000
    assert "query: a cat next to a cup of coffee" in result.stdout
    section = result.stdout.split("query: a cat next to a cup of coffee")[1]
    assert "scene_cat_and_coffee.jpg" in section.splitlines()[2]

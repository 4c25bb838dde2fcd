"""`himir bench build | run | scale` through typer's CliRunner (tiny inputs, no real model)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from himir_rag.bench.scenes import DEFAULT_STAMPS_DIRS
from himir_rag.cli import app
from tests.conftest import ColorEncoder
from tests.test_bench_runner import write_tiny_benchmark

runner = CliRunner()


def _stamps_installed() -> bool:
    return any(d.is_dir() and next(d.rglob("*.png"), None) is not None for d in DEFAULT_STAMPS_DIRS)


@pytest.mark.skipif(not _stamps_installed(), reason="tuxpaint-stamps-default is not installed")
def test_bench_build(tmp_path):
    result = runner.invoke(app, ["bench", "build", str(tmp_path / "b"), "--scenes", "6", "--queries", "2",
                                 "--size", "160x120", "--seed", "3", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "wrote 6 scenes" in result.output and "himir bench run" in result.output
    assert len(list((tmp_path / "b" / "images").iterdir())) == 6
    assert (tmp_path / "b" / "qrels.jsonl").is_file()


def test_bench_build_without_stamps_explains_install(tmp_path):
    result = runner.invoke(app, ["bench", "build", str(tmp_path / "b"), "--stamps-dir", str(tmp_path / "none"),
                                 "--no-progress"])
    assert result.exit_code == 1
    assert "apt-get install tuxpaint-stamps-default" in result.output
    assert "benchmarks/install_stamps.sh" in result.output


def test_bench_build_rejects_bad_size(tmp_path):
    result = runner.invoke(app, ["bench", "build", str(tmp_path / "b"), "--size", "640by480"])
    assert result.exit_code != 0 and "WIDTHxHEIGHT" in result.output


def test_bench_scale(tmp_path):
    out = tmp_path / "scale"
    result = runner.invoke(app, ["bench", "scale", "--images", "400", "--dim", "16", "--queries", "5",
                                 "--modes", "single,mvr,himir-full", "--out", str(out), "--no-plots",
                                 "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "Recall@10" in result.output and str(out / "report.md") in result.output
    report = json.loads((out / "report.json").read_text())
    assert report["benchmark"]["images"] == 400 and set(report["modes"]) == {"single", "mvr", "himir-full"}


def test_bench_scale_too_small(tmp_path):
    result = runner.invoke(app, ["bench", "scale", "--images", "20", "--queries", "5", "--out", str(tmp_path)])
    assert result.exit_code == 1 and "too small" in result.output


def test_bench_run(tmp_path, monkeypatch):
    import himir_rag.index

    # the CLI takes an encoder spec: route a test spec to the colour encoder
    monkeypatch.setattr(himir_rag.index, "get_encoder", lambda spec, device="cpu": ColorEncoder())
    bench = write_tiny_benchmark(tmp_path / "bench")
    result = runner.invoke(app, ["bench", "run", str(bench), "--encoder", "test:color", "--modes", "single,mvr",
                                 "--decomposer", "oracle", "--throughput-images", "2", "--no-plots", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "Recall@10" in result.output and "Latency per query" in result.output
    report = json.loads((bench / "report.json").read_text())
    assert report["config"]["decomposer"] == "oracle" and set(report["modes"]) == {"single", "mvr"}


def test_bench_run_errors(tmp_path):
    result = runner.invoke(app, ["bench", "run", str(tmp_path / "missing")])
    assert result.exit_code == 1 and "himir bench build" in result.output
    bench = write_tiny_benchmark(tmp_path / "bench")
    result = runner.invoke(app, ["bench", "run", str(bench), "--modes", "single,colbert"])
    assert result.exit_code == 1 and "unknown" in result.output
    result = runner.invoke(app, ["bench", "run", str(bench), "--decomposer", "magic"])
    assert result.exit_code == 1 and "decomposer 'magic' is unknown" in result.output


def test_bench_scale_scheduler_option(tmp_path):
    out = tmp_path / "scale"
    result = runner.invoke(app, ["bench", "scale", "--images", "400", "--dim", "16", "--queries", "5", "--modes",
                                 "himir", "--scheduler", '{"candidate_k": -1}', "--out", str(out), "--no-plots",
                                 "--no-progress"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "report.json").read_text())["config"]["scheduler"] == {"candidate_k": -1}
    result = runner.invoke(app, ["bench", "scale", "--images", "400", "--dim", "16", "--queries", "5", "--modes",
                                 "himir", "--reuse", "--warm-pass", "--out", str(out), "--no-plots", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "report.json").read_text())["config"]["warm_pass"] is True
    result = runner.invoke(app, ["bench", "scale", "--scheduler", "nprobe=3", "--out", str(out)])
    assert result.exit_code == 2 and "not JSON" in result.output
    result = runner.invoke(app, ["bench", "scale", "--images", "400", "--dim", "16", "--queries", "5", "--modes",
                                 "himir", "--scheduler", '{"warp": 9}', "--out", str(out), "--no-plots"])
    assert result.exit_code == 1 and "warp" in result.output

"""The example scripts, run as a user runs them (subprocess, offline) on the bundled sample photos.

``index_folder.py`` builds the index once (module fixture); the LlamaIndex and LangChain
examples answer over it with their fake chat models (``HIMIR_LLM`` unset). Slow: each
script loads the offline encoder.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TIMEOUT_S = 900
QUESTION = "a cat next to a cup of coffee"


def _run(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "HIMIR_LLM"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", MPLBACKEND="Agg")
    return subprocess.run([sys.executable, str(EXAMPLES / script), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=TIMEOUT_S)


@pytest.fixture(scope="module")
def demo_photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from himir_rag.demo import write_demo_photos

    folder = tmp_path_factory.mktemp("examples") / "sample-photos"
    write_demo_photos(folder)
    return folder


@pytest.fixture(scope="module")
def indexed(demo_photos: Path) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """``index_folder.py`` over the sample photos, with a query and a plot: (index dir, its run)."""
    workdir = demo_photos.parent
    run = _run("index_folder.py", str(demo_photos), "--query", QUESTION, "-k", "2", "--plot", "matches.png",
               cwd=workdir)
    return workdir / "sample-photos.himir", run


@pytest.mark.slow
def test_index_folder_indexes_searches_and_draws(indexed: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    index_dir, run = indexed
    assert run.returncode == 0, run.stderr
    assert (index_dir / "CURRENT").is_file()
    assert "18 added, 0 updated, 0 unchanged, 0 skipped" in run.stdout
    ranked = [line.split()[-1] for line in run.stdout.splitlines() if line.strip().startswith("#")]
    assert Path(ranked[0]).name == "scene_cat_and_coffee.jpg", run.stdout
    assert "'a cat': " in run.stdout and "'a cup of coffee': " in run.stdout
    assert (index_dir.parent / "matches.png").stat().st_size > 10_000


@pytest.mark.slow
def test_index_folder_rerun_only_indexes_changes(indexed: tuple[Path, subprocess.CompletedProcess[str]],
                                                 demo_photos: Path) -> None:
    index_dir, _ = indexed
    run = _run("index_folder.py", str(demo_photos), "--index", str(index_dir), cwd=index_dir.parent)
    assert run.returncode == 0, run.stderr
    assert "0 added, 0 updated, 18 unchanged" in run.stdout


@pytest.mark.slow
def test_llamaindex_example_answers_over_the_index(indexed: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    index_dir, _ = indexed
    run = _run("llamaindex_qa.py", "--index", str(index_dir), "-k", "2", QUESTION, cwd=index_dir.parent)
    assert run.returncode == 0, run.stderr
    assert "I was shown 2 photo(s)" in run.stdout
    assert "scene_cat_and_coffee.jpg" in run.stdout


@pytest.mark.slow
def test_langchain_example_answers_over_the_index(indexed: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    index_dir, _ = indexed
    run = _run("langchain_chain.py", "--index", str(index_dir), "-k", "2", QUESTION, cwd=index_dir.parent)
    assert run.returncode == 0, run.stderr
    assert "I was shown 2 photo(s)" in run.stdout
    assert "scene_cat_and_coffee.jpg" in run.stdout


def test_index_folder_rejects_a_missing_folder(tmp_path: Path) -> None:
    run = _run("index_folder.py", str(tmp_path / "nowhere"), cwd=tmp_path)
    assert run.returncode == 2
    assert "is not a folder" in run.stderr

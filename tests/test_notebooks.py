"""The notebooks: committed with their rendered figures, and executed end to end offline.

Each notebook runs in a temporary copy (working directory = the copy's folder) with
``HIMIR_LLM`` unset, so the LlamaIndex and LangChain notebooks use their offline
stand-ins. All notebooks of the module share one data folder (``HIMIR_NOTEBOOK_DATA``),
so the demo index built by ``01_quickstart`` is loaded by the later ones; each also runs
alone (it builds what it misses). Slow: every notebook starts a kernel that loads the
offline encoder.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

NOTEBOOKS_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOKS_DIR.glob("[0-9][0-9]_*.ipynb"))
CELL_TIMEOUT_S = 600  # per cell; a notebook takes about a minute on two idle cores
MAX_NOTEBOOK_BYTES = 1_500_000

# text each executed notebook must show (besides running without error)
EXPECTED_OUTPUT = {
    "01_quickstart.ipynb": ["scene_cat_and_coffee.jpg", "himir-full", "dot products"],
    "02_llamaindex_qa.ipynb": ["OFFLINE STAND-IN", "best match is scene_cat_and_coffee.jpg"],
    "03_langchain_chain.ipynb": ["OFFLINE STAND-IN", "best match is scene_cat_and_coffee.jpg"],
    "04_tuning.ipynb": ["trials in", "chosen", "fewer dot products than mvr"],
    "05_query_by_photo.ipynb": ["central 80 % crop", "scene_rocket_and_motorcycle.jpg at rank 1",
                                "with text and photo the best match is scene_cat_and_coffee.jpg",
                                "LangChain HiMIRImageRetriever"],
}


def _outputs(notebook) -> tuple[str, int, list[str]]:
    """(all text output, number of images, error names) of an executed notebook."""
    texts, images, errors = [], 0, []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            if output.output_type == "stream":
                texts.append(output.text)
            elif output.output_type == "error":
                errors.append(f"{output.ename}: {output.evalue}")
            else:
                data = output.get("data", {})
                images += sum(1 for mime in data if mime.startswith("image/"))
                texts.extend(str(data[mime]) for mime in ("text/markdown", "text/plain") if mime in data)
    return "\n".join(texts), images, errors


def test_notebooks_found() -> None:
    assert [nb.name for nb in NOTEBOOKS] == sorted(EXPECTED_OUTPUT)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_notebook_shows_its_figures(path: Path) -> None:
    nbformat = pytest.importorskip("nbformat")
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    text, images, errors = _outputs(notebook)
    assert not errors, f"{path.name} was saved with errors: {errors}"
    assert images >= 1, f"{path.name} holds no rendered figure; execute it and save it with its outputs"
    assert all(cell.get("execution_count") for cell in notebook.cells if cell.cell_type == "code"), (
        f"{path.name} has unexecuted cells")
    assert path.stat().st_size < MAX_NOTEBOOK_BYTES, f"{path.name} is {path.stat().st_size} bytes"
    assert "/work/" not in text and "/tmp/" not in text, f"{path.name} shows local absolute paths"


@pytest.fixture(scope="module")
def notebook_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One data folder for all notebooks of this module (the demo index is built once)."""
    return tmp_path_factory.mktemp("himir-notebook-data")


def _execute(path: Path, workdir: Path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    copy = workdir / path.name
    shutil.copy(path, copy)
    notebook = nbformat.read(copy, as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                     resources={"metadata": {"path": str(workdir)}})
    client.execute()
    return notebook


@pytest.fixture
def offline_env(monkeypatch: pytest.MonkeyPatch, notebook_data: Path) -> None:
    """The kernel inherits this process's environment: no real LLM, no download, shared data."""
    monkeypatch.delenv("HIMIR_LLM", raising=False)
    monkeypatch.delenv("HIMIR_STAMPS_DIR", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("HIMIR_NOTEBOOK_DATA", str(notebook_data))


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_offline(path: Path, tmp_path: Path, offline_env: None) -> None:
    notebook = _execute(path, tmp_path)
    text, images, errors = _outputs(notebook)
    assert not errors
    assert images >= 1, f"{path.name} drew no figure"
    for expected in EXPECTED_OUTPUT[path.name]:
        assert expected in text, f"{path.name}: {expected!r} not in its output"


@pytest.mark.slow
def test_tuning_notebook_falls_back_without_stamps(tmp_path: Path, offline_env: None,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Where tuxpaint-stamps-default is missing, 04 tunes on the demo photos without labels."""
    monkeypatch.setenv("HIMIR_STAMPS_DIR", str(tmp_path / "no-stamps-here"))
    notebook = _execute(NOTEBOOKS_DIR / "04_tuning.ipynb", tmp_path)
    text, images, _ = _outputs(notebook)
    assert "falling back to the demo photos" in text
    assert "agreement-with-himir-full" in text
    assert images >= 1

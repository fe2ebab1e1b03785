"""Each notebook runs top to bottom (smoke mode: a tiny model and a few steps) without an error."""

from __future__ import annotations

import os

import pytest
from conftest import REPO

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")

NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks():
    assert [p.name for p in NOTEBOOKS] == [
        "01_classifier_free_guidance.ipynb",
        "02_guidance_distillation.ipynb",
        "03_flow_matching_and_guidance_free.ipynb",
    ]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_top_to_bottom(path, tmp_path, monkeypatch):
    monkeypatch.setenv("CFG_MINIMAL_SMOKE", "1")
    monkeypatch.setenv("CFG_MINIMAL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "2"))
    notebook = nbformat.read(path, as_version=4)
    workdir = tmp_path / "notebooks"
    workdir.mkdir()
    (workdir.parent / "cfg_minimal").symlink_to(REPO / "cfg_minimal")  # the notebooks import from their parent
    (workdir.parent / "pretrained").symlink_to(REPO / "pretrained")  # ... and load the shipped weights there
    client = nbclient.NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(workdir)}}
    )
    client.execute()  # raises CellExecutionError, naming the cell, on any error
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs)  # it draws pictures

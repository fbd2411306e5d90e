"""Every teaching notebook runs top to bottom (quick mode) and makes its widgets and charts."""
from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def output_types(nb) -> set[str]:
    """Mimetypes the cells produced; an Altair chart rendered as HTML counts as "altair"."""
    kinds = set()
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            data = out.get("data", {})
            kinds.update(data.keys())
            if "vega" in str(data.get("text/html", "")):
                kinds.add("altair")
    return kinds


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs_clean(path, monkeypatch):
    monkeypatch.setenv("JOINTCOMP_QUICK", "1")
    nb = nbformat.read(path, as_version=4)
    assert all(not cell.get("outputs") for cell in nb.cells if cell.cell_type == "code"), "stored with outputs"
    NotebookClient(nb, timeout=300, kernel_name="python3", shutdown_kernel="immediate",
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    kinds = output_types(nb)
    assert "altair" in kinds or any(k.startswith("application/vnd.vegalite") for k in kinds), kinds  # charts drawn
    if path.name.startswith(("01", "02")):
        assert "application/vnd.jupyter.widget-view+json" in kinds  # and the widgets made


def test_notebooks_exist():
    assert [p.name for p in NOTEBOOKS] == ["01_two_knapsacks.ipynb", "02_live_compression.ipynb", "03_export_and_inspect.ipynb"]

"""Every teaching notebook runs top to bottom (quick mode) and makes its widgets and charts."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

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


RUN = """
import sys, time
from queue import Empty
import nbformat
from nbclient import NotebookClient


def polling(get_msg):
    # One long wait on a zmq socket can miss its wake-up (jupyter/nbclient#312, with ipywidgets):
    # wait in one-second slices instead, each of which polls the socket afresh.
    async def get(timeout=None):
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = 1.0 if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                return await get_msg(timeout=min(1.0, left))
            except Empty:
                if deadline is not None and time.monotonic() >= deadline:
                    raise
    return get


class Client(NotebookClient):
    async def async_start_new_kernel_client(self):
        kc = await super().async_start_new_kernel_client()
        for channel in (kc.shell_channel, kc.iopub_channel):
            channel.get_msg = polling(channel.get_msg)
        return kc


nb = nbformat.read(sys.argv[1], as_version=4)
Client(nb, timeout=240, kernel_name="python3", shutdown_kernel="immediate",
       resources={"metadata": {"path": sys.argv[3]}}).execute()
nbformat.write(nb, sys.argv[2])
"""


def execute(path: Path, out: Path, attempts: int = 2) -> None:
    """Run the notebook in its own process group (kernel included). nbclient can miss a reply
    after a cell with ipywidgets (jupyter/nbclient#312), so RUN polls in short slices; should a
    run still hang, it is killed after 5 minutes and retried once. Errors in the notebook fail
    at once."""
    env = {**os.environ, "JOINTCOMP_QUICK": "1"}
    for attempt in range(attempts):
        proc = subprocess.Popen([sys.executable, "-c", RUN, str(path), str(out), str(path.parent)], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            _, stderr = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            continue
        assert proc.returncode == 0, stderr[-3000:]
        return
    pytest.fail(f"{path.name} hung {attempts} times")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs_clean(path, tmp_path):
    stored = nbformat.read(path, as_version=4)
    assert all(not cell.get("outputs") for cell in stored.cells if cell.cell_type == "code"), "stored with outputs"
    execute(path, tmp_path / path.name)
    nb = nbformat.read(tmp_path / path.name, as_version=4)
    kinds = output_types(nb)
    assert "altair" in kinds or any(k.startswith("application/vnd.vegalite") for k in kinds), kinds  # charts drawn
    if path.name.startswith(("01", "02", "04")):
        assert "application/vnd.jupyter.widget-view+json" in kinds  # and the widgets made


def test_notebooks_exist():
    assert [p.name for p in NOTEBOOKS] == ["01_two_knapsacks.ipynb", "02_live_compression.ipynb", "03_export_and_inspect.ipynb",
                                          "04_calibrated_knapsack.ipynb"]

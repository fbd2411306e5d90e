"""End to end in a real browser: a real `streamlit run app.py` server on localhost, driven by
Debian's Chromium through Playwright. Screenshots land in test-artifacts/ (not committed)."""
from __future__ import annotations

import contextlib
import io
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from playwright.sync_api import Error as PlaywrightError

from c_runtime import compile_c, run_c
from jointcomp import Compressor, load_compressed

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]
# One app server and one browser, on one worker of `pytest -n 2`.
pytestmark = [pytest.mark.browser, pytest.mark.xdist_group("browser")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def app_server(folder: Path):
    """A `streamlit run app.py` server on a free local port, its runs and log in `folder`; yields its address."""
    if not Path(CHROMIUM).exists():
        pytest.fail("Chromium is missing: `make system-deps` (apt-get install chromium chromium-driver)")
    port = free_port()
    log = open(folder / "streamlit.log", "w")
    env = {**os.environ, "JOINTCOMP_RUNS": str(folder / "runs")}
    server = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app.py", "--server.headless", "true",
         "--server.port", str(port), "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false",
         "--server.fileWatcherType", "none"],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).read() == b"ok":
                break
        except OSError:
            pass
        if time.monotonic() > deadline or server.poll() is not None:
            server.kill()
            pytest.fail(f"streamlit did not start: {Path(log.name).read_text()[-2000:]}")
        time.sleep(0.5)
    try:
        yield url
    finally:
        server.terminate()
        server.wait(20)


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    with app_server(tmp_path_factory.mktemp("server")) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield b
        b.close()


def slider(page, label: str):
    return page.locator('[data-testid="stSlider"]', has_text=label).get_by_role("slider")


def button(page, key: str):
    """An app button by its Streamlit key: text can also match Streamlit's own status-bar buttons."""
    return page.locator(f".st-key-{key} button").first  # a rerun can leave the previous run's copy a moment


LIVE_CHARTS = ("accuracy", "size", "tradeoff", "loss", "multipliers", "residuals", "layers", "density", "bits")


def epoch_shown(page) -> int:
    text = page.get_by_text(re.compile(r"compression epoch \d+ of 200")).first.inner_text()
    return int(re.search(r"compression epoch (\d+) of 200", text).group(1))


def wait_for_epoch(page, epoch: int, deadline: float) -> float:
    """Wait until the page shows at least `epoch` compression epochs done; when it did."""
    while epoch_shown(page) < epoch:
        assert time.monotonic() < deadline, f"compression epoch {epoch} did not come in time"
        page.wait_for_timeout(250)
    return time.monotonic()


def download(page, key: str, path: Path, tries: int = 3) -> None:
    """Click a download button and save the file once it is complete; a download the browser
    reports as failed (for example cancelled by a rerun of the page) is tried again."""
    for _ in range(tries):
        with page.expect_download(timeout=120_000) as started:
            button(page, key).click()
        failure = started.value.failure()  # waits for the download to finish
        if failure is None:
            started.value.save_as(path)
            return
    raise AssertionError(f"the {key} download failed {tries} times, last: {failure}")


WARNING_STACK = "the script stack of that warning:"
# In the page, before its own scripts: each console warning is followed by a log of the stack that
# raised it, so a failure says which part of the page (a chart's first draw, a data update) warned.
TRACE_WARNINGS = f"""
Error.stackTraceLimit = 40;
const warn = console.warn.bind(console);
console.warn = (...args) => {{ warn(...args); console.log("{WARNING_STACK}", new Error().stack); }};
"""


def pixels(screenshot: bytes) -> np.ndarray:
    """A PNG screenshot as an (height, width, 3) array of signed integers, to subtract."""
    return np.asarray(Image.open(io.BytesIO(screenshot)).convert("RGB"), dtype=np.int16)


def looks_different(a: bytes, b: bytes) -> bool:
    """Whether two screenshots differ by more than anti-aliasing: vega drawing the same chart again
    moves a hundred edge pixels by up to ~20 levels; a new curve or point changes dozens outright."""
    x, y = pixels(a), pixels(b)
    return x.shape != y.shape or int((np.abs(x - y).max(axis=2) > 64).sum()) >= 20


def drawn_chart(page, name: str, deadline: float) -> bytes:
    """A screenshot of the live chart `name` as drawn, not mid-redraw: Streamlit fades a fragment's
    elements while it reruns (data-stale) and vega draws a new spec asynchronously, so the chart
    counts as drawn when nothing around or in it is stale and two screenshots half a second apart look alike."""
    box = page.locator(f".st-key-chart_{name}")
    stale = "box => Boolean(box.closest('[data-stale=\"true\"]') || box.querySelector('[data-stale=\"true\"]'))"
    last = None
    while True:
        try:
            shot = box.locator(".vega-embed").screenshot()
            if last is not None and not looks_different(shot, last) and not box.evaluate(stale):
                return shot
        except PlaywrightError:  # the chart was replaced while being read: a redraw, read it again
            shot = None
        assert time.monotonic() < deadline, f"the {name} chart did not settle"
        last = shot
        page.wait_for_timeout(500)


def what_if_values(page) -> list[str]:
    return page.locator('[data-testid="stMetricValue"]').all_inner_texts()


def test_run_steer_stop_download(app_url, browser, tmp_path):
    page = browser.new_page(viewport={"width": 1500, "height": 1100}, accept_downloads=True)
    opened, timeline, warned = time.monotonic(), [], []

    def note(what: str) -> None:  # what the test did, with the console's warnings between
        timeline.append(f"{time.monotonic() - opened:6.1f} s  {what}")

    def on_console(message) -> None:
        if message.type in ("warning", "error"):
            warned.append(message.text)
            note(f"console {message.type} on {page.url}: {message.text}")
        elif message.text.startswith(WARNING_STACK):
            note(message.text)

    page.add_init_script(TRACE_WARNINGS)
    page.on("console", on_console)
    page.goto(app_url)
    page.get_by_text("jointcomp: compress a network").wait_for(timeout=90_000)
    page.get_by_text("What-if").wait_for(timeout=90_000)
    page.locator('[data-testid="stMetricValue"]').nth(2).wait_for(timeout=30_000)
    alone = what_if_values(page)
    page.screenshot(path=ARTIFACTS / "1-start-page.png", full_page=True)

    epochs = slider(page, "Compression epochs")
    epochs.focus()
    epochs.press("End")  # the longest run, so there is time to steer it
    button(page, "start").click()
    note("Start clicked")
    page.get_by_text(re.compile(r"compression epoch \d+ of 200")).wait_for(timeout=120_000)
    started = time.monotonic()
    one_epoch = wait_for_epoch(page, 1, deadline=started + 600) - started  # measured here, on this machine as busy as it is
    note(f"epoch 1 shown, {one_epoch:.1f} s after the run started")
    wait_for_epoch(page, 2, deadline=time.monotonic() + 10 * one_epoch + 60)
    note("epoch 2 shown")
    for name in LIVE_CHARTS:  # vega draws them asynchronously
        page.locator(f".st-key-chart_{name} .vega-embed").wait_for(timeout=30_000)
    page.screenshot(path=ARTIFACTS / "2-running.png", full_page=True)

    # the trade-off chart moves from one epoch to the next (the run's point every epoch, curves every few)
    epoch, before = epoch_shown(page), drawn_chart(page, "tradeoff", time.monotonic() + 60)
    deadline = wait_for_epoch(page, epoch + 2, deadline=time.monotonic() + 10 * one_epoch + 60) + 10 * one_epoch + 30
    after = drawn_chart(page, "tradeoff", deadline + 60)
    while not looks_different(after, before) and time.monotonic() < deadline:  # the charts redraw every few seconds
        page.wait_for_timeout(250)
        after = drawn_chart(page, "tradeoff", deadline + 60)
    assert looks_different(after, before), "the trade-off chart did not change between epochs"
    note(f"the trade-off chart changed after epoch {epoch}")

    # a second tab while the run trains: its what-if is the one a lone session sees
    other = browser.new_page(viewport={"width": 1500, "height": 1100})
    other.goto(app_url)
    other.get_by_text("What-if").wait_for(timeout=90_000)
    other.locator('[data-testid="stMetricValue"]').nth(2).wait_for(timeout=30_000)
    assert what_if_values(other) == alone
    other.close()
    note("a second tab saw the lone what-if")

    # move the target slider during the run: 50x -> 70x -> 100x
    mlp_weight_bytes = 4 * (64 * 256 + 256 * 128 + 128 * 10)
    target = slider(page, "Target size")
    target.focus()
    target.press("ArrowRight")
    target.press("ArrowRight")
    page.get_by_text(f"target {mlp_weight_bytes / 100 / 1000:.2f} KB").wait_for(timeout=30_000)
    page.get_by_text("100x").first.wait_for(timeout=10_000)
    note("the target moved to 100x")
    page.screenshot(path=ARTIFACTS / "3-target-moved.png", full_page=True)

    button(page, "stop").click()
    note("Stop clicked")
    page.get_by_text(re.compile(r"Result \(stopped at compression epoch \d+ of 200")).wait_for(timeout=60_000)
    note("the result shown")
    page.screenshot(path=ARTIFACTS / "4-result.png", full_page=True)
    saved = tmp_path / "model.jcz"
    download(page, "download", saved)
    model = load_compressed(saved)
    assert sum(p.numel() for p in model.parameters()) > 0
    note("downloaded the .jcz")
    page.get_by_role("link", name="Runs").click()  # the Runs page lists the run, stopped, with its results
    page.get_by_role("heading", name="Runs").wait_for(timeout=30_000)
    row = page.locator("table tbody tr", has_text="stopped")
    row.wait_for(timeout=30_000)
    assert "mlp" in row.inner_text() and "digits" in row.inner_text()
    note("the Runs page lists the run")
    page.screenshot(path=ARTIFACTS / "6-runs.png", full_page=True)
    assert not warned, "the browser console warned:\n" + "\n".join(timeline)
    page.close()


def test_inspect_page_rejects_bad_file_and_reads_good_one(app_url, browser, tmp_path, trained_mlp, digits):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(f"{app_url}/Inspect")
    page.get_by_text("Inspect a compressed checkpoint").wait_for(timeout=60_000)
    bad = tmp_path / "bad.jcz"
    bad.write_bytes(b"JCZ\x01 this is not a checkpoint")
    page.locator('input[type="file"]').set_input_files(str(bad))
    page.get_by_text("This file cannot be opened").wait_for(timeout=30_000)
    page.screenshot(path=ARTIFACTS / "5-inspect-bad.png", full_page=True)

    # a good file: its C export is shown, downloads, compiles with warnings as errors and predicts as PyTorch
    good = tmp_path / "mlp.jcz"
    comp = Compressor(trained_mlp, target="50x", steps=1, meta={"model": "mlp", "input_shape": [1, 8, 8], "num_classes": 10})
    comp.finish()
    comp.export(str(good))
    page.locator('input[type="file"]').set_input_files(str(good))
    page.get_by_text("C export: flash").wait_for(timeout=30_000)
    download(page, "download_c", tmp_path / "c.zip")
    with zipfile.ZipFile(tmp_path / "c.zip") as z:
        z.extractall(tmp_path / "c")
    ours = run_c(compile_c(tmp_path / "c"), digits.val_x)
    with torch.no_grad():
        reference = load_compressed(good)(digits.val_x)
    assert torch.equal(ours.argmax(1), reference.argmax(1)) and (ours - reference).abs().max() <= 1e-4
    page.screenshot(path=ARTIFACTS / "7-inspect-good.png", full_page=True)
    page.close()


def choose(page, label: str, option: str) -> None:
    """Pick `option` in the sidebar's select box `label` (the one drawn now: a rerun leaves hidden ones)."""
    page.locator('[data-testid="stSelectbox"]:visible', has_text=label).click()
    page.get_by_role("option", name=option, exact=True).click()


def not_drawn(chart, rows: int = 0) -> str:
    """What a chart element lacks to count as drawn ('' when nothing): the height for its rows (12 px
    each, title, legend and axis aside), and coloured marks in its lower part (bars, lines), not only
    a title."""
    box = chart.bounding_box()
    if box["height"] < 12 * rows + 100:
        return f"{box['height']:.0f} px for {rows} rows"
    drawn = pixels(chart.screenshot())
    lower = drawn[int(len(drawn) * 0.4):]
    coloured = int((lower.max(-1) - lower.min(-1) > 60).sum())
    return "" if coloured >= 150 else f"{coloured} coloured pixels below the title: no marks drawn"


def assert_drawn(chart, rows: int = 0, timeout_s: float = 60) -> None:
    """Wait until the chart is drawn (vega draws after the element appears); fail with what it lacks
    if it is not within `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while (lacks := not_drawn(chart, rows)) and time.monotonic() < deadline:
        chart.page.wait_for_timeout(250)
    assert not lacks, lacks


SETTLED = """() => !document.querySelector('[data-testid="stStatusWidgetRunningIcon"]')
                 && !document.querySelector('[data-stale="true"]')"""  # no script run going, nothing left from an earlier one


@pytest.mark.parametrize("data,model,layers", [("digits", "mlp", 3), ("fashion-mnist", "lenet5", 4), ("digits", "resnet20", 20)])
def test_every_chart_is_drawn_for_3_4_and_20_layers(app_url, browser, tmp_path, data, model, layers):
    """The what-if's allocation and trade-off, then the result of Compress without training, for
    networks of 3, 4 and 20 layers (LeNet-5 on Fashion-MNIST and ResNet-20 on the 8x8 digits, from an
    uploaded checkpoint); and the choices made on Compress are still there on Sweep."""
    from playwright.sync_api import expect

    page = browser.new_page(viewport={"width": 1500, "height": 1100})
    page.goto(app_url)
    page.get_by_text("What-if").wait_for(timeout=90_000)
    if model != "mlp":
        if data != "digits":
            choose(page, "Data set", data)
            page.get_by_text("training the dense lenet5").wait_for(timeout=120_000)  # the sidebar is drawn again
        if model != "lenet5":
            choose(page, "Model", model)
            page.get_by_text(f"training the dense {model}").wait_for(timeout=120_000)
        choose(page, "Start from", "upload a checkpoint…")
        torch.manual_seed(0)
        from jointcomp import build_model
        shape = (1, 28, 28) if data == "fashion-mnist" else (1, 8, 8)
        torch.save(build_model(model, shape, 10).state_dict(), tmp_path / f"{model}.pt")
        page.locator('input[type="file"]').set_input_files(str(tmp_path / f"{model}.pt"))
    page.get_by_text(f"{model} on {data}").wait_for(timeout=300_000)  # the status line of this model's run,
    page.wait_for_function(SETTLED, timeout=300_000)  # and that run over: the charts of the one before are gone
    allocation, tradeoff = (page.locator(f".st-key-whatif_{name} .vega-embed") for name in ("allocation", "tradeoff"))
    allocation.wait_for(timeout=300_000)
    tradeoff.wait_for(timeout=300_000)
    assert_drawn(allocation, layers)
    assert_drawn(tradeoff)
    page.screenshot(path=ARTIFACTS / f"8-what-if-{model}.png", full_page=True)
    page.get_by_role("button", name="Compress without training").click()
    result = page.locator(".st-key-result_allocation .vega-embed")
    result.wait_for(timeout=300_000)
    assert_drawn(result, layers)
    page.screenshot(path=ARTIFACTS / f"9-result-{model}.png", full_page=True)
    if model != "mlp":
        page.get_by_role("link", name="Sweep").click()
        page.get_by_text("Methods").first.wait_for(timeout=60_000)
        for label, chosen in (("Data set", data), ("Model", model)):
            box = page.locator('[data-testid="stSelectbox"]:visible', has_text=label)
            expect(box.get_by_role("combobox")).to_have_value(chosen, timeout=60_000)
    page.close()


def test_a_first_visit_straight_to_a_page_shows_the_four_pages(browser, tmp_path):
    """A new server whose first visitor opens /Inspect (a bookmark): Streamlit then runs that page from
    pages/ without app.py, and its own menu listed an 'app' page too. The menu is exactly the four pages,
    and each of its links opens its page."""
    with app_server(tmp_path) as url:
        page = browser.new_page(viewport={"width": 1500, "height": 1000})
        page.goto(f"{url}/Inspect")
        page.get_by_role("heading", name="Inspect a compressed checkpoint").wait_for(timeout=60_000)
        menu = page.locator('[data-testid="stSidebar"] a')  # Streamlit's own menu or ours: every page link
        menu.first.wait_for(timeout=30_000)
        assert [text.strip() for text in menu.all_inner_texts()] == ["Compress", "Sweep", "Inspect", "Runs"]
        page.screenshot(path=ARTIFACTS / "8-first-visit-inspect.png", full_page=True)
        page.get_by_role("link", name="Runs").click()
        page.get_by_role("heading", name="Runs").wait_for(timeout=60_000)
        assert [text.strip() for text in menu.all_inner_texts()] == ["Compress", "Sweep", "Inspect", "Runs"]
        page.close()

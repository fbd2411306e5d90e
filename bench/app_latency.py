"""The app as a user meets it, in a real browser (a `streamlit run app.py` server on localhost,
Debian's Chromium through Playwright, as in tests/test_browser.py):

* the what-if: seconds from a key press on the target slider to the page showing the new
  what-if figures (before any run; median and worst of several moves); with `--whatif DATA/MODEL`
  (repeatable), for that network: the seconds from picking it (its published checkpoint from
  $JOINTCOMP_MODELS where there is one, else a dense model trained on the page, which those
  seconds then include) to its first what-if, then the slider moves; with `--after-default-run`,
  once the page's default run (digits MLP) has ended, as for a user who tried that first;
* the default run (digits MLP, 15 epochs): seconds from Start to its download button;
* training speed with a browser attached and without: two 200-epoch runs started from the page,
  the same 40 ADMM epochs of each (their seconds from the run folder's history), one with the
  page open and redrawing all along, one with the page closed once it started (the run goes on
  in the server).

    python bench/app_latency.py [--nice-browser]
    JOINTCOMP_DATA=../shared/data JOINTCOMP_MODELS=../shared/models python bench/app_latency.py --whatif cifar10/resnet56 --moves 4
    JOINTCOMP_DATA=../shared/data python bench/app_latency.py --whatif fashion-mnist/lenet5 --moves 4 --after-default-run
"""
from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from common import machine
from playwright.sync_api import TimeoutError as PlaywrightTimeout, sync_playwright
from jointcomp.models import published_checkpoints
from jointcomp.rundir import HISTORY_FILE

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]


def serve(runs: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app.py", "--server.headless", "true", "--server.port", str(port),
         "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none"],
        cwd=REPO, env={**os.environ, "JOINTCOMP_RUNS": str(runs)}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).read() == b"ok":
                return server, url
        except OSError:
            time.sleep(0.5)
    server.kill()
    raise SystemExit("streamlit did not start")


# Marks, in the page's own clock, when what-if figures other than the ones shown now appear. The bench
# waits for that mark at four polls a second: a Playwright query every 10 ms took a share of the 2 cores
# from the server whose time it measured (a ResNet-56 move: 14.3 s timed so, 1.7x its compute alone).
WATCH = """() => {
  const figures = () => [...document.querySelectorAll('[data-testid="stMetricValue"]')].map(e => e.textContent);
  const before = JSON.stringify(figures());
  window.newFiguresAt = null;
  const observer = new MutationObserver(() => {
    const now = figures();
    if (now.length >= 3 && JSON.stringify(now) !== before) {
      window.newFiguresAt = performance.now();
      observer.disconnect();
    }
  });
  observer.observe(document.body, {subtree: true, childList: true, characterData: true});
  return performance.now();
}"""


def seconds_to_new_what_if(page, act, what: str) -> float:
    """Seconds from `act()` to what-if figures other than those shown before it (stale ones stay
    while a new start loads), in the page's clock."""
    tic = page.evaluate(WATCH)
    act()
    try:
        page.wait_for_function("window.newFiguresAt !== null", polling=250, timeout=1_800_000)
    except PlaywrightTimeout:
        raise SystemExit(f"no what-if for {what} in 30 minutes") from None
    return (page.evaluate("window.newFiguresAt") - tic) / 1000


def slider_latency(page, moves: int) -> list[float]:
    """Seconds from each key press on the target slider to new what-if figures on the page, each
    move to a target not looked at before (the page keeps the what-ifs it has shown)."""
    target = page.locator('[data-testid="stSlider"]', has_text="Target size").get_by_role("slider")
    seconds = []
    for _ in range(moves):
        target.focus()
        seconds.append(seconds_to_new_what_if(page, lambda: target.press("ArrowRight"), "a slider move"))
        page.wait_for_timeout(500)
    return seconds


def choose(page, label: str, option: str) -> None:
    """Pick `option` in the sidebar's select box `label`."""
    page.locator('[data-testid="stSelectbox"]:visible', has_text=label).click()
    page.get_by_role("option", name=option, exact=True).click()


def network_whatif(page, url: str, data: str, model: str, moves: int) -> tuple[float, str, list[float]]:
    """Open the page and pick `data` and `model` (the page starts it from its published checkpoint where
    one fits): the seconds from picking it (from opening the page, for the page's default network; from
    picking the data set, for that data set's first network) to its first what-if, where the dense start
    came from, and each slider move's seconds after."""
    tic = time.monotonic()
    page.goto(url)
    page.locator('[data-testid="stMetricValue"]').nth(2).wait_for(timeout=1_800_000)
    first = time.monotonic() - tic
    if data != "digits":
        first = seconds_to_new_what_if(page, lambda: choose(page, "Data set", data), data)
    picked = page.locator('[data-testid="stSelectbox"]:visible', has_text="Model").get_by_role("combobox")
    if picked.input_value() != model:
        first = seconds_to_new_what_if(page, lambda: choose(page, "Model", model), f"{data}/{model}")
    published = [p.name for p in published_checkpoints(model)]
    start = page.locator('[data-testid="stSelectbox"]:visible', has_text="Start from").get_by_role("combobox")
    return first, start.input_value() if start.input_value() in published else "trained on the page", \
        slider_latency(page, moves)


def opened(browser, url: str):
    """A new page of the app at `url`, once it shows its default what-if."""
    page = browser.new_page(viewport={"width": 1500, "height": 1100})
    page.goto(url)
    page.locator('[data-testid="stMetricValue"]').nth(2).wait_for(timeout=300_000)
    return page


def button(page, key: str):
    """An app button by its Streamlit key, the one shown (a button with a tooltip has a hidden copy)."""
    return page.locator(f".st-key-{key} button:visible")


def run_to_the_end(page) -> float:
    """Seconds from Start (the page's choices as they are) to the run's download button."""
    tic = time.monotonic()
    button(page, "start").click()
    button(page, "download").wait_for(timeout=600_000)
    return time.monotonic() - tic


def epoch_seconds(run: Path) -> list[float]:
    """The ADMM epochs' seconds recorded so far in a run folder's history (the first 40 % of a
    run: the epochs compared below lie in it, so they do the same work)."""
    lines = (run / HISTORY_FILE).read_text().splitlines()
    return [r["seconds"] for r in map(json.loads, lines) if r.get("kind") == "epoch" and r.get("phase") == "admm"]


def long_run(page, runs: Path, epochs: int, close: bool) -> list[float]:
    """Start a 200-epoch run from `page`; the seconds of its ADMM epochs 3 to 2 + `epochs`,
    with the page open all along or (`close`) closed once the run has started."""
    slider = page.locator('[data-testid="stSlider"]', has_text="Compression epochs").get_by_role("slider")
    slider.focus()
    slider.press("End")
    button(page, "start").click()
    page.get_by_text(re.compile(r"compression epoch \d+ of 200")).wait_for(timeout=600_000)
    run = max((d for d in runs.iterdir() if d.is_dir()), key=lambda d: d.stat().st_mtime)
    if close:
        page.close()
    return wait_for_epochs(run, 2 + epochs)[2:]


def wait_for_epochs(run: Path, n: int, timeout: float = 600.0) -> list[float]:
    """The seconds of the run's first `n` ADMM epochs, once there are that many."""
    deadline = time.monotonic() + timeout
    while len(seconds := epoch_seconds(run)) < n:
        if time.monotonic() > deadline:
            raise SystemExit(f"the run did not reach {n} ADMM epochs in {timeout:.0f} s")
        time.sleep(0.2)
    return seconds[:n]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--moves", type=int, default=8, help="target-slider moves timed")
    parser.add_argument("--epochs", type=int, default=40, help="ADMM epochs of the long runs measured each way")
    parser.add_argument("--nice-browser", action="store_true",
                        help="run Chromium at the lowest CPU priority, as if it were on another machine")
    parser.add_argument("--whatif", action="append", default=[], metavar="DATA/MODEL",
                        help="only the what-if of these networks: seconds to the first, then the slider moves")
    parser.add_argument("--screenshots", type=Path, help="with --whatif: a folder for a screenshot of each what-if")
    parser.add_argument("--after-default-run", action="store_true",
                        help="with --whatif: first run the page's default (digits MLP) to its end, as a user trying it first")
    args = parser.parse_args()
    if args.whatif:
        return whatif_only(args.whatif, args.moves, args.screenshots, args.after_default_run)
    with tempfile.TemporaryDirectory() as tmp, sync_playwright() as p:
        runs = Path(tmp)
        server, url = serve(runs)
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        if args.nice_browser:
            subprocess.run(["sh", "-c", "renice -n 19 -p $(pgrep -f chromium)"], capture_output=True)
        try:
            page = opened(browser, url)
            latency = slider_latency(page, args.moves)

            default_run = run_to_the_end(page)

            attached = long_run(page, runs, args.epochs, close=False)
            button(page, "stop").click()
            page.get_by_text("Result (stopped").wait_for(timeout=120_000)
            page.close()
            page = opened(browser, url)
            detached = long_run(page, runs, args.epochs, close=True)
        finally:
            browser.close()
            server.terminate()
            server.wait(20)

    print(f"Machine: {machine()}\n")
    print("| what | measured | goal |")
    print("|---|---|---|")
    print(f"| target slider -> new what-if on the page (before a run), {len(latency)} moves | median "
          f"{statistics.median(latency):.2f} s, worst {max(latency):.2f} s | < 0.5 s |")
    print(f"| default run (digits MLP, 15 epochs): Start -> download button | {default_run:.1f} s | <= 30 s |")
    a, d = statistics.median(attached), statistics.median(detached)
    print(f"| an ADMM epoch of the digits MLP, page open (redrawing) / closed, medians of epochs 3-{2 + len(attached)} "
          f"of two runs | {a:.3f} s / {d:.3f} s: {a / d:.2f}x | within 1.10x |")


def whatif_only(networks: list[str], moves: int, screenshots: Path | None, after_default_run: bool = False) -> None:
    """The what-if of each network (DATA/MODEL), each on a fresh page of one server (`after_default_run`:
    once the default run has ended on a page of its own); a full-page screenshot of each after its last
    move into `screenshots` when given."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp, sync_playwright() as p:
        server, url = serve(Path(tmp))
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            if after_default_run:
                page = opened(browser, url)
                print(f"default run: {run_to_the_end(page):.1f} s", flush=True)
                page.close()
            for network in networks:
                data, model = network.split("/")
                page = browser.new_page(viewport={"width": 1500, "height": 2000})
                rows.append((network, *network_whatif(page, url, data, model, moves)))
                if screenshots:
                    screenshots.mkdir(parents=True, exist_ok=True)
                    page.wait_for_timeout(1000)  # vega draws asynchronously
                    page.screenshot(path=screenshots / f"what-if-{data}-{model}.png", full_page=True)
                page.close()
        finally:
            browser.close()
            server.terminate()
            server.wait(20)
    print(f"Machine: {machine()}\n")
    print("| network | dense start | picking it -> its first what-if | slider move -> new what-if, median (worst) |")
    print("|---|---|---|---|")
    for network, first, start, latency in rows:
        print(f"| {network} | {start} | {first:.1f} s | {statistics.median(latency):.2f} s ({max(latency):.2f} s), "
              f"{len(latency)} moves |")


if __name__ == "__main__":
    main()

"""The Streamlit pages through streamlit.testing.v1.AppTest: widgets, defaults, a real run."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from streamlit.testing.v1 import AppTest

from jointcomp import load_compressed
from sizes import fits

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch, tmp_path):
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("JOINTCOMP_RUNS", str(tmp_path / "runs"))


def wait_until(at: AppTest, condition, timeout: float = 90.0) -> None:
    """Rerun the page until `condition` holds, then once more so the page shows that state."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for the app")
        time.sleep(0.5)
        at.run()
    at.run()


def test_defaults_and_what_if():
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=120).run()
    assert not at.exception
    assert at.selectbox(key="data").value == "digits"
    assert at.selectbox(key="model_digits").value == "mlp"
    assert at.select_slider(key="target_ratio").value == 50
    assert [b.label for b in at.button] == ["Start", "Compress without training", "Stop"]
    labels = [m.label for m in at.metric]
    assert "Size (paper budget)" in labels and ".jcz file" in labels
    assert any("(method posttrain)" in c.value for c in at.caption)  # the what-if names the method it shows
    size_50, accuracy_50 = at.metric[0].value, at.metric[1].value
    assert len(tradeoff_points(at)) == 2  # the dense network and this target
    at.select_slider(key="target_ratio").set_value(500).run()  # the what-if follows the slider
    assert at.metric[0].value != size_50
    at.select_slider(key="target_ratio").set_value(50).run()
    assert (at.metric[0].value, at.metric[1].value) == (size_50, accuracy_50)
    points = tradeoff_points(at).sort_values("size_bits")  # every target looked at, once each
    assert len(points) == 3 and points["size_bits"].iloc[0] < points["size_bits"].iloc[1] / 5
    assert f"{points['accuracy'].iloc[1]:.2%}" == accuracy_50


def tradeoff_points(at: AppTest):
    """The rows the what-if's trade-off chart draws."""
    import pyarrow

    chart = next(c for c in at.get("vega_lite_chart") if json.loads(c.proto.spec)["title"]["text"] == "Trade-off")
    return pyarrow.ipc.open_stream(chart.proto.datasets[0].data.data).read_all().to_pandas()


def test_start_run_to_the_end_then_download():
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=120).run()
    at.slider(key="epochs").set_value(3).run()
    at.button(key="start").click().run()
    runner = at.session_state["runner"]
    wait_until(at, lambda: not runner.running)
    assert not at.exception and not at.error
    assert "Accuracy (compressed)" in [m.label for m in at.metric]
    model_file = Path(runner.engine.run_dir.path) / "model.jcz"
    restored = load_compressed(model_file)
    assert fits(model_file, f"{at.session_state['target_ratio']}x", restored)  # what the slider asked, from the file


def test_a_finished_run_is_shown_only_under_the_choices_it_was_run_with():
    """Another start chosen after a run (here another seed, so another dense model): the page shows
    that start's what-if, not the earlier run's result and download under the new header."""
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=120).run()
    at.slider(key="epochs").set_value(2).run()
    at.button(key="start").click().run()
    runner = at.session_state["runner"]
    wait_until(at, lambda: not runner.running)
    assert "Accuracy (compressed)" in [m.label for m in at.metric] and at.get("download_button")
    at.number_input(key="seed").set_value(1).run()
    assert not at.exception
    assert "Accuracy (compressed)" not in [m.label for m in at.metric] and not at.get("download_button")
    assert "Accuracy without training" in [m.label for m in at.metric]
    assert "Your last run (mlp on digits at 50x) is on the Runs page." in [c.value for c in at.caption]
    at.number_input(key="seed").set_value(0).run()
    assert "Accuracy (compressed)" in [m.label for m in at.metric]


def test_compress_without_training_ends_in_a_result_and_a_file_that_fits(monkeypatch):
    """The button's run is the what-if's result as a file: it takes the what-ifs' calibration (the
    same inputs through the same weights) instead of measuring it again (a ResNet-56's 40 s)."""
    from jointcomp.methods.posttrain import PostTrain

    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=120).run()
    what_if = [m.value for m in at.metric]
    measured = []
    measure = PostTrain._calibrate
    monkeypatch.setattr(PostTrain, "_calibrate", lambda self, report: measured.append(self) or measure(self, report))
    at.button(key="posttrain").click().run()
    runner = at.session_state["runner"]
    wait_until(at, lambda: not runner.running)
    assert not at.exception and not at.error
    assert runner.engine.config.method == "posttrain" and runner.final is not None and not runner.final.stopped
    labels = [m.label for m in at.metric]
    assert "Accuracy (compressed)" in labels
    shown = at.metric[labels.index("Accuracy (compressed)")].value
    assert shown == what_if[1]  # the what-if said what the button gives
    assert measured == []
    model_file = Path(runner.engine.run_dir.path) / "model.jcz"
    assert fits(model_file, f"{at.session_state['target_ratio']}x", load_compressed(model_file))


THREADS_OF_THE_APPS_WORK = """
import threading, torch
from torch import nn
from jointcomp import EngineConfig
from jointcomp.app.runner import Runner, Sweep, prepare, what_ifs
def in_a_new_thread(work):
    done = []
    thread = threading.Thread(target=lambda: done.append(work()))
    thread.start()
    thread.join()
    return done[0]
model, data, accuracy = prepare("mlp", "digits", 1)
Runner.compress(model, data, EngineConfig(epochs=1), "mlp", dense_accuracy=accuracy).wait()
print(in_a_new_thread(torch.get_num_threads))
Sweep.compress(model, data, EngineConfig(epochs=1), "mlp", ["50x"], ["admm"], accuracy).wait()
print(in_a_new_thread(torch.get_num_threads))
wide = nn.Sequential(nn.Flatten(), nn.Linear(64, 1024), nn.ReLU(), nn.Linear(1024, 160), nn.ReLU(), nn.Linear(160, 10))
for network in (model, wide):  # 231k weights: not a small model
    seen = []
    network.register_forward_pre_hook(lambda module, args: seen.append(torch.get_num_threads()))
    in_a_new_thread(lambda: what_ifs(network, data, EngineConfig(), "mlp").plan("20x"))
    print(max(seen))  # (the calibration's sensitivities take one fewer, beside the tables' worker)
print(in_a_new_thread(torch.get_num_threads))
"""


def test_the_apps_threads_compute_a_small_model_on_one_thread_and_leave_later_threads_torchs_count():
    """The app's runs and what-ifs compute on a small model with one intra-op thread, on others with
    the process's count; torch's count is also what every thread started later begins with, so after
    the default run (the digits MLP) every later page computed on one (a LeNet-5 what-if 1.9-2.2 s a
    slider move instead of 1.7-1.9 s, BENCHMARKS.md). A process of two threads, as on the two cores of
    CI (the suite's workers run on one)."""
    done = subprocess.run([sys.executable, "-c", THREADS_OF_THE_APPS_WORK], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}, timeout=600)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["2", "2", "1", "2", "2"]


def test_stop_ends_a_long_run_and_a_second_start_is_impossible_while_running():
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=120).run()
    at.slider(key="epochs").set_value(200).run()
    at.button(key="start").click().run()
    runner = at.session_state["runner"]
    assert runner.running
    assert at.button(key="start").disabled  # reruns cannot start a second run
    at.select_slider(key="target_ratio").set_value(100).run()
    assert at.session_state["runner"] is runner  # a widget rerun kept the same run
    assert runner.target_bits == pytest.approx(runner.engine.dense_bits / 100)
    at.button(key="stop").click().run()
    assert not runner.running
    assert runner.final.stopped and runner.final.size_bits <= runner.final.target_bits


def test_worker_errors_show_in_the_page():
    from jointcomp import EngineConfig, Engine, build_model, load_dataset
    from jointcomp.app.runner import Runner

    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=120).run()
    data = load_dataset("digits")
    model = build_model("mlp", data.input_shape, data.num_classes)
    diverging = Runner(Engine(model, data, EngineConfig(lr=1e9, momentum=0.0, dense_epochs=1, epochs=1))).start()
    diverging.wait(60)
    at.session_state["runner"] = diverging
    at.run()
    assert not at.exception  # the page lives on
    assert any("The run failed" in e.value and "diverged" in e.value for e in at.error)


def test_stop_is_offered_only_where_it_stops_the_run():
    """A run without training has no steps to stop at (Stop did nothing and the run went on to
    its end): while one runs the page's Stop is disabled, and a Stop asked of it leaves its
    result whole."""
    from jointcomp import EngineConfig, Engine, build_model, load_dataset
    from jointcomp.app.runner import Runner

    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=120).run()
    data = load_dataset("digits")
    torch.manual_seed(0)
    model = build_model("resnet20", data.input_shape, data.num_classes)
    runner = Runner(Engine(model, data, EngineConfig(method="posttrain", target="16x"))).start()
    at.session_state["runner"] = runner
    at.run()
    assert runner.running, "the run ended before the page was drawn: give it a larger network"
    assert at.button(key="stop").disabled and not runner.stoppable
    runner.stop()
    assert runner.wait(300) and runner.final is not None and not runner.final.stopped

    training = Runner(Engine(build_model("mlp", data.input_shape, data.num_classes), data, EngineConfig(epochs=200)))
    at.session_state["runner"] = training.start()
    at.run()
    assert training.running and not at.button(key="stop").disabled
    training.stop(wait=60)
    assert training.final is not None and training.final.stopped


def test_inspect_page_asks_for_a_file():
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=60).switch_page("pages/2_Inspect.py").run()
    assert not at.exception
    assert any("Upload a .jcz file" in i.value for i in at.info)


def test_an_image_folder_is_a_data_choice(image_folder):
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=120).run()
    at.selectbox(key="data").set_value("image folder…").run()
    at.text_input(key="folder").input(str(image_folder / "nowhere")).run()
    assert not at.exception
    assert any("needs train/ and val/ (or test/) folders" in e.value for e in at.error)
    assert not [p for p in at.main if p.type == "progress"]  # the loading bar gone with the error
    at.text_input(key="folder").input(str(image_folder)).run()
    assert not at.exception and not at.error
    assert "Size (paper budget)" in [m.label for m in at.metric]  # the what-if of the folder's model
    assert any("from 90 training inputs" in c.value for c in at.caption)  # all it has, not the 512 asked for
    few = image_folder.parent / "few"  # 12 training images: fewer than a calibration needs
    for part in ("train", "val"):
        for folder in (image_folder / part).iterdir():
            (few / part / folder.name).mkdir(parents=True)
            for image in sorted(folder.iterdir())[:4]:
                shutil.copy(image, few / part / folder.name / image.name)
    at.text_input(key="folder").input(str(few)).run()
    assert not at.exception
    assert [e.value for e in at.error] == ["No what-if for this start: post-training compression needs at least 16 "
                                           "calibration inputs, got 12: ask for more (--calibration N), from a "
                                           "training set that has them"]
    assert not [p for p in at.main if p.type == "progress"]  # the calibration's bar gone with it, not left above it


def test_two_sessions_at_once_share_no_mutable_state():
    """Streamlit caches one dense model (and its what-ifs) per server. A run in one session and
    what-ifs in another, at the same time, leave it untouched and see what a lone session sees."""
    import hashlib

    import ui
    from jointcomp.models import dense_epochs

    def checksum(model) -> str:
        digest = hashlib.sha256()
        for name, tensor in model.state_dict().items():
            digest.update(name.encode() + tensor.detach().cpu().numpy().tobytes())
        return digest.hexdigest()

    alone = AppTest.from_file(str(REPO / "app.py"), default_timeout=120).run()
    alone.select_slider(key="target_ratio").set_value(500).run()
    expected = [m.value for m in alone.metric]
    cached, _, _ = ui.dense_model("mlp", "digits", dense_epochs("mlp"), 0)  # the server's shared copy
    before = checksum(cached)

    first = AppTest.from_file(str(REPO / "app.py"), default_timeout=120).run()
    second = AppTest.from_file(str(REPO / "app.py"), default_timeout=120).run()
    first.slider(key="epochs").set_value(200).run()
    first.button(key="start").click().run()
    runner = first.session_state["runner"]
    for ratio in (300, 500):  # what-ifs in the second session while the first one trains
        second.select_slider(key="target_ratio").set_value(ratio).run()
    assert runner.running, "the run ended before the second session's what-ifs: nothing overlapped"
    assert [m.value for m in second.metric] == expected
    runner.stop()
    runner.wait(120)
    assert not runner.error and runner.final.size_bits <= runner.final.target_bits
    assert checksum(cached) == before
    fresh = AppTest.from_file(str(REPO / "app.py"), default_timeout=120).run()
    fresh.select_slider(key="target_ratio").set_value(500).run()
    assert [m.value for m in fresh.metric] == expected


def test_a_second_session_finds_the_what_ifs_calibrated(monkeypatch):
    """Calibrating a ResNet-56's what-ifs takes most of a minute on two cores: once per server, not
    again for a page reload or a second visitor, who sees the same what-ifs."""
    from jointcomp.methods.posttrain import PostTrain

    first = AppTest.from_file(str(REPO / "app.py"), default_timeout=120).run()
    first.select_slider(key="target_ratio").set_value(300).run()
    expected = [m.value for m in first.metric]
    calibrated = []
    calibrate = PostTrain.calibrate

    def counted(self, batches, progress=None, reuse=None) -> None:
        calibrated.append(self)
        calibrate(self, batches, progress, reuse)

    monkeypatch.setattr(PostTrain, "calibrate", counted)
    second = AppTest.from_file(str(REPO / "app.py"), default_timeout=120).run()
    second.select_slider(key="target_ratio").set_value(300).run()
    assert not second.exception and calibrated == []
    assert [m.value for m in second.metric] == expected


def test_runs_page_lists_reopens_and_downloads(tmp_path):
    def runs_page() -> AppTest:  # a session that opens the Runs page of the app
        return AppTest.from_file(str(REPO / "app.py"), default_timeout=120).switch_page("pages/3_Runs.py").run()

    assert any("No runs yet" in i.value for i in runs_page().info)

    finished = AppTest.from_file(str(REPO / "app.py"), default_timeout=120).run()
    finished.slider(key="epochs").set_value(2).run()
    finished.button(key="start").click().run()
    done = finished.session_state["runner"]
    assert done.wait(120) and done.final is not None
    long = AppTest.from_file(str(REPO / "app.py"), default_timeout=120).run()  # a tab that will be closed
    long.slider(key="epochs").set_value(200).run()
    long.button(key="start").click().run()
    running = long.session_state["runner"]
    del long  # the tab is gone; its run goes on

    runs = runs_page()
    assert not runs.exception
    table = runs.table[0].value
    assert sorted(table["status"]) == ["finished", "running"]
    row = table[table["status"] == "finished"].iloc[0]
    assert row["accuracy"] == pytest.approx(done.final.accuracy)
    open_buttons = [b for b in runs.button if b.key and b.key.startswith("open_")]
    assert len(open_buttons) == 1
    open_buttons[0].click().run()  # back on the main page, showing that run
    assert runs.session_state["runner"] is running  # reattached to the run of the closed tab
    assert not runs.exception and any("compression epoch" in p.text for p in runs.get("progress"))
    running.stop(wait=30)
    runs = runs_page()
    assert sorted(runs.table[0].value["status"]) == ["finished", "stopped"]
    assert runs.get("download_button")  # a finished run's file can be downloaded


def test_dense_training_reports_progress():
    from jointcomp.app.runner import prepare

    heard = []
    model, data, accuracy = prepare("mlp", "digits", 2, progress=lambda done, text: heard.append((done, text)))
    fractions = [done for done, _ in heard]
    assert fractions == sorted(fractions) and 0 < fractions[0] and fractions[-1] <= 1
    assert fractions[-1] > 0.85  # heard until near the end (every 10 of 46 steps)
    assert "epoch 2 of 2" in heard[-1][1] and "s left" in heard[-1][1]
    assert 0.5 < accuracy <= 1


def test_a_run_without_training_reports_its_calibration_and_its_allocation():
    """Compress without training on a 20-layer network: no step records come while it calibrates and
    chooses its allocation, so the run's progress line follows both (which layer each is at): the
    calibration up to CALIBRATION_SHARE of the bar, then each layer reconstructed, never going back,
    and ends at 100 % with nothing about either left on it."""
    from jointcomp import EngineConfig, Engine, build_model, load_dataset
    from jointcomp.app.runner import Runner
    from jointcomp.compressor import CALIBRATION_SHARE

    data = load_dataset("digits")
    torch.manual_seed(0)
    model = build_model("resnet20", data.input_shape, data.num_classes)
    runner = Runner(Engine(model, data, EngineConfig(method="posttrain", target="16x")))
    seen = []  # what the page would show at each report
    hear = runner.engine.progress
    runner.engine.progress = lambda fraction, text: (hear(fraction, text), seen.append(runner.progress()))
    runner.start()
    assert runner.wait(300) and runner.final is not None and runner.error is None
    calibrating = [p for p in seen if "calibrating" in p.describe()]
    assert calibrating and all(0 <= p.fraction <= CALIBRATION_SHARE for p in calibrating)
    assert any("layer" in p.describe() for p in calibrating)
    allocating = seen[len(calibrating):]
    assert seen[: len(calibrating)] == calibrating  # the calibration first, then the allocation
    assert any("candidates" in p.describe() for p in allocating)
    assert any("layer by layer" in p.describe() and "20 of 20" in p.describe() for p in allocating)
    assert all(CALIBRATION_SHARE <= p.fraction <= 1 for p in allocating)
    fractions = [p.fraction for p in seen]
    assert fractions == sorted(fractions)
    done = runner.progress()
    assert done.fraction == 1.0 and "calibrating" not in done.describe() and "layer" not in done.describe()


def test_a_sweep_runs_from_its_page_and_names_what_it_ran_on(monkeypatch):
    """Its runs without training take one calibration, the page's what-ifs' (measured here only
    where no page has asked for them yet on this server)."""
    from jointcomp.methods.posttrain import PostTrain

    measured = []
    measure = PostTrain._calibrate
    monkeypatch.setattr(PostTrain, "_calibrate", lambda self, report: measured.append(self) or measure(self, report))
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=120).switch_page("pages/1_Sweep.py").run()
    at.multiselect(key="targets").set_value(["50x", "200x"]).run()
    at.multiselect(key="methods").set_value(["posttrain"]).run()
    at.button(key="run_sweep").click().run()
    sweep = at.session_state["sweep"]
    wait_until(at, lambda: not sweep.running)
    assert not at.exception and not at.error
    assert len(measured) <= 1
    shown = at.dataframe[0].value
    assert list(shown["target"]) == ["50x", "200x"] and (shown["method"] == "posttrain").all()
    progress = [e for e in at.main if e.type == "progress"]
    assert progress and "mlp on digits" in progress[0].proto.text and "2 of 2 runs done" in progress[0].proto.text
    assert any("the 360 validation images: one image is 0.28 points" in c.value for c in at.caption)

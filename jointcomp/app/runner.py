"""Runs in a background thread, for the app and the notebooks.

A `Runner` drives one engine and keeps its records; a `Sweep` runs several targets and
methods one after another. Both expose only records, progress and files, never tensors.
Control (stop, live target) is thread-safe.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import pandas as pd
import torch
from torch import nn

from .. import whatif
from ..budget import DENSE_BITS, parse_target
from ..compressor import Compressor
from ..methods import ProgressCallback, part_of
from ..data import Dataset, model_description
from ..rundir import CONFIG_FILE, MODEL_FILE, SUMMARY_FILE
from ..trainer import (EngineConfig, Engine, accuracy, calibration_inputs, place, steps_per_epoch,
                       train_dense)
from ..models import load_start
from ..records import (EpochRecord, FinalRecord, Record, StartRecord, StepRecord, curve_frame, epochs_frame,
                      layers_frame, steps_frame)


ACTIVE: dict[str, "Runner"] = {}  # run folder -> its runner, for every run this server started
SMALL_MODEL = 200_000  # parameters: below this, the app's runs and what-ifs compute on one intra-op thread
THREADS = torch.get_num_threads()  # torch's own choice for this process, before any run changed it
# Of the what-ifs' start, the calibration's share of the time, for progress (the rest: scoring the
# dense network; a ResNet-56's 41 s and 4 s)
WHATIFS_CALIBRATION_SHARE = 0.9


@contextlib.contextmanager
def threads_for(model: nn.Module) -> Iterator[None]:
    """The calling (background) thread's intra-op threads set for computing on `model` (a run, the
    what-ifs) for a while: one for a small model. In a thread that is not the main one, the digits
    MLP's steps took 2.5x as long with two OpenMP threads as with one (with one they are as fast as on
    the main thread), while LeNet-5's (430k weights) were 1.3x faster with two (BENCHMARKS.md, "The app
    while a run trains"). torch's count is also what every thread started later begins with (the
    page's reruns), so it is given back as the process's own after."""
    torch.set_num_threads(1 if sum(p.numel() for p in model.parameters()) < SMALL_MODEL else THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(THREADS)


@dataclass
class Progress:
    fraction: float  # of all optimizer steps (dense pre-training included)
    elapsed: float
    eta: float | None  # seconds, from the rate of the recent steps; None until it can be measured
    epoch: int = 0  # compression epochs finished
    total_epochs: int = 0
    phase: str = ""  # of the last finished epoch: "dense", "admm" (or "prune"), "retrain" or "finetune"
    notes: tuple[str, ...] = ()  # events the epochs reported (e.g. the final phase restarted)
    steps: int = 0  # optimizer steps done
    total_steps: int = 0
    stopped: bool = False  # the run was stopped before its end
    doing: str = ""  # what a calibration (before any step) or an allocation without training is at

    def describe(self) -> str:
        """One line for people: where the run is, or where it stopped."""
        if self.total_epochs == 0:
            return f"compressing without training · {self.doing + ' · ' if self.doing else ''}{self.elapsed:.0f} s elapsed"
        if self.steps == 0 and self.doing:
            return f"the calibrated start · {self.doing} · {self.elapsed:.0f} s elapsed"
        where = f"compression epoch {self.epoch} of {self.total_epochs}"
        if self.stopped:
            return f"stopped at {where} (step {self.steps:,} of {self.total_steps:,})"
        eta = f", about {self.eta:.0f} s left" if self.eta else ""
        return f"{where} · step {self.steps:,} of {self.total_steps:,} · {self.elapsed:.0f} s elapsed{eta}"


def prepare(model_name: str, data_name: str, dense_epochs: int, seed: int = 0, data_dir: str | None = None,
            progress: ProgressCallback | None = None,
            checkpoint: str | None = None, score: bool = True,
            loaded: Dataset | None = None) -> tuple[nn.Module, Dataset, float | None]:
    """A dense-trained model, its data (`loaded` where the caller holds it), and its validation
    accuracy (the start of every run): trained here for `dense_epochs`, or loaded from `checkpoint`
    (any file `load_weights` takes) and scored unless `score` is False (then None: a CIFAR ResNet-56
    is 14 s on all 10,000 images). `progress(fraction, text)` hears of the training every few steps."""
    model, data = load_start(model_name, data_name, data_dir=data_dir, seed=seed, pretrained=checkpoint, loaded=loaded)
    if checkpoint:
        return model, data, accuracy(model, data) if score else None
    config = EngineConfig(seed=seed)
    total = max(1, dense_epochs * steps_per_epoch(data, config.batch_size))
    measured, started = float("nan"), time.monotonic()
    for record in train_dense(model, data, config, dense_epochs):
        if isinstance(record, EpochRecord):
            measured = record.accuracy
        elif progress is not None and record.step % 10 == 0:
            done = (record.step + 1) / total
            left = (time.monotonic() - started) * (1 - done) / done
            progress(done, f"training the dense {model_name} once (cached for this server): epoch "
                           f"{record.epoch + 1} of {dense_epochs}, step {record.step + 1:,} of {total:,}, "
                           f"about {left:.0f} s left")
    return model, data, measured


class _Worker:
    """Work (`_work`) in a daemon thread. What stops it with an error is kept in `error`, for
    the user to see: the app must not die with its worker."""

    def __init__(self) -> None:
        self.error: str | None = None
        self.started = time.monotonic()
        self.finished_at: float | None = None
        self._thread = threading.Thread(target=self._guarded, daemon=True)

    def start(self):
        self._thread.start()
        return self

    def _guarded(self) -> None:
        try:
            self._work()
        except Exception as err:
            self.error = f"{type(err).__name__}: {err}"
        finally:
            self.finished_at = time.monotonic()

    def _work(self) -> None:
        raise NotImplementedError

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the work ends (or `timeout` seconds pass); True when it has ended."""
        self._thread.join(timeout)
        return not self.running


class Runner(_Worker):
    """One compression run in a background thread; records accumulate in `records`."""

    def __init__(self, engine: Engine) -> None:
        super().__init__()
        self.engine = engine
        self.engine.progress = self._hear
        self.heard: tuple[float, str] = (0.0, "")  # how far the work before the first record is, and at what
        self.records: list[Record] = []
        self._first_step: float | None = None  # when the first step record came (the rate behind the ETA)
        self._last_step = 0.0

    @classmethod
    def compress(cls, model: nn.Module, data: Dataset, config: EngineConfig, model_name: str,
                 run_dir: str | None = None, dense_accuracy: float | None = None,
                 calibration: Compressor | None = None) -> "Runner":
        """Start compressing a copy of `model` (the caller's model is left as it is), recording
        the trade-off curve each epoch; `dense_accuracy`: its score on the whole validation set
        where the caller has it (not scored again before the run can start); `calibration`: the
        what-ifs' compressor, whose calibration a run without training or a calibrated start
        takes where it matches (`Engine`)."""
        config = dataclasses.replace(config, tradeoff=True)
        engine = Engine(copy.deepcopy(model), data, config, run_dir=run_dir, meta=model_description(model_name, data),
                        dense_metric=dense_accuracy, calibration=calibration)
        runner = cls(engine).start()
        if run_dir:
            ACTIVE[str(Path(run_dir).resolve())] = runner  # findable after its tab is closed
        return runner

    def _work(self) -> None:
        with threads_for(self.engine.model):
            for record in self.engine:
                if isinstance(record, StepRecord):
                    self._last_step = time.monotonic()
                    self._first_step = self._first_step or self._last_step
                self.records.append(record)

    def stop(self, wait: float = 0.0) -> None:
        self.engine.stop()
        if wait:
            self.wait(wait)

    @property
    def stoppable(self) -> bool:
        """Whether `stop` ends the run early: a training run stops at its next step; a run without
        training has no steps to stop at and ends on its own (a ResNet-56's in about two minutes)."""
        return self.engine.compressor.method.trains

    def set_target(self, target: str | float) -> float:
        return self.engine.set_target(target)

    @property
    def target_bits(self) -> float:
        return self.engine.target_bits

    @property
    def dense_accuracy(self) -> float:
        """The dense network's score by the run's own measure (on the whole validation set)."""
        return self.engine.compressor.dense_metric

    @property
    def final(self) -> FinalRecord | None:
        last = self.records[-1] if self.records else None
        return last if isinstance(last, FinalRecord) else None

    def progress(self) -> Progress:
        start = next((r for r in self.records if isinstance(r, StartRecord)), None)
        end = self.finished_at or time.monotonic()
        elapsed = end - self.started
        if start is None:
            return Progress(0.0, elapsed, None)
        heard, doing = self.heard
        total = (start.total_epochs + start.dense_epochs - start.resumed_at) * start.steps_per_epoch
        done = sum(1 for r in self.records if isinstance(r, StepRecord))
        final = self.final
        stopped = final is not None and final.stopped
        if final is not None and not stopped:
            fraction = 1.0
        elif start.total_epochs == 0:  # compression without training: its calibration, then the allocation
            fraction = heard
        else:
            fraction = min(done / max(total, 1), 1.0)
        eta = None  # from the mean time per step since the first one: epoch ends and evaluations included
        if final is not None:
            eta = 0.0
        elif done >= 5 and self._first_step is not None and self._last_step > self._first_step:
            eta = (total - done) * (self._last_step - self._first_step) / (done - 1)
        epochs = [r for r in self.records if isinstance(r, EpochRecord)]
        # compression epochs done (the calibrated start, at dense_epochs - 1, is not one)
        epoch = sum(1 for r in epochs if r.epoch >= start.dense_epochs) + max(0, start.resumed_at - start.dense_epochs)
        phase = epochs[-1].phase if epochs else ""
        notes = tuple(r.note for r in epochs if r.note)
        return Progress(fraction, elapsed, eta, epoch, start.total_epochs, phase, notes, done, total, stopped,
                        doing if final is None else "")

    def _hear(self, fraction: float, text: str) -> None:
        self.heard = (fraction, text)

    def epochs(self) -> pd.DataFrame:
        return epochs_frame(list(self.records))

    def layers(self) -> pd.DataFrame:
        return layers_frame(list(self.records))

    def steps(self) -> pd.DataFrame:
        return steps_frame(list(self.records))

    def curve(self) -> pd.DataFrame:
        return curve_frame(list(self.records))

    def checkpoint(self) -> bytes:
        """The compressed model as .jcz bytes (after the run)."""
        if self.final is None:
            raise ValueError("the run has not finished yet")
        return self.engine.checkpoint()


SKETCH_ABOVE = 10e6  # multiply-accumulates of one forward pass above which the page's what-ifs are sketches
SKETCH_EXAMPLES = 2000  # validation examples (evenly spread, `val_batches`) a sketch is scored on


@dataclass
class WhatIfs:
    """The page's what-ifs of one dense model: a compressor on a copy of it that compresses without
    training (method posttrain), calibrated once; each target then costs one knapsack and the chosen
    layers' reconstruction. Where the network's forward pass takes more than SKETCH_ABOVE
    multiply-accumulates (a CIFAR ResNet-20: 41 M; LeNet-5: 2.3 M), posttrain's full result is tens
    of seconds a target on a CPU (a ResNet-56: a minute): there a what-if is its sketch
    (`Method.sketch`), scored on SKETCH_EXAMPLES validation examples spread over the set, and
    Compress without training gives the full result."""

    compressor: Compressor
    sketches: bool
    dense_accuracy: float  # on the examples the what-ifs are scored on
    evaluate: Callable[[nn.Module], float]
    calibrated_on: int  # training inputs the calibration saw (all there are, where fewer than asked for)
    _plans: dict[str, FinalRecord] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def plan(self, target: str) -> FinalRecord:
        """The what-if at `target` (`whatif.plan`), each computed once. From any thread, one at a
        time (the app's sessions share one: scoring swaps the compressor's weights for a while)."""
        with self._lock:
            if target not in self._plans:
                with threads_for(self.compressor.model):
                    self._plans[target] = whatif.plan(self.compressor, target, self.dense_accuracy, self.sketches,
                                                      self.evaluate)
            return self._plans[target]


def what_ifs(model: nn.Module, data: Dataset, config: EngineConfig, model_name: str,
             dense_accuracy: float | None = None, progress: ProgressCallback | None = None) -> WhatIfs:
    """The what-ifs of `model` (`WhatIfs`), calibrated on `config.calibration` training inputs. The
    caller's model is never touched; `dense_accuracy`: its score on the whole validation set where
    the caller has it (not scored again where the what-ifs are scored there; a sketch's reference is
    the dense network on the sketch's examples). `progress(fraction, text)`: how far the
    calibration is (most of a minute on a ResNet-56), then the dense score."""
    config = config.with_method("posttrain")
    with threads_for(model):
        comp = Compressor(place(copy.deepcopy(model), torch.device("cpu")), config=config,
                          meta=model_description(model_name, data))  # no evaluate of its own (nothing
        # scored on construction): the what-ifs are scored by the `evaluate` chosen below
        inputs = calibration_inputs(data, config.calibration, config.seed, torch.device("cpu"))
        comp.calibrate(inputs, part_of(progress, 0.0, WHATIFS_CALIBRATION_SHARE))
        sketches = comp.dense_bops / DENSE_BITS**2 > SKETCH_ABOVE
        examples = SKETCH_EXAMPLES if sketches else None
        evaluate = lambda m: accuracy(m, data, examples)  # noqa: E731
        if dense_accuracy is None or sketches:
            if progress:
                scored = len(data.val_y) if examples is None else min(examples, len(data.val_y))
                progress(WHATIFS_CALIBRATION_SHARE, f"scoring the dense network on {scored:,} validation images")
            dense_accuracy = comp.score(None, evaluate)
    return WhatIfs(comp, sketches, dense_accuracy, evaluate, sum(len(x) for x in inputs))


class Sweep(_Worker):
    """Several (target, method) runs one after another in a background thread. A calibration is
    measured once: each run without training (or from the calibrated start) takes the sweep's
    (`calibration`, then the latest such run's) where it matches (`Engine`'s `calibration`), so
    posttrain at four targets calibrates once."""

    @classmethod
    def compress(cls, model: nn.Module, data: Dataset, config: EngineConfig, model_name: str,
                 targets: list[str], methods: list[str], dense_accuracy: float | None = None,
                 calibration: Compressor | None = None) -> "Sweep":
        """Start a sweep, each run on its own copy of `model` with `config` at one target and method
        (`dense_accuracy` and `calibration`: as `Runner.compress` takes them)."""
        def make_engine(target: str, method: str) -> Engine:
            run_config = dataclasses.replace(config.with_method(method), target=target)
            return Engine(copy.deepcopy(model), data, run_config, meta=model_description(model_name, data),
                          dense_metric=dense_accuracy)

        return cls(make_engine, targets, methods, calibration).start()

    def __init__(self, make_engine: Callable[[str, str], Engine], targets: list[str], methods: list[str],
                 calibration: Compressor | None = None) -> None:
        super().__init__()
        self.jobs = [(t, m) for t in targets for m in methods]
        self.make_engine = make_engine
        self.calibration = calibration
        self.results: list[dict] = []
        self.current: Engine | None = None
        self._stop = threading.Event()

    def _work(self) -> None:
        for target, method in self.jobs:
            if self._stop.is_set():
                break
            self.current = self.make_engine(target, method)
            if self.current.calibration is None:  # a run made without one takes the sweep's
                self.current.calibration = self.calibration
            with threads_for(self.current.model):
                final = [r for r in self.current if isinstance(r, FinalRecord)][-1]
            self.results.append({"target": target, "method": method, **final.summary()})
            if not self.current.compressor.method.trains:  # calibrated, its weights still the dense ones
                self.calibration = self.current.compressor

    def stop(self) -> None:
        self._stop.set()
        if self.current is not None:
            self.current.stop()

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.results, columns=["target", "method", "accuracy", "dense_accuracy", "size_bits",
                                                   "size_kb", "ratio", "file_bytes", "stopped"])


def runs_root() -> Path:
    """Where the app keeps its runs: $JOINTCOMP_RUNS, default runs/app."""
    return Path(os.environ.get("JOINTCOMP_RUNS", "runs/app"))


RUN_COLUMNS = ["run", "status", "model", "data", "method", "target", "accuracy", "dense_accuracy", "size_kb",
               "ratio", "file_bytes", "epochs", "path"]


def list_runs(root: str | Path | None = None) -> pd.DataFrame:
    """Every run folder under `root` (default `runs_root()`), newest first: what it compressed,
    its status (running in this server, finished, stopped, interrupted) and its results."""
    rows = []
    for folder in sorted(Path(root or runs_root()).glob("*/"), reverse=True):
        config = _read_json(folder / CONFIG_FILE)  # read only: a running run may be saving in there
        if config is None or not isinstance(config.get("compress"), dict):
            continue  # not a run folder (or not one that can be read): nothing to list
        summary = _read_json(folder / SUMMARY_FILE)
        active = ACTIVE.get(str(folder.resolve()))
        if active is not None and active.running:
            status = "running"
        elif summary is None:
            status = "interrupted"
        else:
            status = "stopped" if summary.get("stopped") else "finished"
        summary = summary or {}
        rows.append({
            "run": folder.name, "status": status, "model": config.get("model"), "data": config.get("data"),
            "method": config["compress"].get("method"), "target": _ended_target(str(config["compress"].get("target")), summary),
            "accuracy": summary.get("accuracy"), "dense_accuracy": summary.get("dense_accuracy"),
            "size_kb": summary.get("size_kb"),
            "ratio": summary.get("ratio"), "file_bytes": summary.get("file_bytes"), "epochs": summary.get("epochs"),
            "path": str(folder),
        })
    return pd.DataFrame(rows, columns=RUN_COLUMNS)


def _ended_target(first: str, summary: dict) -> str:
    """The target a run ended at: the one it was started with, or the one the slider moved it
    to, as a ratio, saying that it moved."""
    try:
        dense_bits = float(summary["ratio"]) * float(summary["size_bits"])
        ended = float(summary["target_bits"])
        started = parse_target(first, dense_bits)
    except (KeyError, TypeError, ValueError):
        return first
    return first if abs(started - ended) <= 1e-6 * started else f"{dense_bits / ended:.4g}x (moved from {first})"


def active_runner(path: str | Path) -> Runner | None:
    """The runner of a run folder that this server is training now (None: not running here)."""
    runner = ACTIVE.get(str(Path(path).resolve()))
    return runner if runner is not None and runner.running else None


def run_file(path: str | Path) -> bytes:
    """The .jcz file of a finished run folder."""
    return (Path(path) / MODEL_FILE).read_bytes()


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def new_run_dir(root: str | Path | None = None) -> str:
    """A fresh folder for a run (under `runs_root()`), so that nothing a run produced is lost."""
    root = root or runs_root()
    path = Path(root) / time.strftime("%Y%m%d-%H%M%S")
    suffix = 0
    while (candidate := path.with_name(f"{path.name}-{suffix}" if suffix else path.name)).exists():
        suffix += 1
    candidate.mkdir(parents=True)
    return str(candidate)

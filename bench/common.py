"""Shared by the benchmarks: dense starting models (trained once per seed and cached), the
machine, the commands' environment, and the result rows (bench/results/*.jsonl)."""
from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

from jointcomp import EngineConfig, build_model, load_dataset
from jointcomp.trainer import train_dense
from jointcomp.models import load_weights, save_weights

CACHE = Path(__file__).resolve().parent / ".cache"
RESULTS = Path(__file__).resolve().parent / "results"
ROW_KEY = ("network", "data", "method", "start", "target", "budget_mode", "epochs", "seed")  # what makes a row another run


def dense_weights(model_name: str, data_name: str, epochs: int, seed: int = 0) -> Path:
    """Where `dense_model` keeps these dense weights (a checkpoint `compress --pretrained` takes)."""
    return CACHE / f"{model_name}_{data_name}_{epochs}ep_seed{seed}.safetensors"


def dense_model(model_name: str, data_name: str, epochs: int, seed: int = 0):
    """A dense model trained for `epochs` from seed `seed` with the `train` command's defaults
    (cached on disk, `dense_weights`), and its data set."""
    data = load_dataset(data_name)
    torch.manual_seed(seed)
    model = build_model(model_name, data.input_shape, data.num_classes)
    path = dense_weights(model_name, data_name, epochs, seed)
    if path.is_file():
        load_weights(model, path)
    else:
        config = EngineConfig(seed=seed)
        for _ in train_dense(model, data, config, epochs):
            pass
        CACHE.mkdir(exist_ok=True)
        save_weights(model, path)
    return model, data


def machine() -> str:
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def command_env(threads: int | None = None) -> dict[str, str]:
    """The environment of a `python -m jointcomp` command run by a bench: bench/ importable (for
    `--model nets:conv_bn`, a network that is not built in), and `threads` threads if given."""
    path = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parent), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}


def jointcomp(args: list[str], threads: int | None = None) -> float:
    """Run `python -m jointcomp ARGS` as a user does (with `threads` threads when given: several side
    by side); its wall-clock seconds. A failure ends the bench with the command and its error."""
    tic = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "jointcomp", *args], env=command_env(threads), capture_output=True,
                          text=True)
    if done.returncode != 0:
        raise SystemExit(f"failed: python -m jointcomp {shlex.join(args)}\n{done.stderr[-2000:]}")
    return time.perf_counter() - tic


def commit() -> str:
    """The commit the rows are measured at."""
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()


def paper_bits(summary: dict) -> int:
    """The paper's size (bits x non-zeros of the compressed layers) of a run's summary.json, in any budget mode."""
    return sum(layer["bits"] * layer["nnz"] for layer in summary["layers"])


def store_rows(grid: str, rows: list[dict]) -> None:
    """Keep `rows` in bench/results/GRID.jsonl (one JSON object a line), replacing the stored rows
    of the same runs (ROW_KEY)."""
    path = RESULTS / f"{grid}.jsonl"
    key = lambda row: tuple(row.get(k) for k in ROW_KEY)  # noqa: E731
    ours = {key(r) for r in rows}
    kept = [line for line in path.read_text().splitlines() if key(json.loads(line)) not in ours] if path.is_file() else []
    RESULTS.mkdir(exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(f"{line}\n" for line in [*kept, *(json.dumps(r) for r in rows)]))
    tmp.replace(path)

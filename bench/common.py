"""Shared by the benchmarks: dense starting models (trained once per seed and cached), the
machine, the commands' environment, and the result rows (bench/results/*.jsonl)."""
from __future__ import annotations

import json
import os
import platform
import subprocess
from pathlib import Path

import torch

from jointcomp import EngineConfig, build_model, load_dataset
from jointcomp.trainer import train_dense
from jointcomp.models import load_weights, save_weights

CACHE = Path(__file__).resolve().parent / ".cache"
RESULTS = Path(__file__).resolve().parent / "results"
ROW_KEY = ("network", "data", "method", "start", "target", "budget_mode", "epochs", "seed")  # what makes a row another run


def dense_model(model_name: str, data_name: str, epochs: int, seed: int = 0):
    """A dense model trained for `epochs` from seed `seed` with the `train` command's defaults
    (cached on disk), and its data set."""
    data = load_dataset(data_name)
    torch.manual_seed(seed)
    model = build_model(model_name, data.input_shape, data.num_classes)
    path = CACHE / f"{model_name}_{data_name}_{epochs}ep_seed{seed}.safetensors"
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

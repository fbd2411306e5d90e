"""Shared by the benchmarks: dense starting models, trained once per seed and cached."""
from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

from jointcomp import CompressConfig, build_model, load_dataset
from jointcomp.trainer import train_dense
from jointcomp.models import load_weights, save_weights

CACHE = Path(__file__).resolve().parent / ".cache"


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
        config = CompressConfig(seed=seed)
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

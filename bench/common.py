"""Shared by the benchmarks: a dense LeNet-5 on Fashion-MNIST, trained once and cached."""
from __future__ import annotations

import platform
from pathlib import Path

import torch

from jointcomp import CompressConfig, build_model, load_dataset
from jointcomp.engine import train_dense
from jointcomp.models import load_weights, save_weights

CACHE = Path(__file__).resolve().parent / ".cache"


def dense_model(model_name: str, data_name: str, epochs: int):
    """A dense model trained for `epochs` (cached on disk), and its data set."""
    data = load_dataset(data_name)
    torch.manual_seed(0)
    model = build_model(model_name, data.input_shape, data.num_classes)
    path = CACHE / f"{model_name}_{data_name}_{epochs}ep.safetensors"
    if path.is_file():
        load_weights(model, path)
    else:
        for _ in train_dense(model, data, CompressConfig(lr=0.05 if model_name == "mlp" else 0.02), epochs):
            pass
        CACHE.mkdir(exist_ok=True)
        save_weights(model, path)
    return model, data


def machine() -> str:
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"

"""Seconds per epoch of ADMM training against plain training of the same model, data and
batches, in one run: the engine's dense pre-training epochs are the plain baseline.
Training time only (projections included); validation is excluded from both.

    python bench/overhead.py [--device cuda]
"""
from __future__ import annotations

import argparse
import statistics

import torch

from common import machine
from jointcomp import CompressConfig, Engine, EpochRecord, build_model, load_dataset


def bench(model_name: str, data_name: str, epochs: int, device: str) -> str:
    data = load_dataset(data_name)
    torch.manual_seed(0)
    model = build_model(model_name, data.input_shape, data.num_classes)
    config = CompressConfig(target="100x", dense_epochs=epochs, epochs=epochs, device=device)
    seconds: dict[str, list[float]] = {"dense": [], "admm": []}
    for record in Engine(model, data, config):
        if isinstance(record, EpochRecord):
            seconds[record.phase].append(record.seconds)
    plain = statistics.median(seconds["dense"][1:])  # the first epoch warms up
    admm = statistics.median(seconds["admm"][1:])
    return f"| {model_name} / {data_name} | {epochs} + {epochs} | {plain:.3f} | {admm:.3f} | {admm / plain:.3f} |"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    print(f"Device: {torch.cuda.get_device_name() if args.device.startswith('cuda') else machine()}\n")
    print("| model / data | epochs (plain + ADMM) | plain s/epoch (median) | ADMM s/epoch (median) | ratio |")
    print("|---|---|---|---|---|")
    print(bench("mlp", "digits", 10, args.device))
    print(bench("lenet5", "fashion-mnist", 3, args.device))


if __name__ == "__main__":
    main()

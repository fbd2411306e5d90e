"""What compressing costs beyond training, measured in one run each:

* seconds per epoch of compression against plain training of the same model, data and
  batches (the engine's dense pre-training epochs are the plain baseline; training time
  only, projections included, validation excluded);
* the app's run (a Runner: a background thread, trade-off curves within TRADEOFF_SHARE) against the same Engine
  without the curve: the digits MLP, 15 epochs, whole runs;
* the CLI: `compress` against `train` on the same data and epochs, whole processes.

    python bench/overhead.py [--device cuda]
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from common import machine
from jointcomp import EngineConfig, Engine, EpochRecord, build_model, load_dataset
from jointcomp.app.runner import Runner


def bench(model_name: str, data_name: str, epochs: int, device: str) -> str:
    data = load_dataset(data_name)
    torch.manual_seed(0)
    model = build_model(model_name, data.input_shape, data.num_classes)
    config = EngineConfig(target="100x", dense_epochs=epochs, epochs=epochs, device=device)
    seconds: dict[str, list[float]] = {}
    for record in Engine(model, data, config):
        if isinstance(record, EpochRecord):
            seconds.setdefault(record.phase, []).append(record.seconds)
    plain = statistics.median(seconds["dense"][1:])  # the first epoch warms up
    admm = statistics.median(seconds["admm"][1:] or seconds["admm"])  # the epochs that project 4 times
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
    print()
    print(app_against_engine(args.device))
    print()
    print(cli_compress_against_train(args.device))


def app_against_engine(device: str, epochs: int = 15) -> str:
    data = load_dataset("digits")

    def fresh() -> torch.nn.Module:
        torch.manual_seed(0)
        return build_model("mlp", data.input_shape, data.num_classes)

    config = EngineConfig(target="50x", epochs=epochs, device=device)
    tic = time.perf_counter()
    list(Engine(fresh(), data, config))
    engine_s = time.perf_counter() - tic
    tic = time.perf_counter()
    Runner.compress(fresh(), data, config, "mlp").wait()
    app_s = time.perf_counter() - tic
    return ("| digits MLP, 15 epochs from a random start | Engine s | app's Runner (trade-off curves, background thread) s | ratio |\n"
            f"|---|---|---|---|\n| whole run | {engine_s:.1f} | {app_s:.1f} | {app_s / engine_s:.2f} |")


def cli_compress_against_train(device: str, epochs: int = 15) -> str:
    def run(*args: str) -> float:
        tic = time.perf_counter()
        subprocess.run([sys.executable, "-m", "jointcomp", *args, "--device", device], check=True, capture_output=True)
        return time.perf_counter() - tic

    with tempfile.TemporaryDirectory() as tmp:
        train_s = run("train", "--model", "mlp", "--data", "digits", "--epochs", str(epochs), "--out", f"{tmp}/dense")
        compress_s = run("compress", "--model", "mlp", "--data", "digits", "--epochs", str(epochs),
                         "--pretrained", f"{tmp}/dense", "--out", f"{tmp}/run")
    return ("| CLI, digits MLP, 15 epochs, whole processes | train s | compress s | ratio |\n|---|---|---|---|\n"
            f"| `python -m jointcomp train` / `compress --pretrained` | {train_s:.1f} | {compress_s:.1f} | "
            f"{compress_s / train_s:.2f} |")


if __name__ == "__main__":
    main()

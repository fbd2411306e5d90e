"""Accuracy at equal size and equal training: jointcomp's ADMM against the uniform and
sequential baselines (see jointcomp/methods.py), from one cached dense model.

    python bench/quality.py            # LeNet-5 on Fashion-MNIST (apt-get install dataset-fashion-mnist)
    python bench/quality.py --quick    # the digits MLP, a few minutes
"""
from __future__ import annotations

import argparse
import copy
import time

from common import dense_model, machine
from jointcomp import CompressConfig, Engine, FinalRecord


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="digits MLP instead of LeNet-5 / Fashion-MNIST")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    if args.quick:
        model_name, data_name, dense_epochs, targets, epochs = "mlp", "digits", 20, ["50x", "100x", "200x", "400x"], 15
        lr = 0.05
    else:
        model_name, data_name, dense_epochs, targets, epochs = "lenet5", "fashion-mnist", 5, ["100x", "300x", "600x", "1200x"], 6
        lr = 0.02
    epochs = args.epochs or epochs
    dense, data = dense_model(model_name, data_name, dense_epochs)
    meta = {"model": model_name, "input_shape": list(data.input_shape), "num_classes": data.num_classes}
    print(f"Machine: {machine()}; {model_name} on {data_name}, dense model trained {dense_epochs} epochs, "
          f"every method {epochs} epochs (lr {lr}, SGD, cosine)\n")
    print("| target | method | accuracy | dense accuracy | paper ratio | file bytes | minutes |")
    print("|---|---|---|---|---|---|---|")
    for target in targets:
        for method in ("admm", "uniform", "sequential"):
            config = CompressConfig(target=target, epochs=epochs, method=method, lr=lr, device=args.device)
            tic = time.perf_counter()
            final = [r for r in Engine(copy.deepcopy(dense), data, config, meta=meta) if isinstance(r, FinalRecord)][0]
            minutes = (time.perf_counter() - tic) / 60
            print(f"| {target} | {method} | {final.accuracy:.4f} | {final.dense_accuracy:.4f} | "
                  f"{final.ratio:.1f}x | {final.file_bytes:,} | {minutes:.1f} |", flush=True)


if __name__ == "__main__":
    main()

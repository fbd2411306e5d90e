"""Accuracy at equal size and equal training: jointcomp's ADMM against the uniform and
sequential baselines (see jointcomp/methods.py), from one cached dense start per seed.

    python bench/quality.py                                  # LeNet-5 / Fashion-MNIST, the issue's grid
    python bench/quality.py --model mlp --data digits --targets 50x 200x 800x
    python bench/quality.py --budget-mode file --targets 20KB 12KB 8KB --methods admm

Prints one markdown row per target and method: mean accuracy over the seeds with its
min-max, and for admm the per-layer bitwidths at the first and last compression epoch.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

from common import LR, dense_model, machine
from jointcomp import CompressConfig, Engine, EpochRecord, FinalRecord
from jointcomp.methods import METHODS


def setting(default, text: str):
    """A --set value in the type of its default (bools from true/false, 1/0)."""
    if isinstance(default, bool):
        return text.lower() in ("1", "true", "yes", "on")
    return type(default)(text)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="lenet5")
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--dense-epochs", type=int, default=10)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--targets", nargs="+", default=["100x", "300x", "600x", "1200x", "2000x"])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--budget-mode", default="paper", choices=("paper", "file"))
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="other CompressConfig settings for every run, e.g. distill=0.5 finetune=0")
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    extra = {k: setting(getattr(CompressConfig, k), v) for k, v in (kv.split("=", 1) for kv in args.set)}
    lr = LR.get(args.model, 0.02)
    starts = {seed: dense_model(args.model, args.data, args.dense_epochs, seed, args.batch_size) for seed in args.seeds}
    data = starts[args.seeds[0]][1]
    meta = {"model": args.model, "input_shape": list(data.input_shape), "num_classes": data.num_classes}
    print(f"Machine: {machine()}; {args.model} on {args.data}; dense start trained {args.dense_epochs} epochs "
          f"per seed; every method {args.epochs} epochs (lr {lr}, batch {args.batch_size}, SGD, cosine); seeds {args.seeds}; "
          f"budget mode {args.budget_mode}; settings {extra or 'defaults'}\n")
    print("| target | method | accuracy mean (min-max) | dense accuracy | paper ratio | file bytes | bits first -> last (admm) | minutes per run |")
    print("|---|---|---|---|---|---|---|---|")
    for target in args.targets:
        for method in args.methods:
            accs, dense, ratios, files, bits, minutes = [], [], [], [], "", []
            for seed in args.seeds:
                config = CompressConfig(target=target, epochs=args.epochs, method=method, lr=lr, seed=seed,
                                        batch_size=args.batch_size,
                                        budget_mode=args.budget_mode, device=args.device, **extra)
                tic = time.perf_counter()
                records = list(Engine(copy.deepcopy(starts[seed][0]), data, config, meta=meta))
                minutes.append((time.perf_counter() - tic) / 60)
                final = next(r for r in records if isinstance(r, FinalRecord))
                accs.append(final.accuracy)
                dense.append(final.dense_accuracy)
                ratios.append(final.ratio)
                files.append(final.file_bytes)
                epochs = [r for r in records if isinstance(r, EpochRecord) and r.phase != "dense"]
                if method == "admm" and not bits:
                    bits = " -> ".join(",".join(str(layer.bits) for layer in e.layers) for e in (epochs[0], epochs[-1]))
            print(f"| {target} | {method} | {statistics.mean(accs):.4f} ({min(accs):.4f}-{max(accs):.4f}) | "
                  f"{statistics.mean(dense):.4f} | {statistics.mean(ratios):.1f}x | {statistics.mean(files):,.0f} | "
                  f"{bits} | {statistics.mean(minutes):.1f} |", flush=True)


if __name__ == "__main__":
    main()

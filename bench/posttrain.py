"""Compression without training, as a user runs it: one `python -m jointcomp compress --method
posttrain` per target and seed (the seed draws the calibration inputs), every other setting the
CLI's default; beside it, what the untrained projection (the app's what-if before posttrain) gives
at the same target, the same pipeline with uniform allocation (one density and one bitwidth for
every layer, `uniform_allocation`), posttrain's sketch (the app's quick what-if, `sketch`), and the time of one
dense training epoch of the same network in the same run.

    python bench/posttrain.py --model resnet20 --data cifar10 --pretrained ../shared/models/resnet20-12fca82f.th
    python bench/posttrain.py --model resnet56 --data cifar10 --pretrained ../shared/models/resnet56-4bfd9763.th \
        --targets 16x 50x
    python bench/posttrain.py --model lenet5 --data fashion-mnist --dense-epochs 15 --targets 100x 200x 537x 1000x
    python bench/posttrain.py --model mlp --data digits --dense-epochs 20 --targets 50x 200x
    python bench/posttrain.py --model nets:conv_bn --data fashion-mnist --dense-epochs 5 --targets 50x 200x

Without --pretrained the dense start is `python -m jointcomp train --epochs N` (cached in bench/.cache).
Rows go to bench/results/posttrain.jsonl (one JSON object per run, replaced when run again) and a
markdown table is printed: mean accuracy over the seeds with its min-max, and one run's command.
"""
from __future__ import annotations

import argparse
import json
import shlex
import statistics
from pathlib import Path

from common import CACHE, commit, jointcomp, machine, paper_bits, store_rows
import torch

from jointcomp import EngineConfig, Compressor, whatif
from jointcomp.budget import BIT_CHOICES, Budget
from jointcomp.models import load_start
from jointcomp.rundir import SUMMARY_FILE
from jointcomp.trainer import accuracy, calibration_inputs

RUNS = CACHE / "posttrain"


def untrained_projection(model_name: str, data_name: str, weights: str, target: str) -> float:
    """Accuracy of admm's first projection of the dense weights (magnitude pruning + k-means, no
    calibration): what the app's what-if showed before posttrain."""
    model, data = load_start(model_name, data_name, pretrained=weights)
    return Compressor(model.eval(), target, steps=1, evaluate=lambda m: accuracy(m, data)).finish().accuracy


def uniform_allocation(model_name: str, data_name: str, weights: str, target: str, seed: int) -> float:
    """Accuracy of the same pipeline with uniform allocation: one density and one bitwidth for every
    layer (masks by the same (w / d)^2 scores, the same reconstruction and BatchNorm statistics); of
    the bitwidths whose uniform density fits, the one whose outputs are closest to the dense network's."""
    model, data = load_start(model_name, data_name, pretrained=weights)
    comp = Compressor(model.eval(), target, method="posttrain", evaluate=lambda m: accuracy(m, data))
    comp.calibrate(calibration_inputs(data, EngineConfig.calibration, seed, torch.device("cpu")))
    budget = Budget(comp.target_bits, comp.density)
    best = None
    for b in BIT_CHOICES:
        found = comp.method.uniform(b, budget)
        if found is None:
            continue
        alloc, distance = comp.method.reconstruct(*found, budget)
        if alloc.size_bits <= budget.bits and (best is None or distance < best[1]):
            best = alloc, distance
    return comp.score(best[0])


def sketch(model_name: str, data_name: str, weights: str, target: str, seed: int) -> float:
    """Accuracy on the whole validation set of posttrain's sketch (`Method.sketch`): the what-if the
    app's slider shows at once on a network whose forward pass is large (a CIFAR ResNet), from the
    same calibration draw."""
    model, data = load_start(model_name, data_name, pretrained=weights)
    comp = Compressor(model.eval(), target, method="posttrain", evaluate=lambda m: accuracy(m, data))
    comp.calibrate(calibration_inputs(data, EngineConfig.calibration, seed, torch.device("cpu")))
    return whatif.plan(comp, dense_accuracy=comp.dense_metric, sketch=True).accuracy


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="resnet20")
    p.add_argument("--data", default="cifar10")
    p.add_argument("--pretrained", help="the published weights to compress (else a `train` run of --dense-epochs)")
    p.add_argument("--dense-epochs", type=int, default=15)
    p.add_argument("--targets", nargs="+", default=["8x", "16x", "32x", "50x"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    args = p.parse_args()

    base = ["--model", args.model, "--data", args.data]
    weights = args.pretrained
    if weights is None:
        dense = RUNS / f"dense-{args.model.replace(':', '.')}-{args.data}-{args.dense_epochs}ep"
        if not (dense / SUMMARY_FILE).is_file():
            jointcomp(["train", *base, "--epochs", str(args.dense_epochs), "--out", str(dense), "--overwrite"])
        weights = str(dense)
    epoch_seconds = jointcomp(["train", *base, "--pretrained", weights, "--epochs", "1", "--out",
                               str(RUNS / "one-epoch"), "--overwrite"])
    rows = []
    for target in args.targets:
        magnitude = untrained_projection(args.model, args.data, weights, target)
        for seed in args.seeds:
            out = RUNS / f"{args.model.replace(':', '.')}-{args.data}-{target}-seed{seed}"
            cmd = ["compress", *base, "--pretrained", weights, "--method", "posttrain", "--target", target,
                   "--seed", str(seed), "--out", str(out), "--overwrite"]
            seconds = jointcomp(cmd)
            summary = json.loads((out / SUMMARY_FILE).read_text())
            uniform = uniform_allocation(args.model, args.data, weights, target, seed)
            sketched = sketch(args.model, args.data, weights, target, seed)
            rows.append({
                "network": args.model, "data": args.data, "method": "posttrain", "target": target, "budget_mode": "paper",
                "seed": seed, "accuracy": summary["accuracy"], "dense_accuracy": summary["dense_accuracy"],
                "paper_bits": paper_bits(summary), "file_bytes": summary["file_bytes"], "bops": summary["bops"],
                "bops_ratio": summary["bops_ratio"], "epochs": 0,
                "minutes": seconds / 60, "untrained_projection": magnitude, "uniform_allocation": uniform, "sketch": sketched, "dense_epoch_minutes": epoch_seconds / 60,
                "command": "python -m jointcomp " + shlex.join(cmd[:-3]).replace(str(Path.cwd()) + "/", ""),
                "commit": commit(), "machine": machine(),
            })
            print(json.dumps(rows[-1]), flush=True)

    store_rows("posttrain", rows)

    print(f"\nMachine: {machine()}; {args.model} on {args.data}, {weights}; seeds {args.seeds} (calibration draws); "
          f"one dense training epoch: {epoch_seconds / 60:.1f} min (`train --epochs 1`, same run).\n")
    print("| target | posttrain accuracy mean (min-max) | dense | untrained projection | uniform allocation mean (min-max) | "
          "sketch mean (min-max) | file bytes | minutes per run | share of a dense epoch | command (seed 0) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for target in args.targets:
        runs = [r for r in rows if r["target"] == target]
        accs = [r["accuracy"] for r in runs]
        uniform = [r["uniform_allocation"] for r in runs]
        sketched = [r["sketch"] for r in runs]
        minutes = statistics.mean(r["minutes"] for r in runs)
        print(f"| {target} | {statistics.mean(accs):.4f} ({min(accs):.4f}-{max(accs):.4f}) | {runs[0]['dense_accuracy']:.4f} | "
              f"{runs[0]['untrained_projection']:.4f} | {statistics.mean(uniform):.4f} ({min(uniform):.4f}-{max(uniform):.4f}) | "
              f"{statistics.mean(sketched):.4f} ({min(sketched):.4f}-{max(sketched):.4f}) | "
              f"{statistics.mean(r['file_bytes'] for r in runs):,.0f} | {minutes:.2f} | "
              f"{minutes / (epoch_seconds / 60):.2f} | `{runs[0]['command']}` |")


if __name__ == "__main__":
    main()

"""The app's what-if in a script, without the browser: `what_ifs` of a dense model (its calibration and
dense score), then slider moves (`WhatIfs.plan` at targets not asked for before), each timed: the
server's share of bench/app_latency.py's figures, free of Chromium and the page.

    python bench/whatif_moves.py --model lenet5 --data fashion-mnist
    JOINTCOMP_DATA=../shared/data python bench/whatif_moves.py --model resnet56 --data cifar10 \
        --pretrained ../shared/models/resnet56-4bfd9763.th --targets 30x 70x

Without --pretrained the dense model is trained for --dense-epochs (cached in bench/.cache).
"""
from __future__ import annotations

import argparse
import statistics
import time

from common import commit, dense_model, machine

from jointcomp import EngineConfig
from jointcomp.app.runner import what_ifs
from jointcomp.models import load_start


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="lenet5")
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--pretrained", help="the weights to start from (else a dense model of --dense-epochs)")
    p.add_argument("--dense-epochs", type=int, default=2)
    p.add_argument("--targets", nargs="+", default=["60x", "70x", "80x", "100x"])
    args = p.parse_args()
    if args.pretrained:
        model, data = load_start(args.model, args.data, pretrained=args.pretrained)
    else:
        model, data = dense_model(args.model, args.data, args.dense_epochs)
    tic = time.perf_counter()
    shown = what_ifs(model, data, EngineConfig(), args.model)
    first = time.perf_counter() - tic
    print(f"Machine: {machine()}; commit {commit()}\n\n| what | seconds | accuracy |\n|---|---|---|")
    print(f"| what_ifs: calibration and dense score | {first:.2f} | {shown.dense_accuracy:.4f} (dense) |")
    moves = []
    for target in args.targets:
        tic = time.perf_counter()
        plan = shown.plan(target)
        moves.append(time.perf_counter() - tic)
        print(f"| move to {target}{' (sketch)' if shown.sketches else ''} | {moves[-1]:.2f} | {plan.accuracy:.4f} |",
              flush=True)
    print(f"| moves: mean (min-max) | {statistics.mean(moves):.2f} ({min(moves):.2f}-{max(moves):.2f}) | |")


if __name__ == "__main__":
    main()

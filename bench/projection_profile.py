"""Where one joint projection's time goes: the option tables (k-means of every kept count and
bitwidth of every layer), the multiple-choice knapsack, and the deployable model (pruning
knapsack, links, the chosen codebooks), each against one torch.sort of the same weights. The
tables are timed cold (the first projection of a run) and warm: started from the codebooks of the
tables of the weights before they moved by MOVE of their spread (as ADMM's W + U between two
projections), which is what every later projection of a run does.

    python bench/projection_profile.py [--device cuda]
    python bench/projection_profile.py --warm-steps 50 15 8 5 3   # how many Lloyd steps warm tables need

`--warm-steps`: the digits MLP's tables through a chain of CHAIN projections, the weights moving
by MOVE between two, each warm from the last, with WARM_TABLE_ITERS set to each count in turn:
the time of one warm table and how far the last tables' errors are above those of the first count.
"""
from __future__ import annotations

import argparse
import time

import torch
import torchvision

from common import machine
from jointcomp import EngineConfig, build_model, projections
from jointcomp.projector import LayerSpec, Projector
from jointcomp.budget import Budget, Accounting, parse_target
from jointcomp.compressor import compressible_weights
from jointcomp.links import find_links


MOVE = 0.01  # of each layer's standard deviation, per weight: the move between two projections
CHAIN = 8  # projections in a --warm-steps chain


def best_of(fn, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        tic = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tic)
    return min(times)


def weights_and_projector(model: torch.nn.Module, device: torch.device) -> tuple[list[torch.Tensor], Projector]:
    """The model's compressible weights on `device` and the projector a run of it would use."""
    layers = compressible_weights(model, EngineConfig())
    specs = [LayerSpec(n, tuple(w.shape)) for n, w, _ in layers]
    projector = Projector(specs, Accounting(), links=find_links(model, [n for n, _, _ in layers]))
    return [w.detach().to(device) for _, w, _ in layers], projector


def row(name: str, model: torch.nn.Module, target: str, device: torch.device) -> str:
    weights, projector = weights_and_projector(model, device)
    budget = Budget(parse_target(target, 32 * sum(w.numel() for w in weights)))
    flat = torch.cat([w.flatten() for w in weights])
    projector.joint(weights, budget)  # warm-up
    tables = projector.joint_tables(weights)
    bits, _, _ = projector.joint_bits(weights, budget, tables)
    sort_s = best_of(lambda: torch.sort(flat))
    tables_s = best_of(lambda: projector.joint_tables(weights))
    g = torch.Generator().manual_seed(0)
    moved = [w + MOVE * w.std() * torch.randn(w.shape, generator=g).to(device) for w in weights]
    warm_s = best_of(lambda: projector.joint_tables(moved, tables.books))
    mckp_s = best_of(lambda: projector.joint_bits(weights, budget, tables))
    deploy_s = best_of(lambda: projector.prune_and_quantize(weights, bits, budget))
    joint_s = best_of(lambda: projector.joint(weights, budget))
    joint_warm_s = best_of(lambda: projector.joint(moved, budget, projector.joint_tables(moved, tables.books)))
    return (f"| {name} | {flat.numel() / 1e6:.2f} M / {len(weights)} | {target} | {sort_s:.4f} | {tables_s:.4f} | {warm_s:.4f} | "
            f"{mckp_s:.4f} | {deploy_s:.4f} | {joint_s:.4f} | {joint_warm_s:.4f} | {joint_s / sort_s:.2f} | {joint_warm_s / sort_s:.2f} |")


def warm_steps(counts: list[int], device: torch.device) -> None:
    start, projector = weights_and_projector(build_model("mlp", (1, 8, 8), 10), device)
    print("| warm Lloyd steps | one warm table s (best of the chain) | mean excess error | worst excess error |")
    print("|---|---|---|---|")
    first = None
    for steps in counts:
        projections.WARM_TABLE_ITERS = steps
        g = torch.Generator().manual_seed(1)
        weights, tables, seconds = start, projector.joint_tables(start), []
        for _ in range(CHAIN):
            weights = [w + MOVE * w.std() * torch.randn(w.shape, generator=g).to(device) for w in weights]
            tic = time.perf_counter()
            tables = projector.joint_tables(weights, tables.books)
            seconds.append(time.perf_counter() - tic)
        errors = torch.cat([e for _, e in tables.layers])
        first = errors if first is None else first
        excess = (errors - first) / first.clamp(min=1e-30)
        print(f"| {steps} | {min(seconds):.4f} | {float(excess.mean()):.1e} | {float(excess.max()):.1e} |")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--warm-steps", type=int, nargs="+")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    print(f"Device: {torch.cuda.get_device_name() if device.type == 'cuda' else machine()}\n")
    if args.warm_steps:
        warm_steps(args.warm_steps, device)
        return
    print("| weights | size / layers | target | one torch.sort s | option tables s | option tables, warm s | knapsack s "
          "| deployable s | joint projection s | joint, warm s | joint / sort | warm / sort |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    print(row("digits MLP", build_model("mlp", (1, 8, 8), 10), "200x", device))
    print(row("LeNet-5", build_model("lenet5", (1, 28, 28), 10), "600x", device))
    print(row("ResNet-56 (CIFAR)", build_model("resnet56", (3, 32, 32), 10), "200x", device))
    print(row("ResNet-50 (CIFAR-10)", torchvision.models.resnet50(num_classes=10), "27x", device))


if __name__ == "__main__":
    main()

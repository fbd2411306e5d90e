"""Time of one projection, as a multiple of one torch.sort of the same weights in the same
run: the two knapsacks in turn (pruning at fixed bitwidths, then codebooks for all bitwidths
1..8 and the bitwidth knapsack) and the joint projection that training uses (every layer's
(kept count, bitwidth) options priced by one multiplier, then pruning and codebooks), without
and with the links between layers that training traces from the model (links.py: a pruning that
leaves units without inputs runs its knapsack a second time).

Weights: ResNet-50 for CIFAR-10 (torchvision's, 10 classes: 23.5 M weights in 54 layers,
at its own random initialisation) at 27x and 840x, LeNet-5 (430,500 weights), at random
initialisation and trained (a dense start trained and cached if missing), where pruning leaves
units without inputs, ResNet-56 (57 layers) and the digits MLP (50,432 weights).

    python bench/solvers.py [--device cuda] [--repeat 3]
"""
from __future__ import annotations

import argparse
import time

import torch
import torchvision

from common import dense_model, machine
from jointcomp import EngineConfig, build_model
from jointcomp.projector import LayerSpec, Projector
from jointcomp.budget import Budget, Accounting, parse_target
from jointcomp.compressor import compressible_weights
from jointcomp.links import find_links
from jointcomp.solvers import useless_weights
from jointcomp.models import lenet5


def timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    tic = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - tic


def bench(name: str, model: torch.nn.Module, target: str, device: torch.device, repeat: int) -> str:
    layers = compressible_weights(model, EngineConfig())
    weights = [w.detach().to(device) for _, w, _ in layers]
    specs = [LayerSpec(n, tuple(w.shape)) for n, w, _ in layers]
    projector = Projector(specs, Accounting())
    linked = Projector(specs, Accounting(), links=find_links(model, [n for n, _, _ in layers]))
    budget = Budget(parse_target(target, 32 * sum(w.numel() for w in weights)))
    bits = torch.full((len(weights),), 4)
    flat = torch.cat([w.flatten() for w in weights])

    def project() -> None:
        masks, _ = projector.prune(weights, bits, budget)
        projector.quantize(weights, masks, budget)

    project()  # warm-up
    sort_s = min(timed(lambda: torch.sort(flat), device) for _ in range(repeat))
    prune_s = min(timed(lambda: projector.prune(weights, bits, budget), device) for _ in range(repeat))
    full_s = min(timed(project, device) for _ in range(repeat))
    joint_s = min(timed(lambda: projector.joint(weights, budget), device) for _ in range(repeat))
    linked_s = min(timed(lambda: linked.joint(weights, budget), device) for _ in range(repeat))
    second = "yes" if any(u.any() for u in useless_weights(projector.joint(weights, budget).masks, linked.links)) else "no"
    return (f"| {name} | {flat.numel() / 1e6:.2f} M / {len(weights)} | {target} | {sort_s:.3f} | "
            f"{prune_s:.3f} | {full_s:.3f} | {full_s / sort_s:.2f} | {joint_s:.3f} | {joint_s / sort_s:.2f} | "
            f"{len(linked.links)} | {second} | {linked_s:.3f} | {linked_s / sort_s:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    resnet = torchvision.models.resnet50(num_classes=10)
    trained = dense_model("lenet5", "fashion-mnist", 10, seed=0)[0]
    rows = [
        f"Device: {torch.cuda.get_device_name() if device.type == 'cuda' else machine()}",
        "",
        "| weights | size / layers | target | one torch.sort s | pruning s | two knapsacks s | two / sort "
        "| joint projection s | joint / sort | links | second pruning | joint with links s | with links / sort |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        bench("ResNet-50 (CIFAR-10)", resnet, "27x", device, args.repeat),
        bench("ResNet-50 (CIFAR-10)", resnet, "840x", device, args.repeat),
        bench("LeNet-5", lenet5((1, 28, 28), 10), "27x", device, args.repeat),
        bench("LeNet-5", lenet5((1, 28, 28), 10), "840x", device, args.repeat),
        bench("LeNet-5 trained", trained, "2000x", device, args.repeat),
        bench("ResNet-56 (CIFAR-10)", build_model("resnet56", (3, 32, 32), 10), "200x", device, args.repeat),
        bench("digits MLP", build_model("mlp", (1, 8, 8), 10), "200x", device, args.repeat),
    ]
    print("\n".join(rows))


if __name__ == "__main__":
    main()

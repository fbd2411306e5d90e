"""What one training step of a CIFAR-10 ResNet costs, dense and while compressing, and
jointcomp's share of a compression epoch (issue 27): real CIFAR-10 batches of 64, the
Compressor driven by a plain loop (as in a user's own), every part timed on its own:

* the user's step: forward, loss, backward, optimizer step (the same dense or not);
* distillation: the teacher's forward pass (`Compressor.distill`, on by default);
* `Compressor.step` in each phase: the proximal pull (admm), the straight-through snap
  (retrain), the shared-centroid snap (finetune), and the projection steps on their own.

jointcomp's share of an epoch is extrapolated to a full CIFAR-10 epoch (782 steps; an admm
epoch also projects 4 times), per phase, without and with the teacher's forward pass. Also
the dense step with channels_last memory format, against the default.

    python bench/step_speed.py [--models resnet20 resnet56] [--steps 48]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from common import machine
from jointcomp import Compressor, build_model, load_dataset
from jointcomp.schedule import PROJECTIONS_PER_EPOCH

PHASES = ("admm", "retrain", "finetune")


def dense_step_seconds(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, channels_last: bool) -> float:
    model = model.to(memory_format=torch.channels_last) if channels_last else model
    x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t)
    return statistics.median(times[2:])


def compress_parts(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], steps: int, every: int) -> dict:
    comp = Compressor(model, "200x", steps=steps, project_every=every)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    parts: dict[str, list[float]] = {"user": [], "teacher": [], "projection": [], "admm": [], "retrain": [], "finetune": []}
    for t in range(steps):
        x, y = batches[t % len(batches)]
        t0 = time.perf_counter()
        out = model(x)
        loss = nn.functional.cross_entropy(out, y)
        t1 = time.perf_counter()
        loss = comp.distill(x, out, loss)
        t2 = time.perf_counter()
        opt.zero_grad()
        loss.backward()
        opt.step()
        t3 = time.perf_counter()
        projects = comp.phase == "admm" and comp.schedule.projects(t)  # the last one fixes the allocation
        comp.step(lr=0.01)
        t4 = time.perf_counter()
        parts["user"].append((t1 - t0) + (t3 - t2))
        parts["teacher"].append(t2 - t1)
        parts["projection" if projects else comp.phase].append(t4 - t3)
    return {k: statistics.median(v[1:] if len(v) > 2 else v) for k, v in parts.items() if v}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--models", nargs="+", default=["resnet20", "resnet56"])
    p.add_argument("--steps", type=int, default=48)
    args = p.parse_args()
    data = load_dataset("cifar10")
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(data.train_y), generator=g)
    batches = [(data.train_x[order[i:i + 64]], data.train_y[order[i:i + 64]]) for i in range(0, 64 * 8, 64)]
    spe = -(-len(data.train_y) // 64)
    print(f"Machine: {machine()}; CIFAR-10 batches of 64; {args.steps} steps a measurement (medians)\n")
    print("| model | dense step s | channels_last step s | gain | teacher forward s | admm step s | retrain step s "
          "| finetune step s | one projection s | jointcomp's share of an admm / retrain / finetune epoch "
          "| the same with the teacher |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name in args.models:
        torch.manual_seed(0)
        model = build_model(name, data.input_shape, data.num_classes)
        x, y = batches[0]
        plain = dense_step_seconds(build_model(name, data.input_shape, data.num_classes), x, y, 12, False)
        last = dense_step_seconds(build_model(name, data.input_shape, data.num_classes), x, y, 12, True)
        parts = compress_parts(model, batches, args.steps, every=args.steps // 6)
        user, teacher = spe * parts["user"], spe * parts["teacher"]
        ours = {ph: spe * parts[ph] + (PROJECTIONS_PER_EPOCH * parts["projection"] if ph == "admm" else 0.0) for ph in PHASES}
        alone = " / ".join(f"{100 * ours[ph] / (user + ours[ph]):.1f}" for ph in PHASES)
        taught = " / ".join(f"{100 * (ours[ph] + teacher) / (user + ours[ph] + teacher):.1f}" for ph in PHASES)
        print(f"| {name} | {plain:.4f} | {last:.4f} | {plain / last:.2f}x | {parts['teacher']:.4f} | {parts['admm']:.4f} | "
              f"{parts['retrain']:.4f} | {parts['finetune']:.4f} | {parts['projection']:.3f} | {alone} % | {taught} % |",
              flush=True)


if __name__ == "__main__":
    main()

"""What-ifs: a compressor's current weights projected to some size without training (the
app's target slider, the trade-off curve of every epoch). Nothing of the compressor changes:
not its target, not the densities it prices positions at, not what `export` writes."""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from .budget import feasible_range
from .compressor import Compressor
from .projector import Allocation
from .records import CurvePoint, FinalRecord

TRADEOFF_FACTORS = (0.25, 0.5, 1.0, 2.0, 4.0)  # sizes of the trade-off curve, times the target


def plan(comp: Compressor, target: str | float | None = None, dense_accuracy: float | None = None,
         sketch: bool = False, evaluate: Callable[[nn.Module], float] | None = None) -> FinalRecord:
    """What the compressor's method would start from at `target` (default: the live one): its
    allocation of the current weights, scored (`evaluate`, default the compressor's) and sized as a
    final record would be. `dense_accuracy`: the current weights' score where the caller has it (the
    app's slider asks for many targets of one model; each score of a CIFAR ResNet is seconds).
    `sketch`: the method's quick preview of that allocation (`Method.sketch`)."""
    bits = comp.resolve(target) if target is not None else comp.target_bits
    alloc, file_bytes, size = _project(comp, bits, comp.initial_density(bits), sketch)
    nan = torch.full((len(comp.specs),), float("nan"), dtype=torch.float64)
    dense_accuracy = comp.score(None, evaluate) if dense_accuracy is None else dense_accuracy
    return FinalRecord(
        comp.score(alloc, evaluate), dense_accuracy, size, bits, comp.dense_bits / size, 0, 0.0, False,
        file_bytes, comp.fp32_bytes / file_bytes, comp.layer_records(alloc, nan, nan), *comp.count_bops(alloc),
    )


def tradeoff(comp: Compressor, target: str | float | None = None, factors: Sequence[float] = TRADEOFF_FACTORS,
             evaluate: Callable[[nn.Module], float] | None = None) -> list[CurvePoint]:
    """The trade-off around `target` (default: the live one): for each size target x factor
    (within what the model can reach), the score of the method's allocation of the current
    weights to it (`evaluate` defaults to the compressor's)."""
    center = comp.resolve(target) if target is not None else comp.target_bits
    low, high = feasible_range([s.numel for s in comp.specs], [s.bounds for s in comp.specs],
                               comp.accounting, comp.reserved_bits, comp.dense_bits)
    points = []
    for bits in sorted({min(max(center * f, low), high) for f in factors}):
        alloc, file_bytes, size = _project(comp, bits, comp.density)
        points.append(CurvePoint(size, file_bytes, comp.score(alloc, evaluate)))
    return points


def _project(comp: Compressor, bits: float, density: torch.Tensor, sketch: bool = False
             ) -> tuple[Allocation, int, float]:
    """The method's allocation (or its sketch) of the current weights fitted to `bits`, positions
    priced at `density`, with its file bytes and size."""
    alloc = comp.allocation(bits, density, sketch=sketch)
    file_bytes = len(comp.encode(alloc))
    return alloc, file_bytes, comp.measure(alloc, file_bytes)


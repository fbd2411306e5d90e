"""uniform: one density and one bitwidth for every layer, the pair with the least error
(magnitude pruning), then training with the masks fixed. A baseline."""
from __future__ import annotations

import torch

from ..budget import BIT_CHOICES, Budget
from ..projector import top_k_mask
from .base import PruneFirst


class Uniform(PruneFirst):
    """One density and one bitwidth for all layers (the pair with the least error), by magnitude."""

    def choose(self, weights: list[torch.Tensor], budget: Budget) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        numel = self.projector.numel
        best, best_err = None, float("inf")
        for b in BIT_CHOICES:
            bits, density = self.projector.uniform_density(b, budget)
            if density <= 0:
                continue
            keep = [max(1, min(int(n), int(density * n))) for n in numel.tolist()]
            masks = [top_k_mask(w, k) for w, k in zip(weights, keep)]
            alloc = self.projector.quantize(weights, masks, budget, bits=bits)
            if alloc.size_bits > budget.bits:
                continue
            err = sum(float((w - q).square().sum()) for w, q in zip(weights, alloc.values))
            if err < best_err:
                best, best_err = (masks, bits), err
        if best is None:
            raise ValueError("no uniform density and bitwidth fits this target; try a larger one")
        return best


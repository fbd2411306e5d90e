"""sequential: prune first (knapsack at one bitwidth for every layer) and train with the masks
fixed; at `fix_allocation`, bitwidths for the kept weights by the knapsack. A baseline."""
from __future__ import annotations

import torch

from ..budget import Budget
from .base import PruneFirst


class Sequential(PruneFirst):
    """Prune by the knapsack at one bitwidth for every layer; bitwidths by the knapsack later."""

    def choose(self, weights: list[torch.Tensor], budget: Budget) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        masks, _ = self.projector.prune(weights, self.projector.initial_bits(weights, budget), budget)
        return masks, None

"""Codes that flip back and forth while retraining are frozen (Nagel et al., ICML 2022,
"Overcoming Oscillations in Quantization-Aware Training").

While retraining, every kept weight joins the centre nearest its latent weight at every step. A
weight whose latent value sits near the boundary of two centres changes code, the gradient pushes
it back, and it changes again: at 1 and 2 bits these flips are most of what moves the network from
step to step (`nets:conv_bn` at 500x lost up to 7 points between retraining epochs, BENCHMARKS.md).
Per weight, the frequency of its *reversals* (a code change in the direction opposite to its last
one) is followed as a moving average; once it passes FREEZE_AT the weight keeps, for the rest of
the run, the code it has held on average. A weight that moves one way is never frozen.
"""
from __future__ import annotations

import torch

MOMENTUM = 0.01  # of the moving averages: about the last hundred steps count
FREEZE_AT = 0.02  # reversals per step past which a weight's code is frozen (twice the momentum, as Nagel et al. advise)


class Oscillations:
    """Per layer, the kept weights' last code, last direction of change, reversal frequency,
    average code, and the frozen codes."""

    def __init__(self, codes: list[torch.Tensor]) -> None:
        self.last = [c.clone() for c in codes]
        self.direction = [torch.zeros_like(c, dtype=torch.int8) for c in codes]
        self.frequency = [torch.zeros_like(c, dtype=torch.float32) for c in codes]
        self.mean = [c.float() for c in codes]
        self.frozen = [torch.zeros_like(c, dtype=torch.bool) for c in codes]

    @torch.no_grad()
    def follow(self, layer: int, codes: torch.Tensor) -> torch.Tensor:
        """The codes of `layer` this step: `codes` (each weight's nearest centre), the frozen ones
        kept; then the weights whose reversals have become too frequent frozen at their average code."""
        frozen, last = self.frozen[layer], self.last[layer]
        codes = torch.where(frozen, last, codes)
        step = (codes - last).sign().to(torch.int8)
        reversed_ = (step * self.direction[layer]) < 0
        self.frequency[layer].mul_(1 - MOMENTUM).add_(reversed_.float(), alpha=MOMENTUM)
        self.direction[layer] = torch.where(step != 0, step, self.direction[layer])
        self.mean[layer].mul_(1 - MOMENTUM).add_(codes.float(), alpha=MOMENTUM)
        newly = (self.frequency[layer] > FREEZE_AT) & ~frozen
        codes = torch.where(newly, self.mean[layer].round().long(), codes)
        frozen |= newly
        self.last[layer] = codes
        return codes

    def renumber(self, layer: int, new_index: torch.Tensor) -> None:
        """The layer's centres were re-sorted: centre k is now `new_index[k]`. Where the order
        changed, every weight's average code in the layer starts again from its code."""
        self.last[layer] = new_index[self.last[layer]]
        if not torch.equal(new_index, torch.arange(len(new_index), device=new_index.device)):
            self.mean[layer] = self.last[layer].float()

    def frozen_count(self) -> int:
        return sum(int(f.sum()) for f in self.frozen)

    def state_dict(self) -> dict:
        return {"last": self.last, "direction": self.direction, "frequency": self.frequency, "mean": self.mean,
                "frozen": self.frozen}

    @classmethod
    def from_state(cls, state: dict, device: torch.device) -> Oscillations:
        found = cls.__new__(cls)
        for name in ("last", "direction", "frequency", "mean", "frozen"):
            setattr(found, name, [t.to(device) for t in state[name]])
        return found

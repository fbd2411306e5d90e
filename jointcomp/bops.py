"""Bit-operations (BOPs): what a compressed network costs to run, as the literature on joint pruning
and quantization (Bayesian Bits, DJPQ, GETA) counts it: every multiply-accumulate of a kept weight
costs its bitwidth x the activations' bits (8); the dense model runs at 32 x 32.

How often each weight takes part in a multiply-accumulate is measured from the model's own forward
pass on one input (hooks), not from a formula per layer type: a layer called twice counts twice."""
from __future__ import annotations

import math

import torch
from torch import nn

from .budget import DENSE_BITS, Accounting, LayerBounds

ACTIVATION_BITS = 8
BOPS_UNITS = {"bops": 1, "kbops": 10**3, "mbops": 10**6, "gbops": 10**9}  # matched in any case: "5GBOPs"


@torch.no_grad()
def weight_uses(model: nn.Module, names: list[str], input_shape: tuple[int, ...]) -> torch.Tensor:
    """For each named weight (a Linear's or a convolution's, output units first), the multiply-accumulates
    each of its entries takes part in on one input of `input_shape`: every call of its layer adds the
    layer's output elements / its output units (a convolution's output positions, a Linear's rows)."""
    modules = dict(model.named_modules())
    uses = torch.zeros(len(names), dtype=torch.float64)

    def counter(i: int):
        def count(module: nn.Module, inputs, output: torch.Tensor) -> None:
            uses[i] += output.numel() / module.weight.shape[0]
        return count

    handles = [modules[n.removesuffix("weight").removesuffix(".")].register_forward_hook(counter(i))
               for i, n in enumerate(names)]
    training = model.training
    try:
        param = next(model.parameters())
        model.eval()
        model(torch.zeros(1, *input_shape, dtype=param.dtype, device=param.device))
    except Exception as err:  # a shape the model does not take: say which
        raise ValueError(f"the model does not run on one input of shape {list(input_shape)} ({err}); give the shape "
                         "of one input") from None
    finally:
        model.train(training)
        for handle in handles:
            handle.remove()
    return uses


class BopsAccounting(Accounting):
    """The budget mode in which the target is the network's bit-operations: each kept weight costs
    its bits x 8-bit activations x the multiply-accumulates it takes part in (`weight_uses`, measured
    on one input of the model's `input_shape`); layers left dense run at 32 x 32."""

    description = "bit-operations of one forward pass: MACs x weight bits x 8-bit activations (dense: 32 x 32)"
    units = BOPS_UNITS
    unit = "bops"

    def __init__(self, input_shape: tuple[int, ...] | None = None) -> None:
        super().__init__(input_shape)
        self.uses = torch.zeros(0, dtype=torch.float64)  # of the compressed layers, in order

    def reference_bits(self, model: nn.Module, layers: list[tuple[str, nn.Parameter, LayerBounds]]) -> tuple[float, float]:
        if not self.input_shape:
            raise ValueError("the bops budget mode counts the model's operations on one input: give its shape "
                             "(Compressor(..., meta={'input_shape': [3, 32, 32]}); the CLI and the app know it)")
        uses = weight_uses(model, [n for n, _, _ in layers], tuple(self.input_shape))
        dense = torch.tensor([b.dense for _, _, b in layers])
        full = uses * torch.tensor([w.numel() for _, w, _ in layers], dtype=torch.float64) * DENSE_BITS * DENSE_BITS
        self.uses = uses[~dense]
        return float(full[dense].sum()), float(full.sum())

    def weight_bits(self, bits: torch.Tensor, numel: torch.Tensor, density: torch.Tensor | None = None) -> torch.Tensor:
        uses = self.uses.to(bits.device)
        return bits.double() * ACTIVATION_BITS * (uses if bits.dim() == 1 else uses[:, None])

    @staticmethod
    def format(value: float) -> str:
        return format_bops(value)


def format_bops(bops: float) -> str:
    """A count of bit-operations with a decimal prefix: '1.23 GBOPs'."""
    if bops < 1000:
        return f"{bops:.3g} BOPs"
    power = min(3, int(math.log10(bops) // 3))
    return f"{bops / 1000 ** power:.3g} {'kMG'[power - 1]}BOPs"

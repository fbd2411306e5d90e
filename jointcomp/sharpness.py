"""The sharpness of a loss at the model's weights, and the learning rate it allows.

Plain SGD with momentum beta is stable on a quadratic only while lr x sharpness < 2 (1 + beta),
where the sharpness is the largest eigenvalue of the loss's Hessian. A dense model trained to the
end of a cosine schedule sits where the sharpness is high (its last rates were tiny), so
compressing it at a rate meant for training from scratch throws it out of its basin and the loss
explodes (BENCHMARKS.md, "Give only the target"). The Engine measures the sharpness of the model
it is given and lowers its peak rate to what that sharpness allows.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

# Of the stability limit 2 (1 + beta) / sharpness: compression sharpens the loss (LeNet-5 at 537x: 2x to 4x
# its starting value in the first epoch), and a quarter of the limit still diverged once (BENCHMARKS.md).
STABLE_FRACTION = 0.125


@torch.no_grad()
def sharpness(model: nn.Module, loss: Callable[[], torch.Tensor], iters: int = 20, rel_eps: float = 1e-3) -> float:
    """The largest absolute eigenvalue of the Hessian of `loss()` with respect to the model's
    trainable parameters, by power iteration on central finite differences of gradients (so
    any model that has gradients works, no double backward needed). `loss` computes the loss
    of one fixed batch; the model's weights and buffers (BatchNorm statistics) are left as
    they were, and random numbers (dropout) repeat in every evaluation."""
    params = [p for p in model.parameters() if p.requires_grad]
    weights = [p.detach().clone() for p in params]
    buffers = [b.detach().clone() for b in model.buffers()]
    eps = rel_eps * max(math.sqrt(sum(float(w.double().square().sum()) for w in weights)), 1e-3)
    seed = int(torch.randint(1 << 30, ()))

    def gradient_at(direction: list[torch.Tensor], sign: float) -> list[torch.Tensor]:
        for p, w, d in zip(params, weights, direction):
            p.copy_(w + sign * eps * d)
        with torch.enable_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            grads = torch.autograd.grad(loss(), params, allow_unused=True)
        return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]

    generator = torch.Generator().manual_seed(0)
    v = [torch.randn(p.shape, generator=generator).to(p) for p in params]
    value = 0.0
    try:
        for _ in range(iters):
            norm = math.sqrt(sum(float(d.double().square().sum()) for d in v))
            v = [d / norm for d in v]
            plus, minus = gradient_at(v, 1.0), gradient_at(v, -1.0)
            hv = [(a - b) / (2 * eps) for a, b in zip(plus, minus)]
            value = sum(float((d * h).double().sum()) for d, h in zip(v, hv))
            if not math.isfinite(value) or all(float(h.abs().max()) == 0 for h in hv):
                break
            v = hv
    finally:
        for p, w in zip(params, weights):
            p.copy_(w)
        for b, saved in zip(model.buffers(), buffers):
            b.copy_(saved)
    return abs(value)


def stable_lr(lr: float, curvature: float, momentum: float) -> float:
    """The peak learning rate to use: `lr`, lowered to STABLE_FRACTION of SGD's stability
    limit at this sharpness (no change when the sharpness is unknown or zero)."""
    if not math.isfinite(curvature) or curvature <= 0:
        return lr
    return min(lr, STABLE_FRACTION * 2 * (1 + momentum) / curvature)

"""How the compressed layers are trained: jointcomp's ADMM, and two baselines.

Every method is driven by the Compressor (compressor.py) over the same steps of the same
training loop, and answers the same hooks: `start` (at the first step), `before_step`
(projections), `after_step` (after each optimizer step), `deployable` (the model that would
ship now, projected at a budget), `frozen` (the allocation being fine-tuned in its
deployed shape, if any) and `freeze`.

* admm: the paper's method with the joint projection (allocation.py); for the last part
  of the run the Compressor fixes its masks and bitwidths (`freeze`): first the kept weights
  retrain behind their quantized values, then (`fix_codes`) only the codebooks train.
* uniform: one global density and one bitwidth for every layer, chosen to hit the
  target; magnitude pruning + k-means, then fine-tuning with masks and code assignments
  fixed (Deep Compression style: each centre becomes the mean of its cluster's weights).
* sequential: prune first (knapsack with one bitwidth for every layer) and fine-tune with
  the mask fixed; halfway, choose bitwidths (knapsack), quantize, and fine-tune as uniform.
"""
from __future__ import annotations

import torch
from torch import nn

from .allocation import Allocation, Projector
from .budget import BIT_CHOICES
from .projections import assign

METHODS = ("admm", "uniform", "sequential")


@torch.no_grad()
def snap(params: list[nn.Parameter], alloc: Allocation, latent: list[torch.Tensor] | None = None) -> None:
    """Shared-centroid step: every centre becomes the mean of its cluster's current weights,
    and every weight its centre (zeros stay zero); masks and assignments do not change.
    With `latent` (straight-through training) the clusters are those of the latent weights:
    each is first re-assigned to its nearest centre (one Lloyd step), so codes can move."""
    for i, (p, mask) in enumerate(zip(params, alloc.masks)):
        kept = (p.detach() if latent is None else latent[i])[mask].float()
        book = alloc.codebooks[i]
        codes = alloc.codes[i] if latent is None else assign(kept, book)
        total = torch.zeros_like(book).index_add_(0, codes, kept)
        count = torch.zeros_like(book).index_add_(0, codes, torch.ones_like(kept))
        book = torch.where(count > 0, total / count.clamp(min=1), book)
        if latent is not None:  # keep it sorted for the next assignment
            book, order = book.sort()
            codes = order.argsort()[codes]
        alloc.codebooks[i], alloc.codes[i] = book, codes
        value = torch.zeros_like(p, dtype=torch.float32)
        value[mask] = book[alloc.codes[i]]
        alloc.values[i] = value
        p.copy_(value)


def allocation_state(alloc: Allocation | None) -> dict:
    """What a resumed run needs of a fixed allocation (its values are the weights themselves)."""
    return {} if alloc is None else {"masks": alloc.masks, "codes": alloc.codes, "codebooks": alloc.codebooks,
                                     "bits": alloc.bits, "size_bits": alloc.size_bits}


def allocation_from_state(state: dict, params: list[nn.Parameter]) -> Allocation | None:
    if not state:
        return None
    values = [p.detach().float().clone() for p in params]
    return Allocation(state["masks"], state["bits"], state["codebooks"], state["codes"], values,
                      float(state["size_bits"]), 0.0, 0.0)


class Admm:
    """The paper's ADMM with one joint projection: W (the trained weights), V (their
    projection onto the budget) and U (the scaled dual variable) of every compressed layer."""

    final_phase = True  # trains its allocation in the deployed shape at the end (`freeze`)

    def __init__(self, params: list[nn.Parameter], projector: Projector, steps: int, every: int) -> None:
        self.params = params
        self.projector = projector
        self.every = every
        self.V = [torch.zeros_like(p, dtype=torch.float32) for p in params]
        self.U = [torch.zeros_like(p, dtype=torch.float32) for p in params]
        self.frozen: Allocation | None = None
        self.latent: list[torch.Tensor] | None = None  # while retraining: the weights behind the quantized ones

    def start(self, budget: float) -> None:
        pass  # the first projection (step 0) chooses everything

    @torch.no_grad()
    def before_step(self, step: int, budget: float) -> tuple[float, float] | None:
        """Every `every` steps: V <- the joint projection of W + U; U <- U + W - V. Returns the
        two multipliers (pruning cut score, joint price of a bit), in squared error per bit."""
        if self.frozen is not None or step % self.every:
            return None
        x = [p.detach().float() + u for p, u in zip(self.params, self.U)]
        alloc = self.projector.joint(x, budget)
        self.V = alloc.values
        for p, v, u in zip(self.params, self.V, self.U):
            u.add_(p.detach().float() - v)
        return alloc.lambda_prune, alloc.lambda_quant

    @torch.no_grad()
    def after_step(self, lr: float, rho: float) -> None:
        """The proximal step of the augmented term, W <- (W + lr rho (V - U)) / (1 + lr rho).
        Once the allocation is fixed, the shared-centroid step instead; while retraining,
        the optimizer's step first moves the latent weights (straight-through)."""
        if self.frozen is not None:
            if self.latent is not None:
                for p, w, value, mask in zip(self.params, self.latent, self.frozen.values, self.frozen.masks):
                    w.add_(p.detach().float() - value).mul_(mask)
            snap(self.params, self.frozen, self.latent)
            return
        a = lr * rho
        for p, v, u in zip(self.params, self.V, self.U):
            p.add_(v - u, alpha=a).div_(1 + a)

    @torch.no_grad()
    def freeze(self, alloc: Allocation, retrain: bool = False) -> None:
        """From now on train in the deployed shape: masks and bits fixed, pruned weights
        exactly zero, each centre the mean of its members. `retrain`: the kept weights go
        on training behind their quantized values (straight-through), so code assignments
        still move, until `fix_codes`."""
        self.latent = [w * mask for w, mask in zip(self.weights(), alloc.masks)] if retrain else None
        self.frozen = alloc
        snap(self.params, alloc, self.latent)

    @property
    def retraining(self) -> bool:
        """Whether code assignments still move (between `freeze(..., retrain=True)` and `fix_codes`)."""
        return self.latent is not None

    def fix_codes(self) -> None:
        """End retraining: from now on code assignments are fixed too (the final phase)."""
        self.latent = None

    def weights(self) -> list[torch.Tensor]:
        """The trained weights: while retraining, the latent ones behind the quantized weights."""
        return self.latent if self.latent is not None else [p.detach().float() for p in self.params]

    def deployable(self, budget: float) -> Allocation:
        """The model that would ship now: the joint projection of the trained weights."""
        return self.projector.joint(self.weights(), budget)

    def density(self) -> torch.Tensor:
        """Kept fraction per layer of the last projection (what the file's positions will cost)."""
        return torch.tensor([float((v != 0).double().mean()) for v in self.V], dtype=torch.float64)

    @torch.no_grad()
    def residuals(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per layer: primal residual ||W - V||^2 and dual norm ||U||."""
        r = torch.stack([(p.detach().float() - v).square().sum() for p, v in zip(self.params, self.V)])
        d = torch.stack([u.norm() for u in self.U])
        return r.cpu().double(), d.cpu().double()

    def state_dict(self) -> dict:
        return {"V": self.V, "U": self.U, "frozen": allocation_state(self.frozen), "latent": self.latent}

    def load_state_dict(self, state: dict) -> None:
        device = self.params[0].device
        self.V = [v.to(device) for v in state["V"]]
        self.U = [u.to(device) for u in state["U"]]
        self.frozen = allocation_from_state(state["frozen"], self.params)
        latent = state.get("latent")
        self.latent = None if latent is None else [w.to(device) for w in latent]


class _FixedAllocation:
    """Shared by the baselines: an allocation decided once, then fine-tuned in place."""

    final_phase = False  # already trained in their deployed shape once decided
    retraining = False

    def __init__(self, params: list[nn.Parameter], projector: Projector, steps: int, every: int) -> None:
        self.params = params
        self.projector = projector
        self.alloc: Allocation | None = None

    def after_step(self, lr: float, rho: float) -> None:
        assert self.alloc is not None
        snap(self.params, self.alloc)

    def deployable(self, budget: float) -> Allocation:
        assert self.alloc is not None
        return self.alloc

    def residuals(self) -> tuple[torch.Tensor, torch.Tensor]:
        zeros = torch.zeros(len(self.params), dtype=torch.float64)
        return zeros, zeros

    def density(self) -> torch.Tensor:
        """Kept fraction per layer: the weights are held at zero where pruned."""
        return torch.tensor([float((p.detach() != 0).double().mean()) for p in self.params], dtype=torch.float64)

    @property
    def frozen(self) -> Allocation | None:
        return self.alloc

    def state_dict(self) -> dict:
        return allocation_state(self.alloc)

    def load_state_dict(self, state: dict) -> None:
        self.alloc = allocation_from_state(state, self.params)

    def before_step(self, step: int, budget: float) -> tuple[float, float] | None:
        return None


class Uniform(_FixedAllocation):
    """One density and one bitwidth for all layers, magnitude pruning, then fine-tuning."""

    def start(self, budget: float) -> None:
        weights = [p.detach() for p in self.params]
        numel = self.projector.numel
        best, best_err = None, float("inf")
        for b in BIT_CHOICES:
            bits = self.projector.clamp_bits(torch.full((len(weights),), b))
            unit = self.projector.accounting.weight_bits(bits, numel)
            room = budget - self.projector.reserved_bits - float(self.projector.accounting.layer_bits(bits, numel).sum())
            density = room / float((unit * numel).sum())
            if density <= 0:
                continue
            keep = [max(1, min(int(n), int(density * n))) for n in numel.tolist()]
            masks = [_top_k_mask(w, k) for w, k in zip(weights, keep)]
            alloc = self.projector.quantize(weights, masks, budget, bits=bits)
            if alloc.size_bits > budget:
                continue
            err = sum(float((w - q).square().sum()) for w, q in zip(weights, alloc.values))
            if err < best_err:
                best, best_err = alloc, err
        if best is None:
            raise ValueError("no uniform density and bitwidth fits this target; try a larger one")
        self.alloc = best
        snap(self.params, self.alloc)


class Sequential(_FixedAllocation):
    """Prune (knapsack at one bitwidth) and fine-tune; then choose bitwidths, quantize, fine-tune."""

    def __init__(self, params: list[nn.Parameter], projector: Projector, steps: int, every: int) -> None:
        super().__init__(params, projector, steps, every)
        self.switch_step = (-(-steps // every) // 2) * every  # halfway, at a projection boundary
        self.masks: list[torch.Tensor] | None = None

    def start(self, budget: float) -> None:
        weights = [p.detach() for p in self.params]
        bits = self.projector.initial_bits(weights, budget)
        self.masks, _ = self.projector.prune(weights, bits, budget)
        self._apply_masks()

    def before_step(self, step: int, budget: float) -> tuple[float, float] | None:
        if step == self.switch_step and self.alloc is None:
            assert self.masks is not None
            self.alloc = self.projector.quantize([p.detach() for p in self.params], self.masks, budget)
            snap(self.params, self.alloc)
            return float("nan"), self.alloc.lambda_quant
        return None

    def after_step(self, lr: float, rho: float) -> None:
        if self.alloc is None:
            self._apply_masks()
        else:
            snap(self.params, self.alloc)

    def deployable(self, budget: float) -> Allocation:
        if self.alloc is not None:
            return self.alloc
        assert self.masks is not None
        return self.projector.quantize([p.detach() for p in self.params], self.masks, budget)

    @torch.no_grad()
    def _apply_masks(self) -> None:
        assert self.masks is not None
        for p, m in zip(self.params, self.masks):
            p.mul_(m)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "prune_masks": self.masks}

    def load_state_dict(self, state: dict) -> None:
        self.masks = state.pop("prune_masks")
        super().load_state_dict(state)


def _top_k_mask(w: torch.Tensor, k: int) -> torch.Tensor:
    mask = torch.zeros(w.numel(), dtype=torch.bool, device=w.device)
    mask[w.detach().flatten().abs().topk(k).indices] = True
    return mask.view(w.shape)


def make_method(name: str, params: list[nn.Parameter], projector: Projector, steps: int, every: int):
    """The method `name` over `steps` optimizer steps, projecting every `every` steps."""
    classes = {"admm": Admm, "uniform": Uniform, "sequential": Sequential}
    if name not in classes:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return classes[name](params, projector, steps, every)

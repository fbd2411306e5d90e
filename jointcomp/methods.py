"""How the compressed layers are trained: jointcomp's ADMM, and two baselines.

Every method is driven by the Compressor (compressor.py) over the same steps of the same
training loop, and answers the same hooks: `before_step` (projections; it sees the live
target first at every step), `after_step` (after each optimizer step), `deployable` (the model that would
ship now, projected at a budget) and `fix_allocation`. Methods differ only in how they choose the
allocation (which weights to keep, how many bits each layer gets) during their first phase;
from `fix_allocation` on (the schedule's `retrain_start`, schedule.py) every method trains its allocation the same
way (`Method`): first the kept weights retrain behind their quantized values, then
(`fix_codes`) only the codebooks train. So the bench compares allocations, not recipes.

* admm: the paper's method with the joint projection (projector.py).
* uniform: one global density and one bitwidth for every layer, chosen to hit the target
  with the least error; magnitude pruning, then training with the masks fixed.
* sequential: prune first (knapsack with one bitwidth for every layer) and train with the
  masks fixed; at `fix_allocation`, choose bitwidths for the kept weights (knapsack) and quantize.
"""
from __future__ import annotations

import torch
from torch import nn

from .projector import Allocation, Projector
from .budget import BIT_CHOICES, Budget
from .projections import assign, dequantize

METHODS: dict[str, type[Method]] = {}  # name -> class, in the order registered (admm first)


def register_method(name: str):
    """Class decorator: offer a Method subclass under `name` (the CLI's --method, the app)."""
    def register(cls: type[Method]) -> type[Method]:
        METHODS[name] = cls
        return cls
    return register


@torch.no_grad()
def snap(params: list[nn.Parameter], alloc: Allocation, latent: list[torch.Tensor] | None = None) -> None:
    """Shared-centroid step (Deep Compression): every centre moves by the mean of its members'
    updates since the last step, and every weight becomes its centre (zeros stay zero).
    With `latent` (straight-through retraining) each weight first joins the centre nearest to
    its latent weight, so codes can move; latent weights are held within the codebook's range
    (as BinaryConnect clips them), so every one stays a few steps from changing its code."""
    for i, (p, mask) in enumerate(zip(params, alloc.masks)):
        update = torch.masked_select(p.detach().float() - alloc.values[i], mask)
        book = alloc.codebooks[i]
        codes = alloc.codes[i] if latent is None else assign(torch.masked_select(latent[i], mask).float(), book)
        total = torch.zeros_like(book).index_add_(0, codes, update)
        count = torch.zeros_like(book).index_add_(0, codes, torch.ones_like(update))
        book = book + total / count.clamp(min=1)
        if latent is not None:  # keep it sorted for the next assignment
            book, order = book.sort()
            codes = order.argsort()[codes]
            torch.clamp(latent[i], book[0], book[-1], out=latent[i]).mul_(mask)
        alloc.codebooks[i], alloc.codes[i] = book, codes
        value = alloc.values[i] = dequantize(mask, book, codes)
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


class Method:
    """What every method shares: training a fixed allocation in its deployed shape (from
    `fix_allocation` on), its state, and the defaults of the hooks. Subclasses choose the allocation."""

    first_phase: str  # the records' name of the phase before `fix_allocation` ("admm", "prune")

    def __init__(self, params: list[nn.Parameter], projector: Projector, every: int) -> None:
        self.params = params
        self.projector = projector
        self.every = every
        self.fixed: Allocation | None = None  # the fixed allocation, from `fix_allocation` on
        self.latent: list[torch.Tensor] | None = None  # while retraining: the weights behind the quantized ones
        self.books: torch.Tensor | None = None  # of the last joint projection's option tables: the next one's warm start

    def before_step(self, step: int, budget: Budget) -> tuple[float, float] | None:
        """Projections due at this step (before `fix_allocation`, if both are due); their two
        multipliers when there was one."""
        return None

    @torch.no_grad()
    def after_step(self, lr: float, rho: float) -> None:
        """Once the allocation is fixed, the shared-centroid step; while retraining, the
        optimizer's step first moves the latent weights (straight-through)."""
        assert self.fixed is not None
        if self.latent is not None:
            for p, w, value, mask in zip(self.params, self.latent, self.fixed.values, self.fixed.masks):
                w.add_(p.detach().float() - value).mul_(mask)
        snap(self.params, self.fixed, self.latent)

    @torch.no_grad()
    def fix_allocation(self, alloc: Allocation, retrain: bool = False) -> None:
        """From now on train in the deployed shape: masks and bits fixed, pruned weights
        exactly zero, each centre the mean of its members. `retrain`: the kept weights go
        on training behind their quantized values (straight-through), so code assignments
        still move, until `fix_codes`."""
        self.latent = [w * mask for w, mask in zip(self.weights(), alloc.masks)] if retrain else None
        self.fixed = alloc
        snap(self.params, alloc, self.latent)

    @property
    def retraining(self) -> bool:
        """Whether code assignments still move (between `fix_allocation(..., retrain=True)` and `fix_codes`)."""
        return self.latent is not None

    def fix_codes(self) -> None:
        """End retraining: from now on code assignments are fixed too (the final phase)."""
        self.latent = None

    def weights(self) -> list[torch.Tensor]:
        """The trained weights: while retraining, the latent ones behind the quantized weights."""
        return self.latent if self.latent is not None else [p.detach().float() for p in self.params]

    def deployable(self, budget: Budget) -> Allocation:
        raise NotImplementedError

    def density(self) -> torch.Tensor:
        """Kept fraction per layer (what the file's positions will cost)."""
        return torch.tensor([float((p.detach() != 0).double().mean()) for p in self.params], dtype=torch.float64)

    def residuals(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per layer: primal residual and dual norm (zero for methods without ADMM)."""
        zeros = torch.zeros(len(self.params), dtype=torch.float64)
        return zeros, zeros

    def state_dict(self) -> dict:
        return {"fixed": allocation_state(self.fixed), "latent": self.latent}

    def load_state_dict(self, state: dict) -> None:
        self.fixed = allocation_from_state(state["fixed"], self.params)
        device = self.params[0].device
        self.latent = None if state["latent"] is None else [w.to(device) for w in state["latent"]]


@register_method("admm")
class Admm(Method):
    """The paper's ADMM with one joint projection: W (the trained weights), V (their
    projection onto the budget) and U (the scaled dual variable) of every compressed layer."""

    first_phase = "admm"

    def __init__(self, params: list[nn.Parameter], projector: Projector, every: int) -> None:
        super().__init__(params, projector, every)
        self.V = [torch.zeros_like(p, dtype=torch.float32) for p in params]
        self.U = [torch.zeros_like(p, dtype=torch.float32) for p in params]

    @torch.no_grad()
    def before_step(self, step: int, budget: Budget) -> tuple[float, float] | None:
        """Every `every` steps: V <- the joint projection of W + U; U <- U + W - V. Returns the
        two multipliers (pruning cut score, joint price of a bit), in squared error per bit.
        The first projection (step 0) chooses everything; each later one starts its k-means fits
        from the previous one's codebooks, as W + U moves little between projections."""
        if self.fixed is not None or step % self.every:
            return None
        x = [p.detach().float() + u for p, u in zip(self.params, self.U)]
        tables = self.projector.joint_tables(x, self.books)
        self.books = tables.books
        alloc = self.projector.joint(x, budget, tables)
        self.V = alloc.values
        for p, v, u in zip(self.params, self.V, self.U):
            u.add_(p.detach().float() - v)
        return alloc.lambda_prune, alloc.lambda_quant

    @torch.no_grad()
    def after_step(self, lr: float, rho: float) -> None:
        """The proximal step of the augmented term, W <- (W + lr rho (V - U)) / (1 + lr rho)."""
        if self.fixed is not None:
            return super().after_step(lr, rho)
        a = lr * rho
        for p, v, u in zip(self.params, self.V, self.U):
            p.add_(v - u, alpha=a).div_(1 + a)

    def deployable(self, budget: Budget) -> Allocation:
        """The model that would ship now: the joint projection of the trained weights (its fits
        started from the last projection's)."""
        weights = self.weights()
        return self.projector.joint(weights, budget, self.projector.shared_tables(weights, self.books))

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
        return {**super().state_dict(), "V": self.V, "U": self.U, "books": self.books}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        device = self.params[0].device
        self.V = [v.to(device) for v in state["V"]]
        self.U = [u.to(device) for u in state["U"]]
        self.books = None if state["books"] is None else state["books"].to(device)


class _PruneFirst(Method):
    """Shared by the baselines: masks chosen at the start (again whenever the target moves)
    and held while training; bitwidths and codebooks fitted to the kept weights at `fix_allocation`."""

    first_phase = "prune"

    def __init__(self, params: list[nn.Parameter], projector: Projector, every: int) -> None:
        super().__init__(params, projector, every)
        self.budget = float("nan")  # the bits the masks were chosen for
        self.masks: list[torch.Tensor] = []
        self.bits: torch.Tensor | None = None  # None: chosen by the bitwidth knapsack at `fix_allocation`

    def choose(self, weights: list[torch.Tensor], budget: Budget) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """The masks (and the bitwidths, if already decided) for this budget."""
        raise NotImplementedError

    @torch.no_grad()
    def before_step(self, step: int, budget: Budget) -> tuple[float, float] | None:
        if budget.bits != self.budget:  # the start, or a moved target (then `fix_allocation` follows, if past it)
            self.masks, self.bits = self.choose(self.weights(), budget)
            self.budget = budget.bits
        return None

    @torch.no_grad()
    def after_step(self, lr: float, rho: float) -> None:
        if self.fixed is not None:
            return super().after_step(lr, rho)
        for p, m in zip(self.params, self.masks):
            p.mul_(m)

    def deployable(self, budget: Budget) -> Allocation:
        """The kept weights quantized, with the chosen bits or bits from the knapsack. The
        masks are those chosen for the target; only a smaller budget chooses others."""
        weights = self.weights()
        masks, bits = (self.masks, self.bits) if budget.bits >= self.budget else self.choose(weights, budget)
        return self.projector.quantize(weights, masks, budget, bits=bits)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "budget": self.budget, "masks": self.masks, "bits": self.bits}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.budget, self.masks, self.bits = float(state["budget"]), state["masks"], state["bits"]


@register_method("uniform")
class Uniform(_PruneFirst):
    """One density and one bitwidth for all layers (the pair with the least error), by magnitude."""

    def choose(self, weights: list[torch.Tensor], budget: Budget) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        numel = self.projector.numel
        best, best_err = None, float("inf")
        for b in BIT_CHOICES:
            bits = self.projector.clamp_bits(torch.full((len(weights),), b))
            unit, room = self.projector.room(bits, budget)
            density = room / float((unit * numel).sum())
            if density <= 0:
                continue
            keep = [max(1, min(int(n), int(density * n))) for n in numel.tolist()]
            masks = [_top_k_mask(w, k) for w, k in zip(weights, keep)]
            alloc = self.projector.quantize(weights, masks, budget, bits=bits)
            if alloc.size_bits > budget.bits:
                continue
            err = sum(float((w - q).square().sum()) for w, q in zip(weights, alloc.values))
            if err < best_err:
                best, best_err = (masks, bits), err
        if best is None:
            raise ValueError("no uniform density and bitwidth fits this target; try a larger one")
        return best


@register_method("sequential")
class Sequential(_PruneFirst):
    """Prune by the knapsack at one bitwidth for every layer; bitwidths by the knapsack later."""

    def choose(self, weights: list[torch.Tensor], budget: Budget) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        masks, _ = self.projector.prune(weights, self.projector.initial_bits(weights, budget), budget)
        return masks, None


def _top_k_mask(w: torch.Tensor, k: int) -> torch.Tensor:
    mask = torch.zeros(w.numel(), dtype=torch.bool, device=w.device)
    mask[w.detach().flatten().abs().topk(k).indices] = True
    return mask.view(w.shape)


def make_method(name: str, params: list[nn.Parameter], projector: Projector, every: int) -> Method:
    """The method `name`, projecting every `every` steps."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[name](params, projector, every)

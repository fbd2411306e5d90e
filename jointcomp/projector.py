"""Layer-level projections: the tensor math of `solvers.py` turned into per-layer
masks, bitwidths and codebooks under a budget (`budget.Budget`: the bits to fit and the densities
positions are priced at), honouring each layer's bounds and the size accounting in force."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .budget import BIT_CHOICES, Budget, LayerBounds, Accounting
from .solvers import (FIT_SAMPLE, Link, OptionTables, assign, dequantize, fit_codebooks_many, joint_options_many,
                      knapsack_prune, solve_mckp_greedy, useless_weights)


TABLES_KEPT = 2  # option tables a projector remembers: an epoch's deployable model's and its what-ifs'


def fingerprint(weights: list[torch.Tensor]) -> torch.Tensor:
    """Per tensor: its sum, absolute sum and non-zero count (in double), on the CPU; equal for
    two lists of weights exactly when (in any practical case) their values are."""
    return torch.stack([torch.stack([w.double().sum(), w.double().abs().sum(), (w != 0).double().sum()])
                        for w in weights]).cpu()


@dataclass(frozen=True)
class LayerSpec:
    """A compressed layer: its weight's name in the model, size and bounds."""

    name: str
    shape: tuple[int, ...]
    bounds: LayerBounds = field(default_factory=LayerBounds)

    @property
    def numel(self) -> int:
        return int(torch.Size(self.shape).numel())


@dataclass
class Allocation:
    """What a projection decided: kept weights, bitwidths, codebooks and quantized values."""

    masks: list[torch.Tensor]
    bits: torch.Tensor
    codebooks: list[torch.Tensor]
    codes: list[torch.Tensor]  # index into the codebook of every kept weight, in flat order
    values: list[torch.Tensor]  # the quantized weights, zeros where pruned
    size_bits: float
    lambda_prune: float
    lambda_quant: float
    state: dict[str, torch.Tensor] = field(default_factory=dict)  # other tensors of the model this allocation
    # sets (by state-dict name): BatchNorm statistics re-estimated for it

    @property
    def nnz(self) -> torch.Tensor:
        return torch.tensor([int(m.sum()) for m in self.masks])


class Projector:
    """Projections of a model's compressed layers onto the size budget."""

    def __init__(
        self, specs: list[LayerSpec], accounting: Accounting, reserved_bits: float = 0.0,
        links: list[Link] | None = None,
    ) -> None:
        self.specs = specs
        self.accounting = accounting
        self.reserved_bits = reserved_bits  # layers left dense, and any fixed overhead
        self.links = links or []  # which layer reads which one's units (links.py)
        self.numel = torch.tensor([s.numel for s in specs], dtype=torch.float64)
        self.min_keep = [s.bounds.min_keep(s.numel) for s in specs]
        lo = torch.tensor([s.bounds.min_bits for s in specs])
        hi = torch.tensor([s.bounds.max_bits for s in specs])
        choices = torch.tensor(list(BIT_CHOICES))
        self.allowed = (choices[None, :] >= lo[:, None]) & (choices[None, :] <= hi[:, None])
        self._tables: list[tuple[torch.Tensor, torch.Tensor | None, OptionTables]] = []  # (fingerprint, starts, tables)

    def clamp_bits(self, bits: torch.Tensor) -> torch.Tensor:
        lo = torch.tensor([s.bounds.min_bits for s in self.specs])
        hi = torch.tensor([s.bounds.max_bits for s in self.specs])
        return bits.clamp(lo, hi)

    def room(self, bits: torch.Tensor, budget: Budget) -> tuple[torch.Tensor, float]:
        """Cost of one kept weight per layer, and the budget left for kept weights."""
        unit = self.accounting.weight_bits(bits, self.numel, budget.density)
        return unit, budget.bits - self.reserved_bits - float(self.accounting.layer_bits(bits, self.numel).sum())

    def uniform_density(self, b: int, budget: Budget) -> tuple[torch.Tensor, float]:
        """Every layer at `b` bits (within its bounds), and the one kept fraction that fills the
        budget left at those bits (0 or less: nothing fits)."""
        bits = self.clamp_bits(torch.full((len(self.specs),), b))
        unit, room = self.room(bits, budget)
        return bits, room / float((unit * self.numel).sum())

    def fits(self, bits: torch.Tensor, budget: Budget) -> bool:
        """Whether every layer can keep its fewest weights at these bitwidths."""
        unit, room = self.room(bits, budget)
        return float((unit * torch.tensor(self.min_keep, dtype=torch.float64)).sum()) <= room

    def prune(
        self, weights: list[torch.Tensor], bits: torch.Tensor, budget: Budget
    ) -> tuple[list[torch.Tensor], float]:
        """Knapsack masks for these bitwidths; the multiplier at the cut. Weights that read a
        unit the masks leave without inputs (`useless_weights`) give their budget to others."""
        if not self.fits(bits, budget):
            raise ValueError("the budget cannot hold one weight per layer at these bitwidths")
        unit, room = self.room(bits, budget)
        masks, lam = knapsack_prune(weights, unit.tolist(), room, self.min_keep)
        useless = useless_weights(masks, self.links)
        if any(u.any() for u in useless):
            weights = [w.detach().masked_fill(u, 0) for w, u in zip(weights, useless)]
            masks, lam = knapsack_prune(weights, unit.tolist(), room, self.min_keep)
        return masks, lam

    def quantize(
        self,
        values: list[torch.Tensor],
        masks: list[torch.Tensor],
        budget: Budget,
        bits: torch.Tensor | None = None,
    ) -> Allocation:
        """Codebooks for the kept values; bitwidths chosen by the knapsack unless given."""
        nnz = torch.tensor([int(m.sum()) for m in masks], dtype=torch.float64)
        kept = [torch.masked_select(v.detach(), m) for v, m in zip(values, masks)]
        choices = list(BIT_CHOICES)
        lam = 0.0
        if bits is None:
            books, dist = fit_codebooks_many(kept, torch.tensor([choices] * len(kept)), sample=FIT_SAMPLE)
            options = torch.tensor(choices)[None, :].expand(len(masks), -1)
            cost = self.accounting.weight_bits(options, self.numel[:, None], budget.density) * nnz[:, None]
            cost = cost + self.accounting.layer_bits(options, self.numel[:, None])
            cost = torch.where(self.allowed, cost, torch.inf)
            room = budget.bits - self.reserved_bits
            pick, lam = solve_mckp_greedy(cost, dist, room)
            bits = torch.tensor(choices)[pick]
            codebooks = [layer[int(i)] for layer, i in zip(books, pick)]
        else:
            codebooks = [layer[0] for layer in fit_codebooks_many(kept, bits.long()[:, None], sample=FIT_SAMPLE)[0]]
        codes = [assign(k, c) for k, c in zip(kept, codebooks)]
        quantized = [dequantize(m, book, c) for m, book, c in zip(masks, codebooks, codes)]
        size = self.accounting.size_bits(bits, nnz, self.numel, budget.density) + self.reserved_bits
        return Allocation(masks, bits, codebooks, codes, quantized, size, 0.0, lam)

    def joint_tables(self, weights: list[torch.Tensor], starts: torch.Tensor | None = None) -> OptionTables:
        """Each layer's (kept counts, errors) options (`projections.joint_options_many`); `starts`,
        the `books` of a previous projection's tables, warm-start the fits."""
        return joint_options_many(weights, list(BIT_CHOICES), self.min_keep, starts=starts)

    def shared_tables(self, weights: list[torch.Tensor], starts: torch.Tensor | None = None) -> OptionTables:
        """`joint_tables`, remembered: they depend on the weights and starts only, so the last
        TABLES_KEPT are kept with the weights' fingerprint, and the same weights and starts again
        (each try of `trim_to_fit`, an epoch's trade-off curve after its deployable model, the
        slider's what-ifs) get them back instead of fitting anew, with the same result."""
        key = fingerprint(weights)
        kept = self._tables  # one read: the app's what-ifs ask from another thread
        for seen, seen_starts, tables in kept:
            if seen_starts is starts and torch.equal(seen, key):
                return tables
        tables = self.joint_tables(weights, starts)
        self._tables = [*kept, (key, starts, tables)][-TABLES_KEPT:]
        return tables

    def joint_bits(self, weights: list[torch.Tensor], budget: Budget,
                   tables: OptionTables | None = None) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Bitwidths and kept counts of the options the joint projection picks, and its multiplier.

        Every layer offers (kept count, bitwidth) options, each with its pruning plus
        quantization error and its cost in the budget's accounting; one multiplier prices
        a bit of budget in squared error, and each layer takes the option that minimises
        error + multiplier x cost (the multiple-choice knapsack on convex hulls). So a layer
        can trade kept weights for bits in either direction, whatever its bits were before.
        """
        choices = list(BIT_CHOICES)
        tables = (tables if tables is not None else self.joint_tables(weights)).layers
        width = max(len(keeps) for keeps, _ in tables) * len(choices)
        inf = torch.tensor(float("inf"), dtype=torch.float64)
        bits = torch.ones(len(tables), width, dtype=torch.long)
        keep = torch.ones(len(tables), width, dtype=torch.float64)
        dist = torch.zeros(len(tables), width, dtype=torch.float64)
        allowed = torch.zeros(len(tables), width, dtype=torch.bool)
        for j, (keeps, err) in enumerate(tables):
            n = err.numel()
            bits[j, :n] = torch.tensor(choices).repeat(len(keeps))
            keep[j, :n] = keeps.double().repeat_interleave(len(choices))
            dist[j, :n] = err.flatten()
            allowed[j, :n] = self.allowed[j].repeat(len(keeps))
        cost = self.accounting.weight_bits(bits, self.numel[:, None], budget.density) * keep
        cost = cost + self.accounting.layer_bits(bits, self.numel[:, None])
        cost = torch.where(allowed, cost, inf)
        pick, lam = solve_mckp_greedy(cost, dist, budget.bits - self.reserved_bits)
        rows = torch.arange(len(tables))
        return bits[rows, pick], keep[rows, pick].long(), lam

    def joint(self, weights: list[torch.Tensor], budget: Budget, tables: OptionTables | None = None) -> Allocation:
        """The joint projection: bitwidths from `joint_bits`, then the kept weights that fill
        the budget exactly at those bitwidths (knapsack), then a codebook per layer."""
        bits, _, lam = self.joint_bits(weights, budget, tables)
        alloc = self.prune_and_quantize(weights, bits, budget)
        alloc.lambda_quant = lam
        return alloc

    def prune_and_quantize(self, weights: list[torch.Tensor], bits: torch.Tensor, budget: Budget) -> Allocation:
        """The deployable model: prune at these bitwidths, then a fresh codebook per layer."""
        masks, lam_prune = self.prune(weights, bits, budget)
        alloc = self.quantize(weights, masks, budget, bits=bits)
        alloc.lambda_prune = lam_prune
        if alloc.size_bits > budget.bits * (1 + 1e-12):
            raise RuntimeError(
                f"internal error: deployable size {alloc.size_bits:.0f} bits exceeds the "
                f"budget of {budget.bits:.0f} bits; please report this"
            )
        return alloc

    def initial_bits(self, weights: list[torch.Tensor], budget: Budget) -> torch.Tensor:
        """The uniform bitwidth whose deployable weights are closest to `weights`.

        The paper asks the user for an average bitwidth; we take one target only, so we
        start from the uniform bitwidth with the least pruning-plus-quantization error.
        """
        best, best_err = None, float("inf")
        for b in BIT_CHOICES:
            bits = self.clamp_bits(torch.full((len(self.specs),), b))
            if not self.fits(bits, budget):
                continue
            alloc = self.prune_and_quantize(weights, bits, budget)
            err = sum(float((w.detach() - q).square().sum()) for w, q in zip(weights, alloc.values))
            if err < best_err:
                best, best_err = bits, err
        assert best is not None
        return best


def top_k_mask(score: torch.Tensor, k: int) -> torch.Tensor:
    """The `k` entries of largest |score| kept."""
    mask = torch.zeros(score.numel(), dtype=torch.bool, device=score.device)
    mask[score.detach().flatten().abs().topk(k).indices] = True
    return mask.view(score.shape)

"""What every method shares: what it is given (`Layers`), the hooks the Compressor drives
(`calibrate`, `project`, `after_step`, `fix_allocation`), the pure `allocate` (these weights to this
budget, changing nothing: the what-if, the trade-off curve and the final model all call it), and
training a fixed allocation in its deployed shape.

From `fix_allocation` on (the schedule's `retrain_start`, schedule.py) every method trains its
allocation the same way: first the kept weights retrain behind their quantized values (codes
that keep flipping back frozen, oscillations.py), then (`fix_codes`) only the codebooks train.
So the bench compares allocations, not recipes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch import nn

from ..projector import Allocation, Projector
from ..budget import Budget
from ..solvers import assign, dequantize
from .oscillations import Oscillations

ProgressCallback = Callable[[float, str], None]  # told (fraction done, what is being done) by a long step: the app's bars


def part_of(progress: ProgressCallback | None, start: float, end: float, what: str = "") -> ProgressCallback | None:
    """`progress` told of one part of a longer piece of work: the part's fractions mapped onto
    [`start`, `end`] of the whole, its texts led by `what`. None stays None (the step's own default)."""
    if progress is None:
        return None
    return lambda fraction, text: progress(start + (end - start) * fraction, f"{what}: {text}" if what else text)


def never_back(progress: ProgressCallback | None) -> ProgressCallback | None:
    """`progress` told the furthest fraction heard so far: a step that starts a piece of work over
    (a search that drafts again) holds the bar where it was instead of moving it back."""
    if progress is None:
        return None
    furthest = 0.0

    def report(fraction: float, text: str) -> None:
        nonlocal furthest
        furthest = max(furthest, fraction)
        progress(furthest, text)
    return report


@torch.no_grad()
def snap(params: list[nn.Parameter], alloc: Allocation, latent: list[torch.Tensor] | None = None,
         oscillations: Oscillations | None = None) -> None:
    """Shared-centroid step (Deep Compression): every centre moves by the mean of its members'
    updates since the last step, and every weight becomes its centre (zeros stay zero).
    With `latent` (straight-through retraining) each weight first joins the centre nearest to
    its latent weight, so codes can move; latent weights are held within the codebook's range
    (as BinaryConnect clips them), so every one stays a few steps from changing its code;
    `oscillations` freezes the codes that keep flipping back (oscillations.py)."""
    for i, (p, mask) in enumerate(zip(params, alloc.masks)):
        update = torch.masked_select(p.detach().float() - alloc.values[i], mask)
        book = alloc.codebooks[i]
        codes = alloc.codes[i] if latent is None else assign(torch.masked_select(latent[i], mask).float(), book)
        if oscillations is not None:
            codes = oscillations.follow(i, codes)
        total = torch.zeros_like(book).index_add_(0, codes, update)
        count = torch.zeros_like(book).index_add_(0, codes, torch.ones_like(update))
        book = book + total / count.clamp(min=1)
        if latent is not None:  # keep it sorted for the next assignment
            book, order = book.sort()
            new_index = order.argsort()
            codes = new_index[codes]
            if oscillations is not None:
                oscillations.renumber(i, new_index)
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


@dataclass
class Layers:
    """What a method is given: the model, its compressed layers (weight names and parameters, in
    model order) and the projector that prices them in the budget's accounting."""

    model: nn.Module
    names: list[str]
    params: list[nn.Parameter]
    projector: Projector


@dataclass
class MethodConfig:
    """A method's own settings (`CompressorConfig.settings`); a method with some subclasses it."""


class Method:
    """What every method shares: training a fixed allocation in its deployed shape (from
    `fix_allocation` on), its state, and the defaults of the hooks. Subclasses choose the allocation."""

    Config: type[MethodConfig] = MethodConfig  # its settings
    first_phase: str  # the records' name of the phase before `fix_allocation` ("admm", "prune")
    trains = True  # False: the method compresses without training (no steps, `calibrate` then `allocate`)
    measured_budgets = False  # whether its allocations can be trimmed to a measured size (the file, flash modes)
    drafts = False  # whether `draft` is cheaper than `allocate` (a budget that fits is searched on drafts)

    def __init__(self, layers: Layers, config: MethodConfig | None = None) -> None:
        self.config = config or self.Config()
        self.layers = layers
        self.params = layers.params
        self.projector = layers.projector
        self.fixed: Allocation | None = None  # the fixed allocation, from `fix_allocation` on
        self.latent: list[torch.Tensor] | None = None  # while retraining: the weights behind the quantized ones
        self.oscillations: Oscillations | None = None  # while retraining: whose codes flip back and forth
        self.books: torch.Tensor | None = None  # of the last joint projection's option tables: the next one's warm start

    def calibrate(self, batches: Iterable, progress: ProgressCallback | None = None,
                  reuse: "Method | None" = None) -> None:
        """See the network's inputs (batches of model inputs): a method that prices its options
        by what they do to its layers' outputs measures that here, telling `progress` how far it
        is, or takes what `reuse` (the same method, calibrated before) measured where it saw the
        same. The training methods need none."""

    def project(self, budget: Budget) -> tuple[float, float] | None:
        """A projection onto `budget`, due now (the Compressor's schedule says when, until
        `fix_allocation`); its two multipliers when it has them."""
        return None

    @classmethod
    def settings(cls, given: dict[str, Any]) -> MethodConfig:
        """This method's config from `given` (names of its fields), refused in one line when wrong."""
        fields = list(cls.Config.__dataclass_fields__)
        unknown = sorted(set(given) - set(fields))
        if unknown:
            have = f"its settings are {', '.join(fields)}" if fields else "it has none"
            raise ValueError(f"{', '.join(unknown)} is not a setting of method {cls.__name__.lower()} ({have})")
        return cls.Config(**given)

    @torch.no_grad()
    def after_step(self, lr: float) -> None:
        """Once the allocation is fixed, the shared-centroid step; while retraining, the
        optimizer's step first moves the latent weights (straight-through)."""
        assert self.fixed is not None
        if self.latent is not None:
            for p, w, value, mask in zip(self.params, self.latent, self.fixed.values, self.fixed.masks):
                w.add_(p.detach().float() - value).mul_(mask)
        snap(self.params, self.fixed, self.latent, self.oscillations)

    @torch.no_grad()
    def fix_allocation(self, alloc: Allocation, retrain: bool = False) -> None:
        """From now on train in the deployed shape: masks and bits fixed, pruned weights
        exactly zero, each centre the mean of its members. `retrain`: the kept weights go
        on training behind their quantized values (straight-through), so code assignments
        still move, until `fix_codes`; those that keep flipping back are frozen (oscillations.py)."""
        self.latent = [w * mask for w, mask in zip(self.weights(), alloc.masks)] if retrain else None
        self.oscillations = Oscillations(alloc.codes) if retrain else None
        self.fixed = alloc
        snap(self.params, alloc, self.latent, self.oscillations)

    @property
    def retraining(self) -> bool:
        """Whether code assignments still move (between `fix_allocation(..., retrain=True)` and `fix_codes`)."""
        return self.latent is not None

    def fix_codes(self) -> int:
        """End retraining: from now on code assignments are fixed too (the final phase). Returns
        how many codes retraining froze for flipping back and forth."""
        frozen = 0 if self.oscillations is None else self.oscillations.frozen_count()
        self.latent = self.oscillations = None
        return frozen

    def weights(self) -> list[torch.Tensor]:
        """The trained weights: while retraining, the latent ones behind the quantized weights."""
        return self.latent if self.latent is not None else [p.detach().float() for p in self.params]

    def allocate(self, budget: Budget, progress: ProgressCallback | None = None) -> Allocation:
        """The model that would ship now at `budget`: the trained weights allocated to it by
        this method's own rule. Pure: it changes no state of the method or the model. A method
        whose allocation takes long (posttrain's reconstructions) tells `progress` how far it is."""
        raise NotImplementedError

    def draft(self, budget: Budget, progress: ProgressCallback | None = None) -> Allocation:
        """The masks and bits `allocate(budget)` gives, made more cheaply where the method can
        (`drafts`): what a search for the budget that fits a measured size tries."""
        return self.allocate(budget, progress)

    def sketch(self, budget: Budget) -> Allocation:
        """A quick, rougher `allocate(budget)` for a preview where the method has one (posttrain's);
        else the draft."""
        return self.draft(budget)

    def density(self) -> torch.Tensor:
        """Kept fraction per layer (what the file's positions will cost)."""
        return torch.tensor([float((p.detach() != 0).double().mean()) for p in self.params], dtype=torch.float64)

    def residuals(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per layer: primal residual and dual norm (zero for methods without ADMM)."""
        zeros = torch.zeros(len(self.params), dtype=torch.float64)
        return zeros, zeros

    def state_dict(self) -> dict:
        return {"fixed": allocation_state(self.fixed), "latent": self.latent,
                "oscillations": None if self.oscillations is None else self.oscillations.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.fixed = allocation_from_state(state["fixed"], self.params)
        device = self.params[0].device
        self.latent = None if state["latent"] is None else [w.to(device) for w in state["latent"]]
        self.oscillations = None if state["oscillations"] is None else Oscillations.from_state(state["oscillations"], device)


class PruneFirst(Method):
    """Shared by the baselines: masks chosen at the start (again whenever the target moves)
    and held while training; bitwidths and codebooks fitted to the kept weights at `fix_allocation`."""

    first_phase = "prune"

    def __init__(self, layers: Layers, config: MethodConfig | None = None) -> None:
        super().__init__(layers, config)
        self.budget = float("nan")  # the bits the masks were chosen for
        self.masks: list[torch.Tensor] = []
        self.bits: torch.Tensor | None = None  # None: chosen by the bitwidth knapsack at `fix_allocation`

    def choose(self, weights: list[torch.Tensor], budget: Budget) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """The masks (and the bitwidths, if already decided) for this budget."""
        raise NotImplementedError

    @torch.no_grad()
    def project(self, budget: Budget) -> tuple[float, float] | None:
        if budget.bits != self.budget:  # the start, or a moved target (then `fix_allocation` follows, if past it)
            self.masks, self.bits = self.choose(self.weights(), budget)
            self.budget = budget.bits
        return None

    @torch.no_grad()
    def after_step(self, lr: float) -> None:
        if self.fixed is not None:
            return super().after_step(lr)
        for p, m in zip(self.params, self.masks):
            p.mul_(m)

    def allocate(self, budget: Budget, progress: ProgressCallback | None = None) -> Allocation:
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

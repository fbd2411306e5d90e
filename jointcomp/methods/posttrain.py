"""posttrain: compression without training, from a few hundred calibration inputs.

A compressed layer's inputs X on the calibration set give H = X^T X (for a convolution, of its
unfolded patches): a change dW of its weight changes its output by tr(dW H dW^T), the measure of
OBS, OBC, GPTQ and SparseGPT. With d_i the i-th diagonal entry of the Cholesky factor of H^-1,
removing weight w of input column i after the columns before it were corrected costs about
(w / d_i)^2 (GPTQ's per-column loss). So:

* `calibrate`: one forward pass of the dense network on the whole calibration set records every
  compressed layer's inputs, every BatchNorm's input moments and the outputs (`_Dense`: what each
  reconstruction aims at; refused past DENSE_RECORD_BOUND bytes) and gives every layer's H; each
  layer's sensitivity (how far the network's outputs move per unit of its relative output error),
  and meanwhile, in a thread of their own, each layer's option table: for every (kept count, bits),
  keep the weights of largest (w / d)^2, fit a k-means codebook to them and reconstruct a sample of
  rows for real; its output error in the network's unit. Nothing here depends on the target.
* `allocate(budget)`: the multiple-choice knapsack over those tables (the one admm's joint
  projection uses) picks each layer's bits and kept count, the pruning knapsack on (w / d)^2 fills
  what is left of the budget exactly (and two more candidates: admm's magnitude projection, one
  bitwidth for every layer; the one whose outputs are closest to the dense network's is kept); each
  layer's kept weights are reconstructed column by column with the inverse of its H onto its
  codebook, fitted to its kept dense weights (GPTQ with a mask and a non-uniform codebook; each
  row keeps in each block of 128 columns as many weights as the mask, chosen when the loop
  reaches it, after SparseGPT); then
  BatchNorm statistics either moved by the shift compression made in their inputs or measured
  anew, whichever brings the outputs closer to the dense network's. The model itself never changes.
* `sketch(budget)`: the first of those candidates alone, reconstructed on dense inputs, its BatchNorm
  statistics chosen on one calibration batch: three forward passes of that batch, what the app's
  slider shows at once on a large network.

The candidates are compared reconstructed on each layer's inputs in the dense network (H measured
once). The one kept is then reconstructed in order: each layer on the inputs Y that the
already-compressed layers before it give, aimed at the dense layer's outputs on its dense inputs X
(least squares through the cross moment X^T Y, then GPTQ with Y's H), so that each layer makes up
for the errors of those before it; the BatchNorms before each layer have their statistics moved
first, so that its inputs are normalized as they will be (aimed through stale statistics, a
conv-BN network's outputs ended farther from the dense ones than without the pass). Of the two
reconstructions the one whose outputs are closer to the dense network's is kept: in order on the
convolutional networks measured, on dense inputs for a GPT at 16x (BENCHMARKS.md). The pass is one
forward pass of the compressed copy on the whole calibration set, each layer reconstructed by a hook
as the pass reaches it (the dense inputs X come from the record); aiming each layer at its own
outputs on Y, as GPTQ does, was no better than the dense inputs.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import math
import threading
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Callable, Iterable, Iterator

import numpy
import torch
from torch import nn
from tqdm import tqdm

from ..budget import BIT_CHOICES, Budget
from ..solvers import OptionTables, assign, fit_codebooks_many, knapsack_prune
from ..projector import Allocation, top_k_mask
from ..recorded_pass import RecordedPass
from .base import Layers, Method, MethodConfig, ProgressCallback

MIN_CALIBRATION = 16  # fewer inputs than this cannot say how a layer's inputs are spread
DAMPING = 0.01  # of the mean diagonal of H, added to it (GPTQ's): a singular H stays invertible
LADDER_POINTS = 12  # kept counts per layer in an option table: a geometric ladder from the fewest to all,
LINEAR_POINTS = 20  # and evenly spaced fractions of all (every 5 %), where most allocations fall
TABLE_ROWS = 16  # rows of a layer reconstructed for real to price each of its options
BLOCK = 128  # columns reconstructed together (GPTQ's lazy batch), each row keeping its share of them
STEP = 16  # columns of a block rounded one by one before the rest of the block is updated in one product
RECONSTRUCTIONS_KEPT = 8  # reconstructions a method remembers (three candidates and the chosen one in order, twice)
SENSITIVITY_NOISE = 0.01  # relative output error of the random change that measures a layer's sensitivity
SENSITIVITY_BATCHES = 1  # calibration batches it is measured on (two were no better: BENCHMARKS.md)
SENSITIVITY_RECORD_BOUND = 1 << 30  # bytes of the dense pass's layer outputs kept to measure it faster
MOMENTS_SHARE = 0.35  # of a calibration's time, its dense pass and layers' input moments (a ResNet-56's 15 s of 41), for progress
CHUNK = 128  # calibration inputs unfolded at a time to measure a layer's moments (as many as a calibration batch)
DENSE_RECORD_BOUND = 4 << 30  # bytes the dense network's recorded layer inputs may take
ORDINALS = ("first", "second", "third")  # of a draft's candidates, for progress


@contextlib.contextmanager
def _intra_op_threads(n: int) -> Iterator[None]:
    """torch's intra-op threads of the calling thread set to `n` for a while, then given back."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def _terminal_bar(what: str) -> Iterator[ProgressCallback]:
    """A progress report drawn as a bar on the terminal (none where output is not one)."""
    with tqdm(total=1.0, desc=what, leave=False, disable=None, bar_format="{desc} {percentage:3.0f}% {bar}") as bar:
        def report(fraction: float, text: str) -> None:
            bar.set_description_str(f"{what}: {text}", refresh=False)
            bar.update(fraction - bar.n)
        yield report


def _reporting(progress: ProgressCallback | None, what: str) -> contextlib.AbstractContextManager[ProgressCallback]:
    """`progress` itself, or (None) a bar on the terminal for `what`."""
    return contextlib.nullcontext(progress) if progress else _terminal_bar(what)


@contextlib.contextmanager
def _hooked(model: nn.Module, hooks: list[tuple[nn.Module, Callable]]) -> Iterator[None]:
    """`model` in eval mode with each (module, forward pre-hook) of `hooks` registered; undone after."""
    handles = [module.register_forward_pre_hook(hook) for module, hook in hooks]
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)


@dataclasses.dataclass
class _Dense:
    """The dense network on the whole calibration set, recorded in one forward pass: the input of
    every module that uses a compressed weight and the per-channel moments of every BatchNorm's
    input (by module name; and on the first calibration batch alone, what a sketch is shifted
    against), and the outputs. What every reconstruction aims at."""

    inputs: dict[str, torch.Tensor]
    norms: dict[str, torch.Tensor]
    first_norms: dict[str, torch.Tensor]
    outputs: torch.Tensor


def check_calibration_count(count: int) -> None:
    """Refuse fewer than MIN_CALIBRATION calibration inputs in one line that says what to do."""
    if count < MIN_CALIBRATION:
        raise ValueError(f"post-training compression needs at least {MIN_CALIBRATION} calibration inputs, got "
                         f"{count}: ask for more (--calibration N), from a training set that has them")


class PostTrain(Method):
    """Compression without training: options priced by output error on calibration inputs,
    one knapsack for the target, the kept weights reconstructed layer by layer."""

    first_phase = "posttrain"
    trains = False
    measured_budgets = True
    drafts = True

    def __init__(self, layers: Layers, config: MethodConfig | None = None) -> None:
        super().__init__(layers, config)
        self.inputs: list[torch.Tensor] = []
        self.users: list[list[str]] = []  # per layer, the names of the modules that use its weight
        self.dense: _Dense | None = None
        self.hessians: list[torch.Tensor] = []  # per layer, H of its inputs in the dense network
        self.factors: list[torch.Tensor] = []  # per layer, the Cholesky factor of its (H + damping)^-1
        self.tables: OptionTables | None = None
        self.scaled: list[torch.Tensor] = []  # w sqrt(unit) / d: the pruning knapsack's scores are their squares
        self._kept: list[tuple[tuple, tuple[Allocation, float]]] = []  # recent reconstructions, by key
        self._drafted: tuple[Budget, Allocation, float, int] | None = None  # the latest `_draft`: its budget and result

    # --- target-independent: the inputs and the option tables -------------------------
    @torch.no_grad()
    def calibrate(self, batches: Iterable, progress: ProgressCallback | None = None, reuse: Method | None = None) -> None:
        """Collect every layer's H on `batches` (model inputs, or (inputs, labels) pairs) and
        build the option tables. `progress(fraction, text)` hears how far it is, from the calling
        thread (default: a bar on the terminal). `reuse`: a posttrain calibrated before (the app's
        what-ifs); where it saw these same inputs through a network with these same weights and
        settings, its results are taken as they are (shared, never written) instead of measured again."""
        device = self.params[0].device
        inputs = [(b[0] if isinstance(b, (tuple, list)) else b).to(device) for b in batches]
        check_calibration_count(sum(len(x) for x in inputs))
        self._drafted = None
        with _reporting(progress, "calibrating") as report:
            if isinstance(reuse, PostTrain) and reuse.saw(self, inputs):
                self.inputs, self.users, self.dense, self.hessians, self.factors, self.tables, self.scaled, self._kept = (
                    inputs, reuse.users, reuse.dense, reuse.hessians, reuse.factors, reuse.tables, reuse.scaled,
                    reuse._kept)
                report(1.0, f"every layer's options as calibrated before ({len(self.params)} layers)")
            else:
                self.inputs = inputs
                self._calibrate(report)

    def saw(self, other: PostTrain, inputs: list[torch.Tensor]) -> bool:
        """Whether this posttrain is calibrated on `inputs`, through a network with `other`'s weights,
        buffers (BatchNorm statistics) and compressed layers, with its settings: what it measured is
        what `other` would."""
        if self.tables is None or self.config != other.config or self.layers.names != other.layers.names:
            return False
        mine, theirs = self.layers.model.state_dict(), other.layers.model.state_dict()
        return (list(mine) == list(theirs)
                and all(mine[k].device == theirs[k].device and torch.equal(mine[k], theirs[k]) for k in mine)
                and self.projector.min_keep == other.projector.min_keep and len(self.inputs) == len(inputs)
                and all(a.device == b.device and torch.equal(a, b) for a, b in zip(self.inputs, inputs)))

    def _calibrate(self, report: ProgressCallback) -> None:
        count = sum(len(x) for x in self.inputs)
        model, modules = self.layers.model, self._modules()
        name_of = {id(m): n for n, m in model.named_modules()}
        self.users = [[name_of[id(m)] for m in users] for users in modules]
        n = len(modules)
        report(0.0, f"one dense pass over {count} calibration inputs")
        self.dense = _record_dense(model, self.users, self.inputs)
        self.hessians = hessians = []
        for users, names in zip(modules, self.users):
            report(MOMENTS_SHARE * len(hessians) / n, f"measuring what layer {len(hessians) + 1} of {n} sees")
            hessians.append(_mean_moments([(m, self.dense.inputs[name], self.dense.inputs[name])
                                           for m, name in zip(users, names)])[1])
        weights = [_grouped(p.detach().float().clone(), len(h)) for p, h in zip(self.params, hessians)]
        self.factors = [_damped_inverse_factor(h).to(w.dtype) for w, h in zip(weights, hessians)]
        tables: list[tuple[torch.Tensor, torch.Tensor]] = []  # filled by the worker, layer by layer

        def priced(sensed: int) -> None:
            report(MOMENTS_SHARE + (1 - MOMENTS_SHARE) * (sensed + len(tables)) / (2 * n),
                   f"pricing each layer's options: {len(tables)} of {n} tables, {sensed} of {n} sensitivities")

        given_up = threading.Event()  # the caller gave up (the app's rerun stops a calibration at its next report)
        # the pool ends first (its tables built or given up): its worker gives back the one thread it began with,
        # and torch's last count set is what later threads begin with, so the caller's must come last
        with _intra_op_threads(max(1, torch.get_num_threads() - 1)), ThreadPoolExecutor(1) as pool:
            building = pool.submit(_option_tables, weights, hessians, self.factors, self.projector.min_keep, tables,
                                   given_up)
            try:
                sensitivity = _sensitivities(model, self.params, hessians, self.inputs[:SENSITIVITY_BATCHES], priced)
                while wait([building], timeout=0.5).not_done:
                    priced(n)
            except BaseException:
                given_up.set()
                raise
            building.result()
        report(1.0, f"every layer's options priced ({n} layers)")
        layers, scaled = [], []
        for p, w, h, factor, (keeps, errors), weight in zip(self.params, weights, hessians, self.factors, tables,
                                                            sensitivity):
            unit = weight / _output_energy(w, h)  # network output error per unit of this layer's tr(dW H dW^T)
            layers.append((keeps, errors * unit))
            d = factor.diagonal(dim1=-2, dim2=-1)[:, None, :]  # removing w costs about (w / d)^2 of output
            scaled.append((_live(w, h) * math.sqrt(unit) / d).reshape(p.shape))
        self.tables, self.scaled, self._kept = OptionTables(layers, torch.empty(0)), scaled, []

    # --- per target -------------------------------------------------------------------
    @torch.no_grad()
    def allocate(self, budget: Budget, progress: ProgressCallback | None = None) -> Allocation:
        """The draft's masks and bits (`draft`), reconstructed in order: each layer on the inputs the
        already-compressed layers before it give (one forward pass); the draft itself where
        its outputs are the closer to the dense network's (a GPT at 16x, BENCHMARKS.md).
        `progress` hears of every layer reconstructed: the candidates' (a draft already made is
        remembered), then the pass in order (default: a bar on the terminal)."""
        with _reporting(progress, "choosing the allocation") as report:
            best, apart, compared = self._draft(budget, report)
            n = len(self.params)
            alloc, in_order = self.reconstruct(best.masks, best.bits, budget, told=lambda k, name: report(
                (compared * n + k) / ((compared + 1) * n), f"reconstructing layer by layer on the compressed "
                f"network's inputs: {k} of {n} ({name})"))
        if apart < in_order:
            return best
        alloc.lambda_prune, alloc.lambda_quant = best.lambda_prune, best.lambda_quant
        return alloc

    @torch.no_grad()
    def draft(self, budget: Budget, progress: ProgressCallback | None = None) -> Allocation:
        """Three candidates for `budget`, each reconstructed on its dense inputs (kept weights onto their
        codebooks, and the BatchNorm statistics for them, `Allocation.state`); the one whose outputs on
        the calibration inputs are closest to the dense network's. The first: bits and kept counts from
        the option tables, masks by (w / d)^2. The second: admm's joint projection of the dense weights
        (magnitude). The third: one bitwidth and one density for every layer (`uniform`). The tables
        price each layer alone, its error in the network's unit measured with a small change; at high
        ratios on networks without BatchNorm errors compound beyond that (LeNet-5 at 537x, BENCHMARKS.md),
        and the measured outputs say which holds. `progress`: as `allocate`'s, which goes on from
        where it ends."""
        with _reporting(progress, "choosing the allocation") as report:
            return self._draft(budget, report)[0]

    def _draft(self, budget: Budget, report: ProgressCallback) -> tuple[Allocation, float, int]:
        """`draft`'s allocation, its outputs' distance from the dense network's and how many candidates
        it compared, telling `report` of each layer reconstructed as a share of `allocate`'s
        reconstructions (the candidates', then one in order).
        The latest is remembered: a budget searched on drafts is then allocated at the same budget
        (`trim_to_fit`), and the candidates' two projections are 0.1-0.3 s of a LeNet-5 what-if's 3 s."""
        if self._drafted is not None and _same_budget(self._drafted[0], budget):
            _, alloc, distance, compared = self._drafted
            return copy.copy(alloc), distance, compared
        candidates = [self._tables_candidate(budget)]
        magnitude = self.projector.joint([p.detach().float() for p in self.params], budget)
        candidates.append((magnitude.masks, magnitude.bits, magnitude.lambda_prune, magnitude.lambda_quant))
        uniform = self._uniform_candidate(budget)
        if uniform is not None:
            candidates.append((*uniform, math.nan, math.nan))  # no multiplier prices a uniform choice
        compared, n = len(candidates), len(self.params)
        found = []
        for i, (masks, bits, lam_p, lam_q) in enumerate(candidates):
            def told(k: int, name: str, i: int = i) -> None:
                report((i * n + k) / ((compared + 1) * n),
                       f"comparing {compared} candidates, reconstructing the {ORDINALS[i]}: layer {k} of {n} ({name})")
            found.append((*self.reconstruct(masks, bits, budget, in_order=False, told=told), lam_p, lam_q))
        best, distance, lam_prune, lam_quant = min(found, key=lambda f: f[1])
        alloc = copy.copy(best)
        alloc.lambda_prune, alloc.lambda_quant = lam_prune, lam_quant
        self._drafted = (Budget(budget.bits, None if budget.density is None else budget.density.clone()), alloc,
                         distance, compared)
        return copy.copy(alloc), distance, compared

    @torch.no_grad()
    def sketch(self, budget: Budget) -> Allocation:
        """The option tables' candidate alone (`draft`'s first), each layer reconstructed on its dense
        inputs, its BatchNorm statistics moved by the shift compression made or measured anew, whichever
        brings the outputs on the first calibration batch closer: three forward passes of that batch,
        no candidates compared, no pass in order. What the app shows at once where `allocate` takes a
        minute (a CIFAR ResNet-56 on two CPU cores, BENCHMARKS.md), which compares more and ends
        closer to the dense outputs."""
        masks, bits, lam_prune, lam_quant = self._tables_candidate(budget)
        alloc, _ = self.reconstruct(masks, bits, budget, in_order=False, sketch=True)
        alloc.lambda_prune, alloc.lambda_quant = lam_prune, lam_quant
        return alloc

    def _tables_candidate(self, budget: Budget) -> tuple[list[torch.Tensor], torch.Tensor, float, float]:
        """Bits and kept counts from the option tables' knapsack, masks by (w / d)^2 filling the rest of
        `budget` exactly; with the two multipliers."""
        if self.tables is None:
            raise ValueError("post-training compression needs calibration inputs first: call calibrate(batches)")
        bits, kept, lam_quant = self.projector.joint_bits(self.scaled, budget, self.tables)
        unit, room = self.projector.room(bits, budget)
        masks, lam_prune = knapsack_prune(self.scaled, unit.tolist(), room, kept.tolist())
        return masks, bits, lam_prune, lam_quant

    def uniform(self, b: int, budget: Budget) -> tuple[list[torch.Tensor], torch.Tensor] | None:
        """Uniform allocation at `b` bits: one bitwidth and the one density that fills `budget` for
        every layer, each layer's weights of largest (w / d)^2 kept; None when it does not fit."""
        found = self._uniform_counts(b, budget)
        if found is None:
            return None
        bits, keep = found
        return [top_k_mask(score, k) for score, k in zip(self.scaled, keep)], bits

    def _uniform_counts(self, b: int, budget: Budget) -> tuple[torch.Tensor, list[int]] | None:
        """`uniform`'s bits and each layer's kept count, without its masks."""
        bits, density = self.projector.uniform_density(b, budget)
        if density <= 0:
            return None
        numel = self.projector.numel
        keep = [min(int(n), max(low, int(density * n))) for n, low in zip(numel.tolist(), self.projector.min_keep)]
        size = self.projector.accounting.size_bits(bits, torch.tensor(keep, dtype=torch.float64), numel, budget.density)
        if size + self.projector.reserved_bits > budget.bits:
            return None
        return bits, keep

    def _uniform_candidate(self, budget: Budget) -> tuple[list[torch.Tensor], torch.Tensor] | None:
        """Of the uniform allocations that fit, the one whose summed option-table error is least
        (its masks made for it alone). Where every option is cheap (8x, 16x on ResNet-20) one
        bitwidth everywhere reconstructs as well as the joint choice or better: the tables price
        layers alone, and how errors compound decides."""
        best, least = None, math.inf
        for b in BIT_CHOICES:
            found = self._uniform_counts(b, budget)
            if found is None:
                continue
            bits, keep = found
            error = sum(_table_error(keeps, errors, k, int(layer_bits))
                        for (keeps, errors), k, layer_bits in zip(self.tables.layers, keep, bits))
            if error < least:
                best, least = b, error
        return None if best is None else self.uniform(best, budget)

    def reconstruct(self, masks: list[torch.Tensor], bits: torch.Tensor, budget: Budget, in_order: bool = True,
                    sketch: bool = False, told: Callable[[int, str], None] | None = None) -> tuple[Allocation, float]:
        """These bits and as many kept weights as these masks in each row of each block of columns,
        reconstructed (`reconstruct_layer`, and the BatchNorm statistics for them), sized in
        `budget`'s accounting; and its outputs' distance from the dense network's on the calibration inputs. `in_order`:
        layer after layer on the compressed network's inputs (one forward pass); else each on its
        dense inputs (cheaper, to compare candidates). `sketch`: the BatchNorm statistics' two
        candidates measured and compared on the first calibration batch alone (`_statistics`), and
        the distance on it. `told(k, name)` hears that the k-th layer, `name`, is reconstructed.
        Pure; the last RECONSTRUCTIONS_KEPT are remembered (the slider's what-if and the run's final
        model ask again for the same)."""
        key = (tuple(bits.tolist()), tuple(_digest(m) for m in masks), in_order, sketch)
        found = next((result for seen, result in self._kept if seen == key), None)
        if found is None:
            found = self._reconstruct(masks, bits, in_order, sketch, told or (lambda k, name: None))
            self._kept = [*self._kept, (key, found)][-RECONSTRUCTIONS_KEPT:]
        alloc, distance = copy.copy(found[0]), found[1]
        alloc.size_bits = self.projector.accounting.size_bits(alloc.bits, alloc.nnz.double(), self.projector.numel,
                                                              budget.density) + self.projector.reserved_bits
        return alloc, distance

    @torch.no_grad()
    def _reconstruct(self, masks: list[torch.Tensor], bits: torch.Tensor, in_order: bool, sketch: bool,
                     told: Callable[[int, str], None]) -> tuple[Allocation, float]:
        """Each layer's kept weights reconstructed onto a codebook: on its inputs in the dense network
        (H measured once), or, `in_order`, layer after layer on the inputs the already-compressed
        layers before it give, towards the dense layer's outputs: one forward pass on the whole
        calibration set, each layer reconstructed as the pass reaches it and each BatchNorm's
        statistics moved before it runs. Then the BatchNorm statistics of that copy of the model,
        and its output distance from the dense one."""
        model = copy.deepcopy(self.layers.model)
        params = dict(model.named_parameters(remove_duplicate=False))
        found: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}  # layer -> its codebook, weight, mask
        batches = self.inputs[:1] if sketch else self.inputs  # what the statistics are chosen on

        def rebuild(j: int, w: torch.Tensor, h: torch.Tensor, factor: torch.Tensor | None = None,
                    book: torch.Tensor | None = None) -> None:
            name = self.layers.names[j]
            found[j] = _, q, _ = reconstruct_layer(w, h, masks[j], int(bits[j]), factor, book)
            params[name].copy_(q)
            told(len(found), name)

        def aim(j: int, name: str) -> Callable:
            def hook(module: nn.Module, args: tuple) -> None:
                if j in found:  # a weight several modules use: on the inputs of the first the pass reaches
                    return
                weight, dense, compressed = self.params[j].detach().float(), self.dense.inputs[name], args[0].detach()
                if not found and len(self.users[j]) == 1 and torch.equal(dense, compressed):
                    # nothing compressed comes before it: its moments would be H and W* = W
                    rebuild(j, weight, self.hessians[j], self.factors[j])
                    return
                cross, h = _mean_moments([(module, dense, compressed)])
                rebuild(j, _towards_dense(weight, cross, h), h)
            return hook

        if in_order:
            modules = dict(model.named_modules())
            self._outputs(model, self._shifts(model) + [(modules[n], aim(j, n)) for j, names in enumerate(self.users)
                                                        for n in names])
            # a pass of its own: in the one above, an embedding sharing a weight read it before its reconstruction
            outputs = self._outputs(model)
        else:
            weights = [p.detach().float() for p in self.params]
            for j, (w, h, factor, book) in enumerate(zip(weights, self.hessians, self.factors,
                                                         layer_codebooks(weights, masks, bits))):
                rebuild(j, w, h, factor, book)
            outputs = self._outputs(model, self._shifts(model, sketch), batches)
        state, distance = self._statistics(model, outputs, batches)
        books, values, kept = (list(layer) for layer in zip(*(found[j] for j in range(len(masks)))))
        codes = [assign(torch.masked_select(q, mask), book) for q, mask, book in zip(values, kept, books)]
        return Allocation(kept, bits.clone(), books, codes, values, 0.0, 0.0, 0.0, state), distance

    def _outputs(self, model: nn.Module, hooks: list[tuple[nn.Module, Callable]] = (),
                 inputs: list[torch.Tensor] | None = None) -> torch.Tensor:
        """`model`'s outputs on the whole calibration set (or `inputs`) in eval mode: with `hooks`, in one
        pass (a hook sees every input at once); without, batch by batch (with glibc's default allocator a CIFAR
        ResNet's forward pass on 512 inputs at once took 3x as long as on four batches of 128: its
        large freed blocks go back to the OS, jointcomp.allocator)."""
        inputs = self.inputs if inputs is None else inputs
        with _hooked(model, list(hooks)):
            return model(torch.cat(inputs)) if hooks else torch.cat([model(x) for x in inputs])

    def _shifts(self, model: nn.Module, first_batch: bool = False) -> list[tuple[nn.Module, Callable]]:
        """Hooks that move each BatchNorm's statistics by the shift compression made in its input (on
        the whole calibration set, or on its `first_batch` alone)."""
        norms = self.dense.first_norms if first_batch else self.dense.norms
        return [(m, _shift_to(norms[n])) for n, m in _batchnorms(model) if n in norms]

    def _distance(self, outputs: torch.Tensor) -> float:
        """Summed squared distance between these outputs on the first len(outputs) calibration inputs
        and the dense network's."""
        return float((outputs - self.dense.outputs[: len(outputs)]).double().square().sum())

    def _statistics(self, model: nn.Module, outputs: torch.Tensor, inputs: list[torch.Tensor]
                    ) -> tuple[dict[str, torch.Tensor], float]:
        """The running statistics of every BatchNorm of the compressed `model` (which it takes), by
        state-dict name, and the distance of its outputs from the dense network's with them: of two
        candidates, the one whose outputs on `inputs` (the calibration batches `outputs` are of) are the closer. Moved by the shift compression made in each
        BatchNorm's input (`_shift_to`, on a pass before; `outputs`: the model's with them) keeps the
        statistics the network was trained with, which a few hundred inputs estimate worse
        (re-estimating the published ResNet-20's alone costs 1.7 points, BENCHMARKS.md); measured anew
        on the compressed network holds where compression moved the activations too far for a small
        shift (high ratios): at 50x, the sketch of a published ResNet-56 scored 78.5 % with the first,
        80.0 % with the second."""
        shifted_distance, found = self._distance(outputs), _batchnorms(model)
        if not found:
            return {}, shifted_distance
        names = _statistics_names(found)
        tensors = model.state_dict()
        shifted = {k: tensors[k].clone() for k in names}
        _reestimate(model, [m for _, m in found], inputs)
        measured_distance = self._distance(self._outputs(model, inputs=inputs))
        if measured_distance < shifted_distance:
            return {k: tensors[k].clone() for k in names}, measured_distance
        for k in names:
            tensors[k].copy_(shifted[k])
        return shifted, shifted_distance

    def _modules(self) -> list[list[nn.Module]]:
        """Per compressed weight, the Conv2d and Linear modules of the model that use it. A weight an
        embedding also looks up (a GPT's head tied to its token embedding) is priced and reconstructed
        on the head's inputs: a lookup has no inputs to compensate on."""
        model = self.layers.model
        by_weight: dict[int, list[nn.Module]] = {}
        for module in model.modules():
            weight = getattr(module, "weight", None)
            if isinstance(weight, nn.Parameter):
                by_weight.setdefault(id(weight), []).append(module)
        params = dict(model.named_parameters(remove_duplicate=False))
        found = [by_weight.get(id(params[name]), []) for name in self.layers.names]
        layers = [[m for m in users if isinstance(m, (nn.Linear, nn.Conv2d))] for users in found]
        for name, users, used in zip(self.layers.names, found, layers):
            if not used or not all(isinstance(m, (nn.Linear, nn.Conv2d, nn.Embedding)) for m in users):
                raise ValueError(f"post-training compression handles Conv2d and Linear layers; {name} is used by "
                                 f"{', '.join(type(m).__name__ for m in users) or 'no module'}")
        return layers


def _digest(mask: torch.Tensor) -> bytes:
    """A digest of which weights `mask` keeps: two masks of one layer share it only where they are equal
    (a key of counts alone took one mask's reconstruction for another's of as many weights)."""
    return hashlib.blake2b(numpy.packbits(mask.cpu().numpy()).tobytes(), digest_size=16).digest()


def _same_budget(a: Budget, b: Budget) -> bool:
    return a.bits == b.bits and (a.density is None) == (b.density is None) and (
        a.density is None or torch.equal(a.density, b.density))


def _grouped(w: torch.Tensor, groups: int) -> torch.Tensor:
    """A Linear or Conv2d weight as (groups, rows, columns): the columns are the inputs of H."""
    return w.reshape(groups, w.shape[0] // groups, -1)


def _layer_inputs(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The rows X (groups, samples, columns) whose product with the weight's rows is the output: for
    a convolution, each output position's patch, its columns in (kernel row, kernel column, channel)
    order (`_in_weight_order` brings a moment of them to the weight's (channel, kernel row, kernel
    column)), copied once out of strided windows on the input padded as the convolution pads it
    (`padding='same'`, reflect and circular modes included), laid out channels last so that each
    patch is read as kernel-row runs of contiguous values (half the time of the weight's order on a
    ResNet's 3x3 layers; nn.functional.unfold's intermediate took several times as long again)."""
    if isinstance(module, nn.Linear):
        return x.reshape(1, -1, x.shape[-1])
    (kh, kw), (dh, dw), (sh, sw) = module.kernel_size, module.dilation, module.stride
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    padded = nn.functional.pad(x, module._reversed_padding_repeated_twice, mode=mode).permute(0, 2, 3, 1).contiguous()
    windows = padded.unfold(1, dh * (kh - 1) + 1, sh).unfold(2, dw * (kw - 1) + 1, sw)[..., ::dh, ::dw]
    n, rows, columns, channels = windows.shape[:4]
    g = module.groups
    per_group = windows.unflatten(3, (g, channels // g)).permute(3, 0, 1, 2, 5, 6, 4)  # g, n, rows, columns, kh, kw, c
    return per_group.reshape(g, n * rows * columns, -1)


def _in_weight_order(module: nn.Module, moment: torch.Tensor) -> torch.Tensor:
    """A moment (groups, columns, columns) of `_layer_inputs` rows with its columns in the order of
    the weight's."""
    if isinstance(module, nn.Linear):
        return moment
    (kh, kw), (g, size) = module.kernel_size, moment.shape[:2]
    c = size // (kh * kw)
    return moment.view(g, kh, kw, c, kh, kw, c).permute(0, 3, 1, 2, 6, 4, 5).reshape(g, size, size)


def _moment(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a^T b per group (groups, columns, columns) over one batch's rows, in float32 (half the time
    of float64), returned in float64 on the CPU so that the sum over batches keeps its precision."""
    return torch.einsum("gnc,gnd->gcd", a.float(), b.float()).to(torch.float64 if a.device.type == "cpu" else torch.float32)


def _mean_moments(pairs: list[tuple[nn.Module, torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """The means of X^T Y and of Y^T Y over the input rows of each (module, x, y) of `pairs` (x and y:
    that module's inputs on the same samples in the dense network and in a compressed copy; with
    y = x both are H), CHUNK samples unfolded at a time, each once; both shrunk as one (`_shrunk`)."""
    cross, gram, fourth, count = 0.0, 0.0, 0.0, 0
    for module, x, y in pairs:
        pair_cross, pair_gram = 0.0, 0.0
        for x_chunk, y_chunk in zip(x.split(CHUNK), y.split(CHUNK)):
            rows = _layer_inputs(module, y_chunk)
            square = _moment(rows, rows)
            pair_gram = pair_gram + square
            pair_cross = pair_cross + (square if x is y else _moment(_layer_inputs(module, x_chunk), rows))
            fourth = fourth + torch.linalg.vector_norm(rows.float(), dim=-1).to(square.dtype).pow(4).sum(-1)
            count += rows.shape[1]
        cross = cross + _in_weight_order(module, pair_cross)
        gram = gram + _in_weight_order(module, pair_gram)
    return _shrunk(cross / count, gram / count, fourth / count, count)


def _shrunk(cross: torch.Tensor, gram: torch.Tensor, fourth: torch.Tensor, count: int
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """X^T Y and H shrunk towards their mean diagonal by the Ledoit-Wolf intensity rho of H, per group:
    (1 - rho) M + rho mean(diag H) I. H is estimated from `count` rows; where they are few for its
    columns (a Linear layer's 512 calibration inputs for 800 columns), the reconstruction fitted
    the sample's noise (LeNet-5's posttrain lost 1.1-1.5 points to it at 200x-1000x, BENCHMARKS.md).
    Shrunk alike, the two give a ridge towards the dense weight (`_towards_dense`: W* = W where
    Y = X). `fourth`: the mean of |row|^4, what the intensity needs besides H; rows are taken as
    independent, so a convolution's overlapping patches get almost none."""
    mean = gram.diagonal(dim1=-2, dim2=-1).mean(-1)
    centred = gram.clone()
    centred.diagonal(dim1=-2, dim2=-1).sub_(mean[:, None])
    spread = centred.square().sum((-2, -1))  # |H - mean I|^2
    noise = (fourth - gram.square().sum((-2, -1))) / count  # of the estimate H, |H_sample - H|^2 expected
    rho = torch.where(spread > 0, (noise / spread.clamp(min=1e-300)).clamp(0, 1), torch.zeros_like(spread))
    keep, ridge = (1 - rho)[:, None, None], rho * mean
    return _plus_diagonal(keep * cross, ridge), _plus_diagonal(keep * gram, ridge)


def _plus_diagonal(m: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """`m` (groups, n, n) with `d` (groups,) added to its diagonal, in place: m + d I, the same numbers,
    without an n x n identity (shrinking a Linear layer's 800 columns' moments 12 ms -> 7 ms)."""
    m.diagonal(dim1=-2, dim2=-1).add_(d[:, None])
    return m


def _damped(h: torch.Tensor) -> torch.Tensor:
    """H + damping per group (GPTQ's), columns no input reached given a unit diagonal so that H
    stays invertible."""
    h = h.clone()
    diag = h.diagonal(dim1=-2, dim2=-1)
    diag[diag == 0] = 1.0
    diag += DAMPING * diag.mean(-1, keepdim=True)
    return h


def _damped_inverse_factor(h: torch.Tensor) -> torch.Tensor:
    """The upper Cholesky factor of (H + damping)^-1 per group."""
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(_damped(h)))
    return torch.linalg.cholesky(inverse, upper=True)


def _towards_dense(weight: torch.Tensor, cross: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """The weight W* whose outputs on a layer's inputs Y in the compressed network come closest to
    the dense layer's outputs on its inputs X: least squares, W* = W (X^T Y + D)(Y^T Y + D)^-1 with
    the damping D (a ridge towards W, so that W* = W where Y = X). Reconstructing W* with Y's H then
    compensates the errors of the layers before, not only the layer's own."""
    w = _grouped(weight, len(h)).to(h.dtype)
    damped = _damped(h)
    shift = torch.linalg.solve(damped, w @ (cross - h), left=False)
    return (w + shift).to(weight.dtype).reshape(weight.shape)


def _output_energy(w: torch.Tensor, h: torch.Tensor) -> float:
    """tr(W H W^T): the layer's output energy on the calibration inputs (its squared weights where
    no input reached it)."""
    energy = float(torch.einsum("grd,gde,gre->", w.double(), h, w.double()))
    return energy if energy > 0 else float(w.square().sum())


@torch.no_grad()
def _sensitivities(model: nn.Module, params: list[nn.Parameter], hessians: list[torch.Tensor],
                   inputs: list[torch.Tensor], measured: Callable[[int], None] = lambda count: None,
                   bound: int = SENSITIVITY_RECORD_BOUND) -> list[float]:
    """Per layer: how much the network's outputs move, per unit of relative output error of that
    layer (tr(dW H dW^T) / tr(W H W^T)). Measured by giving each layer in turn a random weight
    change of relative output error SENSITIVITY_NOISE, on the dense network: layers whose errors
    the rest of the network amplifies or absorbs are told apart, so the knapsack prices every
    option in one unit, the network's output error. What a pass makes before the changed weight's
    first use is answered from the dense pass (`RecordedPass`, up to `bound` bytes): the same
    numbers, on a ResNet-56 a third of the time less. `measured(count)` after each layer."""
    was_training = model.training
    model.eval()
    passes = [RecordedPass.record(model, x, params, bound // len(inputs)) for x in inputs]
    generator = torch.Generator().manual_seed(0)
    found = []
    try:
        for p, h in zip(params, hessians):
            w = _grouped(p.detach().float(), len(h))
            noise = torch.randn(w.shape, generator=generator).to(w.device) * w.std()
            relative = _output_energy(noise, h) / _output_energy(w, h)
            saved = p.detach().clone()
            p.add_((noise * math.sqrt(SENSITIVITY_NOISE / relative)).reshape(p.shape))
            moved = 0.0
            for x, dense in zip(inputs, passes):
                with dense.answering_before(p):
                    moved += float((model(x) - dense.outputs).double().square().sum())
            p.copy_(saved)
            found.append(max(moved, 1e-30) / SENSITIVITY_NOISE)
            measured(len(found))
    finally:
        model.train(was_training)
    return found


def _option_tables(weights: list[torch.Tensor], hessians: list[torch.Tensor], factors: list[torch.Tensor],
                   min_keep: list[int], into: list[tuple[torch.Tensor, torch.Tensor]], given_up: threading.Event) -> None:
    """Every layer's option table (`_option_table`, its weights of largest (w / d)^2 kept), appended
    to `into` as it is built (the caller reads its length for progress), until the caller has
    `given_up`; on one intra-op thread: `calibrate` builds them in a thread of their own while the
    network's passes measure the sensitivities on the other cores (the tables' thousands of small
    steps ran no faster on two threads than on one: a ResNet-56's what-ifs 31.9 s -> 28.9 s on two
    cores, BENCHMARKS.md)."""
    with _intra_op_threads(1):
        for w, h, factor, low in zip(weights, hessians, factors, min_keep):
            if given_up.is_set():
                return
            into.append(_option_table(w, h, factor, (_live(w, h) / factor.diagonal(dim1=-2, dim2=-1)[:, None, :]).square(), low))


def _live(w: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """`w` where its input moved on the calibration inputs, 0 where it never did (worth nothing)."""
    return w * (h.diagonal(dim1=-2, dim2=-1) > 0)[:, None, :]


def _option_table(w: torch.Tensor, h: torch.Tensor, factor: torch.Tensor, score: torch.Tensor,
                  min_keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Kept counts (K,) and the output error of each (kept count, bits) option (K, bits), as the
    layer's tr(dW H dW^T) (`calibrate` turns it into the network's unit): the weights of largest `score`
    kept (each row's count per block, chosen anew by `_round_columns` as the reconstruction reaches
    it), a k-means codebook fitted to them, and the option's reconstruction run for real on a
    sample of TABLE_ROWS rows (rows are reconstructed independently, with the same H), every option
    of the layer in one batched pass; its error scaled up to all rows."""
    groups, rows, _ = w.shape
    flat, order = w.flatten(), score.flatten().argsort(descending=True)
    n = flat.numel()
    ladder = torch.cat([torch.logspace(math.log10(max(1, min_keep)), math.log10(n), LADDER_POINTS, dtype=torch.float64),
                        n * torch.linspace(0, 1, LINEAR_POINTS + 1, dtype=torch.float64)[1:]])
    keeps = torch.unique(ladder.round().long().clamp(max(1, min_keep), n))
    choices = list(BIT_CHOICES)
    kept_sorted = flat[order]
    books, _ = fit_codebooks_many([kept_sorted[:k] for k in keeps.tolist()], torch.tensor([choices] * len(keeps)),
                                  iters=15, sample=1 << 14)
    rank = torch.empty(n, dtype=torch.long, device=w.device)
    rank[order] = torch.arange(n, device=w.device)
    sample = torch.randperm(rows, generator=torch.Generator().manual_seed(rows))[:TABLE_ROWS].to(w.device)
    rank = rank.view(w.shape)[:, sample]  # (groups, sampled rows, columns)
    options = [(k, book) for k, layer_books in zip(keeps.tolist(), books) for book in layer_books]
    masks = torch.cat([rank < k for k, _ in options], 1)
    widest = 2 ** max(choices)
    padded = torch.stack([torch.cat([b, b[-1:].expand(widest - b.numel())]) for _, b in options]).to(w.device)
    w_rows = w[:, sample].repeat(1, len(options), 1)  # each option's sampled rows, rounded onto its codebook
    q, _ = _round_columns(w_rows, masks, factor, padded, torch.arange(len(options)).repeat_interleave(len(sample)))
    delta = (w_rows - q).double()
    error = torch.einsum("grd,gde,gre->r", delta, h, delta).view(len(options), len(sample))
    errors = error.sum(1).view(len(keeps), len(choices)) * (rows / len(sample))
    return keeps.cpu(), errors.cpu()


def _table_error(keeps: torch.Tensor, errors: torch.Tensor, kept: int, bits: int) -> float:
    """A layer's option-table error at `kept` weights and `bits`, linear between the table's kept counts."""
    column = errors[:, bits - BIT_CHOICES[0]]
    if len(keeps) == 1:
        return float(column[0])
    i = min(max(1, int(torch.searchsorted(keeps, torch.tensor(kept)))), len(keeps) - 1)
    t = min(1.0, max(0.0, (kept - int(keeps[i - 1])) / max(1, int(keeps[i] - keeps[i - 1]))))
    return float(column[i - 1] + t * (column[i] - column[i - 1]))


def layer_codebooks(weights: list[torch.Tensor], masks: list[torch.Tensor], bits: torch.Tensor) -> list[torch.Tensor]:
    """Each layer's codebook: 2^bits sorted values fitted to its kept weights, all layers in one
    batched fit (each fit as it would be alone; five fits of LeNet-5's layers 107 ms -> 37 ms)."""
    sets = [torch.masked_select(w, m) for w, m in zip(weights, masks)]
    return [books[0].to(w.device) for w, books in zip(weights, fit_codebooks_many(sets, bits.long().cpu()[:, None])[0])]


def reconstruct_layer(weight: torch.Tensor, h: torch.Tensor, mask: torch.Tensor, bits: int,
                      factor: torch.Tensor | None = None, book: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The layer's codebook (`book`, else `layer_codebooks`' fit to its kept dense weights), its
    reconstructed weight and its mask (as many kept weights as `mask`, `_round_columns`): pruned
    weights exactly zero, kept ones codebook values, chosen column by column so that the output on
    the calibration inputs stays close to the dense layer's. (A codebook refitted to the corrected
    weights the columns were rounded from, kept where it made the layer's own output error smaller,
    left LeNet-5 0.5-4 points less accurate: BENCHMARKS.md.)
    `factor`: the Cholesky factor of (H + damping)^-1 where the caller has it (`_damped_inverse_factor`)."""
    groups = h.shape[0]
    w = _grouped(weight, groups)
    factor = (_damped_inverse_factor(h) if factor is None else factor).to(w.dtype)
    book = layer_codebooks([weight], [mask], torch.tensor([bits]))[0] if book is None else book
    q, kept = _round_columns(w, _grouped(mask, groups), factor, book[None], torch.zeros(w.shape[1], dtype=torch.long))
    return book, q.reshape(weight.shape), kept.reshape(weight.shape)


def _round_columns(w: torch.Tensor, mask: torch.Tensor, factor: torch.Tensor, books: torch.Tensor,
                   book_of: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ with a mask and non-uniform codebooks: each column in turn rounded (kept weights to the
    nearest centre of their row's sorted codebook, `books[book_of[row]]` of `books` (codebooks,
    centres), pruned ones to zero) and its error spread over the columns not yet rounded through the
    Cholesky factor of H^-1 (`factor`, per group), in blocks: the rounded weights and the mask they
    keep. Each row keeps in each block as many weights as `mask` does there, chosen anew when the
    block is reached: those of largest (w / d)^2 after the corrections of the columns before
    (SparseGPT's adaptive mask selection, row by row; a mask fixed up front left ResNet-20 and
    LeNet-5 up to 1.6 and 4.7 points less accurate; chosen across the block's rows, as SparseGPT
    does, a character-level GPT at 16x ended 23 % above its dense validation loss instead of 9 %,
    BENCHMARKS.md). The column loop is thousands of steps on a few hundred numbers each: it runs in
    NumPy on the CPU, whose cost per call is a fraction of torch's (the same arithmetic and results;
    a LeNet-5 what-if in the app's thread spent half its time here in torch), on the weights held
    transposed from start to end (a column contiguous, a block a view), its error spread one column
    at a time only over the STEP columns it is among and by one product over the rest of the block
    (the same sums in another order: a ResNet-56's option tables 22 s -> 12 s), and each block's
    update of the columns after it by one product (held in torch's layout, those two products and the
    copies between the layouts were half of a LeNet-5 layer's 0.2 s). The two products are torch's, on
    the memory the NumPy steps work in: NumPy's own BLAS threads, woken by a product, went on spinning
    on the cores torch's next forward pass needed (a LeNet-5 what-if 1.64-1.70 s -> 1.32-1.38 s a move,
    bench/whatif_moves.py, BENCHMARKS.md)."""
    device, (groups, rows, columns) = w.device, w.shape
    # (groups, columns, rows), a copy whatever the shape: with one row per group (a depthwise convolution, a
    # Linear layer of one output) the transpose is contiguous already and the loop wrote into the caller's weight
    wt_torch = w.detach().cpu().float().transpose(1, 2).clone(memory_format=torch.contiguous_format)
    factor_torch = factor.cpu().float().contiguous()
    wt, factor, books = wt_torch.numpy(), factor_torch.numpy(), books.cpu().float().numpy()  # the same memory
    nearest_centre = _nearest_centre(books, numpy.tile(book_of.cpu().numpy().astype(numpy.int64), groups))
    centres, kept = books.ravel(), mask.cpu().numpy().transpose(0, 2, 1).copy()
    q = numpy.zeros_like(wt)
    for s in range(0, columns, BLOCK):
        e = min(s + BLOCK, columns)
        block, f, keep, rounded = wt[:, s:e], factor[:, s:e, s:e], kept[:, s:e], q[:, s:e]  # views, written through
        score = numpy.square(block / numpy.diagonal(f, axis1=1, axis2=2)[:, :, None])
        order = numpy.argsort(-score, axis=1, kind="stable")  # each row's largest first, ties by column
        numpy.put_along_axis(keep, order, numpy.arange(e - s)[:, None] < keep.sum(1, keepdims=True), 1)
        errors_torch = torch.zeros(groups, e - s, rows)
        errors = errors_torch.numpy()
        for t in range(0, e - s, STEP):
            u = min(t + STEP, e - s)
            for i in range(t, u):
                col = block[:, i]
                rounded[:, i] = numpy.where(keep[:, i], centres[nearest_centre(col.ravel())].reshape(groups, rows), 0)
                errors[:, i] = (col - rounded[:, i]) / f[:, i, i, None]
                block[:, i + 1:u] -= f[:, i, i + 1:u, None] * errors[:, i, None]
            wt_torch[:, s + u:e].baddbmm_(factor_torch[:, s + t:s + u, s + u:e].mT, errors_torch[:, t:u], alpha=-1)
        wt_torch[:, e:].baddbmm_(factor_torch[:, s:e, e:].mT, errors_torch, alpha=-1)
    return (torch.from_numpy(q).transpose(1, 2).contiguous().to(device),
            torch.from_numpy(kept).transpose(1, 2).contiguous().to(device))


def _nearest_centre(books: numpy.ndarray, row: numpy.ndarray) -> Callable[[numpy.ndarray], numpy.ndarray]:
    """For sorted float32 `books` (codebooks, centres) and the codebook `row` (int64) of each value
    to come: a function that takes those values and gives the index of each one's nearest centre in
    `books.ravel()`, exactly its codebook's first centre plus the count of its midpoints <= the
    value, in log k steps a value instead of k (the option tables round 3,840 rows against 255
    midpoints each, a column at a time: 26 s of a ResNet-56's calibration). One codebook: a
    searchsorted of its midpoints. Several: every codebook's midpoints in one sorted array of int64
    keys, a float's order in its low 32 bits and its codebook above them, so one searchsorted
    answers all rows (an option table's rows share their option's codebook 16 at a time: the keys
    a sixteenth as many, and in cache)."""
    mids = (books[:, :-1] + books[:, 1:]) / 2
    if len(books) == 1:
        return lambda values: mids[0].searchsorted(values, side="right")  # -0.0 and 0.0 compare equal
    keys = (_order_key(mids) + (numpy.arange(len(mids), dtype=numpy.int64)[:, None] << 32)).ravel()
    above = row << 32
    # among the keys a value's place is row * (k - 1) + count; among the centres, row * k + count
    return lambda values: numpy.searchsorted(keys, _order_key(values) + above, side="right") + row


def _order_key(values: numpy.ndarray) -> numpy.ndarray:
    """float32 values as int64 keys in [0, 2^32) in the same order (-0.0 equal to 0.0): a non-negative
    float's bits count up with it, a negative one's count up with its magnitude, so those are flipped."""
    bits = (numpy.asarray(values, dtype=numpy.float32) + numpy.float32(0)).view(numpy.int32).astype(numpy.int64)
    return numpy.where(bits < 0, bits ^ 0x7FFFFFFF, bits) + (1 << 31)


def _channel_moments(x: torch.Tensor) -> torch.Tensor:
    """Per channel (dimension 1): the mean and the mean of squares of a BatchNorm's input (2, channels),
    summed in the input's precision (torch sums pairwise: a float32 mean of a CIFAR ResNet's 500,000
    values a channel is within 1e-6 of a float64 one, at a fifth of the time) and given in float64."""
    dims = [d for d in range(x.dim()) if d != 1]
    return torch.stack([x.mean(dims), x.square().mean(dims)]).double()


def _shift_to(reference: torch.Tensor) -> Callable:
    """A forward pre-hook that moves a BatchNorm's running statistics by the shift compression made
    in its input, against the dense network's `reference` moments on the same inputs: the mean by
    the difference, the variance by the ratio."""
    def move(norm: nn.Module, args: tuple) -> None:
        (mean_d, square_d), (mean_c, square_c) = reference, _channel_moments(args[0])
        var_d, var_c = square_d - mean_d.square(), square_c - mean_c.square()
        ratio = torch.where(var_d > 1e-12, var_c / var_d.clamp(min=1e-12), torch.ones_like(var_d))
        norm.running_mean.add_((mean_c - mean_d).to(norm.running_mean.dtype))
        norm.running_var.mul_(ratio.to(norm.running_var.dtype))
    return move


@torch.no_grad()
def _record_dense(model: nn.Module, users: list[list[str]], inputs: list[torch.Tensor]) -> _Dense:
    """One forward pass of the dense `model` on all of `inputs` at once, recorded (`_Dense`); refused
    when the layer inputs it keeps would take more than DENSE_RECORD_BOUND bytes."""
    modules = dict(model.named_modules())
    watched = sorted({n for names in users for n in names})

    def run(x: torch.Tensor) -> _Dense:
        record = _Dense({}, {}, {}, torch.empty(0))

        def keep(found: dict, name: str, measure: Callable) -> Callable:
            def hook(module: nn.Module, args: tuple) -> None:  # (a pre-hook that returned a value would replace the input)
                if name not in found:
                    found[name] = measure(args[0].detach())
            return hook

        hooks = [(modules[n], keep(record.inputs, n, lambda t: t)) for n in watched]
        hooks += [(m, keep(record.norms, n, _channel_moments)) for n, m in _batchnorms(model)]
        hooks += [(m, keep(record.first_norms, n, lambda t: _channel_moments(t[:first]))) for n, m in _batchnorms(model)]
        with _hooked(model, hooks):
            record.outputs = model(x)
        return record

    whole, first = torch.cat(inputs), len(inputs[0])
    need = len(whole) * sum(t.numel() * t.element_size() for t in run(whole[:1]).inputs.values())
    if need > DENSE_RECORD_BOUND:
        raise ValueError(f"{len(whole)} calibration inputs would keep {need / 2**30:.1f} GiB of this network's layer "
                         f"inputs (at most {DENSE_RECORD_BOUND / 2**30:.0f}); give fewer (--calibration N)")
    record = run(whole)
    if set(watched) - record.inputs.keys():
        raise ValueError("a compressed layer saw no input in the model's forward pass; post-training compression "
                         "needs every compressed layer to be used")
    return record


def _batchnorms(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The (name, module) of every BatchNorm of `model` that keeps running statistics."""
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


def _statistics_names(found: list[tuple[str, nn.Module]]) -> list[str]:
    return [f"{n}.{b}" if n else b for n, _ in found for b in ("running_mean", "running_var")]


@torch.no_grad()
def remeasured_batchnorm(model: nn.Module, inputs: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The running statistics of every BatchNorm of `model` (which it takes) measured anew on
    `inputs`, by state-dict name: one pass, what a trained model's deployable allocation needs
    (its BatchNorms saw the trained weights, not the projected ones)."""
    found = _batchnorms(model)
    if not found:
        return {}
    _reestimate(model, [m for _, m in found], inputs)
    tensors = model.state_dict()
    return {k: tensors[k].clone() for k in _statistics_names(found)}


def _reestimate(model: nn.Module, norms: list[nn.Module], inputs: list[torch.Tensor]) -> None:
    """Measure the running statistics of `norms` anew on `inputs` (a cumulative average)."""
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    was_training = model.training
    model.train()
    try:
        for x in inputs:
            model(x)
    finally:
        for m, momentum in zip(norms, saved):
            m.momentum = momentum
        model.train(was_training)

"""posttrain: compression without training, from a few hundred calibration inputs.

A compressed layer's inputs X on the calibration set give H = X^T X (for a convolution, of its
unfolded patches): a change dW of its weight changes its output by tr(dW H dW^T), the measure of
OBS, OBC, GPTQ and SparseGPT. With d_i the i-th diagonal entry of the Cholesky factor of H^-1,
removing or rounding weight w of input column i after the columns before it were corrected costs
about (w - q)^2 / d_i^2 (GPTQ's per-column loss). So:

* `calibrate`: one pass over the calibration inputs collects every layer's H (per batch, never
  the whole set's activations), then each layer's option table: for every (kept count, bits), the
  output error of keeping the weights of largest w^2 / d^2 and rounding them to a k-means
  codebook, relative to the layer's output energy tr(W H W^T). The tables do not depend on the
  target.
* `allocate(budget)`: the multiple-choice knapsack over those tables (the one admm's joint
  projection uses) gives the bits, the pruning knapsack on w^2 / d^2 fills the budget exactly at
  those bits; then layer after layer, each on the inputs the already-compressed layers before it
  give, the kept weights are reconstructed column by column with the inverse of H onto the layer's
  codebook (GPTQ with a mask and a non-uniform codebook), the codebook refitted to the corrected
  weights; BatchNorm statistics, at the end, either moved by the shift compression made in their
  inputs or measured anew, whichever brings the outputs closer to the dense network's. The model
  itself never changes.
"""
from __future__ import annotations

import copy
import math
from typing import Callable, Iterable

import torch
from torch import nn
from tqdm import tqdm

from ..budget import BIT_CHOICES, Budget
from ..projections import OptionTables, assign, dequantize, fit_codebooks_many
from ..projector import Allocation, fingerprint
from .base import Layers, Method

MIN_CALIBRATION = 16  # fewer inputs than this cannot say how a layer's inputs are spread
DAMPING = 0.01  # of the mean diagonal of H, added to it (GPTQ's): a singular H stays invertible
LADDER_POINTS = 24  # kept counts per layer in an option table (a geometric ladder)
BLOCK = 128  # columns reconstructed together (GPTQ's lazy batch)


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the layer it watches has seen its input."""


class PostTrain(Method):
    """Compression without training: options priced by output error on calibration inputs,
    one knapsack for the target, the kept weights reconstructed layer by layer."""

    first_phase = "posttrain"
    trains = False
    measured_budgets = True

    def __init__(self, layers: Layers) -> None:
        super().__init__(layers)
        self.inputs: list[torch.Tensor] = []
        self.tables: OptionTables | None = None
        self.scaled: list[torch.Tensor] = []  # w / (d sqrt(energy)): the pruning knapsack's scores are their squares
        self._kept: tuple[torch.Tensor, Allocation] | None = None  # the last reconstruction and its key

    # --- target-independent: the inputs and the option tables -------------------------
    @torch.no_grad()
    def calibrate(self, batches: Iterable) -> None:
        """Collect every layer's H on `batches` (model inputs, or (inputs, labels) pairs) and
        build the option tables."""
        device = self.params[0].device
        self.inputs = [(b[0] if isinstance(b, (tuple, list)) else b).to(device) for b in batches]
        count = sum(len(x) for x in self.inputs)
        if count < MIN_CALIBRATION:
            raise ValueError(f"post-training compression needs at least {MIN_CALIBRATION} calibration inputs, got "
                             f"{count}; give more (--calibration N)")
        model, modules = self.layers.model, self._modules()
        hessians = _hessians(model, modules, self.inputs)
        layers, scaled = [], []
        for p, h, low in zip(tqdm(self.params, desc="option tables", leave=False, disable=None), hessians,
                             self.projector.min_keep):
            w = _grouped(p.detach().float(), len(h))
            d2 = _column_scale(h).square()  # (groups, columns)
            energy = float(torch.einsum("grd,gde,gre->", w.double(), h, w.double()))
            energy = energy if energy > 0 else float(w.square().sum())  # a layer whose inputs were all zero
            layers.append(_option_table(w, d2, energy, low))
            scaled.append((w / (d2.sqrt()[:, None, :] * math.sqrt(energy))).reshape(p.shape))
        self.tables, self.scaled, self._kept = OptionTables(layers, torch.empty(0)), scaled, None

    # --- per target -------------------------------------------------------------------
    @torch.no_grad()
    def allocate(self, budget: Budget) -> Allocation:
        """The bits and masks for `budget`, then the kept weights reconstructed onto their
        codebooks layer by layer, and the BatchNorm statistics for them (`Allocation.state`)."""
        if self.tables is None:
            raise ValueError("post-training compression needs calibration inputs first: call calibrate(batches)")
        bits, lam_quant = self.projector.joint_bits(self.scaled, budget, self.tables)
        masks, lam_prune = self.projector.prune(self.scaled, bits, budget)
        key = torch.cat([bits.double()[:, None], fingerprint(masks)], 1)
        if self._kept is None or not torch.equal(self._kept[0], key):
            self._kept = key, self._reconstruct(masks, bits)
        alloc = copy.copy(self._kept[1])
        nnz = alloc.nnz.double()
        alloc.size_bits = self.projector.accounting.size_bits(bits, nnz, self.projector.numel, budget.density) \
            + self.projector.reserved_bits
        alloc.lambda_prune, alloc.lambda_quant = lam_prune, lam_quant
        return alloc

    def _reconstruct(self, masks: list[torch.Tensor], bits: torch.Tensor) -> Allocation:
        """Each layer in model order, calibrated on a copy of the model whose earlier layers are
        already compressed: its kept weights reconstructed onto a codebook; then BatchNorm."""
        model = copy.deepcopy(self.layers.model)
        names = self.layers.names
        params = dict(model.named_parameters())
        modules = self._modules(model)
        books, codes, values = [], [], []
        bar = tqdm(list(zip(names, modules, masks, bits.tolist())), desc="reconstructing", leave=False, disable=None)
        for name, users, mask, b in bar:
            bar.set_postfix_str(name)
            weight = params[name]
            h = _hessians(model, [users], self.inputs, stop=True)[0]
            book, q = _reconstruct_layer(weight.detach().float(), h, mask, int(b))
            weight.copy_(q)
            books.append(book)
            codes.append(assign(torch.masked_select(q, mask), book))
            values.append(q)
        state = _batchnorm_statistics(self.layers.model, model, self.inputs)
        return Allocation(masks, bits.clone(), books, codes, values, 0.0, 0.0, 0.0, state)

    def _modules(self, model: nn.Module | None = None) -> list[list[nn.Module]]:
        """Per compressed weight of `model` (default: the method's), the modules that use it."""
        model = model or self.layers.model
        by_weight: dict[int, list[nn.Module]] = {}
        for module in model.modules():
            weight = getattr(module, "weight", None)
            if isinstance(weight, nn.Parameter):
                by_weight.setdefault(id(weight), []).append(module)
        params = dict(model.named_parameters(remove_duplicate=False))
        found = [by_weight.get(id(params[name]), []) for name in self.layers.names]
        for name, users in zip(self.layers.names, found):
            if not users or not all(isinstance(m, (nn.Linear, nn.Conv2d)) for m in users):
                raise ValueError(f"post-training compression handles Conv2d and Linear layers; {name} is used by "
                                 f"{', '.join(type(m).__name__ for m in users) or 'no module'}")
        return found


def _grouped(w: torch.Tensor, groups: int) -> torch.Tensor:
    """A Linear or Conv2d weight as (groups, rows, columns): the columns are the inputs of H."""
    return w.reshape(groups, w.shape[0] // groups, -1)


def _layer_inputs(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The rows X (groups, samples, columns) whose product with the weight's rows is the output."""
    if isinstance(module, nn.Linear):
        return x.reshape(1, -1, x.shape[-1])
    patches = nn.functional.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)
    n, cols, positions = patches.shape
    g = module.groups
    return patches.view(n, g, cols // g, positions).permute(1, 0, 3, 2).reshape(g, n * positions, cols // g)


def _hessians(model: nn.Module, modules: list[list[nn.Module]], inputs: list[torch.Tensor],
              stop: bool = False) -> list[torch.Tensor]:
    """H = X^T X / samples (groups, columns, columns) of each entry of `modules` over `inputs`."""
    dtype = torch.float64 if inputs[0].device.type == "cpu" else torch.float32

    def measure(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        rows = _layer_inputs(module, x).to(dtype)
        return torch.einsum("gnc,gnd->gcd", rows, rows), rows.shape[1]

    return _accumulate(model, modules, inputs, measure, stop)


@torch.no_grad()
def _accumulate(model: nn.Module, modules: list[list[nn.Module]], inputs: list[torch.Tensor],
                measure: Callable[[nn.Module, torch.Tensor], tuple[torch.Tensor, int]], stop: bool) -> list[torch.Tensor]:
    """The mean of `measure(module, its input) -> (sum, count)` of each entry of `modules` over
    `inputs`, one batch at a time (never the whole set's activations), the model in eval mode.
    `stop`: one entry, whose forward pass ends once its modules have seen the batch."""
    sums: list[torch.Tensor | None] = [None] * len(modules)
    counts = [0] * len(modules)

    def hook(j: int, last: bool):
        def collect(module: nn.Module, args: tuple) -> None:
            total, count = measure(module, args[0].detach())
            sums[j] = total if sums[j] is None else sums[j] + total
            counts[j] += count
            if last:
                raise _Stop
        return collect

    handles = [m.register_forward_pre_hook(hook(j, stop and k == len(users) - 1))
               for j, users in enumerate(modules) for k, m in enumerate(users)]
    was_training = model.training
    model.eval()
    try:
        for x in inputs:
            try:
                model(x)
            except _Stop:
                pass
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if any(total is None for total in sums):
        raise ValueError("a compressed layer saw no input in the model's forward pass; post-training compression "
                         "needs every compressed layer to be used")
    return [total / count for total, count in zip(sums, counts)]


def _damped_inverse_factor(h: torch.Tensor) -> torch.Tensor:
    """The upper Cholesky factor of (H + damping)^-1 per group (GPTQ's), columns no input reached
    given a unit diagonal so that H stays invertible."""
    h = h.clone()
    diag = h.diagonal(dim1=-2, dim2=-1)
    diag[diag == 0] = 1.0
    diag += DAMPING * diag.mean(-1, keepdim=True)
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(h))
    return torch.linalg.cholesky(inverse, upper=True)


def _column_scale(h: torch.Tensor) -> torch.Tensor:
    """d per group and column: removing weight w of that column costs about (w / d)^2 of output."""
    return _damped_inverse_factor(h).diagonal(dim1=-2, dim2=-1).float()


def _option_table(w: torch.Tensor, d2: torch.Tensor, energy: float, min_keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Kept counts (K,) and the relative output error of each (kept count, bits) option (K, bits):
    the weights of largest w^2 / d^2 kept, rounded to a k-means codebook fitted to them."""
    weight = (1.0 / d2)[:, None, :].expand_as(w).flatten()
    values = w.flatten()
    score = values.square() * weight
    order = score.argsort(descending=True)
    values, weight, score = values[order], weight[order], score[order].double()
    n = values.numel()
    tail = torch.cat([score.flip(0).cumsum(0).flip(0), score.new_zeros(1)])
    ladder = torch.logspace(math.log10(max(1, min_keep)), math.log10(n), LADDER_POINTS, dtype=torch.float64)
    keeps = torch.unique(ladder.round().long().clamp(max(1, min_keep), n))
    choices = list(BIT_CHOICES)
    books, _ = fit_codebooks_many([values[:k] for k in keeps.tolist()], torch.tensor([choices] * len(keeps)), iters=15)
    errors = torch.empty(len(keeps), len(choices), dtype=torch.float64)
    for i, k in enumerate(keeps.tolist()):
        kept, kept_weight = values[:k], weight[:k].double()
        for j, book in enumerate(books[i]):
            rounded = book[assign(kept, book)]
            errors[i, j] = float(tail[k]) + float(((kept - rounded).double().square() * kept_weight).sum())
    return keeps.cpu(), (errors / energy).cpu()


def _reconstruct_layer(weight: torch.Tensor, h: torch.Tensor, mask: torch.Tensor, bits: int
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's codebook (2^bits sorted values) and its reconstructed weight: pruned weights
    exactly zero, kept ones codebook values, chosen column by column so that the output on the
    calibration inputs stays close to the dense layer's. Two passes: the codebook fitted to the
    kept dense weights, then refitted to the corrected weights the first pass rounded; the one
    with the smaller output error is kept."""
    groups = h.shape[0]
    w = _grouped(weight, groups)
    m = _grouped(mask, groups)
    factor = _damped_inverse_factor(h).to(w.dtype)
    book = fit_codebooks_many([torch.masked_select(weight, mask)], torch.tensor([[bits]]))[0][0][0].to(w.device)
    best = None
    for _ in range(2):
        q, rounded_from = _round_columns(w, m, factor, book)
        error = float(torch.einsum("grd,gde,gre->", (w - q).double(), h, (w - q).double()))
        if best is None or error < best[0]:
            best = error, book, q
        kept = torch.masked_select(rounded_from, m)
        book = fit_codebooks_many([kept], torch.tensor([[bits]]), starts=[[book]])[0][0][0].to(w.device)
    _, book, q = best
    return book, q.reshape(weight.shape)


def _round_columns(w: torch.Tensor, mask: torch.Tensor, factor: torch.Tensor, book: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ with a mask and a non-uniform codebook: each column in turn rounded (kept weights to
    their nearest centre, pruned ones to zero) and its error spread over the columns not yet
    rounded through the Cholesky factor of H^-1, in blocks. Returns the rounded weights and the
    corrected values that were rounded."""
    w = w.clone()
    q = torch.zeros_like(w)
    before = torch.zeros_like(w)
    columns = w.shape[-1]
    for s in range(0, columns, BLOCK):
        e = min(s + BLOCK, columns)
        block = w[:, :, s:e].clone()
        errors = torch.zeros_like(block)
        f = factor[:, s:e, s:e]
        for i in range(e - s):
            col = block[:, :, i]
            rounded = torch.where(mask[:, :, s + i], book[assign(col, book)], 0.0)
            err = (col - rounded) / f[:, i, i, None]
            block[:, :, i:] -= err[:, :, None] * f[:, i, None, i:]
            q[:, :, s + i], before[:, :, s + i], errors[:, :, i] = rounded, col, err
        w[:, :, e:] -= errors @ factor[:, s:e, e:]
    return q, before


def _channel_moments(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Per channel (dimension 1): the sum and the sum of squares of a BatchNorm's input."""
    dims = [d for d in range(x.dim()) if d != 1]
    x = x.double()
    return torch.stack([x.sum(dims), x.square().sum(dims)]), x.numel() // x.shape[1]


@torch.no_grad()
def _batchnorm_statistics(dense: nn.Module, model: nn.Module, inputs: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The running statistics of every BatchNorm of the compressed `model` (which it takes), by
    state-dict name: of two candidates, the one whose outputs on the calibration inputs are closer
    to the dense network's. Moved by the shift compression made in each BatchNorm's input (the
    mean by the difference, the variance by the ratio, each measured on the same inputs after the
    BatchNorms before it are moved) keeps the statistics the network was trained with, which a
    few hundred inputs estimate worse (re-estimating the published ResNet-20's alone costs 1.7
    points, BENCHMARKS.md); measured anew on the compressed network holds where compression moved
    the activations too far for a small shift (high ratios)."""
    found = [(n, m) for n, m in model.named_modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not found:
        return {}
    names = [f"{n}.{b}" if n else b for n, _ in found for b in ("running_mean", "running_var")]
    tensors = model.state_dict()
    original = {k: tensors[k].clone() for k in names}
    dense_modules = dict(dense.named_modules())
    reference = _accumulate(dense, [[dense_modules[n]] for n, _ in found], inputs, _channel_moments, stop=False)
    for (_, norm), (mean_d, square_d) in zip(found, reference):
        mean_c, square_c = _accumulate(model, [[norm]], inputs, _channel_moments, stop=True)[0]
        var_d, var_c = square_d - mean_d.square(), square_c - mean_c.square()
        ratio = torch.where(var_d > 1e-12, var_c / var_d.clamp(min=1e-12), torch.ones_like(var_d))
        norm.running_mean.add_((mean_c - mean_d).to(norm.running_mean.dtype))
        norm.running_var.mul_(ratio.to(norm.running_var.dtype))
    shifted = {k: tensors[k].clone() for k in names}
    for k in names:
        tensors[k].copy_(original[k])
    _reestimate(model, [m for _, m in found], inputs)
    measured = {k: tensors[k].clone() for k in names}
    best = min((shifted, measured), key=lambda state: _output_distance(dense, model, state, inputs))
    for k in names:
        tensors[k].copy_(best[k])
    return best


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


def _output_distance(dense: nn.Module, model: nn.Module, state: dict[str, torch.Tensor], inputs: list[torch.Tensor]) -> float:
    """Mean squared distance between the outputs of `model` with these tensors and the dense network's."""
    tensors = model.state_dict()
    for k, v in state.items():
        tensors[k].copy_(v)
    was = dense.training, model.training
    dense.eval(), model.eval()
    distance = sum(float((model(x) - dense(x)).double().square().sum()) for x in inputs)
    dense.train(was[0]), model.train(was[1])
    return distance

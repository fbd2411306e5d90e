"""Compressor: the method attached to any model and driven by any training loop.

    comp = Compressor(model, target="50x", steps=epochs * len(loader))
    for epoch in range(epochs):
        for x, y in loader:
            loss = my_loss(model(x), y)
            opt.zero_grad(); loss.backward(); opt.step()
            comp.step(lr=opt.param_groups[0]["lr"])
    comp.finish(); comp.convert_(); comp.export("model.jcz")

`step()` runs after the user's optimizer step: a projection onto the budget every
`project_every` steps (with ADMM's dual update) and the proximal pull of the weights towards
it; then, with masks and bitwidths fixed, `retrain` (the weights train behind their quantized
values) and, for the last `finetune` part of the steps, training in exactly the deployed shape.
The Engine (trainer.py) is one such loop; records (records.py) report what happens.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import fnmatch
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn

from . import distributed
from .projector import Allocation, LayerSpec, Projector, fingerprint
from .budget import Budget, LayerBounds, Shipped, resolve_target
from .bops import BopsAccounting
from .budget_modes import BUDGET_MODES, MEASURED_MODES
from .codec import PackedLayer, encode, fp32_bytes
from .data import DESCRIPTION_KEYS
from .links import find_links
from .methods import METHODS, Layers, Method, ProgressCallback, make_method, never_back, part_of
from .methods.posttrain import remeasured_batchnorm
from .records import EpochRecord, FinalRecord, LayerRecord, Record, StepRecord
from .rundir import atomic_write
from .schedule import Schedule

SAVED_VERSION = 6  # of saved settings and states: a resume or export checks it


@dataclass
class CompressorConfig:
    """How the method compresses: target, method (and its own settings), budget mode and its knobs. The built-in
    trainer's settings (epochs, learning rate, ...) extend it in trainer.EngineConfig."""

    target: str | float = "50x"
    method: str = "admm"  # "posttrain" (no training), or a baseline: "uniform", "sequential" (jointcomp/methods/)
    budget_mode: str = "paper"  # "paper" (bits x non-zeros), "file" (.jcz bytes), "flash" (C const data), "bops"
    settings: dict[str, Any] = field(default_factory=dict)  # the method's own (its Config's fields: admm's rho)
    project_every: int = 0  # steps between projections; 0 = schedule.DEFAULT_PROJECTIONS over the run
    retrain: float = 0.3  # fraction of the steps, before the final phase, with masks and bits fixed
    finetune: float = 0.3  # fraction of the steps trained at the end in the deployed shape
    distill: float = 0.5  # weight of the starting model's soft targets in `distill()` (0 = off)
    temperature: float = 4.0  # of the distillation's soft targets
    layer_types: tuple[str, ...] = ("Conv2d", "Linear")
    exclude: tuple[str, ...] = ()  # weight names (glob) neither compressed nor counted
    bounds: dict[str, LayerBounds] = field(default_factory=dict)  # weight name glob -> bounds

    def __post_init__(self) -> None:
        if not math.isfinite(self.temperature) or self.temperature <= 0:
            raise ValueError(f"temperature must be a positive finite number, got {self.temperature}")
        for name in ("retrain", "finetune", "distill"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must lie between 0 and 1, got {getattr(self, name)}")
        if self.retrain + self.finetune > 0.9:
            raise ValueError(f"retrain + finetune must leave at least a tenth of the steps to choosing the allocation, got "
                             f"{self.retrain} + {self.finetune}")
        if self.project_every < 0:
            raise ValueError(f"project_every must be at least 0, got {self.project_every}")
        if self.budget_mode not in BUDGET_MODES:
            raise ValueError(f"unknown budget mode {self.budget_mode!r}; use {' or '.join(map(repr, BUDGET_MODES))}")
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        METHODS[self.method].settings(self.settings)  # refused here, in one line, when wrong
        if self.budget_mode in MEASURED_MODES and not METHODS[self.method].measured_budgets:
            measured = ", ".join(repr(name) for name, m in METHODS.items() if m.measured_budgets)
            raise ValueError(f"the {self.budget_mode} budget mode needs method {measured} "
                             "(the baselines cannot trim to a measured size)")
        unknown = [t for t in self.layer_types if not isinstance(getattr(nn, t, None), type)]
        if unknown:
            raise ValueError(f"unknown layer type {unknown[0]!r}; use torch.nn class names such as Conv2d, Linear")

    def with_method(self, method: str):
        """This config for `method`: another method's own settings start at their defaults."""
        return dataclasses.replace(self, method=method, settings=self.settings if method == self.method else {})

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["bounds"] = {k: dataclasses.asdict(v) for k, v in self.bounds.items()}
        return {"version": SAVED_VERSION, **data}

    @classmethod
    def from_dict(cls, data: dict):
        data = dict(data)
        check_version(data.pop("version", None), "settings")
        data["bounds"] = {k: LayerBounds(**v) for k, v in data.get("bounds", {}).items()}
        for key in ("layer_types", "exclude"):
            data[key] = tuple(data.get(key, ()))
        return cls(**data)


def check_version(version: object, what: str) -> None:
    """Refuse `what` (settings, state) saved by a jointcomp that wrote another layout."""
    if version != SAVED_VERSION:
        raise ValueError(f"these {what} were saved by another jointcomp version (layout {version}, this one reads "
                         f"{SAVED_VERSION}); start a new run")


def compressible_weights(model: nn.Module, config: CompressorConfig) -> list[tuple[str, nn.Parameter, LayerBounds]]:
    """The (name, weight, bounds) of every layer the config compresses, in model order."""
    types = tuple(getattr(nn, t) for t in config.layer_types)
    found, seen = [], set()
    for mod_name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not isinstance(module, types) or not isinstance(weight, nn.Parameter) or id(weight) in seen:
            continue
        name = f"{mod_name}.weight" if mod_name else "weight"
        if any(fnmatch.fnmatchcase(name, pat) for pat in config.exclude):
            continue
        seen.add(id(weight))
        bounds = next((b for pat, b in config.bounds.items() if fnmatch.fnmatchcase(name, pat)), LayerBounds())
        found.append((name, weight, bounds))
    if not found:
        raise ValueError(
            f"the model has no {'/'.join(config.layer_types)} weights to compress "
            "(check --exclude and the layer types)"
        )
    return found


@torch.no_grad()
def _assign(model: nn.Module, params: list[nn.Parameter], values: list[torch.Tensor], state: dict[str, torch.Tensor]) -> None:
    """Copy `values` into `params` and `state` into the model's tensors of those names."""
    for p, v in zip(params, values):
        p.copy_(v)
    tensors = model.state_dict(keep_vars=True)
    for name, value in state.items():
        tensors[name].detach().copy_(value)


def describe(module: nn.Module) -> str:
    """A layer as people name it: "Linear 64→256", "Conv2d 1→20, 5x5"."""
    if isinstance(module, nn.Linear):
        return f"Linear {module.in_features}→{module.out_features}"
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        groups = f", {module.groups} groups" if module.groups > 1 else ""
        return f"Conv2d {module.in_channels}→{module.out_channels}, {kh}x{kw}{groups}"
    return type(module).__name__


# For progress, shares of the time of compressing without training (the published ResNet-20 at 50x from
# the app on two CPU cores: calibration 20 s, allocation 29 s, scoring the result 13 s): the calibration's
# of the whole, and the final score's of what follows it (`finish`)
CALIBRATION_SHARE = 0.35
SCORE_SHARE = 0.3
FIT_SLACK = 1e-3  # a measured size this close below the target uses the budget well enough
FIT_GROWTHS = 6  # at most this many tries at a larger budget after one fits


def trim_to_fit(deploy: Callable[[float], Allocation], target: float, size: Callable[[Allocation], float],
                draft: Callable[[float], Allocation] | None = None) -> Allocation:
    """The allocation `deploy` makes at about the largest budget whose real `size` fits
    `target`. A real size can differ from the estimate the projection spends against: the
    budget shrinks by each overshoot until one fits, then grows by each undershoot (halving
    back after an overshoot) a few times; the largest allocation that fits is kept. `draft`,
    when given, makes the same masks and bits as `deploy` more cheaply (posttrain's, without its
    reconstruction in order): the budget is searched on drafts, then `deploy` runs once, at the budget
    found (and the search runs again on `deploy` should its values move its real size over)."""
    found, budget = _search_budget(draft or deploy, target, size)
    if draft is None:
        return found
    alloc = deploy(budget)
    return alloc if size(alloc) <= target else _search_budget(deploy, target, size)[0]


def _search_budget(deploy: Callable[[float], Allocation], target: float, size: Callable[[Allocation], float]
                   ) -> tuple[Allocation, float]:
    """trim_to_fit's search: the largest allocation that fits, and the budget that made it."""
    budget, best, best_size, fits_at, growths = target, None, -1.0, None, 0
    for _ in range(50):
        alloc = deploy(budget)
        measured = size(alloc)
        if measured <= target:
            if measured > best_size:
                best, best_size, best_budget = alloc, measured, budget
            fits_at = budget if fits_at is None else max(fits_at, budget)
        if best is not None and (growths == FIT_GROWTHS or target - best_size <= FIT_SLACK * target):
            return best, best_budget
        if measured <= target:
            budget += target - measured
        elif fits_at is None:
            budget -= (measured - target) + 64
        else:
            budget = (fits_at + budget) / 2
        growths += best is not None
    if best is None:
        raise RuntimeError(f"could not fit the model in {target:.0f} bits; please report this")
    return best, best_budget


class OneProcess:
    """What the processes of a run must agree on, when there is one process: nothing.
    Under torchrun `distributed.ProcessGroup` takes its place."""

    def target(self, bits: float) -> float:
        return bits

    def check(self, fingerprint: Callable[[], torch.Tensor]) -> None:
        pass


class Compressor:
    """Prune and quantize `model` jointly to `target` over `steps` optimizer steps.

    Options are `CompressorConfig` fields (or pass `config=`). `evaluate(model) -> float`,
    when given, scores the deployable model in the records (e.g. validation accuracy);
    `callback(record)` receives every record; `meta` describes the model in the file
    header (`data.model_description`) so that it reloads by name; `dense_metric` is `evaluate`
    of the model as attached where the caller has it already (a CIFAR ResNet's score is seconds).
    """

    def __init__(
        self,
        model: nn.Module,
        target: str | float | None = None,
        *,
        steps: int = 0,
        config: CompressorConfig | None = None,
        evaluate: Callable[[nn.Module], float] | None = None,
        callback: Callable[[Record], None] | None = None,
        meta: dict | None = None,
        dense_metric: float | None = None,
        **options,
    ) -> None:
        if target is not None:
            options["target"] = target
        self.config = dataclasses.replace(config or CompressorConfig(), **options)
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module  # the names, the file and the teacher are those of the model itself
        self.model, self.steps = model, int(steps)
        self.evaluate, self.callback, self.meta = evaluate, callback, dict(meta or {})
        layers = compressible_weights(model, self.config)
        compressed = [(n, w, b) for n, w, b in layers if not b.dense]
        if not compressed:
            raise ValueError("every layer found is left dense by its bounds: there is nothing to compress")
        self.names = [n for n, _, _ in compressed]
        self.params = [w for _, w, _ in compressed]
        self.specs = [LayerSpec(n, tuple(w.shape), b) for n, w, b in compressed]
        modules = dict(model.named_modules())
        self.labels = [describe(modules[n.removesuffix("weight").removesuffix(".")]) for n in self.names]
        shape = self.meta.get("input_shape")  # of one input: the bit-operations are counted on it
        self.accounting = BUDGET_MODES[self.config.budget_mode](shape)
        self.reserved_bits, self.dense_bits = self.accounting.reference_bits(model, layers)
        self.bops = BopsAccounting(shape)  # reported in every budget mode when the input's shape is known
        self.reserved_bops, self.dense_bops = self.bops.reference_bits(model, layers) if shape else (0.0, 0.0)
        self.fp32_bytes = fp32_bytes(model)
        self.projector = Projector(self.specs, self.accounting, self.reserved_bits, find_links(model, self.names))
        self.schedule = Schedule.of(self.steps, self.config.project_every, self.config.retrain, self.config.finetune)
        self.method = make_method(self.config.method, Layers(model, self.names, self.params, self.projector),
                                  self.config.settings)
        if self.method.trains and self.steps < 1:
            raise ValueError(f"steps must be at least 1 for method {self.config.method!r}, got {steps}")
        self._lock = threading.Lock()
        self.agreement = distributed.ProcessGroup() if distributed.active() else OneProcess()
        self._target_bits = self.resolve(self.config.target)
        self.density = self.initial_density(self._target_bits)  # per layer, of the last projection: what positions cost
        self.step_count = 0
        self.epoch = 0  # epochs reported by end_epoch()
        self.lambdas = (float("nan"), float("nan"))  # of the projections since the last epoch record
        self.fixed_target: float | None = None  # the target the final phase's allocation fits
        self.notes: list[str] = []  # events for the next epoch record
        self.teacher: nn.Module | None = None  # the model as attached, copied by the first `distill()`
        self.batchnorm_inputs: list[torch.Tensor] = []  # a deployable model's BatchNorm statistics are measured on these
        self.dense_metric = self.score(None) if dense_metric is None else dense_metric  # of the model as attached
        self.final: Allocation | None = None
        self.final_file_bytes = 0
        self.converted = False
        self._seconds = 0.0  # of earlier sessions (a resumed run)
        self._started = self._epoch_started = time.perf_counter()

    # --- the target, from any thread --------------------------------------------------
    @property
    def target_bits(self) -> float:
        with self._lock:
            return self._target_bits

    def set_target(self, target: str | float) -> float:
        """Move the target (any thread); the next projection uses it. Returns it in bits."""
        bits = self.resolve(target)
        with self._lock:
            self._target_bits = bits
        return bits

    def resolve(self, target: str | float) -> float:
        """A target ("50x", "12KB", bits) in bits of this compressor's accounting."""
        numel = [s.numel for s in self.specs]
        bounds = [s.bounds for s in self.specs]
        return resolve_target(target, numel, bounds, self.accounting, self.reserved_bits, self.dense_bits)

    # --- the loop ---------------------------------------------------------------------
    @property
    def phase(self) -> str:
        """The method's first phase ("admm", or "prune" for the baselines), then "retrain" (masks
        and bits fixed, codes still move), then "finetune" (the deployed shape)."""
        if self.fixed_target is None:
            return self.method.first_phase
        return "retrain" if self.method.retraining else "finetune"

    def step(self, lr: float, loss: float | torch.Tensor | None = None) -> StepRecord:
        """Apply the method after one optimizer step taken at learning rate `lr`: projections
        and phases when due, then the pull towards the projection. `loss` only goes into
        the step record."""
        if self.converted:
            raise RuntimeError("the model was converted to its deployed weights; start a new Compressor to go on")
        t = self.step_count
        if self.schedule.projects(t) and not bool(torch.stack([p.detach().float().square().sum() for p in self.params]).isfinite().all()):
            raise FloatingPointError(f"step {t}: the weights are not finite (NaN, infinite, or too large to square), so they "
                                     "cannot be projected; training diverged: lower the learning rate and start again from "
                                     "a good state")
        with self._lock:
            target = self._target_bits = self.agreement.target(self._target_bits)
        decided = t == 0
        if t == 0:
            self.density = self.initial_density(target)
        projected = None
        if self.fixed_target is None and self.schedule.projects(t):
            projected = self.method.project(Budget(target, self.density))
        if projected:
            self.lambdas = projected
            self.density = self.method.density()
        schedule = self.schedule
        if (self.fixed_target is None and t == schedule.retrain_start) or self.fixed_target not in (None, target):
            self._fix_allocation(target, retrain=schedule.finetune_start < 0 or t < schedule.finetune_start)
            decided = True
        elif t == schedule.finetune_start and self.phase == "retrain":
            frozen = self.method.fix_codes()
            self.note(f"retraining froze {frozen:,} of {int(self.method.fixed.nnz.sum()):,} codes: they kept flipping back and forth")
        self.method.after_step(lr)
        if decided or projected:
            self.agreement.check(self.fingerprint)
        self.step_count += 1
        value = float("nan") if loss is None else float(loss)
        return self._emit(StepRecord(self.phase, t, self.epoch, value, lr))

    def calibrate(self, batches: Iterable, progress: ProgressCallback | None = None,
                  reuse: Compressor | None = None) -> EpochRecord | None:
        """Show the method the network's inputs: `batches` of model inputs, or of (inputs, labels)
        pairs (a DataLoader, a list of tensors). The post-training method prices its options and
        reconstructs the kept weights with them; then `finish()` compresses without training.
        A training method, before its first step, starts from the post-training result at the
        target instead: the weights it keeps, reconstructed, and its BatchNorm statistics (so
        training has less to recover); the weights it prunes keep their trained values, so the
        method's projections can still revise which to keep (zeroed, they never grew past the
        kept ones again). The record of that start is returned (epoch -1: before the first epoch).
        `progress(fraction, text)` hears how far the calibration is (and that start's allocation).
        `reuse`: a compressor without training calibrated before on a copy of this model (the app's
        what-ifs): what it measured is taken where it saw the same inputs and weights."""
        calibrated = reuse.method if reuse is not None else None
        if not self.method.trains:
            self.method.calibrate(batches, progress, calibrated)
            return None
        if self.step_count:
            raise ValueError("calibrate() a training method before its first step: it sets the weights training starts from")
        start = make_method("posttrain", Layers(self.model, self.names, self.params, self.projector))
        start.calibrate(batches, part_of(progress, 0.0, CALIBRATION_SHARE, "calibrating"), calibrated)
        self.batchnorm_inputs = start.inputs
        alloc = self.allocation(self.target_bits, method=start, progress=part_of(progress, CALIBRATION_SHARE, 1.0))
        if self.config.distill and self.teacher is None:  # the teacher stays the model as attached
            self.teacher = copy.deepcopy(self.model).eval().requires_grad_(False)
        kept_reconstructed = [torch.where(m, v, p.detach().float()) for m, v, p in zip(alloc.masks, alloc.values, self.params)]
        _assign(self.model, self.params, kept_reconstructed, alloc.state)
        return self._emit(self._epoch_record(alloc, start.first_phase, self.epoch - 1))

    def note(self, text: str) -> None:
        """Tell `text` in the next epoch record (an event of the run, e.g. a recovery)."""
        self.notes.append(text)

    def distill(self, x: torch.Tensor, output: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        """`loss` mixed with distillation from the model as attached (soft targets over the
        last dimension at `temperature`, weight `distill`); `loss` itself when distill is 0.
        Call it from the first batch on: its first call keeps a copy of the model as teacher."""
        t, w = self.config.temperature, self.config.distill
        if w == 0:
            return loss
        if self.teacher is None:
            if self.step_count > 0:
                raise ValueError("distill() must be used from the first step on: its teacher is the model as attached")
            self.teacher = copy.deepcopy(self.model).eval().requires_grad_(False)
        with torch.no_grad():
            soft = (self.teacher(x) / t).log_softmax(-1)
        kl = nn.functional.kl_div((output / t).log_softmax(-1), soft, log_target=True, reduction="batchmean")
        return (1 - w) * loss + w * t**2 * kl

    def end_epoch(self) -> EpochRecord:
        """The record of the deployable model now: score, size, multipliers, residuals and
        per-layer density and bitwidth. Call it once per epoch (or whenever you like)."""
        self._measure_moving_codes()
        record = self._epoch_record(self.method.fixed or self._deployable(self.method, self.density, self.target_bits),
                                    self.phase, self.epoch)
        self.epoch += 1
        self.lambdas = (float("nan"), float("nan"))
        return self._emit(record)

    def _epoch_record(self, alloc: Allocation, phase: str, epoch: int) -> EpochRecord:
        """The record of this allocation as the deployable model at the end of `epoch`."""
        seconds = time.perf_counter() - self._epoch_started
        file_bytes = len(self.encode(alloc))
        size = self.measure(alloc, file_bytes)
        residual, dual = self.method.residuals()
        if self.step_count == 0:  # the calibrated start: no projection yet, so no residuals
            residual, dual = torch.zeros_like(residual), torch.zeros_like(dual)
        note, self.notes = "; ".join(self.notes), []
        self._epoch_started = time.perf_counter()
        return EpochRecord(
            phase, epoch, self.step_count, self.score(alloc), size, self.dense_bits / size,
            self.target_bits, *self.lambdas, float(residual.sum()), float(dual.square().sum().sqrt()), seconds,
            self.layer_records(alloc, residual, dual), note, file_bytes,
        )

    def finish(self, progress: ProgressCallback | None = None) -> FinalRecord:
        """The deployable model, checked to fit the live target: the fine-tuned allocation of
        the final phase when it still fits, else a fresh projection trimmed until it does.
        `progress` hears how far a long allocation is (posttrain's), then of the scoring."""
        target = self.target_bits
        fixed = self.method.fixed
        self._measure_moving_codes()
        if fixed is not None and self.measure(fixed) <= target:
            alloc = fixed
        else:
            alloc = self.allocation(target, progress=part_of(progress, 0.0, 1 - SCORE_SHARE))
        if progress:
            progress(1 - SCORE_SHARE, "scoring the compressed network")
        self.final, self.final_file_bytes = alloc, len(self.encode(alloc))
        size = self.measure(alloc, self.final_file_bytes)
        residual, dual = self.method.residuals()
        return self._emit(FinalRecord(
            self.score(alloc), self.dense_metric, size, target, self.dense_bits / size, self.epoch,
            self.seconds, self.method.trains and self.step_count < self.steps, self.final_file_bytes,
            self.fp32_bytes / self.final_file_bytes, self.layer_records(alloc, residual, dual),
            *self.count_bops(alloc),
        ))

    @torch.no_grad()
    def convert_(self) -> nn.Module:
        """Put the final deployable weights into the model itself (after `finish`)."""
        if self.final is None:
            raise ValueError("nothing to convert yet: call finish() first")
        _assign(self.model, self.params, self.final.values, self.final.state)
        self.converted = True
        return self.model

    def export(self, path: str) -> int:
        """Write the final deployable model as a .jcz file (atomically); returns its bytes."""
        if self.final is None:
            raise ValueError("nothing to export yet: call finish() first")
        data = self.encode(self.final)
        atomic_write(path, data)
        return len(data)

    # --- checkpoints of the user's run ------------------------------------------------
    def state_dict(self) -> dict:
        """Everything a resumed run needs besides the model's and the optimizer's own state."""
        return {
            "version": SAVED_VERSION, "config": self.config.to_dict(), "steps": self.steps, "step": self.step_count, "epoch": self.epoch,
            "target_bits": self.target_bits, "fixed_target": self.fixed_target, "lambdas": list(self.lambdas),
            "notes": list(self.notes), "method": self.method.state_dict(), "density": self.density,
            "teacher": self.teacher.state_dict() if self.teacher is not None else None,
            "dense_metric": self.dense_metric, "seconds": self.seconds,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state_dict()`; load the model's weights first."""
        check_version(state.get("version"), "compressor state")
        self.step_count, self.epoch = int(state["step"]), int(state["epoch"])
        with self._lock:
            self._target_bits = float(state["target_bits"])
        self.fixed_target = state["fixed_target"]
        self.lambdas = tuple(state["lambdas"])
        self.notes = list(state["notes"])
        self.method.load_state_dict(state["method"])
        self.density = state["density"].double()
        if state["teacher"] is not None:
            self.teacher = self.teacher or copy.deepcopy(self.model).eval().requires_grad_(False)
            self.teacher.load_state_dict(state["teacher"])
        self.dense_metric = float(state["dense_metric"])
        self._seconds = float(state["seconds"])
        self._started = self._epoch_started = time.perf_counter()

    # --- pieces -----------------------------------------------------------------------
    @property
    def seconds(self) -> float:
        return self._seconds + time.perf_counter() - self._started

    def packed(self, alloc: Allocation) -> dict[str, PackedLayer]:
        """This allocation's compressed weights as they are stored: codebook, mask, codes."""
        return {
            name: PackedLayer(spec_.shape, int(bits), book.cpu(), mask.cpu(), codes.cpu())
            for name, spec_, bits, book, mask, codes in zip(
                self.names, self.specs, alloc.bits.tolist(), alloc.codebooks, alloc.masks, alloc.codes
            )
        }

    def encode(self, alloc: Allocation) -> bytes:
        """The .jcz bytes of the model with this allocation's compressed weights."""
        spec = {k: self.meta[k] for k in DESCRIPTION_KEYS if k in self.meta} if "model" in self.meta else None
        with self._weights(alloc, values=False):
            return encode(self.model, self.packed(alloc), spec)

    def measure(self, alloc: Allocation, file_bytes: int | None = None) -> float:
        """The allocation's size in this compressor's accounting (real bytes where it counts those;
        `file_bytes`: the .jcz's, when already known)."""
        shipped = Shipped(lambda: self.packed(alloc),
                          lambda: file_bytes if file_bytes is not None else len(self.encode(alloc)))
        return self.accounting.measure(alloc.size_bits, shipped)

    def count_bops(self, alloc: Allocation) -> tuple[float, float]:
        """The allocation's bit-operations on one input (bops.py) and the dense model's over them; (0, 0)
        when the input's shape is not known."""
        if not self.dense_bops:
            return 0.0, 0.0
        bops = self.bops.size_bits(alloc.bits, alloc.nnz.double(), self.projector.numel) + self.reserved_bops
        return bops, self.dense_bops / bops

    def allocation(self, target: float, density: torch.Tensor | None = None, method: Method | None = None,
                   sketch: bool = False, progress: ProgressCallback | None = None) -> Allocation:
        """The method's deployable model (or `method`'s) at about the largest budget whose real size
        fits `target` bits (`trim_to_fit`), positions priced at `density` (default: the last
        projection's); searched on the method's drafts where it makes them. `sketch`: the method's
        quick preview of it instead (`Method.sketch`). `progress`: see `Method.allocate` (held, not moved back,
        where the search drafts again). Changes nothing."""
        method, density, progress = method or self.method, self.density if density is None else density, never_back(progress)
        if sketch:
            return trim_to_fit(lambda bits: self._deployable(method, density, bits, sketch=True), target, self.measure)
        draft = (lambda bits: method.draft(Budget(bits, density), progress)) if method.drafts else None
        return trim_to_fit(lambda bits: self._deployable(method, density, bits, progress=progress), target,
                           self.measure, draft)

    def _deployable(self, method: Method, density: torch.Tensor, bits: float, sketch: bool = False,
                    progress: ProgressCallback | None = None) -> Allocation:
        """`method`'s deployable model (its `sketch`) at `bits`, positions priced at `density`; with
        `batchnorm_inputs` (from `calibrate`, or set: the Engine's calibration inputs), its BatchNorm
        statistics measured for its own weights."""
        budget = Budget(bits, density)
        alloc = method.sketch(budget) if sketch else method.allocate(budget, progress)
        if self.batchnorm_inputs and not alloc.state:
            model = copy.deepcopy(self.model)
            _assign(model, [dict(model.named_parameters(remove_duplicate=False))[n] for n in self.names], alloc.values, {})
            alloc.state = remeasured_batchnorm(model, self.batchnorm_inputs)
        return alloc

    def _measure_moving_codes(self) -> None:
        """While retraining, the model's BatchNorm statistics measured anew on `batchnorm_inputs` for
        the weights it has now: its codes move at every step, and the running averages of training
        lag behind (on `nets:conv_bn` at 500x, with 1-bit layers, the retraining epochs scored
        0.19-0.50 with them and 0.64-0.73 with statistics measured, BENCHMARKS.md). Once codes are
        fixed the weights move smoothly and the running averages of many more inputs are kept."""
        if self.method.fixed is not None and self.method.retraining and self.batchnorm_inputs:
            remeasured_batchnorm(self.model, self.batchnorm_inputs)

    def _fix_allocation(self, target: float, retrain: bool) -> None:
        """Fit the current weights to the live target and train in that shape from now on
        (`retrain`: with code assignments still free)."""
        alloc = self.allocation(target)
        if self.fixed_target is not None:
            self.note(f"target moved to {target:.0f} bits during the {self.phase} phase: re-projected, "
                              "that phase started again")
        self.method.fix_allocation(alloc, retrain)
        _assign(self.model, [], [], alloc.state)  # from the statistics of these weights on, the model's own follow them
        alloc.state = {}
        self.fixed_target = target

    @torch.no_grad()
    def fingerprint(self) -> torch.Tensor:
        """A fingerprint of the compressed weights (sums, absolute sums and non-zero counts per
        layer): equal on every process exactly when their allocations and weights agree."""
        return fingerprint([p.detach() for p in self.params])

    def initial_density(self, target: float) -> torch.Tensor:
        """A first guess of the kept fraction per layer before any projection: the target at ~4 bits a weight."""
        return torch.full((len(self.specs),), min(1.0, target / (4.0 * sum(s.numel for s in self.specs))), dtype=torch.float64)

    def score(self, alloc: Allocation | None, evaluate: Callable[[nn.Module], float] | None = None) -> float:
        """`evaluate` (default: the compressor's) of the model with this allocation's
        weights (None: as it is now)."""
        evaluate = evaluate or self.evaluate
        if evaluate is None:
            return float("nan")
        with self._weights(alloc):
            return float(evaluate(self.model))

    @contextlib.contextmanager
    def _weights(self, alloc: Allocation | None, values: bool = True) -> Iterator[None]:
        """The model with this allocation's compressed weights (`values`) and other state for a
        while, then exactly as before."""
        params = self.params if values and alloc is not None else []
        state = alloc.state if alloc is not None else {}
        if not params and not state:
            yield
            return
        tensors = self.model.state_dict(keep_vars=True)
        saved_params = [p.detach().clone() for p in params]
        saved_state = {k: tensors[k].detach().clone() for k in state}
        try:
            _assign(self.model, params, alloc.values if params else [], state)
            yield
        finally:
            _assign(self.model, params, saved_params, saved_state)

    def layer_records(self, alloc: Allocation, residual: torch.Tensor, dual: torch.Tensor) -> list[LayerRecord]:
        """Each compressed layer's record for this allocation (and its ADMM residual and dual norm)."""
        return [
            LayerRecord(s.name, s.numel, k, k / s.numel, int(b), float(r), float(d), label)
            for s, k, b, r, d, label in zip(self.specs, alloc.nnz.tolist(), alloc.bits.tolist(), residual, dual,
                                            self.labels)
        ]

    def _emit(self, record):
        if self.callback is not None:
            self.callback(record)
        return record

"""The training loop: dense pre-training (optional), then ADMM joint pruning + quantization.

`Engine` is an iterator of records (see records.py). It can be stopped (`stop()`) and its
target moved (`set_target()`) from another thread; the next projection uses the new
target. With a run folder it saves a resumable state after every epoch.
"""
from __future__ import annotations

import copy
import dataclasses
import fnmatch
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import nn
from torch.func import functional_call

from .admm import Allocation, LayerSpec, Projector
from .budget import DENSE_BITS, FileAccounting, LayerBounds, PaperAccounting, resolve_target
from .codec import PackedLayer, encode, fp32_bytes
from .data import Dataset
from .methods import METHODS, make_method
from .records import EpochRecord, FinalRecord, LayerRecord, Record, StartRecord, StepRecord
from .rundir import MODEL_FILE, RunDir, atomic_write

FILE_OVERHEAD_BYTES = 64  # magic, lengths, checksum and the model description


@dataclass
class CompressConfig:
    """Everything a compression run needs besides the model and the data."""

    target: str | float = "50x"
    epochs: int = 15
    dense_epochs: int = 0  # plain training first, for a model that is not pre-trained
    batch_size: int = 64
    lr: float = 0.05
    optimizer: str = "sgd"  # "sgd" (with momentum) or "adam"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: float = 1.0
    rho: float = 2.0
    project_every: int = 0  # steps between projections; 0 = once per epoch
    finetune: float = 0.3  # admm: fraction of the epochs trained at the end in the deployed shape
    distill: float = 0.5  # weight of distillation from the dense starting model (0 = off)
    temperature: float = 4.0  # of the distillation's soft targets
    layer_types: tuple[str, ...] = ("Conv2d", "Linear")
    exclude: tuple[str, ...] = ()  # weight names (glob) neither compressed nor counted
    bounds: dict[str, LayerBounds] = field(default_factory=dict)  # weight name glob -> bounds
    budget_mode: str = "paper"  # "paper" (bits x non-zeros) or "file" (bytes of the .jcz)
    method: str = "admm"  # or a baseline: "uniform", "sequential" (see methods.py)
    seed: int = 0
    device: str = "auto"  # "auto" = CUDA when available, else CPU

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.dense_epochs < 0:
            raise ValueError("epochs must be at least 1 and dense_epochs at least 0")
        for name in ("lr", "rho", "momentum", "weight_decay", "warmup_epochs", "temperature"):
            if not math.isfinite(getattr(self, name)) or getattr(self, name) < 0:
                raise ValueError(f"{name} must be a finite number of at least 0, got {getattr(self, name)}")
        if self.batch_size < 1 or self.lr == 0 or self.temperature == 0:
            raise ValueError("batch_size, lr and temperature must be positive")
        for name in ("finetune", "distill"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must lie between 0 and 1, got {getattr(self, name)}")
        if self.optimizer not in ("sgd", "adam"):
            raise ValueError(f"optimizer must be 'sgd' or 'adam', got {self.optimizer!r}")
        if self.budget_mode not in ("paper", "file"):
            raise ValueError(f"unknown budget mode {self.budget_mode!r}; use 'paper' or 'file'")
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.budget_mode == "file" and self.method != "admm":
            raise ValueError("the file budget mode needs method 'admm' (the baselines cannot trim to a file size)")

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["bounds"] = {k: dataclasses.asdict(v) for k, v in self.bounds.items()}
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "CompressConfig":
        data = dict(data)
        data["bounds"] = {k: LayerBounds(**v) for k, v in data.get("bounds", {}).items()}
        for key in ("layer_types", "exclude"):
            data[key] = tuple(data.get(key, ()))
        return cls(**data)


def compressible_weights(model: nn.Module, config: CompressConfig) -> list[tuple[str, nn.Parameter, LayerBounds]]:
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


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but no CUDA GPU is available; use --device cpu")
    return torch.device(name)


def make_optimizer(model: nn.Module, config: CompressConfig, epochs: int, steps_per_epoch: int):
    """The configured optimizer with a warm-up + cosine learning-rate schedule over `epochs`."""
    params = list(model.parameters())
    if config.optimizer == "adam":
        opt = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    else:
        opt = torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    steps = max(1, epochs * steps_per_epoch)
    warmup = max(1, round(config.warmup_epochs * steps_per_epoch))

    def factor(t: int) -> float:
        return min(1.0, (t + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(t, steps) / steps))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def batches(data: Dataset, config: CompressConfig, epoch: int, device: torch.device):
    """Shuffled mini-batches of the training split; the order depends only on seed and epoch."""
    gen = torch.Generator().manual_seed(config.seed * 1_000_003 + epoch)
    order = torch.randperm(len(data.train_y), generator=gen)
    for i in range(0, len(order), config.batch_size):
        idx = order[i : i + config.batch_size]
        yield data.train_x[idx].to(device), data.train_y[idx].to(device)


def set_base_lr(opt: torch.optim.Optimizer, sched, lr: float) -> None:
    """Give a loaded optimizer and schedule a new peak learning rate (a resumed run's --lr)."""
    sched.base_lrs = [lr] * len(opt.param_groups)
    for group, factor in zip(opt.param_groups, sched.lr_lambdas):
        group["initial_lr"] = lr
        group["lr"] = lr * factor(sched.last_epoch)


def train_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
               teacher: nn.Module | None = None, distill: float = 0.0, temperature: float = 4.0) -> float:
    """One optimizer step on the cross-entropy loss, mixed with distillation from `teacher`
    when given (soft targets at `temperature`, weight `distill`); returns the loss."""
    model.train()
    opt.zero_grad(set_to_none=True)
    logits = model(x)
    loss = nn.functional.cross_entropy(logits, y)
    if teacher is not None and distill > 0:
        with torch.no_grad():
            soft = (teacher(x) / temperature).log_softmax(1)
        kl = nn.functional.kl_div((logits / temperature).log_softmax(1), soft, log_target=True, reduction="batchmean")
        loss = (1 - distill) * loss + distill * temperature**2 * kl
    if not torch.isfinite(loss):
        raise FloatingPointError("training diverged (the loss is not finite)")
    loss.backward()
    opt.step()
    return loss.item()


@torch.no_grad()
def accuracy(model: nn.Module, data: Dataset, overrides: dict[str, torch.Tensor] | None = None) -> float:
    """Validation accuracy, with some weights replaced by `overrides` (e.g. compressed ones)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    for i in range(0, len(data.val_y), 1000):
        x = data.val_x[i : i + 1000].to(device)
        y = data.val_y[i : i + 1000].to(device)
        correct += int((functional_call(model, overrides or {}, (x,)).argmax(1) == y).sum())
    model.train(was_training)
    return correct / len(data.val_y)


def train_dense(model: nn.Module, data: Dataset, config: CompressConfig, epochs: int) -> Iterator[Record]:
    """Plain training (no compression) for `epochs`; yields step and epoch records."""
    device = pick_device(config.device)
    model.to(device)
    torch.manual_seed(config.seed)
    spe = math.ceil(len(data.train_y) / config.batch_size)
    opt, sched = make_optimizer(model, config, epochs, spe)
    dense_bits = float(DENSE_BITS * sum(w.numel() for _, w, _ in compressible_weights(model, config)))
    for epoch in range(epochs):
        tic = time.perf_counter()
        for i, (x, y) in enumerate(batches(data, config, epoch, device)):
            loss = train_step(model, opt, x, y)
            yield StepRecord("dense", epoch * spe + i, epoch, loss, opt.param_groups[0]["lr"])
            sched.step()
        yield dense_epoch_record(model, data, epoch, (epoch + 1) * spe, time.perf_counter() - tic, dense_bits)


def dense_epoch_record(model: nn.Module, data: Dataset, epoch: int, step: int, seconds: float, dense_bits: float) -> EpochRecord:
    nan = float("nan")
    return EpochRecord("dense", epoch, step, accuracy(model, data), dense_bits, 1.0, nan, nan, nan, nan, nan, seconds)


class Engine:
    """Compress `model` on `data` to `config.target`; iterate it to run."""

    def __init__(
        self,
        model: nn.Module,
        data: Dataset,
        config: CompressConfig,
        run_dir: str | None = None,
        resume: bool = False,
        meta: dict | None = None,
        overwrite: bool = False,
    ) -> None:
        self.config = config
        self.meta = meta or {}  # stored with the run's config (e.g. model and data names)
        self.device = pick_device(config.device)
        self.model = model.to(self.device)
        self.data = data
        layers = compressible_weights(model, config)
        compressed = [(n, w, b) for n, w, b in layers if not b.dense]
        self.names = [n for n, _, _ in compressed]
        self.specs = [LayerSpec(n, tuple(w.shape), b) for n, w, b in compressed]
        self._numel = [s.numel for s in self.specs]
        self._bounds = [s.bounds for s in self.specs]
        self.fp32_bytes = fp32_bytes(model)
        if config.budget_mode == "file":  # everything the file holds besides the compressed weights
            self.accounting: PaperAccounting = FileAccounting(len(self.specs))
            self._reserved = 8.0 * (self.fp32_bytes - 4 * sum(self._numel) + FILE_OVERHEAD_BYTES)
            self.dense_bits = 8.0 * self.fp32_bytes
        else:  # layers left dense count at 32 bits per weight
            self.accounting = PaperAccounting()
            self._reserved = float(DENSE_BITS * sum(w.numel() for _, w, b in layers if b.dense))
            self.dense_bits = float(DENSE_BITS * sum(w.numel() for _, w, _ in layers))
        self._target_bits = self._resolve(config.target)
        self.projector = Projector(self.specs, self.accounting, self._reserved)
        self.steps_per_epoch = math.ceil(len(data.train_y) / config.batch_size)
        self.params = [w for _, w, _ in compressed]
        self.method = make_method(config.method, self.params, self.projector, config.epochs, self.steps_per_epoch)
        self.run_dir = RunDir(run_dir, resume=resume, overwrite=overwrite) if run_dir else None
        self.resume = resume
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.final: Allocation | None = None
        self.final_file_bytes = 0
        self.final_target = 0.0  # the target `final` was fitted to (the live one may move on)
        self._saved_epochs, self._saved_accuracy = 0, float("-inf")  # the state a resume starts from
        self.teacher: nn.Module | None = None  # the dense model, when distilling
        self._frozen_target: float | None = None  # the target the final phase's allocation fits
        self._notes: list[str] = []  # events worth telling in the next epoch record

    # --- control from other threads -------------------------------------------------
    @property
    def target_bits(self) -> float:
        with self._lock:
            return self._target_bits

    def set_target(self, target: str | float) -> float:
        """Change the target of the running compression; returns it in bits."""
        bits = self._resolve(target)
        with self._lock:
            self._target_bits = bits
        return bits

    def _resolve(self, target: str | float) -> float:
        return resolve_target(target, self._numel, self._bounds, self.accounting, self._reserved, self.dense_bits)

    def stop(self) -> None:
        """Ask the run to end after the current step; it still yields its final record."""
        self._stop.set()

    # --- the run --------------------------------------------------------------------
    def __iter__(self) -> Iterator[Record]:
        return self.run()

    def run(self) -> Iterator[Record]:
        cfg = self.config
        torch.manual_seed(cfg.seed)
        started = time.perf_counter()
        state = self._load() if self.resume else None
        done = int(state["epochs_done"]) if state else 0
        elapsed = float(state["seconds"]) if state else 0.0
        dense_accuracy = float(state["dense_accuracy"]) if state else float("nan")
        changes = self._changes(state["config"]) if state else {}
        if self.run_dir and (changes or not state):
            self.run_dir.write_config({**self.meta, "compress": cfg.to_dict()})
        if self.run_dir and not state:
            self.run_dir.start_history()

        yield self._emit(StartRecord(
            cfg.epochs, self.steps_per_epoch, cfg.dense_epochs, self.dense_bits,
            self.target_bits, self.names, str(self.device), done, changes,
        ))
        total = cfg.dense_epochs + cfg.epochs
        opt, sched = self._optimizer(dense=done < cfg.dense_epochs)
        if state and "optimizer" in state:
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            set_base_lr(opt, sched, cfg.lr)
        if not state:  # a state to come back to, whatever happens in the first epoch
            self._save(0, opt, sched, dense_accuracy, 0.0, float("-inf"))

        try:
            yield from self._epochs(done, total, opt, sched, dense_accuracy, elapsed, started)
        except FloatingPointError as err:
            where = (f"; the run folder keeps the state after epoch {self._saved_epochs}: resume it with a "
                     f"lower learning rate (--resume {self.run_dir.path} --lr {cfg.lr / 10:g})") if self.run_dir else ""
            raise FloatingPointError(f"{err}{where}") from None

    def _epochs(self, done: int, total: int, opt, sched, dense_accuracy: float, elapsed: float,
                started: float) -> Iterator[Record]:
        cfg = self.config
        for epoch in range(done, total):
            dense = epoch < cfg.dense_epochs
            if epoch == cfg.dense_epochs:  # entering compression: measure the dense model, keep it as teacher
                dense_accuracy = self._accuracy(None)
                self._keep_teacher()
                self._estimate_positions(self._initial_density())
                self.method.start(self.target_bits)
                if epoch > 0:
                    opt, sched = self._optimizer(dense=False)
            if epoch == self.finetune_epoch and self.method.frozen is None:
                self._freeze()
            tic = time.perf_counter()
            lams = (float("nan"), float("nan"))
            for step_in_epoch, (x, y) in enumerate(batches(self.data, cfg, epoch, self.device)):
                admm_step = (epoch - cfg.dense_epochs) * self.steps_per_epoch + step_in_epoch
                every = cfg.project_every or self.steps_per_epoch
                if self._frozen_target is not None and self._frozen_target != self.target_bits:
                    self._freeze()  # the target moved during the final phase: re-project, start it again
                projected = None if dense else self.method.before_step(admm_step, every, self.target_bits)
                if projected:
                    lams = projected
                    self._estimate_positions(None)
                loss = train_step(self.model, opt, x, y, None if dense else self.teacher, cfg.distill, cfg.temperature)
                lr = opt.param_groups[0]["lr"]
                sched.step()
                if not dense:
                    self.method.after_step(lr, cfg.rho)
                yield self._emit(StepRecord(
                    self._phase(dense), epoch * self.steps_per_epoch + step_in_epoch, epoch, loss, lr,
                ))
                if self._stop.is_set():
                    break
            if self._stop.is_set():
                break
            record = self._epoch_record(dense, epoch, lams, time.perf_counter() - tic)
            yield self._emit(record)
            if self._healthy(record.accuracy):
                self._save(epoch + 1, opt, sched, dense_accuracy, elapsed + time.perf_counter() - started, record.accuracy)

        if math.isnan(dense_accuracy):  # stopped during dense pre-training
            dense_accuracy = self._accuracy(None)
        seconds = elapsed + time.perf_counter() - started
        yield self._emit(self._final_record(dense_accuracy, seconds))

    # --- pieces ---------------------------------------------------------------------
    @property
    def finetune_epoch(self) -> int:
        """The epoch at which admm's final phase (training in the deployed shape) starts:
        at least one epoch when asked for, and never before one epoch of ADMM (-1: none)."""
        cfg = self.config
        epochs = min(cfg.epochs - 1, max(1, round(cfg.finetune * cfg.epochs)))
        if cfg.method != "admm" or cfg.finetune == 0 or epochs < 1:
            return -1
        return cfg.dense_epochs + cfg.epochs - epochs

    def _phase(self, dense: bool) -> str:
        if dense:
            return "dense"
        return "finetune" if self._frozen_target is not None else "admm"

    def _freeze(self) -> None:
        """Fit the current weights to the live target and train in that shape from now on."""
        target = self.target_bits
        alloc, _ = self.fit(self.method.deployable, target)
        self.method.freeze(alloc)
        if self._frozen_target is not None:
            self._notes.append(f"target moved to {target:.0f} bits during the final phase: re-projected, "
                               "fine-tuning started again")
        self._frozen_target = target

    def _keep_teacher(self) -> None:
        """The dense model, frozen, as the distillation teacher (only when distilling)."""
        if self.config.distill > 0 and self.teacher is None:
            self.teacher = copy.deepcopy(self.model).eval().requires_grad_(False)

    def _optimizer(self, dense: bool):
        epochs = self.config.dense_epochs if dense else self.config.epochs
        return make_optimizer(self.model, self.config, epochs, self.steps_per_epoch)

    def _accuracy(self, alloc: Allocation | None) -> float:
        return accuracy(self.model, self.data, dict(zip(self.names, alloc.values)) if alloc else None)

    def _emit(self, record: Record) -> Record:
        if self.run_dir:
            self.run_dir.append(record)
        return record

    def _layers(self, alloc: Allocation) -> list[LayerRecord]:
        residual, dual = self.method.residuals()
        nnz = alloc.nnz.tolist()
        return [
            LayerRecord(s.name, s.numel, k, k / s.numel, int(b), float(r), float(d))
            for s, k, b, r, d in zip(self.specs, nnz, alloc.bits.tolist(), residual, dual)
        ]

    def _epoch_record(self, dense: bool, epoch: int, lams: tuple[float, float], seconds: float) -> EpochRecord:
        step = (epoch + 1) * self.steps_per_epoch
        target = self.target_bits
        if dense:
            return dense_epoch_record(self.model, self.data, epoch, step, seconds, self.dense_bits)
        alloc = self.method.frozen or self.method.deployable(target)
        size = self._size(alloc)
        residual, dual = self.method.residuals()
        note, self._notes = "; ".join(self._notes), []
        return EpochRecord(
            self._phase(False), epoch, step, self._accuracy(alloc), size, self.dense_bits / size,
            target, lams[0], lams[1], float(residual.sum()), float(dual.square().sum().sqrt()), seconds,
            self._layers(alloc), note,
        )

    def _initial_density(self) -> float:
        """A first guess of the kept fraction before any projection: the target at ~4 bits a weight."""
        return min(1.0, self.target_bits / (4.0 * sum(self._numel)))

    def _estimate_positions(self, density: float | None) -> None:
        """File mode (admm only): refresh the position cost per weight from the layers'
        densities, a first guess or those of the last projection."""
        if isinstance(self.accounting, FileAccounting):
            if density is None:
                self.accounting.set_density(self.method.density())
            else:
                self.accounting.set_density(torch.full((len(self.specs),), density))

    def packed(self, alloc: Allocation) -> dict[str, PackedLayer]:
        """The compressed layers of an allocation, as the codec stores them."""
        return {
            name: PackedLayer(spec.shape, int(bits), book.cpu(), mask.cpu(), codes.cpu())
            for name, spec, bits, book, mask, codes in zip(
                self.names, self.specs, alloc.bits.tolist(), alloc.codebooks, alloc.masks, alloc.codes
            )
        }

    def encode(self, alloc: Allocation) -> bytes:
        """The .jcz bytes of the model with this allocation's compressed weights."""
        keys = ("model", "data", "input_shape", "num_classes")
        spec = {k: self.meta[k] for k in keys if k in self.meta} if "model" in self.meta else None
        return encode(self.model, self.packed(alloc), spec)

    def fit(self, deploy: Callable[[float], Allocation], target: float) -> tuple[Allocation, int]:
        """The allocation `deploy` makes at the largest budget whose size fits `target`, and
        its file bytes: in file mode the real file is measured and the budget trimmed."""
        budget = target
        for _ in range(50):
            alloc = deploy(budget)
            file_bytes = len(self.encode(alloc))
            size = 8 * file_bytes if isinstance(self.accounting, FileAccounting) else alloc.size_bits
            if size <= target:
                return alloc, file_bytes
            budget -= (size - target) + 64
        raise RuntimeError(f"could not fit the model in {target:.0f} bits; please report this")

    def finish(self, deploy: Callable[[float], Allocation] | None = None) -> Allocation:
        """The deployable model, checked to fit the live target: the fine-tuned allocation of
        the final phase when there is one and it still fits, else a fresh projection."""
        target = self.target_bits
        frozen = self.method.frozen if deploy is None else None
        if frozen is not None and self._size(frozen) <= target:
            alloc, file_bytes = frozen, len(self.encode(frozen))
        else:
            alloc, file_bytes = self.fit(deploy or self.method.deployable, target)
        self.final, self.final_file_bytes, self.final_target = alloc, file_bytes, target
        return alloc

    def _size(self, alloc: Allocation) -> float:
        """The size of an allocation in the budget's accounting."""
        return 8.0 * len(self.encode(alloc)) if isinstance(self.accounting, FileAccounting) else alloc.size_bits

    def export(self, path: str) -> int:
        """Write the final deployable model as a .jcz file; returns its size in bytes."""
        if self.final is None:
            raise ValueError("nothing to export yet: run the engine (or restore a run) first")
        data = self.encode(self.final)
        atomic_write(path, data)
        return len(data)

    def plan(self, target: str | float | None = None) -> FinalRecord:
        """What the method would start from at `target` (default: the live one), without
        training: one joint projection of the current weights (the "what-if" view). It
        changes nothing in the engine: not its target, not what `export` writes."""
        bits_target = self._resolve(target) if target is not None else self.target_bits
        weights = [p.detach() for p in self.params]
        self._estimate_positions(self._initial_density())
        alloc, file_bytes = self.fit(lambda budget: self.projector.joint(weights, budget), bits_target)
        size = 8 * file_bytes if isinstance(self.accounting, FileAccounting) else alloc.size_bits
        return FinalRecord(
            self._accuracy(alloc), self._accuracy(None), size, bits_target, self.dense_bits / size, 0, 0.0,
            False, file_bytes, self.fp32_bytes / file_bytes, self._layers(alloc),
        )

    def restore(self) -> Allocation:
        """Load a saved run's state (no training) and compute its deployable model."""
        self._load()
        return self.finish()

    def _final_record(self, dense_accuracy: float, seconds: float) -> FinalRecord:
        alloc = self.finish()
        size = 8 * self.final_file_bytes if isinstance(self.accounting, FileAccounting) else alloc.size_bits
        record = FinalRecord(
            self._accuracy(alloc), dense_accuracy, size, self.final_target, self.dense_bits / size,
            self.config.epochs, seconds, self._stop.is_set(), self.final_file_bytes,
            self.fp32_bytes / self.final_file_bytes, self._layers(alloc),
        )
        if self.run_dir:
            self.export(str(self.run_dir.path / MODEL_FILE))
            self.run_dir.write_summary({
                "target_bits": record.target_bits, "size_bits": record.size_bits, "ratio": record.ratio,
                "budget_mode": self.config.budget_mode, "accuracy": record.accuracy,
                "dense_accuracy": record.dense_accuracy, "epochs": record.epochs, "seconds": record.seconds,
                "stopped": record.stopped, "file_bytes": record.file_bytes, "file_ratio": record.file_ratio,
                "layers": [{"name": l.name, "numel": l.numel, "nnz": l.nnz, "bits": l.bits} for l in record.layers],
            })
        return record

    def _healthy(self, accuracy: float) -> bool:
        """Whether an epoch's state is worth keeping to resume from: finite accuracy, and not
        a fall to chance from a state that was better (a divergence keeps the last good one)."""
        chance = 1.0 / self.data.num_classes
        return math.isfinite(accuracy) and (accuracy > chance or self._saved_accuracy <= chance)

    def _changes(self, saved: dict) -> dict:
        """The settings this resumed run changes, against the saved run's."""
        now = self.config.to_dict()
        return {k: v for k, v in now.items() if saved.get(k) != v}

    def _save(self, epochs_done: int, opt, sched, dense_accuracy: float, seconds: float, accuracy: float) -> None:
        if not self.run_dir:
            return
        self._saved_epochs, self._saved_accuracy = epochs_done, accuracy
        self.run_dir.save_state({
            "config": self.config.to_dict(), "accuracy": self._saved_accuracy,
            "epochs_done": epochs_done, "model": self.model.state_dict(), "method": self.method.state_dict(),
            "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "accounting": self.accounting.state_dict(),
            "target_bits": self.target_bits, "dense_accuracy": dense_accuracy, "seconds": seconds,
            "teacher": self.teacher.state_dict() if self.teacher is not None else None,
            "frozen_target": self._frozen_target,
        })

    def _load(self) -> dict | None:
        if not self.run_dir or not self.run_dir.has_state():
            raise FileNotFoundError("nothing to resume: the run folder has no saved state")
        state = self.run_dir.load_state()
        self.model.load_state_dict(state["model"])
        self.method.load_state_dict(state["method"])
        self.accounting.load_state_dict(state["accounting"])
        self._saved_epochs, self._saved_accuracy = int(state["epochs_done"]), float(state["accuracy"])
        self._frozen_target = state["frozen_target"]
        if state["teacher"] is not None:
            self.teacher = copy.deepcopy(self.model).eval().requires_grad_(False)
            self.teacher.load_state_dict(state["teacher"])
        if self.config.target == state["config"]["target"]:  # else the resumed run was given a new target
            with self._lock:
                self._target_bits = float(state["target_bits"])
        if state["epochs_done"] == self.config.dense_epochs:
            del state["optimizer"]  # ADMM starts with a fresh optimizer
        return state

"""The built-in classification trainer: dense pre-training (optional), then compression
by a `Compressor` (compressor.py) driven from this loop.

`Engine` is an iterator of records (see records.py). It can be stopped (`stop()`) and its
target moved (`set_target()`) from another thread; the next projection uses the new
target. With a run folder it saves a resumable state after every healthy epoch.

Given only a target, the run chooses its own learning rate: the peak rate is lowered to what the
sharpness of the model as attached allows (sharpness.py); and a step whose loss diverges (not
finite, or far above where it started: `_check_loss`) rolls the run back to the last good state
held in memory and halves the rate (`recover`).
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import math
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler

from . import distributed, whatif
from .budget import DENSE_BITS
from .compressor import CALIBRATION_SHARE, Compressor, CompressorConfig, compressible_weights
from .data import Dataset, Loaders
from .methods import METHODS, ProgressCallback, part_of
from .methods.posttrain import check_calibration_count
from .sharpness import sharpness, stable_lr
from .records import CurvePoint, EpochRecord, FinalRecord, Record, StartRecord, StepRecord
from .rundir import MODEL_FILE, STATE_FILE, RunDir
from .schedule import every_for_epoch

Data = Dataset | Loaders
TRADEOFF_SUBSET = 1000  # validation examples (evenly spread, `val_batches`) that score the trade-off curve
VAL_BATCH = 64  # validation examples scored at a time: a CIFAR ResNet on a CPU 3-4x faster than 1,000 (BENCHMARKS.md)
TRADEOFF_SHARE = 0.1  # the most of a run's time its trade-off curves may take (`tradeoff=True`)
STARTS = ("dense", "calibrated")  # where a training method starts (EngineConfig.start)
log = logging.getLogger("jointcomp")
RECOVERIES = 3  # roll-backs after a diverging loss before a run gives up
DIVERGING_LOSS = 10.0  # a loss above this many times the larger of the first compressing step's and chance's diverges


@dataclass
class EngineConfig(CompressorConfig):
    """A run of the built-in trainer: the method's settings plus the training loop's."""

    epochs: int = 15
    dense_epochs: int = 0  # plain training first, for a model that is not pre-trained
    batch_size: int = 64  # of in-memory data sets (DataLoaders bring their own)
    lr: float = 0.05  # peak learning rate; lowered for compression by `auto_lr`
    auto_lr: bool = True  # lower the compression's peak rate to what the sharpness of the model as attached allows
    optimizer: str = "sgd"  # "sgd" (with momentum) or "adam"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: float = 1.0
    seed: int = 0
    device: str = "auto"  # "auto" = CUDA when available, else CPU
    tradeoff: bool = False  # record the accuracy/size trade-off around the target (the app), within TRADEOFF_SHARE of the time
    calibration: int = 512  # training inputs posttrain (and a calibrated start) sees, drawn by `seed`
    start: str = "dense"  # a training method starts from the weights as they are, or from the post-training result

    @property
    def calibrates(self) -> bool:
        """Whether a run of this config calibrates: a method without training, or the calibrated start."""
        return not METHODS[self.method].trains or self.start == "calibrated"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.epochs < 1 or self.dense_epochs < 0:
            raise ValueError("epochs must be at least 1 and dense_epochs at least 0")
        for name in ("lr", "momentum", "weight_decay", "warmup_epochs"):
            if not math.isfinite(getattr(self, name)) or getattr(self, name) < 0:
                raise ValueError(f"{name} must be a finite number of at least 0, got {getattr(self, name)}")
        if self.start not in STARTS:
            raise ValueError(f"start must be {' or '.join(map(repr, STARTS))}, got {self.start!r}")
        if self.calibrates:
            check_calibration_count(self.calibration)  # said before any training, not after it
        elif self.calibration < 1:
            raise ValueError(f"calibration must be at least 1 input, got {self.calibration}")
        if self.batch_size < 1 or self.lr == 0:
            raise ValueError("batch_size and lr must be positive")
        if self.optimizer not in ("sgd", "adam"):
            raise ValueError(f"optimizer must be 'sgd' or 'adam', got {self.optimizer!r}")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but no CUDA GPU is available; use --device cpu")
    return torch.device(name)


def make_optimizer(model: nn.Module, config: EngineConfig, epochs: int, steps_per_epoch: int, lr: float | None = None):
    """The configured optimizer with a warm-up + cosine learning-rate schedule over `epochs`,
    peaking at `lr` (default: the config's)."""
    params = list(model.parameters())
    lr = config.lr if lr is None else lr
    if config.optimizer == "adam":
        opt = torch.optim.Adam(params, lr=lr, weight_decay=config.weight_decay)
    else:
        opt = torch.optim.SGD(params, lr=lr, momentum=config.momentum, weight_decay=config.weight_decay)
    steps = max(1, epochs * steps_per_epoch)
    warmup = max(1, round(config.warmup_epochs * steps_per_epoch))

    def factor(t: int) -> float:
        return min(1.0, (t + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(t, steps) / steps))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _sampler(data: Dataset, seed: int) -> DistributedSampler:
    """This process's share of the training examples: all of them when it runs alone, every
    N-th of one shuffled order under torchrun (so the N shares of a step form the batch one
    process would take at N x the batch size)."""
    return DistributedSampler(range(len(data.train_y)), num_replicas=distributed.world_size(),
                              rank=distributed.rank(), shuffle=True, seed=seed * 1_000_003)


def steps_per_epoch(data: Data, batch_size: int) -> int:
    if isinstance(data, Loaders):
        return len(data.train)
    return math.ceil(len(_sampler(data, 0)) / batch_size)


def batches(data: Data, config: EngineConfig, epoch: int, device: torch.device):
    """The training batches of one epoch. In memory: shuffled and augmented (the data set's
    `augment`), both depending only on seed and epoch (and shared out between the processes of
    a torchrun); DataLoaders: their own order (a DistributedSampler gets the epoch)."""
    if isinstance(data, Loaders):
        sampler = getattr(data.train, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        for x, y in data.train:
            yield x.to(device), y.to(device)
        return
    sampler = _sampler(data, config.seed)
    sampler.set_epoch(epoch)
    order = torch.tensor(list(sampler))
    generator = torch.Generator().manual_seed(config.seed * 1_000_003 + epoch)  # the augmentation's draws
    for i in range(0, len(order), config.batch_size):
        idx = order[i : i + config.batch_size]
        x = data.train_x[idx].to(device)
        yield (data.augment(x, generator) if data.augment else x), data.train_y[idx].to(device)


def calibration_inputs(data: Data, count: int, seed: int, device: torch.device, size: int = 128) -> list[torch.Tensor]:
    """`count` training inputs, drawn at random by `seed` without augmentation (DataLoaders: their
    first ones), in batches of `size`: what a method that calibrates sees. A training set smaller than
    `count` gives all it has, and says so."""
    if isinstance(data, Loaders):
        found, taken = [], 0
        for x, _ in data.train:
            found.append(x[: count - taken].to(device))
            taken += len(found[-1])
            if taken >= count:
                break
    else:
        order = torch.randperm(len(data.train_y), generator=torch.Generator().manual_seed(seed))[:count]
        found, taken = [data.train_x[i].to(device) for i in order.split(size)], len(order)
    if taken < count:
        log.info("calibrating on all %d training inputs: %d were asked for (--calibration)", taken, count)
    return found


def val_batches(data: Data, device: torch.device, size: int = VAL_BATCH, limit: int | None = None):
    """The validation set in batches; `limit`: only that many examples, evenly spread over it (every
    k-th: a set stored class by class, as CIFAR-10's folders are, is sampled across its classes;
    its first 1,000 are all airplanes), or a DataLoader's first ones."""
    if isinstance(data, Loaders):
        taken = 0
        for x, y in data.val:
            if limit is not None:
                x, y = x[: limit - taken], y[: limit - taken]
                taken += len(y)
            yield x.to(device), y.to(device)
            if limit is not None and taken >= limit:
                return
        return
    count = len(data.val_y)
    if limit is None or limit >= count:
        for i in range(0, count, size):
            yield data.val_x[i : i + size].to(device), data.val_y[i : i + size].to(device)
        return
    for chunk in torch.linspace(0, count - 1, limit, dtype=torch.float64).round().long().split(size):
        yield data.val_x[chunk].to(device), data.val_y[chunk].to(device)


def set_base_lr(opt: torch.optim.Optimizer, sched, lr: float) -> None:
    """Give a loaded optimizer and schedule a new peak learning rate (a resumed run's --lr,
    or a recovery's lower one)."""
    sched.base_lrs = [lr] * len(opt.param_groups)
    for group, factor in zip(opt.param_groups, sched.lr_lambdas):
        group["initial_lr"] = lr
        group["lr"] = lr * factor(sched.last_epoch)


def train_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
               loss_fn: Callable = nn.functional.cross_entropy, compressor: Compressor | None = None) -> float:
    """One optimizer step on `loss_fn`, mixed with the compressor's distillation when
    given; returns the loss."""
    model.train()
    opt.zero_grad(set_to_none=True)
    output = model(x)
    loss = loss_fn(output, y)
    if compressor is not None:
        loss = compressor.distill(x, output, loss)
    if not torch.isfinite(loss):
        raise FloatingPointError("training diverged (the loss is not finite)")
    loss.backward()
    opt.step()
    return loss.item()


@torch.no_grad()
def accuracy(model: nn.Module, data: Data, limit: int | None = None) -> float:
    """Validation accuracy (top-1) of `model` on `data` (on `limit` examples if given, `val_batches`).
    On a CPU a model with convolutions is scored in channels_last whatever layout it is in, and
    put back after: LeNet-5 scores 2.9x faster than in the layout a loaded file has, a CIFAR
    ResNet 1.15-1.26x (BENCHMARKS.md), and the same weights always score the same."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    convolutional = _channels_last_pays(model, device)
    laid_out = [(t, t.data) for t in [*model.parameters(), *model.buffers()] if convolutional and t.dim() == 4]
    if convolutional:
        model.to(memory_format=torch.channels_last)
    correct = total = 0
    try:
        for x, y in val_batches(data, device, limit=limit):
            if convolutional and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            correct += int((model(x).argmax(1) == y).sum())
            total += len(y)
    finally:
        for tensor, original in laid_out:  # the very tensors it had: .to() would leave a 1x1 kernel's strides changed
            tensor.data = original
        model.train(was_training)
    return correct / max(total, 1)


def _channels_last_pays(model: nn.Module, device: torch.device) -> bool:
    """Whether `model` runs faster in channels_last here: on a CPU, with a Conv2d."""
    return device.type == "cpu" and any(isinstance(m, nn.Conv2d) for m in model.modules())


def place(model: nn.Module, device: torch.device, training: bool = True) -> nn.Module:
    """`model` moved to `device`. For training on a CPU, a model with convolutions is also put
    in channels_last memory format, which makes a CIFAR ResNet's step 1.2-1.5x faster there
    (bench/step_speed.py); `training=False` puts it back in the layout a model loaded from a
    file has, the layout a user's own code expects. Only the layout changes, never a value."""
    model.to(device)
    if _channels_last_pays(model, device):
        model.to(memory_format=torch.channels_last if training else torch.contiguous_format)
    return model


def dense_steps(model: nn.Module, opt: torch.optim.Optimizer, sched, data: Data, config: EngineConfig, epoch: int,
                device: torch.device, loss_fn: Callable = nn.functional.cross_entropy) -> Iterator[StepRecord]:
    """The plain training steps of one epoch (no compression): `train_dense`'s and the Engine's."""
    spe = steps_per_epoch(data, config.batch_size)
    for i, (x, y) in enumerate(batches(data, config, epoch, device)):
        loss = train_step(model, opt, x, y, loss_fn)
        lr = opt.param_groups[0]["lr"]
        sched.step()
        yield StepRecord("dense", epoch * spe + i, epoch, loss, lr)


def train_dense(model: nn.Module, data: Data, config: EngineConfig, epochs: int) -> Iterator[Record]:
    """Plain training (no compression) for `epochs`; yields step and epoch records."""
    device = pick_device(config.device)
    place(model, device)
    torch.manual_seed(config.seed)
    spe = steps_per_epoch(data, config.batch_size)
    opt, sched = make_optimizer(model, config, epochs, spe)
    dense_bits = float(DENSE_BITS * sum(w.numel() for _, w, _ in compressible_weights(model, config)))
    for epoch in range(epochs):
        tic = time.perf_counter()
        yield from dense_steps(model, opt, sched, data, config, epoch, device)
        if epoch == epochs - 1:
            place(model, device, training=False)
        yield dense_epoch_record(accuracy(model, data), epoch, (epoch + 1) * spe, time.perf_counter() - tic, dense_bits)


def first_batch_stable_lr(model: nn.Module, data: Data, config: EngineConfig, lr: float, device: torch.device,
                          loss: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]) -> tuple[float, float]:
    """`lr`, lowered to what the sharpness of `loss(model, x, y)` on the first training batch
    allows (SGD only: Adam's steps do not scale with the curvature); and that sharpness. The
    loss is evaluated once, in eval mode, at the weights as they are before the measurement
    perturbs them (a distilling loss keeps its teacher then; BatchNorm statistics stay)."""
    if config.optimizer != "sgd":
        return lr, float("nan")
    x, y = next(iter(batches(data, config, 0, device)))
    with torch.no_grad():
        loss(model.eval(), x, y)
    model.train()
    curvature = distributed.from_main(sharpness(model, lambda: loss(model, x, y)))
    return stable_lr(lr, curvature, config.momentum), curvature


def dense_epoch_record(score: float, epoch: int, step: int, seconds: float, dense_bits: float) -> EpochRecord:
    nan = float("nan")
    return EpochRecord("dense", epoch, step, score, dense_bits, 1.0, nan, nan, nan, nan, nan, seconds)


class Engine:
    """Compress `model` on `data` to `config.target`; iterate it to run.

    `data` is an in-memory `Dataset` or `Loaders` (any iterables of (x, y) batches);
    `loss(output, y)` defaults to cross-entropy and `evaluate(model)` to validation accuracy;
    `dense_metric`: `evaluate(model)` where the caller has it (a ResNet-56's whole validation set
    is 14 s on a CPU; not scored again), for a run without dense epochs; `calibration`: a compressor
    without training already calibrated on a copy of `model` (the app's what-ifs), whose measurements a
    run without training or a calibrated start takes where it saw the same inputs and weights
    (`Compressor.calibrate`'s `reuse`).
    """

    def __init__(
        self,
        model: nn.Module,
        data: Data,
        config: EngineConfig,
        run_dir: str | None = None,
        resume: bool = False,
        meta: dict | None = None,
        overwrite: bool = False,
        loss: Callable | None = None,
        evaluate: Callable[[nn.Module], float] | None = None,
        progress: ProgressCallback | None = None,
        dense_metric: float | None = None,
        calibration: Compressor | None = None,
    ) -> None:
        distributed.init_from_env(config.device)  # under torchrun: join the other processes
        self.config = config
        self.progress = progress  # hears how far a calibration and an allocation without training are (no records
        # come while they run); default a bar on the terminal
        self.meta = meta or {}  # stored with the run's config and in the file (model and data names)
        self.calibration = calibration
        self.device = pick_device(distributed.local_device(config.device))
        self.model = place(model, self.device)
        self.train_model = (DistributedDataParallel(self.model, device_ids=[self.device] if self.device.type == "cuda" else None)
                            if distributed.active() else self.model)  # DDP averages the gradients
        self.data = data
        self.loss = loss or nn.functional.cross_entropy
        self.evaluate = evaluate or (lambda m: accuracy(m, data))
        self.steps_per_epoch = steps_per_epoch(data, config.batch_size)
        self.run_path = Path(run_dir) if run_dir else None
        main = distributed.is_main()  # only rank 0 writes the run folder
        self.run_dir = RunDir(run_dir, resume=resume, overwrite=overwrite) if run_dir and main else None
        self.resume = resume
        self._stop = threading.Event()
        self._lock = threading.Lock()  # guards swapping the compressor against set_target
        self.compressor = self._attach(config.target, dense_metric if config.dense_epochs == 0 else None)
        self._saved_epochs, self._saved_score = 0, float("-inf")  # the state a resume starts from
        self._good: dict | None = None  # the last good state in memory, for `_recover`
        self._recoveries = 0
        self._loss_scale: float | None = None  # of `_check_loss`: set by the first compressing step
        self._curve_seconds = 0.0  # spent on trade-off curves, kept within TRADEOFF_SHARE of the run

    def _attach(self, target: str | float, dense_metric: float | None = None) -> Compressor:
        """A compressor on the model as it is now (the start of compression), scored unless
        `dense_metric` is its score."""
        cfg = self.config
        return Compressor(
            self.model, target, steps=cfg.epochs * self.steps_per_epoch, evaluate=self.evaluate, meta=self.meta,
            dense_metric=dense_metric,
            config=dataclasses.replace(
                cfg, project_every=cfg.project_every or every_for_epoch(self.steps_per_epoch)),
        )

    # --- control from other threads -------------------------------------------------
    @property
    def target_bits(self) -> float:
        return self.compressor.target_bits

    @property
    def dense_bits(self) -> float:
        return self.compressor.dense_bits

    def set_target(self, target: str | float) -> float:
        """Change the target of the running compression; returns it in bits."""
        with self._lock:
            return self.compressor.set_target(target)

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
        changes = self._changes(state["config"]) if state else {}
        if self.run_dir and (changes or not state):
            self.run_dir.write_config({**self.meta, "compress": cfg.to_dict()})
        if self.run_dir and not state:
            self.run_dir.start_history()

        comp = self.compressor
        yield self._emit(StartRecord(
            cfg.epochs if comp.method.trains else 0, self.steps_per_epoch, cfg.dense_epochs, comp.dense_bits,
            comp.target_bits, comp.names, str(self.device), done, changes,
        ))
        if not state and cfg.dense_epochs == 0:
            yield from self._compression_start()
        elif state and (done > cfg.dense_epochs or cfg.dense_epochs == 0) and comp.method.trains:
            comp.batchnorm_inputs = self._calibration_inputs()  # what its start measured BatchNorm on
        trains = comp.method.trains or done < cfg.dense_epochs  # else no optimizer (its first costs 1.5 s: torch imports its compiler)
        opt, sched = self._optimizer(dense=done < cfg.dense_epochs) if trains else (None, None)
        if trains and state and "optimizer" in state:
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            if {"lr", "auto_lr"} & set(changes):  # the resumed run was given a learning rate
                set_base_lr(opt, sched, cfg.lr)
        if not state:  # a state to come back to, whatever happens in the first epoch
            self._save(0, opt, sched, 0.0, float("-inf"))

        try:
            yield from self._epochs(done, opt, sched, elapsed, started)
        except FloatingPointError as err:
            tried = f" ({self._recoveries} roll-backs to a good state at lower learning rates did not help)" if self._recoveries else ""
            where = (f"; the run folder keeps the state after epoch {self._saved_epochs}: resume it with a "
                     f"lower learning rate (--resume {self.run_dir.path} --lr {cfg.lr / 10:g})") if self.run_dir else ""
            raise FloatingPointError(f"{err}{tried}{where}") from None

    def _epochs(self, done: int, opt, sched, elapsed: float, started: float) -> Iterator[Record]:
        cfg, spe = self.config, self.steps_per_epoch
        trains = self.compressor.method.trains
        for epoch in range(done, cfg.dense_epochs + (cfg.epochs if trains else 0)):
            dense = epoch < cfg.dense_epochs
            if epoch == cfg.dense_epochs and epoch > 0:  # compression starts from the dense-trained model
                self._reattach()
                yield from self._compression_start()
                opt, sched = self._optimizer(dense=False)
            tic = time.perf_counter()
            first: int | None = 0
            while first is not None:
                try:
                    yield from self._steps(epoch, first, dense, opt, sched)
                    first = None
                except FloatingPointError as err:
                    first = self._recover(err, dense, opt, sched)
            if self._stop.is_set():
                break
            if dense:
                record = dense_epoch_record(self.evaluate(self.model), epoch, (epoch + 1) * spe,
                                            time.perf_counter() - tic, self.dense_bits)
            else:
                record = self._shift(self.compressor.end_epoch())
                if cfg.tradeoff and self._curve_seconds <= TRADEOFF_SHARE * (time.perf_counter() - started):
                    record.curve = self._curve()
            yield self._emit(record)
            if self._healthy(record.accuracy):
                self._save(epoch + 1, opt, sched, elapsed + time.perf_counter() - started, record.accuracy)

        if self.compressor.step_count == 0 and cfg.dense_epochs > 0:  # stopped during dense training
            self._reattach()
        if not trains:  # compression without training, from the model as it is now
            self.compressor.calibrate(self._calibration_inputs(),
                                      part_of(self.progress, 0.0, CALIBRATION_SHARE, "calibrating"), self.calibration)
        yield self._emit(self._final_record(elapsed + time.perf_counter() - started,
                                            None if trains else part_of(self.progress, CALIBRATION_SHARE, 1.0)))

    def _compression_start(self) -> Iterator[Record]:
        """A training method's start. With `start` "calibrated", the post-training result at the
        target, from calibration inputs drawn from the training data (its record is the run's
        first point). From either start, the deployable model's BatchNorm statistics are measured
        for its own weights on those inputs: the trained ones go stale when masks and codes move."""
        comp = self.compressor
        if comp.method.trains and self.config.start == "calibrated":
            yield self._emit(self._shift(comp.calibrate(self._calibration_inputs(), self.progress, self.calibration)))
        elif comp.method.trains:
            comp.batchnorm_inputs = self._calibration_inputs()

    def _calibration_inputs(self) -> list[torch.Tensor]:
        return calibration_inputs(self.data, self.config.calibration, self.config.seed, self.device)

    def _steps(self, epoch: int, first: int, dense: bool, opt, sched) -> Iterator[Record]:
        """The training steps of one epoch from its batch `first` on, until a stop is asked."""
        steps = (dense_steps(self.train_model, opt, sched, self.data, self.config, epoch, self.device, self.loss)
                 if dense else self._compression_steps(epoch, first, opt, sched))
        for record in steps:
            yield self._emit(record)
            if self._stopping():
                return

    def _compression_steps(self, epoch: int, first: int, opt, sched) -> Iterator[StepRecord]:
        """One epoch's compressing steps from its batch `first` on; a good state is kept in
        memory at every projection interval, to come back to."""
        for i, (x, y) in enumerate(batches(self.data, self.config, epoch, self.device)):
            if i < first:
                continue
            if self.compressor.schedule.projects(i):
                self._good = copy.deepcopy({
                    "batch": i, "model": self.model.state_dict(), "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(),
                    "compressor": {**self.compressor.state_dict(), "teacher": None}})  # the teacher never changes
            loss = train_step(self.train_model, opt, x, y, self.loss, self.compressor)
            self._check_loss(loss)
            lr = opt.param_groups[0]["lr"]
            sched.step()
            yield self._shift(self.compressor.step(lr, loss))

    def _check_loss(self, loss: float) -> None:
        """Raise FloatingPointError when `loss` says training diverged: above DIVERGING_LOSS x the larger of
        the first compressing step's loss and chance's (log of the classes). Caught there, before the weights
        run off to 1e17 with a loss still finite, the last good state in memory is one worth coming back to."""
        if self._loss_scale is None:
            self._loss_scale = max(loss, math.log(self.data.num_classes))
        if loss > DIVERGING_LOSS * self._loss_scale:
            raise FloatingPointError(f"training diverged (the loss rose to {loss:.3g}, over {DIVERGING_LOSS:g} times "
                                     f"{self._loss_scale:.3g})")

    def _recover(self, err: FloatingPointError, dense: bool, opt, sched) -> int:
        """After a non-finite loss: back to the last good state held in memory, at half the
        learning rate or what the sharpness there allows, if lower; returns the batch of the
        epoch to go on from. Re-raises `err` in dense training, under torchrun (the processes
        would have to agree) and after RECOVERIES tries."""
        if dense or self._good is None or distributed.active() or self._recoveries >= RECOVERIES:
            raise err
        self._recoveries += 1
        failed_at = self.config.dense_epochs * self.steps_per_epoch + self.compressor.step_count
        good = copy.deepcopy(self._good)  # loading shares tensors with the state: keep this one intact
        self.model.load_state_dict(good["model"])
        opt.load_state_dict(good["optimizer"])
        sched.load_state_dict(good["scheduler"])
        self.compressor.load_state_dict(good["compressor"])
        old = sched.base_lrs[0]
        lr, _ = self._stable_lr(old / 2)
        set_base_lr(opt, sched, lr)
        self.compressor.note(f"recovered at step {failed_at}: learning rate {old:.3g} -> {lr:.3g} "
                             "(the loss diverged; back to the last good state)")
        return good["batch"]

    def _compression_lr(self) -> float:
        """The peak learning rate of compression: the config's, lowered (`auto_lr`, SGD) to
        what the sharpness of the model as attached allows on the first batch, with the loss
        it will train on (distillation included)."""
        cfg = self.config
        if not cfg.auto_lr or self.compressor.step_count > 0 or not self.compressor.method.trains:
            return cfg.lr
        lr, curvature = self._stable_lr(cfg.lr)
        if lr < cfg.lr:
            self.compressor.note(f"learning rate {cfg.lr:g} -> {lr:.3g}: the model as attached has sharpness "
                                 f"{curvature:.3g}, and SGD is stable only below {2 * (1 + cfg.momentum) / curvature:.3g}")
        return lr

    def _stable_lr(self, lr: float) -> tuple[float, float]:
        """`lr`, lowered to what the sharpness of the compression's loss (distillation
        included) at the model's weights allows; and that sharpness."""
        def loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            output = model(x)
            return self.compressor.distill(x, output, self.loss(output, y))

        return first_batch_stable_lr(self.model, self.data, self.config, lr, self.device, loss)

    # --- pieces ---------------------------------------------------------------------
    def _curve(self) -> list[CurvePoint]:
        """The trade-off around the target now (whatif.tradeoff), timed against TRADEOFF_SHARE:
        a curve is drawn at an epoch's end only while the curves so far took at most that share
        of the run, so on a network whose epochs are shorter than a curve it comes every few epochs."""
        tic = time.perf_counter()
        curve = whatif.tradeoff(self.compressor, evaluate=lambda m: accuracy(m, self.data, TRADEOFF_SUBSET))
        self._curve_seconds += time.perf_counter() - tic
        return curve

    def _stopping(self) -> bool:
        """Whether to stop now: asked here, or (under torchrun) asked of rank 0."""
        if distributed.active() and distributed.from_main(float(self._stop.is_set())):
            self._stop.set()
        return self._stop.is_set()

    def _reattach(self) -> None:
        with self._lock:
            self.compressor = self._attach(f"{self.compressor.target_bits!r}{self.compressor.accounting.unit}")

    def _shift(self, record):
        """A compressor record placed after the dense pre-training epochs."""
        offset = self.config.dense_epochs
        return dataclasses.replace(record, epoch=record.epoch + offset, step=record.step + offset * self.steps_per_epoch)

    def _optimizer(self, dense: bool):
        if dense:
            return make_optimizer(self.model, self.config, self.config.dense_epochs, self.steps_per_epoch)
        return make_optimizer(self.model, self.config, self.config.epochs, self.steps_per_epoch, self._compression_lr())

    def _emit(self, record: Record) -> Record:
        if self.run_dir:
            self.run_dir.append(record)
        return record

    @property
    def final(self):
        """The allocation that `export` writes (after the run, or `restore`)."""
        return self.compressor.final

    def export(self, path: str) -> int:
        """Write the final deployable model as a .jcz file; returns its size in bytes."""
        return self.compressor.export(path)

    def checkpoint(self) -> bytes:
        """The final deployable model as .jcz bytes."""
        if self.final is None:
            raise ValueError("nothing to export yet: run the engine (or restore a run) first")
        return self.compressor.encode(self.final)

    def plan(self, target: str | float | None = None) -> FinalRecord:
        """The what-if at `target`: see `whatif.plan` (changes nothing)."""
        return whatif.plan(self.compressor, target)

    def restore(self) -> FinalRecord:
        """Load a saved run's state (no training) and compute its deployable model."""
        self._load()
        return self._finish()

    def _final_record(self, seconds: float, progress: ProgressCallback | None = None) -> FinalRecord:
        record = dataclasses.replace(self._finish(progress), seconds=seconds)
        if self.run_dir:
            self.export(str(self.run_dir.path / MODEL_FILE))
            self.run_dir.write_summary({**record.summary(), "budget_mode": self.config.budget_mode})
        return record

    def _finish(self, progress: ProgressCallback | None = None) -> FinalRecord:
        """The compressor's final record, computed in the layout the run computes in (posttrain's
        allocation is forward passes: faster there, and what the app's what-ifs compute), then the
        model put in the layout a loaded file has."""
        record = self.compressor.finish(progress)
        place(self.model, self.device, training=False)
        return record

    def _healthy(self, score: float) -> bool:
        """Whether an epoch's state is worth keeping to resume from: a finite score, and not
        a fall to chance from a state that was better (a divergence keeps the last good one)."""
        chance = 1.0 / self.data.num_classes
        return math.isfinite(score) and (score > chance or self._saved_score <= chance)

    def _changes(self, saved: dict) -> dict:
        """The settings this resumed run changes, against the saved run's."""
        now = self.config.to_dict()
        return {k: v for k, v in now.items() if saved.get(k) != v}

    def _save(self, epochs_done: int, opt, sched, seconds: float, score: float) -> None:
        if not self.run_dir:
            return
        self._saved_epochs, self._saved_score = epochs_done, score
        self.run_dir.save_state({
            "config": self.config.to_dict(), "accuracy": score, "epochs_done": epochs_done,
            "model": self.model.state_dict(), "compressor": self.compressor.state_dict(), "seconds": seconds,
            **({"optimizer": opt.state_dict(), "scheduler": sched.state_dict()} if opt else {}),
        })

    def _load(self) -> dict:
        if not self.run_path or not (self.run_path / STATE_FILE).is_file():
            raise FileNotFoundError("nothing to resume: the run folder has no saved state")
        if self.run_dir:  # rank 0 (or alone): also trims the history back to the state
            state = self.run_dir.load_state()
        else:
            state = torch.load(self.run_path / STATE_FILE, map_location="cpu", weights_only=True)
        try:
            self.model.load_state_dict(state["model"])
            self.compressor.load_state_dict(state["compressor"])
            self._saved_epochs, self._saved_score = int(state["epochs_done"]), float(state["accuracy"])
        except (KeyError, IndexError, TypeError, ValueError, RuntimeError, AttributeError) as err:  # another layout, or edited
            why = (str(err).splitlines() or [""])[0]
            raise ValueError(f"cannot resume: {self.run_path / STATE_FILE} was saved by another jointcomp version or "
                             f"is damaged ({type(err).__name__} {why}); start a new run") from None
        if self.config.target != state["config"]["target"]:  # the resumed run was given a new target
            self.compressor.set_target(self.config.target)
        if state["epochs_done"] == self.config.dense_epochs:
            state.pop("optimizer", None)  # compression starts with a fresh optimizer
        return state

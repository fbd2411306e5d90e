"""The Compressor inside users' own training loops (real digits, real DataLoaders, real
files): a classifier with Adam and gradient accumulation, an autoencoder to a file size,
the built-in Engine as one such loop, and resuming from the user's own checkpoint.
Accuracies and sizes are recomputed here from the weights and the files, not taken from
the compressor's records."""
from __future__ import annotations

import copy
import dataclasses
import io
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from jointcomp import EngineConfig, Compressor, Engine, Loaders, load_compressed, whatif
from jointcomp.schedule import every_for_epoch
from jointcomp.records import EpochRecord, FinalRecord, StepRecord, to_json
from jointcomp.trainer import accuracy, batches, make_optimizer


def val_accuracy(model: nn.Module, data) -> float:
    with torch.no_grad():
        return float((model.eval()(data.val_x).argmax(1) == data.val_y).float().mean())


def paper_bits(model: nn.Module, names: list[str]) -> int:
    """bits x non-zeros of the named weights, the bits read off their distinct non-zero values."""
    state = model.state_dict()
    total = 0
    for name in names:
        nonzero = state[name][state[name] != 0]
        distinct = nonzero.unique().numel()
        total += max(1, math.ceil(math.log2(max(distinct, 2)))) * nonzero.numel()
    return total


def test_user_loop_with_adam_accumulation_and_custom_loss(trained_mlp, digits, tmp_path):
    dense = val_accuracy(copy.deepcopy(trained_mlp), digits)
    model = trained_mlp.train()
    gen = torch.Generator().manual_seed(0)
    loader = DataLoader(TensorDataset(digits.train_x, digits.train_y), batch_size=32, shuffle=True, generator=gen)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def my_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # label smoothing, by hand
        logp = logits.log_softmax(1)
        return -(0.9 * logp.gather(1, y[:, None]).squeeze(1) + 0.1 * logp.mean(1)).mean()

    epochs, accumulate = 10, 2
    comp = Compressor(model, target="50x", steps=epochs * (len(loader) // accumulate))
    for _ in range(epochs):
        for i, (x, y) in enumerate(loader):
            (my_loss(model(x), y) / accumulate).backward()
            if i % accumulate == accumulate - 1:
                opt.step()
                opt.zero_grad()
                comp.step(lr=opt.param_groups[0]["lr"])
    comp.finish()
    comp.convert_()
    path = tmp_path / "model.jcz"
    written = comp.export(str(path))

    assert path.stat().st_size == written
    fp32_weight_bits = 32 * sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    assert paper_bits(model, comp.names) <= fp32_weight_bits / 50
    reloaded = load_compressed(path, model=copy.deepcopy(model))
    for name, tensor in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name
    assert val_accuracy(model, digits) >= dense - 0.03


def test_autoencoder_to_a_file_size(digits, tmp_path):
    """A task that is not classification: reconstruct the 64 pixels through 24 numbers
    (MSE), compressed so that the .jcz file holds at most 3,000 bytes (the fp32 state dict
    takes 12.7 KB). Bound: the compressed model's error stays within 1.5x the dense one's
    and below half of what predicting the mean image costs."""
    torch.manual_seed(0)
    ae = nn.Sequential(nn.Flatten(), nn.Linear(64, 24), nn.ReLU(), nn.Linear(24, 64))
    x_train, x_val = digits.train_x.flatten(1), digits.val_x.flatten(1)
    loader = DataLoader(TensorDataset(x_train), batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.Adam(ae.parameters(), lr=3e-3)

    def mse(model: nn.Module) -> float:
        with torch.no_grad():
            return float(nn.functional.mse_loss(model(x_val), x_val))

    for _ in range(60):
        for (x,) in loader:
            opt.zero_grad()
            nn.functional.mse_loss(ae(x), x).backward()
            opt.step()
    dense_error = mse(ae)
    mean_error = float(nn.functional.mse_loss(x_train.mean(0).expand_as(x_val), x_val))

    epochs = 30
    comp = Compressor(ae, target="3000B", steps=epochs * len(loader), budget_mode="file")
    for _ in range(epochs):
        for (x,) in loader:
            opt.zero_grad()
            nn.functional.mse_loss(ae(x), x).backward()
            opt.step()
            comp.step(lr=opt.param_groups[0]["lr"])
    comp.finish()
    comp.convert_()
    path = tmp_path / "ae.jcz"
    comp.export(str(path))

    assert path.stat().st_size <= 3000
    restored = load_compressed(path, model=copy.deepcopy(ae))
    error = mse(restored)
    assert error <= 1.5 * dense_error
    assert error <= 0.5 * mean_error


def hand_written_loop(model, data, config, callback) -> Compressor:
    """What the Engine does, written out: same batches, optimizer, schedule and losses."""
    spe = math.ceil(len(data.train_y) / config.batch_size)
    torch.manual_seed(config.seed)
    every = config.project_every or every_for_epoch(spe)  # as the Engine chooses
    comp = Compressor(model, steps=config.epochs * spe, config=dataclasses.replace(config, project_every=every),
                      evaluate=lambda m: accuracy(m, data), callback=callback)
    opt, sched = make_optimizer(model, config, config.epochs, spe)
    for epoch in range(config.epochs):
        for x, y in batches(data, config, epoch, torch.device("cpu")):
            model.train()
            opt.zero_grad(set_to_none=True)
            logits = model(x)
            loss = comp.distill(x, logits, nn.functional.cross_entropy(logits, y))
            loss.backward()
            opt.step()
            lr = opt.param_groups[0]["lr"]
            sched.step()
            comp.step(lr, loss.item())
        comp.end_epoch()
    comp.finish()
    return comp


def timeless(records: list) -> list[str]:
    """Records as JSON (so that NaN equals NaN), wall-clock seconds left out."""
    return [to_json(dataclasses.replace(r, seconds=0.0) if hasattr(r, "seconds") else r) for r in records]


def test_engine_is_a_loop_over_compressor(trained_mlp, digits):
    config = EngineConfig(target="40x", epochs=4, device="cpu", auto_lr=False)  # the loop alone (auto_lr: test_defaults)
    engine_records = [r for r in Engine(copy.deepcopy(trained_mlp), digits, config)
                      if isinstance(r, (StepRecord, EpochRecord, FinalRecord))]
    hand_records: list = []
    hand_written_loop(copy.deepcopy(trained_mlp), digits, config, hand_records.append)
    assert {r.phase for r in hand_records if isinstance(r, EpochRecord)} == {"admm", "retrain", "finetune"}
    assert timeless(hand_records) == timeless(engine_records)


@pytest.mark.parametrize("cut", [1, 2, 4])  # after ADMM, while retraining, and in the final phase
def test_resume_from_state_dict_ends_identically(trained_mlp, digits, cut):
    config = EngineConfig(target="60x", epochs=5, retrain=0.4, finetune=0.4, device="cpu")
    spe = math.ceil(len(digits.train_y) / config.batch_size)
    cpu = torch.device("cpu")

    def start(model):
        comp = Compressor(model, steps=config.epochs * spe, config=dataclasses.replace(config, project_every=spe),
                          evaluate=lambda m: accuracy(m, digits))
        return comp, *make_optimizer(model, config, config.epochs, spe)

    def train(model, comp, opt, sched, epochs):
        for epoch in epochs:
            for x, y in batches(digits, config, epoch, cpu):
                opt.zero_grad()
                logits = model(x)
                comp.distill(x, logits, nn.functional.cross_entropy(logits, y)).backward()
                opt.step()
                comp.step(opt.param_groups[0]["lr"])
                sched.step()
            comp.end_epoch()

    whole = copy.deepcopy(trained_mlp)
    comp, opt, sched = start(whole)
    train(whole, comp, opt, sched, range(config.epochs))
    expected = comp.finish()

    first = copy.deepcopy(trained_mlp)
    comp, opt, sched = start(first)
    train(first, comp, opt, sched, range(cut))
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                "comp": comp.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    second = copy.deepcopy(trained_mlp)  # a new process: the dense model, then the checkpoint
    comp, opt, sched = start(second)
    second.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    sched.load_state_dict(saved["sched"])
    comp.load_state_dict(saved["comp"])
    train(second, comp, opt, sched, range(cut, config.epochs))
    resumed = comp.finish()

    assert timeless([resumed]) == timeless([expected])
    for name, tensor in whole.state_dict().items():
        assert torch.equal(second.state_dict()[name], tensor), name


def test_engine_takes_dataloaders(trained_mlp, digits):
    train = DataLoader(TensorDataset(digits.train_x, digits.train_y), batch_size=64, shuffle=True,
                       generator=torch.Generator().manual_seed(0))
    val = DataLoader(TensorDataset(digits.val_x, digits.val_y), batch_size=500)
    data = Loaders("digits", train, val, digits.num_classes, digits.input_shape)
    engine = Engine(trained_mlp, data, EngineConfig(target="30x", epochs=3, device="cpu"))
    records = list(engine)
    steps = [r for r in records if isinstance(r, StepRecord)]
    assert len(steps) == 3 * len(train)
    final = records[-1]
    assert [layer.label for layer in final.layers] == ["Linear 64→256", "Linear 256→128", "Linear 128→10"]
    model = copy.deepcopy(trained_mlp)
    model.load_state_dict({**model.state_dict(), **dict(zip(engine.compressor.names, engine.final.values))})
    assert paper_bits(model, engine.compressor.names) <= final.target_bits
    assert final.accuracy == pytest.approx(val_accuracy(model, digits))


def test_plan_and_bad_use_leave_nothing_behind(trained_mlp):
    before = {k: v.clone() for k, v in trained_mlp.state_dict().items()}
    comp = Compressor(trained_mlp, "50x", steps=10, budget_mode="file")
    density = comp.density.clone()
    target = comp.target_bits
    whatif.plan(comp, "80x")
    assert comp.target_bits == target and comp.final is None
    assert torch.equal(comp.density, density)
    for name, tensor in trained_mlp.state_dict().items():
        assert torch.equal(tensor, before[name])
    with pytest.raises(ValueError, match="call finish"):
        comp.export("never.jcz")
    with pytest.raises(ValueError, match="steps must be at least 1"):
        Compressor(trained_mlp, "50x", steps=0)
    with pytest.raises(ValueError, match="unknown layer type"):
        Compressor(trained_mlp, "50x", steps=10, layer_types=("Linearr",))
    late = Compressor(trained_mlp, "50x", steps=10)
    late.step(lr=0.01)
    x = torch.zeros(2, 1, 8, 8)
    with pytest.raises(ValueError, match="from the first step on"):
        late.distill(x, trained_mlp(x), torch.tensor(0.0))


@pytest.mark.parametrize("method", ["admm", "uniform", "sequential"])
def test_every_method_runs_through_the_same_phases_and_fits_a_moved_target(method, trained_mlp, digits):
    """Each method over a whole short run: its own first phase (admm, or pruning with the
    masks held for the baselines, and kept when they quantize), then the same retraining and final phase for all. The
    target moves during the first phase; the final model fits the new one and still classifies."""
    loader = list(zip(digits.train_x.split(64), digits.train_y.split(64)))
    epochs = 4
    opt = torch.optim.SGD(trained_mlp.parameters(), lr=0.02, momentum=0.9)
    comp = Compressor(trained_mlp, target="50x", method=method, steps=epochs * len(loader))
    names = [n for n, _ in trained_mlp.named_parameters() if n.endswith("weight")]
    phases, pruned = [], None
    for epoch in range(epochs):
        if epoch == 1:
            comp.set_target("80x")
        for x, y in loader:
            opt.zero_grad()
            nn.functional.cross_entropy(trained_mlp(x), y).backward()
            opt.step()
            record = comp.step(lr=0.02)
            zeros = {n: p.detach() == 0 for n, p in trained_mlp.named_parameters() if n in names}
            if record.phase == "prune" and epoch == 0:
                assert pruned is None or all(torch.equal(zeros[n], pruned[n]) for n in names), "a mask moved"
            if record.phase == "retrain" and phases[-1] == "prune":  # quantized with the masks it held
                assert all(torch.equal(zeros[n], pruned[n]) for n in names), "the masks changed at the freeze"
            pruned = zeros
            if record.phase != (phases or [None])[-1]:
                phases.append(record.phase)
        comp.end_epoch()
    final = comp.finish()
    assert phases == ["admm" if method == "admm" else "prune", "retrain", "finetune"]
    assert final.target_bits == comp.set_target("80x") and final.size_bits <= final.target_bits
    comp.convert_()
    assert (trained_mlp(digits.val_x).argmax(1) == digits.val_y).float().mean() > 0.85


@pytest.mark.parametrize("real_over_estimate", [0.8, 1.0, 1.15])
def test_trim_to_fit_uses_the_budget_whichever_way_the_estimate_errs(real_over_estimate):
    """A real size below the projection's estimate leaves budget unused unless the budget grows;
    one above it must shrink. Either way the result fits and uses nearly all of the target."""
    from jointcomp.compressor import trim_to_fit

    target = 100_000.0
    steps = [1.0 * k for k in range(0, 400_001, 37)]  # allocations come in discrete sizes
    deploy = lambda budget: max(s for s in steps if s <= budget)  # noqa: E731
    size = lambda estimate: estimate * real_over_estimate  # noqa: E731
    chosen = size(trim_to_fit(deploy, target, size))
    assert chosen <= target
    assert chosen >= 0.995 * target


@pytest.mark.parametrize("final_over_draft", [1.0, 1.002])
def test_trim_to_fit_searches_on_drafts_and_deploys_once_unless_it_no_longer_fits(final_over_draft):
    """posttrain's drafts have its final allocations' masks and bits without its pass per layer: the
    budget is searched on them and the costly allocation made once; where the final one's values
    move its real size over the target, the search runs again on final allocations, and fits."""
    from jointcomp.compressor import trim_to_fit

    target = 100_000.0
    steps = [1.0 * k for k in range(0, 400_001, 37)]
    draft = lambda budget: max(s for s in steps if s <= budget)  # noqa: E731
    deployed = []

    def deploy(budget):
        deployed.append(budget)
        return draft(budget) * final_over_draft

    chosen = trim_to_fit(deploy, target, lambda size: size, draft)
    assert chosen <= target and chosen >= 0.99 * target
    assert (len(deployed) == 1) == (final_over_draft == 1.0)


def test_whatifs_follow_the_weights(trained_mlp):
    """What-ifs of unchanged weights share their option tables; weights that moved get new ones,
    so a what-if after training is the one a fresh compressor on those weights gives."""
    comp = Compressor(copy.deepcopy(trained_mlp), "50x", steps=10)
    first = whatif.plan(comp, "80x")
    with torch.no_grad():
        comp.params[0].mul_(0.3)
        comp.params[2].mul_(3.0)
    moved = whatif.plan(comp, "80x")
    fresh = whatif.plan(Compressor(copy.deepcopy(comp.model), "50x", steps=10), "80x")

    def allocation(record):
        return [(layer.nnz, layer.bits) for layer in record.layers]

    assert allocation(fresh) != allocation(first)  # the change matters to the allocation
    assert allocation(moved) == allocation(fresh) and moved.size_bits == fresh.size_bits


def test_a_dense_score_the_caller_has_is_not_measured_again(trained_mlp, digits):
    """The app's what-if gets the dense accuracy the page already showed: a published ResNet-56's
    score is 6 s of its first what-if."""
    scored = []

    def evaluate(model: nn.Module) -> float:
        scored.append(model)
        return accuracy(model, digits)

    Compressor(copy.deepcopy(trained_mlp), "10x", method="posttrain", evaluate=evaluate, dense_metric=0.97)
    assert scored == []
    measured = Compressor(copy.deepcopy(trained_mlp), "10x", method="posttrain", evaluate=evaluate)
    assert len(scored) == 1 and measured.dense_metric == accuracy(trained_mlp, digits)

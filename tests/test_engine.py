"""The engine on real data (bundled digits): fits the target, stays accurate, obeys stop and
set_target, is deterministic and resumable. Sizes and accuracies are recomputed here from
the deployable weights, not read back from the engine's own records."""
from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
from torch import nn

from jointcomp import EngineConfig, Engine, FinalRecord, build_model
from jointcomp.records import EpochRecord, StepRecord
from jointcomp.trainer import accuracy, calibration_inputs


def evaluate(model: nn.Module, data, weights: dict[str, torch.Tensor] | None = None) -> float:
    model = copy.deepcopy(model).eval()
    if weights:
        state = model.state_dict()
        state.update(weights)
        model.load_state_dict(state)
    with torch.no_grad():
        return float((model(data.val_x).argmax(1) == data.val_y).float().mean())


def measured_size(engine: Engine) -> tuple[float, dict[str, torch.Tensor]]:
    """Paper size of the final deployable weights: bits from the codebook size, nnz counted."""
    total, weights = 0.0, {}
    for name, values, bits in zip(engine.compressor.names, engine.final.values, engine.final.bits.tolist()):
        nonzero = values[values != 0]
        assert nonzero.unique().numel() <= 2**bits  # really a 2^b-entry codebook
        total += bits * nonzero.numel()
        weights[name] = values
    return total, weights


def dense_bits(model: nn.Module) -> int:
    return 32 * sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))


def run(engine: Engine) -> list:
    return list(engine)


def test_50x_fits_and_stays_within_3_points(trained_mlp, digits):
    dense_acc = evaluate(trained_mlp, digits)
    engine = Engine(trained_mlp, digits, EngineConfig(target="50x", epochs=15, device="cpu"))
    records = run(engine)
    size, weights = measured_size(engine)
    assert size <= dense_bits(trained_mlp) / 50
    assert evaluate(trained_mlp, digits, weights) >= dense_acc - 0.03
    assert isinstance(records[-1], FinalRecord)
    assert records[-1].accuracy == pytest.approx(evaluate(trained_mlp, digits, weights))


def test_set_target_mid_run_moves_the_size(trained_mlp, digits):
    engine = Engine(trained_mlp, digits, EngineConfig(target="20x", epochs=6, device="cpu"))
    new_target = dense_bits(trained_mlp) / 100
    sizes = []
    for record in engine:
        if isinstance(record, EpochRecord) and record.epoch >= 0:  # after the calibrated start
            sizes.append(record.size_bits)
            if record.epoch == 1:
                engine.set_target("100x")
    assert all(s > new_target for s in sizes[:2])
    assert all(s <= new_target for s in sizes[2:])
    size, _ = measured_size(engine)
    assert size <= new_target


def test_set_target_rejects_infeasible(trained_mlp, digits):
    engine = Engine(trained_mlp, digits, EngineConfig(target="20x", epochs=1, device="cpu"))
    with pytest.raises(ValueError, match="outside what this model can reach"):
        engine.set_target("1b")


def test_stop_ends_within_one_step(trained_mlp, digits):
    engine = Engine(trained_mlp, digits, EngineConfig(target="50x", epochs=15, device="cpu"))
    steps, after_stop = 0, []
    for record in engine:
        if after_stop or steps == 30:
            after_stop.append(record)
            continue
        if isinstance(record, StepRecord):
            steps += 1
            if steps == 30:
                engine.stop()
    assert [type(r) for r in after_stop] == [FinalRecord]
    assert after_stop[0].stopped
    size, _ = measured_size(engine)
    assert size <= dense_bits(trained_mlp) / 50


def comparable(records):
    """Records without wall-clock fields, NaN written as a string (NaN != NaN)."""
    out = []
    for r in records:
        d = dataclasses.asdict(r)
        d.pop("seconds", None)
        out.append({k: "nan" if isinstance(v, float) and math.isnan(v) else v for k, v in d.items()})
    return out


def test_same_seed_same_records(trained_mlp, digits):
    config = EngineConfig(target="80x", epochs=4, device="cpu", seed=3)
    first = run(Engine(copy.deepcopy(trained_mlp), digits, config))
    second = run(Engine(copy.deepcopy(trained_mlp), digits, config))
    assert comparable(first) == comparable(second)
    other = run(Engine(copy.deepcopy(trained_mlp), digits, dataclasses.replace(config, seed=4)))
    assert comparable(other) != comparable(first)


def test_resume_after_interruption_matches_an_uninterrupted_run(trained_mlp, digits, tmp_path):
    config = EngineConfig(target="60x", epochs=5, device="cpu")
    whole = run(Engine(copy.deepcopy(trained_mlp), digits, config, run_dir=str(tmp_path / "whole")))

    interrupted = Engine(copy.deepcopy(trained_mlp), digits, config, run_dir=str(tmp_path / "cut"))
    for record in interrupted:
        if isinstance(record, StepRecord) and record.epoch == 3 and record.step % 23 == 5:
            break  # the process dies mid-epoch: no final record, no summary
    fresh_model = build_model("mlp", digits.input_shape, digits.num_classes)
    resumed = Engine(fresh_model, digits, config, run_dir=str(tmp_path / "cut"), resume=True)
    rest = run(resumed)
    size, _ = measured_size(resumed)
    assert size <= dense_bits(fresh_model) / 60
    assert comparable(rest[-1:]) == comparable(whole[-1:])
    history = resumed.run_dir.read_history()
    epochs = [r.epoch for r in history if isinstance(r, EpochRecord)]
    assert epochs == sorted(set(epochs)) == list(range(5))  # no epoch lost or repeated


def test_a_training_run_starts_from_the_post_training_result(trained_mlp, digits, monkeypatch):
    """The calibrated start is the post-training result at the target; given the compressor of a run
    without training on the same network (the app's what-ifs), it takes that calibration as it is."""
    from jointcomp.methods.posttrain import PostTrain

    dense = copy.deepcopy(trained_mlp.state_dict())
    posttrain = Engine(copy.deepcopy(trained_mlp), digits, EngineConfig(target="50x", method="posttrain", device="cpu"))
    run(posttrain)
    measured = []
    measure = PostTrain._calibrate
    monkeypatch.setattr(PostTrain, "_calibrate", lambda self, report: measured.append(self) or measure(self, report))
    engine = Engine(trained_mlp, digits, EngineConfig(target="50x", epochs=2, device="cpu", start="calibrated"),
                    calibration=posttrain.compressor)
    records = iter(engine)
    next(records)  # what will run
    start = next(records)
    assert measured == []
    assert isinstance(start, EpochRecord) and (start.phase, start.epoch) == ("posttrain", -1)
    final = posttrain.final
    for name, p, kept, values in zip(engine.compressor.names, engine.compressor.params, final.masks, final.values):
        # the weights training starts from: the post-training result where it keeps weights, the trained ones where it prunes
        assert torch.equal(p.detach()[kept], values[kept]), name
        assert torch.equal(p.detach()[~kept], dense[name][~kept]) and not torch.equal(values, dense[name]), name
    assert [int(m.sum()) for m in final.masks] == [layer.nnz for layer in start.layers]
    assert sum(layer.bits * layer.nnz for layer in start.layers) <= dense_bits(trained_mlp) / 50
    assert start.accuracy == pytest.approx(evaluate(trained_mlp, digits, dict(zip(engine.compressor.names, final.values))))
    rest = list(records)
    assert [r.epoch for r in rest if isinstance(r, EpochRecord)] == [0, 1]
    teacher = engine.compressor.teacher.state_dict()
    assert all(torch.equal(teacher[k], v) for k, v in dense.items())  # distillation still from the dense model

    model = build_model("mlp", digits.input_shape, digits.num_classes)
    model.load_state_dict(dense)
    from_dense = run(Engine(model, digits, EngineConfig(target="50x", epochs=1, device="cpu")))  # the default
    assert [r.epoch for r in from_dense if isinstance(r, EpochRecord)] == [0]  # no calibrated start
    with pytest.raises(ValueError, match="before its first step"):
        engine.compressor.calibrate([digits.train_x[:64]])


def test_a_sweep_calibrates_once_and_gives_what_runs_of_their_own_give(trained_mlp, digits, monkeypatch):
    """A sweep's runs without training see the same inputs through the same weights: the first
    measures its calibration, the others take it, and each ends where a run of its own would."""
    from jointcomp.app.runner import Sweep
    from jointcomp.methods.posttrain import PostTrain

    measured = []
    measure = PostTrain._calibrate
    monkeypatch.setattr(PostTrain, "_calibrate", lambda self, report: measured.append(self) or measure(self, report))
    config = EngineConfig(epochs=1, device="cpu")
    sweep = Sweep.compress(trained_mlp, digits, config, "mlp", ["50x", "200x"], ["posttrain", "uniform"])
    assert sweep.wait(timeout=600) and sweep.error is None
    assert [(r["target"], r["method"]) for r in sweep.results] == [
        ("50x", "posttrain"), ("50x", "uniform"), ("200x", "posttrain"), ("200x", "uniform")]
    assert len(measured) == 1
    alone = run(Engine(copy.deepcopy(trained_mlp), digits, dataclasses.replace(config, target="200x", method="posttrain")))
    assert len(measured) == 2
    assert sweep.results[2]["accuracy"] == alone[-1].accuracy and sweep.results[2]["size_bits"] == alone[-1].size_bits


def test_a_dense_score_the_caller_has_is_not_measured_again(trained_mlp, digits):
    """The app knows the dense start's whole-set score (a ResNet-56's is 14 s): a run given it
    scores only its own result, and reports the score it was given; with dense epochs the model
    it compresses is another, scored anew."""
    def counted(model: nn.Module) -> float:
        scored.append(1)
        return accuracy(model, digits)

    scored = []
    engine = Engine(copy.deepcopy(trained_mlp), digits, EngineConfig(method="posttrain", target="16x"),
                    evaluate=counted, dense_metric=0.25)
    final = [r for r in engine if isinstance(r, FinalRecord)][-1]
    assert final.dense_accuracy == 0.25 and len(scored) == 1
    pretrained = Engine(copy.deepcopy(trained_mlp), digits, EngineConfig(dense_epochs=1, epochs=1, target="16x"),
                        dense_metric=0.25)
    final = [r for r in pretrained if isinstance(r, FinalRecord)][-1]
    assert final.dense_accuracy > 0.5


def test_layer_bounds_keep_a_layer_dense_and_limit_bits(trained_mlp, digits):
    from jointcomp import LayerBounds

    config = EngineConfig(
        target="30x", epochs=3, device="cpu",
        bounds={"5.weight": LayerBounds(dense=True), "1.weight": LayerBounds(min_bits=3, max_bits=4)},
    )
    engine = Engine(trained_mlp, digits, config)
    run(engine)
    assert "5.weight" not in engine.compressor.names
    bits = dict(zip(engine.compressor.names, engine.final.bits.tolist()))
    assert 3 <= bits["1.weight"] <= 4
    size, _ = measured_size(engine)
    assert size + 32 * trained_mlp[5].weight.numel() <= dense_bits(trained_mlp) / 30


def test_pretraining_from_scratch_records_dense_phase(digits):
    torch.manual_seed(0)
    model = build_model("mlp", digits.input_shape, digits.num_classes)
    records = run(Engine(model, digits, EngineConfig(target="50x", epochs=2, dense_epochs=2, device="cpu")))
    phases = [r.phase for r in records if isinstance(r, EpochRecord)]
    assert phases == ["dense", "dense", "retrain", "finetune"]  # ADMM for 40 % of the steps: its epoch ends retraining
    assert records[-1].dense_accuracy > 0.8


def test_deployable_batchnorm_statistics_are_those_of_its_own_weights(digits):
    """From the dense start too, the deployable model's BatchNorm statistics are measured for its
    projected weights on the calibration inputs: those of training belong to the weights before
    the projection (a BatchNorm network's accuracy swung by up to 38 points between epochs)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 64, bias=False), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 10))
    config = EngineConfig(target="50x", epochs=6, dense_epochs=1, device="cpu")
    engine = Engine(model, digits, config)
    next(r for r in engine if isinstance(r, EpochRecord) and r.phase == "admm")  # one ADMM epoch, then look
    comp = engine.compressor
    alloc = comp.allocation(comp.target_bits)
    inputs = calibration_inputs(digits, config.calibration, config.seed, torch.device("cpu"))
    batches = [x.flatten(1) @ alloc.values[0].T for x in inputs]  # the first BatchNorm's inputs
    assert torch.allclose(alloc.state["2.running_mean"], torch.stack([h.mean(0) for h in batches]).mean(0), atol=1e-5)
    assert torch.allclose(alloc.state["2.running_var"], torch.stack([h.var(0) for h in batches]).mean(0),
                          rtol=1e-4, atol=1e-6)


def test_while_codes_move_each_epochs_statistics_are_measured_for_its_weights(digits):
    """Retraining moves codes at every step and the running averages of training lag behind them (a
    conv-BN network at 500x scored 0.19-0.50 in its retraining epochs with them, 0.64-0.73 with
    statistics measured, BENCHMARKS.md): at a retraining epoch's end the model's own statistics are
    measured anew on the calibration inputs for the weights it has then. In the final phase codes are
    fixed and the running averages of many more inputs are kept."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 64, bias=False), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 10))
    config = EngineConfig(target="50x", epochs=6, dense_epochs=1, device="cpu")
    engine = Engine(model, digits, config)
    inputs = calibration_inputs(digits, config.calibration, config.seed, torch.device("cpu"))
    measured = {}
    for record in engine:
        if isinstance(record, EpochRecord) and record.phase in ("retrain", "finetune") and record.phase not in measured:
            batches = [x.flatten(1) @ model[1].weight.detach().T for x in inputs]  # the BatchNorm's inputs now
            measured[record.phase] = torch.allclose(model[2].running_mean, torch.stack([h.mean(0) for h in batches]).mean(0),
                                                    atol=1e-5)
    assert measured == {"retrain": True, "finetune": False}


def test_model_with_nothing_to_compress(digits):
    model = nn.Sequential(nn.Flatten(), nn.BatchNorm1d(64))
    with pytest.raises(ValueError, match="no Conv2d/Linear weights to compress"):
        Engine(model, digits, EngineConfig(device="cpu"))


@pytest.mark.parametrize("target", ["0x", "abc", "1b", "0.5x", -1])
def test_bad_targets(trained_mlp, digits, target):
    with pytest.raises(ValueError):
        Engine(trained_mlp, digits, EngineConfig(target=target, device="cpu"))


def test_bad_config_values():
    with pytest.raises(ValueError):
        EngineConfig(epochs=0)
    with pytest.raises(ValueError):
        EngineConfig(optimizer="lbfgs")


def test_resume_needs_saved_state(trained_mlp, digits, tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        Engine(trained_mlp, digits, EngineConfig(device="cpu"), run_dir=str(tmp_path / "none"), resume=True)
    assert not (tmp_path / "none").exists()  # resuming never creates the folder


def truncate(path):
    path.write_bytes(path.read_bytes()[:500])


def drop_latent(path):
    """A state as an earlier version saved it: its method state had no "latent"."""
    state = torch.load(path, weights_only=True)
    del state["compressor"]["method"]["latent"]
    torch.save(state, path)


def older_layout(path):
    """A state saved by a jointcomp whose saved layout had another version number."""
    state = torch.load(path, weights_only=True)
    state["compressor"]["version"] = 1
    torch.save(state, path)


def edited_books(path):
    """A state whose method's warm-start codebooks were replaced by something that is not a tensor."""
    state = torch.load(path, weights_only=True)
    state["compressor"]["method"]["books"] = "not a tensor"
    torch.save(state, path)


@pytest.mark.parametrize("damage", [truncate, drop_latent, older_layout, edited_books])
def test_damaged_or_foreign_state_file_is_reported(trained_mlp, digits, tmp_path, damage):
    config = EngineConfig(target="50x", epochs=1, device="cpu")
    run(Engine(copy.deepcopy(trained_mlp), digits, config, run_dir=str(tmp_path)))
    damage(tmp_path / "train_state.pt")
    engine = Engine(copy.deepcopy(trained_mlp), digits, config, run_dir=str(tmp_path), resume=True)
    with pytest.raises(ValueError, match="damaged") as caught:
        next(iter(engine))
    assert "\n" not in str(caught.value)
    if damage is older_layout:
        assert "layout 1, this one reads" in str(caught.value)


@pytest.mark.parametrize("share, curves", [(0.0, [0]), (math.inf, [0, 1, 2])])
def test_tradeoff_curves_stay_within_their_share_of_the_run(trained_mlp, digits, monkeypatch, share, curves):
    """A curve at an epoch's end only while the curves so far took at most TRADEOFF_SHARE of the
    run: with no share only the first epoch has one, with an unbounded share every epoch."""
    monkeypatch.setattr("jointcomp.trainer.TRADEOFF_SHARE", share)
    engine = Engine(copy.deepcopy(trained_mlp), digits, EngineConfig(target="50x", epochs=3, device="cpu", tradeoff=True))
    epochs = [r for r in run(engine) if isinstance(r, EpochRecord) and r.epoch >= 0]  # after the calibrated start
    assert [r.epoch for r in epochs if r.curve] == curves
    target = dense_bits(trained_mlp) / 50
    sizes = [point.size_bits for point in epochs[0].curve]
    assert min(sizes) <= target / 2 and max(sizes) >= 2 * target  # around the target, a quarter to four times it


def test_a_tradeoff_curve_prices_no_options_again(trained_mlp, digits, monkeypatch):
    """An ADMM epoch's curve projects the weights its deployable model was just made from, from
    the same option tables (the costliest part of a projection): a curve every epoch adds tables
    only in the later phases (whose epochs make no new deployable model), and each ADMM curve
    passes through its epoch's model."""
    import jointcomp.projector

    builds = []
    build = jointcomp.projector.joint_options_many
    monkeypatch.setattr(jointcomp.projector, "joint_options_many", lambda *a, **k: builds.append(1) or build(*a, **k))
    monkeypatch.setattr("jointcomp.trainer.TRADEOFF_SHARE", math.inf)
    counts, records = [], []
    for tradeoff in (False, True):
        builds.clear()
        config = EngineConfig(target="200x", epochs=6, device="cpu", tradeoff=tradeoff)
        records = [r for r in run(Engine(copy.deepcopy(trained_mlp), digits, config)) if isinstance(r, EpochRecord)]
        counts.append(len(builds))
    admm = [r for r in records if r.phase == "admm" and r.curve]
    later = [r for r in records if r.phase != "admm" and r.curve]
    assert counts[0] > 0 and len(later) > 0 and counts[1] == counts[0] + len(later)
    assert len(admm) >= 2
    for record in admm:
        at_target = [p for p in record.curve if p.size_bits == pytest.approx(record.target_bits, rel=0.01)]
        assert [p.file_bytes for p in at_target] == [record.file_bytes]


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_a_convolutional_model_is_scored_in_channels_last_and_left_as_it_was(digits, layout):
    """Scores are the same whatever layout a model is in (a file loads contiguous, training runs
    channels_last): every convolution sees channels_last inputs, and every tensor is laid out as
    before after (a 1x1 kernel is contiguous in both layouts, but its strides still pick a kernel)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 1), nn.Flatten(), nn.Linear(512, 10))
    model.to(memory_format=layout)
    strides = [p.stride() for p in model.parameters()]
    seen = []
    for conv in (model[0], model[2]):
        conv.register_forward_pre_hook(lambda _, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last)))
    score = accuracy(model, digits)
    assert seen and all(seen)
    assert [p.stride() for p in model.parameters()] == strides
    other = copy.deepcopy(model).to(memory_format=torch.channels_last if layout == torch.contiguous_format
                                    else torch.contiguous_format)
    assert accuracy(other, digits) == score


def test_a_validation_subset_is_spread_over_a_set_stored_class_by_class(trained_mlp, digits):
    """CIFAR-10's folders store the validation set class by class: its first 1,000 images are all
    airplanes. A subset that scores a trade-off curve or the app's sketch takes every k-th example,
    so each class counts as often as in the whole set."""
    order = digits.val_y.argsort(stable=True)
    by_class = dataclasses.replace(digits, val_x=digits.val_x[order], val_y=digits.val_y[order])
    limit = len(order) // 4
    assert len(by_class.val_y[:limit].unique()) <= 3  # the first quarter: a few of the ten classes
    first_class = nn.Linear(digits.val_x[0].numel(), digits.num_classes)
    with torch.no_grad():
        first_class.weight.zero_()
        first_class.bias.copy_(torch.arange(digits.num_classes, 0, -1).float())  # always says the first class
    model = nn.Sequential(nn.Flatten(), first_class)
    share = float((digits.val_y == by_class.val_y[0]).double().mean())
    assert accuracy(model, by_class, limit) == pytest.approx(share, abs=0.02)
    assert accuracy(trained_mlp, by_class, limit) == pytest.approx(accuracy(trained_mlp, digits), abs=0.05)

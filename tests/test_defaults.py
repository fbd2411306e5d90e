"""Only the target given: every kind of model compresses with the defaults and fits, a
diverging run rolls back and goes on at a lower rate, and a user's loop whose weights stop
being finite gets one clear error naming the step."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from jointcomp import EngineConfig, Compressor, Engine, EpochRecord, FinalRecord, StepRecord, build_model, load_dataset
from jointcomp.budget import parse_target
from jointcomp.data import Dataset
from jointcomp.sharpness import sharpness
from jointcomp.trainer import STARTS
from sizes import fp32_bits, paper_bits_in_file


def subset(data: Dataset, train: int = 256, val: int = 128) -> Dataset:
    return Dataset(data.name, data.train_x[:train], data.train_y[:train], data.val_x[:val], data.val_y[:val],
                   data.num_classes)


def conv_bn(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """A user's own network: convolutions with BatchNorm, not one of jointcomp's."""
    return nn.Sequential(
        nn.Conv2d(input_shape[0], 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, num_classes),
    )


MODELS = {
    "mlp": ("digits", lambda d: build_model("mlp", d.input_shape, d.num_classes)),
    "lenet5": ("fashion-mnist", lambda d: build_model("lenet5", d.input_shape, d.num_classes)),
    "resnet20": ("digits", lambda d: build_model("resnet20", d.input_shape, d.num_classes)),  # on 8 x 8 images: the
    # same network at a twelfth of Fashion-MNIST's pixels (its sharpness there took 41 of the test's 56 s)
    "torchvision:mobilenet_v3_small": (
        "fashion-mnist", lambda d: build_model("torchvision:mobilenet_v3_small", d.input_shape, d.num_classes)),
    "conv-bn factory": ("fashion-mnist", lambda d: conv_bn(d.input_shape, d.num_classes)),
}


@pytest.mark.parametrize("name", MODELS)
def test_the_defaults_compress_every_kind_of_model_to_its_target(name, tmp_path):
    data_name, build = MODELS[name]
    data = subset(load_dataset(data_name))
    torch.manual_seed(0)
    start = build(data)
    for target in ("10x", "500x", "2000x"):
        engine = Engine(copy.deepcopy(start), data, EngineConfig(target=target, epochs=1, device="cpu"))
        records = list(engine)
        losses = [r.loss for r in records if isinstance(r, StepRecord)]
        assert len(losses) == math.ceil(256 / EngineConfig.batch_size)
        assert {r.phase for r in records if isinstance(r, StepRecord)} == {"admm", "retrain", "finetune"}
        assert all(math.isfinite(loss) for loss in losses), (target, losses)
        engine.export(str(tmp_path / "model.jcz"))
        assert paper_bits_in_file(tmp_path / "model.jcz", start) <= parse_target(target, fp32_bits(start)), target


@pytest.mark.parametrize("start", STARTS)
def test_a_run_forced_to_diverge_rolls_back_and_says_so(trained_mlp, digits, start):
    """At lr=10 the weights run off within a few steps while the loss is still finite: the run sees the
    loss rise, goes back to a state from before (not one whose weights had already grown to 1e17, as a
    good state taken by the clock was) at a rate the sharpness there allows, and ends as a model that works."""
    config = EngineConfig(target="50x", epochs=3, lr=10.0, auto_lr=False, device="cpu", start=start)
    records = list(Engine(trained_mlp, digits, config))
    notes = " ".join(r.note for r in records if isinstance(r, EpochRecord))
    assert "recovered at step" in notes and "learning rate 10 -> " in notes
    assert next(r for r in records if isinstance(r, FinalRecord)).accuracy > 0.9
    steps = [r for r in records if isinstance(r, StepRecord)]
    assert steps[-1].step == 3 * math.ceil(len(digits.train_y) / config.batch_size) - 1  # the run went to its end
    assert math.isfinite(steps[-1].loss)
    assert max(r.lr for r in steps[-10:]) < 5.0  # it ended at a halved rate, or lower


def test_auto_lr_lowers_the_rate_to_what_the_sharpness_allows(trained_mlp, digits):
    sharp = copy.deepcopy(trained_mlp)
    with torch.no_grad():  # a sharper copy of the same function: the last layer x 30, the one before / 30
        sharp[-1].weight.mul_(30)
        sharp[-3].weight.div_(30)
        sharp[-3].bias.div_(30)
    engine = Engine(sharp, digits, EngineConfig(target="50x", epochs=1, device="cpu"))
    records = list(engine)
    note = next(r.note for r in records if isinstance(r, EpochRecord) and r.note)
    assert note.startswith("learning rate 0.05 -> ")
    chosen = float(note.split()[4].rstrip(":"))
    assert chosen < 0.05
    assert max(r.lr for r in records if isinstance(r, StepRecord)) <= chosen * (1 + 1e-6)  # the run used it

    plain = list(Engine(trained_mlp, digits, EngineConfig(target="50x", epochs=1, device="cpu")))
    assert max(r.lr for r in plain if isinstance(r, StepRecord)) > chosen  # the same function, less sharp: a higher rate


def test_sharpness_of_a_quadratic_is_its_largest_curvature():
    model = nn.Linear(3, 1, bias=False)
    scales = torch.tensor([1.0, 4.0, 9.0])
    value = sharpness(model, lambda: (scales * model.weight[0].square()).sum() / 2)
    assert value == pytest.approx(9.0, rel=1e-3)


def test_a_user_loop_with_non_finite_weights_gets_a_clear_error(trained_mlp, digits):
    comp = Compressor(trained_mlp, "50x", steps=100, project_every=5)
    opt = torch.optim.SGD(trained_mlp.parameters(), lr=1e30)
    with pytest.raises(FloatingPointError, match=r"^step (\d+): the weights are not finite") as caught:
        for i in range(100):
            x, y = digits.train_x[i * 8 : i * 8 + 8], digits.train_y[i * 8 : i * 8 + 8]
            opt.zero_grad()
            nn.functional.cross_entropy(trained_mlp(x), y).backward()
            opt.step()
            comp.step(lr=opt.param_groups[0]["lr"])
    assert int(caught.value.args[0].split()[1].rstrip(":")) % 5 == 0

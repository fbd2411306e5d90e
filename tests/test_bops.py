"""Bit-operations: counted on the model's own forward pass, checked against a count by hand, and met
as a target by the bops budget mode."""
import pytest
import torch
from torch import nn

import jointcomp
from jointcomp.bops import BOPS_UNITS, weight_uses
from jointcomp.budget import parse_target


class SharedNet(nn.Module):
    """A convolution, a Linear called twice (its weights work twice per input), and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)  # 1x8x8 -> 4x6x6
        self.shared = nn.Linear(36, 36)
        self.head = nn.Linear(36, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = nn.functional.max_pool2d(torch.relu(self.conv(x)), 2).flatten(1)  # 4x3x3 = 36
        return self.head(torch.relu(self.shared(torch.relu(self.shared(h)))))


# By hand: each of the convolution's 36 weights is multiplied once per output position (6 x 6 = 36);
# the shared Linear's once per call (2); the head's once. Dense: 32-bit weights x 32-bit activations.
USES = {"conv.weight": 36, "shared.weight": 2, "head.weight": 1}
DENSE_MACS = 36 * 36 + 36 * 36 * 2 + 36 * 10
INPUT = [1, 8, 8]


def test_each_weight_counts_the_multiply_accumulates_of_the_forward_pass():
    names = list(USES)
    assert weight_uses(SharedNet(), names, tuple(INPUT)).tolist() == [USES[n] for n in names]
    with pytest.raises(ValueError, match=r"does not run on one input of shape \[3, 8, 8\]"):
        weight_uses(SharedNet(), names, (3, 8, 8))


def batches(digits):
    return list(zip(digits.train_x.split(64), digits.train_y.split(64)))


def train(model, digits, comp=None, epochs=2, lr=0.05):
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    for _ in range(epochs):
        for x, y in batches(digits):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            if comp is not None:
                comp.step(lr=lr)
    return (model(digits.val_x).argmax(1) == digits.val_y).float().mean().item()


@pytest.fixture(scope="module")
def dense(digits):
    torch.manual_seed(0)
    model = SharedNet()
    assert train(model, digits, epochs=6) > 0.8
    return model


def test_every_final_record_reports_its_bit_operations_as_counted_by_hand(dense, digits):
    model = SharedNet()
    model.load_state_dict(dense.state_dict())
    comp = jointcomp.Compressor(model, "20x", steps=2 * len(batches(digits)), meta={"input_shape": INPUT})
    train(model, digits, comp)
    final = comp.finish()
    by_hand = sum(USES[l.name] * l.nnz * l.bits * 8 for l in final.layers)
    assert final.bops == by_hand
    assert final.bops_ratio == pytest.approx(DENSE_MACS * 32 * 32 / by_hand)
    assert final.size_bits == sum(l.nnz * l.bits for l in final.layers)  # the budget is still the paper's size
    unknown = jointcomp.Compressor(SharedNet(), "20x", steps=1).finish()  # no input shape: not counted, said so by 0
    assert (unknown.bops, unknown.bops_ratio) == (0.0, 0.0)


@pytest.mark.parametrize("method", ["admm", "sequential", "uniform"])
def test_the_bops_budget_mode_meets_its_target(dense, digits, method):
    model = SharedNet()
    model.load_state_dict(dense.state_dict())
    comp = jointcomp.Compressor(model, "3%", steps=2 * len(batches(digits)), budget_mode="bops", method=method,
                                meta={"input_shape": INPUT})
    target = 0.03 * DENSE_MACS * 32 * 32
    assert comp.target_bits == pytest.approx(target)
    accuracy = train(model, digits, comp)
    final = comp.finish()
    by_hand = sum(USES[l.name] * l.nnz * l.bits * 8 for l in final.layers)
    assert final.bops == final.size_bits == by_hand
    assert 0.9 * target < by_hand <= target  # met, not left on the table
    assert final.ratio == pytest.approx(1 / 0.03, rel=0.1)
    assert accuracy > 0.5  # it still learns


def test_a_bops_target_is_a_count_of_operations_and_needs_the_input_shape():
    dense_bops = DENSE_MACS * 32 * 32
    assert parse_target("5GBOPs", dense_bops, BOPS_UNITS) == 5e9
    assert parse_target("120kbops", dense_bops, BOPS_UNITS) == 120e3
    with pytest.raises(ValueError, match="unknown unit 'KB'.*bops, kbops, mbops, gbops"):
        parse_target("12KB", dense_bops, BOPS_UNITS)
    with pytest.raises(ValueError, match="bops budget mode counts the model's operations on one input"):
        jointcomp.Compressor(SharedNet(), "5%", steps=1, budget_mode="bops")
    with pytest.raises(ValueError, match="outside what this model can reach: between .*BOPs"):
        jointcomp.Compressor(SharedNet(), "10GBOPs", steps=1, budget_mode="bops", meta={"input_shape": INPUT})
